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
    /// Layers whose FFN is one dense SwiGLU MLP instead of experts
    /// (DeepSeek-V3's first `first_k_dense_replace`; the Qwen families'
    /// `mlp_only_layers` and `decoder_sparse_step`). They run on the
    /// attention workers and have no M2N round.
    #[serde(default)]
    pub dense_layers: Vec<u64>,
    /// The dense layers' MLP size (`intermediate_size`).
    #[serde(default)]
    pub dense_ffn: u64,
    /// Multi-head latent attention's sizes (DeepSeek-V3), instead of GQA.
    #[serde(default)]
    pub mla: Option<Mla>,
    /// YaRN rope scaling, in the families that implement it.
    #[serde(default)]
    pub yarn: Option<Yarn>,
    /// Group-limited routing: the experts fall in `n_group` groups and a
    /// token's top-k are chosen from its best `topk_group` groups
    /// (DeepSeek-V3; 1 and 1 elsewhere).
    #[serde(default = "one")]
    pub n_group: u64,
    #[serde(default = "one")]
    pub topk_group: u64,
    /// The routed experts' weights are multiplied by this
    /// (`routed_scaling_factor`; 1 elsewhere).
    #[serde(default = "one_f64")]
    pub routed_scaling: f64,
}

/// Multi-head latent attention (DeepSeek-V2/V3): queries through an
/// optional low-rank pair, keys and values from one compressed latent per
/// token (what the KV cache holds, with the shared rope key).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Mla {
    /// `q_lora_rank` (0: one `q_proj`, as `q_lora_rank: null`).
    pub q_lora_rank: u64,
    pub kv_lora_rank: u64,
    pub qk_nope_head_dim: u64,
    pub qk_rope_head_dim: u64,
    pub v_head_dim: u64,
    /// Rope rotates interleaved pairs `(x0, x1), (x2, x3)...`
    /// (`rope_interleave`, DeepSeek's checkpoints) instead of halves.
    pub rope_interleave: bool,
}

impl Mla {
    /// A query's or key's width per head (`qk_nope_head_dim + qk_rope_head_dim`).
    pub fn qk_head_dim(&self) -> u64 {
        self.qk_nope_head_dim + self.qk_rope_head_dim
    }
}

/// YaRN rope scaling (transformers' `_compute_yarn_parameters`): the
/// inverse frequencies blend interpolation and extrapolation, and cos and
/// sin are scaled by an attention factor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Yarn {
    pub factor: f64,
    pub original_max_position_embeddings: u64,
    pub beta_fast: f64,
    pub beta_slow: f64,
    /// 0: not set.
    pub mscale: f64,
    /// 0: not set.
    pub mscale_all_dim: f64,
    /// Set explicitly (`attention_factor`), else derived from the mscales.
    pub attention_factor: Option<f64>,
    pub truncate: bool,
}

impl Yarn {
    fn get_mscale(scale: f64, mscale: f64) -> f64 {
        if scale <= 1.0 {
            1.0
        } else {
            0.1 * mscale * scale.ln() + 1.0
        }
    }

    /// The factor cos and sin are multiplied by.
    pub fn attention_factor(&self) -> f64 {
        self.attention_factor.unwrap_or_else(|| {
            if self.mscale != 0.0 && self.mscale_all_dim != 0.0 {
                Self::get_mscale(self.factor, self.mscale)
                    / Self::get_mscale(self.factor, self.mscale_all_dim)
            } else {
                Self::get_mscale(self.factor, 1.0)
            }
        })
    }

    /// DeepSeek's softmax scale multiplier (`yarn_apply_mscale`):
    /// `mscale(factor, mscale_all_dim)^2` when `mscale_all_dim` is set.
    pub fn softmax_scale(&self) -> f64 {
        if self.mscale_all_dim != 0.0 {
            let m = Self::get_mscale(self.factor, self.mscale_all_dim);
            m * m
        } else {
            1.0
        }
    }

    /// The inverse frequencies of a `dim`-wide rope with base `theta`.
    pub fn inv_freq(&self, dim: usize, theta: f64) -> Vec<f64> {
        let d = dim as f64;
        let correction = |rot: f64| {
            d * (self.original_max_position_embeddings as f64 / (rot * 2.0 * std::f64::consts::PI))
                .ln()
                / (2.0 * theta.ln())
        };
        let (mut low, mut high) = (correction(self.beta_fast), correction(self.beta_slow));
        if self.truncate {
            (low, high) = (low.floor(), high.ceil());
        }
        let (low, mut high) = (low.max(0.0), high.min(d - 1.0));
        if low == high {
            high += 0.001;
        }
        (0..dim / 2)
            .map(|i| {
                // transformers computes these in float32.
                let pos = (theta as f32).powf((2 * i) as f32 / dim as f32) as f64;
                let extra = 1.0 / pos;
                let inter = 1.0 / (self.factor * pos);
                let ramp = ((i as f64 - low) / (high - low)).clamp(0.0, 1.0);
                let keep = 1.0 - ramp;
                inter * (1.0 - keep) + extra * keep
            })
            .collect()
    }
}

fn one() -> u64 {
    1
}

fn one_f64() -> f64 {
    1.0
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

    /// Whether layer `l` has a dense MLP instead of experts.
    pub fn is_dense(&self, l: usize) -> bool {
        self.dense_layers.contains(&(l as u64))
    }

    /// The layers with experts (each one M2N round per micro-batch).
    pub fn moe_layers(&self) -> Vec<usize> {
        (0..self.layers as usize)
            .filter(|&l| !self.is_dense(l))
            .collect()
    }

    /// How many layers have experts.
    pub fn sparse_layers(&self) -> u64 {
        self.layers - self.dense_layers.len() as u64
    }

    /// Elements per token of one layer's KV cache, (keys, values): GQA's
    /// keys and values; MLA's compressed latent and its shared rope key.
    pub fn kv_widths(&self) -> (usize, usize) {
        match &self.mla {
            Some(m) => (m.kv_lora_rank as usize, m.qk_rope_head_dim as usize),
            None => {
                let kv = (self.kv_heads * self.head_dim) as usize;
                (kv, kv)
            }
        }
    }

    /// Self-attention's parameters in one layer (projections and their
    /// norms and biases).
    fn self_attention_params(&self) -> u64 {
        let (h, heads) = (self.hidden, self.heads);
        if let Some(m) = &self.mla {
            let q_out = heads * m.qk_head_dim();
            let q = if m.q_lora_rank > 0 {
                h * m.q_lora_rank + m.q_lora_rank + m.q_lora_rank * q_out
            } else {
                h * q_out
            };
            let kv = h * (m.kv_lora_rank + m.qk_rope_head_dim)
                + m.kv_lora_rank
                + m.kv_lora_rank * heads * (m.qk_nope_head_dim + m.v_head_dim);
            return q + kv + heads * m.v_head_dim * h;
        }
        let q = h * heads * self.head_dim;
        let kv = 2 * h * self.kv_heads * self.head_dim;
        let o = heads * self.head_dim * h;
        let qk_norm = match self.family.qk_norm() {
            None => 0,
            Some(QkNorm::PerHead) => 2 * self.head_dim,
            Some(QkNorm::Whole) => (heads + self.kv_heads) * self.head_dim,
        };
        let qkv_bias = if self.family.qkv_bias() {
            (heads + 2 * self.kv_heads) * self.head_dim
        } else {
            0
        };
        q + kv + o + qk_norm + qkv_bias
    }

    /// What an attention worker holds of layer `l`: self-attention, the
    /// two norms, and the router and shared expert (sparse layers) or the
    /// dense MLP (dense layers).
    pub fn attention_params_of_layer(&self, l: usize) -> u64 {
        let h = self.hidden;
        let ffn_side = if self.is_dense(l) {
            3 * h * self.dense_ffn
        } else {
            let router = h * self.experts
                + if self.family.router_bias() {
                    self.experts
                } else {
                    0
                };
            let gate = if self.family.shared_expert_gate() && self.shared_ffn > 0 {
                h
            } else {
                0
            };
            router + 3 * h * self.shared_ffn + gate
        };
        self.self_attention_params() + 2 * h + ffn_side
    }

    /// Attention-side parameters of a layer, the mean over the layers
    /// (they differ where some layers are dense).
    pub fn attention_params_per_layer(&self) -> u64 {
        let total: u64 = (0..self.layers as usize)
            .map(|l| self.attention_params_of_layer(l))
            .sum();
        total / self.layers.max(1)
    }

    /// P_a: everything an attention node holds (all layers' attention,
    /// routers, shared experts and dense MLPs, embeddings and the LM head).
    pub fn attention_params(&self) -> u64 {
        (0..self.layers as usize)
            .map(|l| self.attention_params_of_layer(l))
            .sum::<u64>()
            + 2 * self.vocab * self.hidden
    }

    /// Parameters of one expert in one layer (gate, up, down).
    pub fn expert_params_per_layer(&self) -> u64 {
        3 * self.hidden * self.ffn
    }

    /// P_e: what an expert node holds: one expert in every sparse layer.
    pub fn expert_params(&self) -> u64 {
        self.sparse_layers() * self.expert_params_per_layer()
    }

    pub fn total_params(&self) -> u64 {
        self.attention_params() + self.experts * self.expert_params()
    }

    /// Attention's FLOPs per query token and per token of its context, in
    /// one layer: GQA's scores and weighted values (`4 heads head_dim`);
    /// MLA's in the latent space (scores over latent and rope key, the
    /// weighted latent).
    pub fn attention_flops_per_context_token(&self) -> u64 {
        match &self.mla {
            Some(m) => 2 * self.heads * (2 * m.kv_lora_rank + m.qk_rope_head_dim),
            None => 4 * self.heads * self.head_dim,
        }
    }

    /// KV-cache bytes of one token in one layer.
    pub fn kv_bytes_per_token_layer(&self) -> u64 {
        let (k, v) = self.kv_widths();
        (k + v) as u64 * self.dtype_bytes
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
                dense_layers: Vec::new(),
                dense_ffn: 0,
                mla: None,
                yarn: None,
                n_group: 1,
                topk_group: 1,
                routed_scaling: 1.0,
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
        // DeepSeek-V3's pattern at small size: MLA with both low-rank
        // projections and interleaved rope under YaRN scaling, 64
        // fine-grained experts top-8 from the best 2 of 4 groups (sigmoid
        // scores, a score-correction bias, renormalised, scaled by 2.5),
        // one shared expert, and the first layer dense.
        let deepseek_v3_mini = ModelConfig {
            family: Family::DeepseekV3,
            head_dim: 16,
            rope_theta: 1e4,
            norm_eps: 1e-6,
            shared_ffn: 64,
            dense_layers: vec![0],
            dense_ffn: 320,
            mla: Some(Mla {
                q_lora_rank: 96,
                kv_lora_rank: 64,
                qk_nope_head_dim: 32,
                qk_rope_head_dim: 16,
                v_head_dim: 32,
                rope_interleave: true,
            }),
            yarn: Some(Yarn {
                factor: 4.0,
                original_max_position_embeddings: 64,
                beta_fast: 32.0,
                beta_slow: 1.0,
                mscale: 1.0,
                mscale_all_dim: 1.0,
                attention_factor: None,
                truncate: true,
            }),
            n_group: 4,
            topk_group: 2,
            routed_scaling: 2.5,
            ..m("deepseek-v3-mini", 128, 4, 8, 8, 64, 8, 64, 1024)
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
            deepseek_v3_mini,
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
            // The dense MLP's size (unused while every layer is sparse).
            "intermediate_size": if self.dense_ffn > 0 { self.dense_ffn } else { 3 * self.hidden },
            "decoder_sparse_step": 1,
            "mlp_only_layers": self.dense_layers,
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
            Family::DeepseekV3 => {
                let m = self.mla.as_ref().expect("DeepSeek-V3 has MLA");
                let first_k = self.dense_layers.len();
                debug_assert!(self
                    .dense_layers
                    .iter()
                    .enumerate()
                    .all(|(i, &l)| l == i as u64));
                json!({
                    "n_routed_experts": self.experts,
                    "moe_intermediate_size": self.ffn,
                    "intermediate_size": self.dense_ffn,
                    "n_shared_experts": self.shared_ffn / self.ffn.max(1),
                    "first_k_dense_replace": first_k,
                    "norm_topk_prob": self.norm_topk,
                    "n_group": self.n_group,
                    "topk_group": self.topk_group,
                    "routed_scaling_factor": self.routed_scaling,
                    "q_lora_rank": if m.q_lora_rank > 0 { json!(m.q_lora_rank) } else { json!(null) },
                    "kv_lora_rank": m.kv_lora_rank,
                    "qk_nope_head_dim": m.qk_nope_head_dim,
                    "qk_rope_head_dim": m.qk_rope_head_dim,
                    "v_head_dim": m.v_head_dim,
                    "rope_interleave": m.rope_interleave,
                    "attention_bias": false,
                    "max_position_embeddings": self.yarn.as_ref().map_or(4096, |y| {
                        (y.factor * y.original_max_position_embeddings as f64) as u64
                    }),
                    "rope_scaling": self.yarn.as_ref().map(|y| json!({
                        "type": "yarn",
                        "factor": y.factor,
                        "original_max_position_embeddings": y.original_max_position_embeddings,
                        "beta_fast": y.beta_fast,
                        "beta_slow": y.beta_slow,
                        "mscale": y.mscale,
                        "mscale_all_dim": y.mscale_all_dim,
                        "attention_factor": y.attention_factor,
                        "truncate": y.truncate,
                    })),
                })
            }
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
                "n_routed_experts",
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
                Family::Qwen3Moe | Family::Olmoe | Family::Qwen2Moe | Family::DeepseekV3 => v
                    .get("norm_topk_prob")
                    .and_then(|x| x.as_bool())
                    .unwrap_or(false),
            },
            shared_ffn: match family {
                Family::Qwen2Moe => need(&["shared_expert_intermediate_size"])?,
                Family::DeepseekV3 => {
                    get(&["n_shared_experts"]).unwrap_or(0) * need(&["moe_intermediate_size"])?
                }
                _ => 0,
            },
            dense_layers: Vec::new(),
            dense_ffn: 0,
            mla: None,
            yarn: None,
            n_group: 1,
            topk_group: 1,
            routed_scaling: 1.0,
        };
        let mut cfg = cfg;
        match family {
            Family::Qwen3Moe | Family::Qwen2Moe => {
                // transformers: layer l is sparse unless listed in
                // mlp_only_layers, and only every decoder_sparse_step-th.
                let only: Vec<u64> = v
                    .get("mlp_only_layers")
                    .and_then(|l| l.as_array())
                    .map(|a| a.iter().filter_map(|x| x.as_u64()).collect())
                    .unwrap_or_default();
                let step = get(&["decoder_sparse_step"]).unwrap_or(1).max(1);
                cfg.dense_layers = (0..cfg.layers)
                    .filter(|l| only.contains(l) || (l + 1) % step != 0)
                    .collect();
            }
            Family::DeepseekV3 => {
                let first_k = get(&["first_k_dense_replace"]).unwrap_or(0).min(cfg.layers);
                cfg.dense_layers = (0..first_k).collect();
                cfg.norm_topk = v
                    .get("norm_topk_prob")
                    .and_then(|x| x.as_bool())
                    .unwrap_or(true);
                cfg.n_group = get(&["n_group"]).unwrap_or(1);
                cfg.topk_group = get(&["topk_group"]).unwrap_or(1);
                cfg.routed_scaling = v
                    .get("routed_scaling_factor")
                    .and_then(|x| x.as_f64())
                    .unwrap_or(1.0);
                let mla = Mla {
                    q_lora_rank: get(&["q_lora_rank"]).unwrap_or(0),
                    kv_lora_rank: need(&["kv_lora_rank"])?,
                    qk_nope_head_dim: need(&["qk_nope_head_dim"])?,
                    qk_rope_head_dim: need(&["qk_rope_head_dim"])?,
                    v_head_dim: need(&["v_head_dim"])?,
                    rope_interleave: v
                        .get("rope_interleave")
                        .and_then(|x| x.as_bool())
                        .unwrap_or(true),
                };
                // transformers: head_dim is the rope part's width.
                cfg.head_dim = mla.qk_rope_head_dim;
                cfg.mla = Some(mla);
                cfg.yarn = read_yarn(&v, get(&["max_position_embeddings"]))
                    .map_err(|e| ModelConfigError::BadConfig(format!("{name}: {e}")))?;
            }
            Family::Mixtral | Family::Olmoe => {}
        }
        if !cfg.dense_layers.is_empty() {
            cfg.dense_ffn = need(&["intermediate_size"])?;
        }
        if cfg.heads == 0
            || cfg.kv_heads == 0
            || !cfg.heads.is_multiple_of(cfg.kv_heads)
            || !cfg.head_dim.is_multiple_of(2)
            || cfg.hidden == 0
            || cfg.vocab == 0
            || cfg.experts == 0
            || cfg.top_k == 0
            || cfg.top_k > cfg.experts
            || cfg.n_group == 0
            || !cfg.experts.is_multiple_of(cfg.n_group)
            || cfg.topk_group == 0
            || cfg.topk_group > cfg.n_group
            || cfg.top_k > cfg.topk_group * (cfg.experts / cfg.n_group)
            || cfg.sparse_layers() == 0
            || cfg.mla.as_ref().is_some_and(|m| {
                m.kv_lora_rank == 0 || m.qk_rope_head_dim % 2 != 0 || m.v_head_dim == 0
            })
        {
            return Err(ModelConfigError::BadConfig(format!(
                "{name}: inconsistent shape {cfg:?}"
            )));
        }
        Ok(cfg)
    }
}

/// YaRN scaling from `rope_scaling` (transformers 4 and the published
/// configs) or `rope_parameters` (transformers 5), if either says
/// "yarn"; `factor` defaults to `max_position_embeddings /
/// original_max_position_embeddings` as in transformers.
fn read_yarn(v: &serde_json::Value, max_pos: Option<u64>) -> Result<Option<Yarn>, String> {
    let Some(r) = ["rope_scaling", "rope_parameters"]
        .iter()
        .filter_map(|k| v.get(*k).filter(|r| !r.is_null()))
        .find(|r| {
            r.get("rope_type")
                .or_else(|| r.get("type"))
                .and_then(|t| t.as_str())
                == Some("yarn")
        })
    else {
        return Ok(None);
    };
    let f = |k: &str| r.get(k).and_then(|x| x.as_f64()).filter(|x| *x != 0.0);
    let original = r
        .get("original_max_position_embeddings")
        .and_then(|x| x.as_u64())
        .ok_or("yarn rope scaling without original_max_position_embeddings")?;
    let factor = match (f("factor"), max_pos) {
        (Some(x), _) => x,
        (None, Some(m)) => m as f64 / original as f64,
        (None, None) => return Err("yarn rope scaling without a factor".into()),
    };
    Ok(Some(Yarn {
        factor,
        original_max_position_embeddings: original,
        beta_fast: f("beta_fast").unwrap_or(32.0),
        beta_slow: f("beta_slow").unwrap_or(1.0),
        mscale: f("mscale").unwrap_or(0.0),
        mscale_all_dim: f("mscale_all_dim").unwrap_or(0.0),
        attention_factor: r.get("attention_factor").and_then(|x| x.as_f64()),
        truncate: r.get("truncate").and_then(|x| x.as_bool()).unwrap_or(true),
    }))
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
