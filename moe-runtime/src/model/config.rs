//! Model shapes: presets and Hugging Face `config.json`.

use serde::{Deserialize, Serialize};

use super::family::{Family, QkNorm};

/// A model description that cannot be read (the planner reports it as
/// its own [`crate::plan::PlanError`]).
#[derive(Debug, thiserror::Error, PartialEq)]
pub enum ModelConfigError {
    #[error("unknown model {name:?}; known: {known}")]
    UnknownModel { name: String, known: String },
    #[error("bad input: {0}")]
    BadConfig(String),
}

/// The shape of an MoE decoder of one of the [`Family`]s.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ModelConfig {
    pub name: String,
    /// Which architecture (what the layer computes besides its shape).
    #[serde(default)]
    pub family: Family,
    /// Hidden size h.
    pub hidden: u64,
    /// Decoder layers L.
    pub layers: u64,
    pub heads: u64,
    pub kv_heads: u64,
    pub head_dim: u64,
    /// Experts E.
    pub experts: u64,
    /// Experts per token K.
    pub top_k: u64,
    /// Expert FFN intermediate size.
    pub ffn: u64,
    pub vocab: u64,
    /// Bytes per parameter and activation element (bf16: 2).
    pub dtype_bytes: u64,
    /// RoPE base (`rope_theta`).
    #[serde(default = "default_rope_theta")]
    pub rope_theta: f64,
    /// RMSNorm epsilon (`rms_norm_eps`).
    #[serde(default = "default_norm_eps")]
    pub norm_eps: f64,
    /// The router renormalises the chosen experts' weights to sum to one
    /// (Mixtral always; Qwen3-MoE when `norm_topk_prob`).
    #[serde(default = "default_norm_topk")]
    pub norm_topk: bool,
    /// The shared expert's FFN size (0: none), in the families that have
    /// one; it runs on the attention workers.
    #[serde(default)]
    pub shared_ffn: u64,
}

fn default_norm_topk() -> bool {
    true
}

fn default_rope_theta() -> f64 {
    1e6
}

fn default_norm_eps() -> f64 {
    1e-5
}

impl ModelConfig {
    /// GQA group size g = heads / kv_heads.
    pub fn gqa_group(&self) -> u64 {
        (self.heads / self.kv_heads.max(1)).max(1)
    }

    /// Attention parameters of one layer (q, k, v, o projections, norms).
    pub fn attention_params_per_layer(&self) -> u64 {
        let q = self.hidden * self.heads * self.head_dim;
        let kv = 2 * self.hidden * self.kv_heads * self.head_dim;
        let o = self.heads * self.head_dim * self.hidden;
        let router = self.hidden * self.experts;
        let qk_norm = match self.family.qk_norm() {
            None => 0,
            Some(QkNorm::PerHead) => 2 * self.head_dim,
            Some(QkNorm::Whole) => (self.heads + self.kv_heads) * self.head_dim,
        };
        let qkv_bias = if self.family.qkv_bias() {
            (self.heads + 2 * self.kv_heads) * self.head_dim
        } else {
            0
        };
        // The shared expert and its gate run beside attention.
        let shared =
            3 * self.hidden * self.shared_ffn + self.hidden * u64::from(self.shared_ffn > 0);
        q + kv + o + router + 2 * self.hidden + qk_norm + qkv_bias + shared
    }

    /// P_a: everything an attention node holds (all layers' attention,
    /// routers, embeddings and the LM head).
    pub fn attention_params(&self) -> u64 {
        self.layers * self.attention_params_per_layer() + 2 * self.vocab * self.hidden
    }

    /// Parameters of one expert in one layer (gate, up, down).
    pub fn expert_params_per_layer(&self) -> u64 {
        3 * self.hidden * self.ffn
    }

    /// P_e: what an expert node holds: one expert in every layer.
    pub fn expert_params(&self) -> u64 {
        self.layers * self.expert_params_per_layer()
    }

    pub fn total_params(&self) -> u64 {
        self.attention_params() + self.experts * self.expert_params()
    }

    /// KV-cache bytes of one token in one layer.
    pub fn kv_bytes_per_token_layer(&self) -> u64 {
        2 * self.kv_heads * self.head_dim * self.dtype_bytes
    }

    /// The presets: the paper's three models, and small shapes that run in
    /// seconds on a CPU (`tiny`, `qwen3-mini`, and `mixtral-mini` / `dbrx-mini`, which keep
    /// the published expert counts, top-k, a 4:1 GQA group and the FFN to
    /// hidden ratio).
    pub fn presets() -> Vec<ModelConfig> {
        let m =
            |name: &str, hidden, layers, heads, kv_heads, experts, top_k, ffn, vocab| ModelConfig {
                name: name.into(),
                family: Family::Mixtral,
                hidden,
                layers,
                heads,
                kv_heads,
                head_dim: hidden / heads,
                experts,
                top_k,
                ffn,
                vocab,
                dtype_bytes: 2,
                rope_theta: 1e6,
                norm_eps: 1e-5,
                norm_topk: true,
                shared_ffn: 0,
            };
        // Qwen2-57B-A14B's pattern: 64 experts top-8 not renormalised, GQA,
        // biased q/k/v, a gated shared expert 4 x the routed experts' size.
        let qwen2_moe_mini = ModelConfig {
            family: Family::Qwen2Moe,
            rope_theta: 1e4,
            norm_eps: 1e-6,
            norm_topk: false,
            shared_ffn: 256,
            ..m("qwen2-moe-mini", 128, 4, 8, 2, 64, 8, 64, 1024)
        };
        // Qwen3-30B-A3B's pattern at small size: 32 fine-grained experts,
        // top-8 renormalised, a head_dim of its own (q is 2 x hidden wide).
        let qwen3_mini = ModelConfig {
            family: Family::Qwen3Moe,
            head_dim: 32,
            rope_theta: 1e4,
            norm_eps: 1e-6,
            ..m("qwen3-mini", 128, 4, 8, 2, 32, 8, 64, 1024)
        };
        // OLMoE-1B-7B's pattern: 64 experts top-8 without renormalisation,
        // full multi-head attention, whole-projection query and key norms.
        let olmoe_mini = ModelConfig {
            family: Family::Olmoe,
            rope_theta: 1e4,
            norm_topk: false,
            ..m("olmoe-mini", 128, 4, 8, 8, 64, 8, 64, 1024)
        };
        vec![
            // Hugging Face mistralai/Mixtral-8x22B-v0.1.
            m("mixtral-8x22b", 6144, 56, 48, 8, 8, 2, 16384, 32768),
            // Hugging Face databricks/dbrx-base.
            m("dbrx", 6144, 40, 48, 8, 16, 4, 10752, 100352),
            // Scaled-MoE: the paper gives 317B parameters, 32 experts, top-4 but
            // no dimensions; these are an ASSUMPTION that lands on ~317B.
            m("scaled-moe", 8192, 48, 64, 8, 32, 4, 8192, 32000),
            // A tiny shape for tests and the end-to-end demo.
            m("tiny", 64, 2, 4, 2, 4, 2, 128, 320),
            // Mixtral's 8 experts, top-2, FFN = 2.67 x hidden; 8/2 heads;
            // 8 layers, so that the pipeline's fill and drain are amortised.
            m("mixtral-mini", 256, 8, 8, 2, 8, 2, 688, 1024),
            // DBRX's 16 experts, top-4, FFN = 1.75 x hidden; 8/2 heads.
            m("dbrx-mini", 256, 4, 8, 2, 16, 4, 448, 1024),
            qwen3_mini,
            olmoe_mini,
            qwen2_moe_mini,
        ]
    }

    /// A preset by name (case-insensitive), or an error listing them.
    pub fn preset(name: &str) -> Result<ModelConfig, ModelConfigError> {
        let all = Self::presets();
        all.iter()
            .find(|m| m.name.eq_ignore_ascii_case(name))
            .cloned()
            .ok_or_else(|| ModelConfigError::UnknownModel {
                name: name.into(),
                known: all
                    .iter()
                    .map(|m| m.name.clone())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// A Hugging Face `config.json` in its family's naming, which
    /// [`from_hf_config`](Self::from_hf_config) reads back to `self`.
    pub fn to_hf_config(&self) -> serde_json::Value {
        use serde_json::json;
        let mut v = json!({
            "architectures": [self.family.architecture()],
            "model_type": self.family.model_type(),
            "_name_or_path": self.name,
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "num_experts_per_tok": self.top_k,
            "vocab_size": self.vocab,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.norm_eps,
            "hidden_act": "silu",
            "tie_word_embeddings": false,
            "torch_dtype": "bfloat16",
        });
        // The Qwen families' every-layer-sparse settings.
        let sparse = json!({
            "moe_intermediate_size": self.ffn,
            // The dense MLP's size: unused while every layer is sparse.
            "intermediate_size": 3 * self.hidden,
            "decoder_sparse_step": 1,
            "mlp_only_layers": [],
            "use_sliding_window": false,
            "sliding_window": null,
        });
        let own = match self.family {
            Family::Mixtral => json!({
                "head_dim": self.head_dim,
                "num_local_experts": self.experts,
                "intermediate_size": self.ffn,
            }),
            Family::Qwen3Moe => json!({
                "head_dim": self.head_dim,
                "num_experts": self.experts,
                "norm_topk_prob": self.norm_topk,
                "attention_bias": false,
            }),
            Family::Qwen2Moe => json!({
                "num_experts": self.experts,
                "norm_topk_prob": self.norm_topk,
                "shared_expert_intermediate_size": self.shared_ffn,
            }),
            // OLMoE's head_dim is hidden / heads; it has no field for it.
            Family::Olmoe => json!({
                "num_experts": self.experts,
                "intermediate_size": self.ffn,
                "norm_topk_prob": self.norm_topk,
                "attention_bias": false,
                "clip_qkv": null,
            }),
        };
        let mut extend = |more: serde_json::Value| {
            if let (Some(v), serde_json::Value::Object(more)) = (v.as_object_mut(), more) {
                v.extend(more);
            }
        };
        if matches!(self.family, Family::Qwen3Moe | Family::Qwen2Moe) {
            extend(sparse);
        }
        extend(own);
        v
    }

    /// The kernels' view of one layer.
    pub fn layer_shape(&self) -> kernels::LayerShape {
        kernels::LayerShape {
            hidden: self.hidden as usize,
            heads: self.heads as usize,
            kv_heads: self.kv_heads as usize,
            head_dim: self.head_dim as usize,
            experts: self.experts as usize,
            top_k: self.top_k as usize,
            ffn: self.ffn as usize,
            rope_theta: self.rope_theta as f32,
            norm_eps: self.norm_eps as f32,
        }
    }

    /// Reads a Hugging Face `config.json` (Mixtral, Qwen3-MoE and DBRX
    /// naming). Lenient about the family (the planner reads shapes of
    /// families the runtime does not run); [`super::load_config`] checks
    /// it for a model to run.
    pub fn from_hf_config(name: &str, text: &str) -> Result<ModelConfig, ModelConfigError> {
        let v: serde_json::Value = serde_json::from_str(text)
            .map_err(|e| ModelConfigError::BadConfig(format!("{name}: {e}")))?;
        let family = Family::lenient(v.get("model_type").and_then(|t| t.as_str()));
        let get = |keys: &[&str]| -> Option<u64> {
            keys.iter().find_map(|k| {
                let mut cur = &v;
                for part in k.split('.') {
                    cur = cur.get(part)?;
                }
                cur.as_u64()
            })
        };
        let need = |keys: &[&str]| {
            get(keys).ok_or_else(|| {
                ModelConfigError::BadConfig(format!("{name}: none of {} is set", keys.join(", ")))
            })
        };
        let hidden = need(&["hidden_size", "d_model"])?;
        let heads = need(&["num_attention_heads", "n_heads"])?;
        let kv_heads = get(&["num_key_value_heads", "attn_config.kv_n_heads"]).unwrap_or(heads);
        let cfg = ModelConfig {
            name: name.into(),
            family,
            hidden,
            layers: need(&["num_hidden_layers", "n_layers"])?,
            heads,
            kv_heads,
            head_dim: get(&["head_dim"]).unwrap_or(hidden / heads.max(1)),
            experts: need(&[
                "num_local_experts",
                "ffn_config.moe_num_experts",
                "num_experts",
            ])?,
            top_k: need(&["num_experts_per_tok", "ffn_config.moe_top_k"])?,
            // Families with dense layers too name the experts' size apart.
            ffn: need(&[
                "moe_intermediate_size",
                "intermediate_size",
                "ffn_config.ffn_hidden_size",
            ])?,
            vocab: need(&["vocab_size"])?,
            dtype_bytes: 2,
            // Top level (transformers 4), in `rope_parameters`
            // (transformers 5), or DBRX's attention config.
            rope_theta: v
                .get("rope_theta")
                .or_else(|| v.get("rope_parameters").and_then(|r| r.get("rope_theta")))
                .or_else(|| v.get("attn_config").and_then(|a| a.get("rope_theta")))
                .and_then(|x| x.as_f64())
                .unwrap_or(default_rope_theta()),
            norm_eps: v
                .get("rms_norm_eps")
                .and_then(|x| x.as_f64())
                .unwrap_or(default_norm_eps()),
            // transformers' Qwen3MoeConfig defaults norm_topk_prob to false.
            norm_topk: match family {
                Family::Mixtral => true,
                Family::Qwen3Moe | Family::Olmoe | Family::Qwen2Moe => v
                    .get("norm_topk_prob")
                    .and_then(|x| x.as_bool())
                    .unwrap_or(false),
            },
            shared_ffn: if family.shared_expert() {
                need(&["shared_expert_intermediate_size"])?
            } else {
                0
            },
        };
        if cfg.heads == 0
            || cfg.kv_heads == 0
            || !cfg.heads.is_multiple_of(cfg.kv_heads)
            || !cfg.head_dim.is_multiple_of(2)
            || cfg.hidden == 0
            || cfg.vocab == 0
            || cfg.experts == 0
            || cfg.top_k == 0
            || cfg.top_k > cfg.experts
        {
            return Err(ModelConfigError::BadConfig(format!(
                "{name}: inconsistent shape {cfg:?}"
            )));
        }
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn presets_have_the_published_sizes() {
        let b = |name: &str| ModelConfig::preset(name).unwrap().total_params() as f64 / 1e9;
        // Mixtral-8x22B: 141B; DBRX: 132B; Scaled-MoE: 317B (assumed dimensions).
        assert!(
            (b("mixtral-8x22b") - 141.0).abs() < 3.0,
            "{}",
            b("mixtral-8x22b")
        );
        assert!((b("dbrx") - 132.0).abs() < 3.0, "{}", b("dbrx"));
        assert!((b("scaled-moe") - 317.0).abs() < 5.0, "{}", b("scaled-moe"));
    }

    #[test]
    fn hf_config_round_trips() {
        for m in ModelConfig::presets() {
            let text = m.to_hf_config().to_string();
            assert_eq!(ModelConfig::from_hf_config(&m.name, &text).unwrap(), m);
        }
    }

    #[test]
    fn shared_experts_and_biases_count_on_the_attention_side() {
        let q2 = ModelConfig::preset("qwen2-moe-mini").unwrap();
        let bare = ModelConfig {
            family: Family::Mixtral,
            shared_ffn: 0,
            ..q2.clone()
        };
        let (h, d) = (q2.hidden, q2.head_dim);
        let shared = 3 * h * q2.shared_ffn + h;
        let bias = (q2.heads + 2 * q2.kv_heads) * d;
        assert_eq!(
            q2.attention_params_per_layer(),
            bare.attention_params_per_layer() + shared + bias
        );
        // The experts' side is the routed experts alone.
        assert_eq!(q2.expert_params_per_layer(), 3 * h * q2.ffn);
    }

    #[test]
    fn unknown_model_lists_the_known_ones() {
        let err = ModelConfig::preset("gpt-5").unwrap_err().to_string();
        assert!(
            err.contains("mixtral-8x22b") && err.contains("dbrx"),
            "{err}"
        );
    }

    #[test]
    fn hugging_face_configs() {
        let mixtral = r#"{"hidden_size": 6144, "num_hidden_layers": 56, "num_attention_heads": 48,
            "num_key_value_heads": 8, "num_local_experts": 8, "num_experts_per_tok": 2,
            "intermediate_size": 16384, "vocab_size": 32768}"#;
        assert_eq!(
            ModelConfig::from_hf_config("mixtral-8x22b", mixtral).unwrap(),
            ModelConfig::preset("mixtral-8x22b").unwrap()
        );
        let dbrx = r#"{"d_model": 6144, "n_layers": 40, "n_heads": 48, "attn_config": {"kv_n_heads": 8},
            "ffn_config": {"moe_num_experts": 16, "moe_top_k": 4, "ffn_hidden_size": 10752}, "vocab_size": 100352}"#;
        assert_eq!(
            ModelConfig::from_hf_config("dbrx", dbrx).unwrap(),
            ModelConfig::preset("dbrx").unwrap()
        );
        // transformers 5 keeps the theta in `rope_parameters`.
        let v5 = r#"{"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4,
            "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 128,
            "vocab_size": 320, "rope_parameters": {"rope_type": "default", "rope_theta": 5000.0}}"#;
        assert_eq!(
            ModelConfig::from_hf_config("v5", v5).unwrap().rope_theta,
            5000.0
        );
        let err = ModelConfig::from_hf_config("x", r#"{"hidden_size": 1}"#)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("num_hidden_layers") || err.contains("num_attention_heads"),
            "{err}"
        );
    }
}
