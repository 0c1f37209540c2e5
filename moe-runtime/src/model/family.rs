//! Model families: which Hugging Face architectures the runtime runs, and
//! the configuration options each family's implementation covers. A
//! checkpoint of another family, or one that sets an option the family
//! module does not implement (a sliding window, a rope scaling, tied
//! embeddings...), is refused when its `config.json` is read, before any
//! worker starts, naming the field and what is supported.
//!
//! Families run: Mixtral (`mixtral`, `MixtralForCausalLM`), Qwen3-MoE
//! (`qwen3_moe`, `Qwen3MoeForCausalLM`, every layer sparse), OLMoE
//! (`olmoe`, `OlmoeForCausalLM`), Qwen2-MoE (`qwen2_moe`,
//! `Qwen2MoeForCausalLM`) and DeepSeek-V3 (`deepseek_v3`,
//! `DeepseekV3ForCausalLM`, also Kimi-K2's architecture). The planner
//! reads more shapes (DBRX) than the runtime runs.
//!
//! What differs between families, and where it is handled: the config
//! fields ([`super::config`]), the tensor names ([`super::tensors`]), and
//! the pieces of the layer ([`super::forward`]: per-head query and key
//! norms; the router's renormalisation over the chosen experts). The
//! workers, the pipeline and the server do not know the family.

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// A family the runtime implements.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// `transformers/models/mixtral`: GQA attention with rotate-half rope,
    /// a softmax top-k router renormalised over the chosen experts, SwiGLU
    /// experts (`w1`, `w3`, `w2`).
    #[default]
    Mixtral,
    /// `transformers/models/qwen3_moe`: Mixtral's layer plus an RMSNorm
    /// over each head of the queries and keys before rope, an explicit
    /// `head_dim`, and the router's renormalisation only when
    /// `norm_topk_prob` says so; experts of `moe_intermediate_size`
    /// (`gate_proj`, `up_proj`, `down_proj`).
    Qwen3Moe,
    /// `transformers/models/olmoe`: Mixtral's layer plus an RMSNorm over
    /// the whole query projection and the whole key projection before
    /// rope, and the router's renormalisation only when `norm_topk_prob`
    /// says so; experts named as Qwen3-MoE's.
    Olmoe,
    /// `transformers/models/qwen2_moe`: Mixtral's layer with biased query,
    /// key and value projections, the router's renormalisation only when
    /// `norm_topk_prob` says so, and a shared expert (a SwiGLU MLP of
    /// `shared_expert_intermediate_size` every token goes through) whose
    /// output is scaled by `sigmoid(shared_expert_gate(x))`.
    Qwen2Moe,
    /// `transformers/models/deepseek_v3`: multi-head latent attention
    /// (queries through a low-rank pair, keys and values from one
    /// compressed latent per token, a shared rope key; rope over
    /// interleaved pairs, YaRN scaling), a sigmoid router whose choice adds
    /// a score-correction bias and is limited to the best `topk_group` of
    /// `n_group` expert groups, weights renormalised by `norm_topk_prob`
    /// and scaled by `routed_scaling_factor`; ungated shared experts
    /// (`n_shared_experts` x `moe_intermediate_size`), and the first
    /// `first_k_dense_replace` layers dense.
    DeepseekV3,
}

/// How a family normalises its queries and keys before rope.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QkNorm {
    /// An RMSNorm over each head (`head_dim` weights): Qwen3-MoE.
    PerHead,
    /// An RMSNorm over the whole projection (`heads * head_dim` and
    /// `kv_heads * head_dim` weights): OLMoE.
    Whole,
}

/// Every family, with its `model_type` and its `architectures` entry.
const FAMILIES: &[(Family, &str, &str)] = &[
    (Family::Mixtral, "mixtral", "MixtralForCausalLM"),
    (Family::Qwen3Moe, "qwen3_moe", "Qwen3MoeForCausalLM"),
    (Family::Olmoe, "olmoe", "OlmoeForCausalLM"),
    (Family::Qwen2Moe, "qwen2_moe", "Qwen2MoeForCausalLM"),
    (Family::DeepseekV3, "deepseek_v3", "DeepseekV3ForCausalLM"),
];

impl Family {
    /// The family a `model_type` names, for readers that only want the
    /// shape (the planner): anything else reads as Mixtral.
    pub fn lenient(model_type: Option<&str>) -> Family {
        FAMILIES
            .iter()
            .find(|f| Some(f.1) == model_type)
            .map_or(Family::Mixtral, |f| f.0)
    }

    /// How queries and keys are normalised before rope, if they are.
    pub fn qk_norm(self) -> Option<QkNorm> {
        match self {
            Family::Mixtral => None,
            Family::Qwen3Moe => Some(QkNorm::PerHead),
            Family::Olmoe => Some(QkNorm::Whole),
            Family::Qwen2Moe | Family::DeepseekV3 => None,
        }
    }

    /// Whether the query, key and value projections have biases.
    pub fn qkv_bias(self) -> bool {
        self == Family::Qwen2Moe
    }

    /// Whether sparse layers have a shared expert.
    pub fn shared_expert(self) -> bool {
        matches!(self, Family::Qwen2Moe | Family::DeepseekV3)
    }

    /// Whether the shared expert's output is scaled by a sigmoid gate
    /// (Qwen2-MoE; DeepSeek-V3's is added as it is).
    pub fn shared_expert_gate(self) -> bool {
        self == Family::Qwen2Moe
    }

    /// Whether the router scores with a sigmoid and chooses with a
    /// score-correction bias in groups (DeepSeek-V3), rather than with a
    /// softmax.
    pub fn router_bias(self) -> bool {
        self == Family::DeepseekV3
    }

    pub fn model_type(self) -> &'static str {
        FAMILIES
            .iter()
            .find(|f| f.0 == self)
            .map(|f| f.1)
            .expect("every family is listed")
    }

    pub fn architecture(self) -> &'static str {
        FAMILIES
            .iter()
            .find(|f| f.0 == self)
            .map(|f| f.2)
            .expect("every family is listed")
    }

    /// The family a `config.json` names, with its options checked.
    pub fn of_config(v: &Value) -> Result<Family, String> {
        let supported = || {
            FAMILIES
                .iter()
                .map(|f| format!("{} ({})", f.1, f.2))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let model_type = v.get("model_type").and_then(Value::as_str);
        let family = match model_type {
            Some(t) => FAMILIES
                .iter()
                .find(|f| f.1 == t)
                .map(|f| f.0)
                .ok_or_else(|| {
                    format!(
                        "model_type {t:?} is not a family this runtime runs; supported: {}",
                        supported()
                    )
                })?,
            None => {
                return Err(format!(
                    "model_type is not set, so the model's family is unknown; supported: {}",
                    supported()
                ))
            }
        };
        if let Some(archs) = v.get("architectures") {
            let names: Vec<&str> = archs
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            if !names.contains(&family.architecture()) {
                return Err(format!(
                    "architectures {archs} does not name {} (model_type {:?} runs as {})",
                    family.architecture(),
                    family.model_type(),
                    family.architecture()
                ));
            }
        }
        family.check_options(v)?;
        Ok(family)
    }

    /// Refuses an option set to something this family's implementation
    /// does not compute.
    fn check_options(self, v: &Value) -> Result<(), String> {
        let set = |k: &str| v.get(k).filter(|x| !x.is_null());
        let name = self.model_type();
        match self {
            Family::Mixtral => {
                if let Some(w) = set("sliding_window") {
                    return Err(format!(
                        "sliding_window {w}: sliding-window attention is not implemented (null: full attention)"
                    ));
                }
            }
            Family::Qwen3Moe | Family::Qwen2Moe => {
                // Qwen configs carry a window size that applies only when
                // use_sliding_window is true.
                if set("use_sliding_window").and_then(Value::as_bool) == Some(true) {
                    return Err(
                        "use_sliding_window true: sliding-window attention is not implemented"
                            .into(),
                    );
                }
                if set("attention_bias").and_then(Value::as_bool) == Some(true) {
                    return Err(
                        "attention_bias true: biased attention projections are not implemented"
                            .into(),
                    );
                }
            }
            Family::DeepseekV3 => {
                if set("attention_bias").and_then(Value::as_bool) == Some(true) {
                    return Err(
                        "attention_bias true: biased attention projections are not implemented"
                            .into(),
                    );
                }
                // The published configs name the router that transformers
                // implements; another one is not computed.
                for (key, want) in [("scoring_func", "sigmoid"), ("topk_method", "noaux_tc")] {
                    if let Some(x) = set(key).filter(|x| x.as_str() != Some(want)) {
                        return Err(format!(
                            "{key} {x}: {name}'s router is implemented as {want:?} only"
                        ));
                    }
                }
            }
            Family::Olmoe => {
                if let Some(c) = set("clip_qkv") {
                    return Err(format!(
                        "clip_qkv {c}: clipping the query, key and value projections is not implemented (null: none)"
                    ));
                }
                if set("attention_bias").and_then(Value::as_bool) == Some(true) {
                    return Err(
                        "attention_bias true: biased attention projections are not implemented"
                            .into(),
                    );
                }
            }
        }
        // Every family: plain rope (and YaRN for DeepSeek-V3), silu
        // experts, an LM head of its own.
        // transformers 4 writes `rope_scaling` (null when plain);
        // transformers 5 writes `rope_parameters` with a `rope_type`
        // ("default" when plain) and the theta.
        for key in ["rope_scaling", "rope_parameters"] {
            let Some(r) = set(key) else { continue };
            let kind = r.get("rope_type").or_else(|| r.get("type"));
            let kind = kind.and_then(Value::as_str);
            if self == Family::DeepseekV3 {
                if !matches!(kind, Some("default" | "yarn")) {
                    return Err(format!(
                        "{key} {r}: rope scaling {kind:?} is not implemented for {name} (rope_type \"default\" or \"yarn\")"
                    ));
                }
            } else if kind != Some("default") {
                return Err(format!(
                    "{key} {r}: rope scaling is not implemented for {name} (plain rope only: rope_type \"default\")"
                ));
            }
        }
        if let Some(a) = set("hidden_act").filter(|a| a.as_str() != Some("silu")) {
            return Err(format!("hidden_act {a}: {name}'s experts run silu only"));
        }
        if set("tie_word_embeddings").and_then(Value::as_bool) == Some(true) {
            return Err(
                "tie_word_embeddings true: tied embeddings are not implemented (the checkpoint must hold lm_head.weight)"
                    .into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(extra: &str) -> Value {
        let base = r#"{"model_type": "mixtral", "architectures": ["MixtralForCausalLM"]"#;
        serde_json::from_str(&format!("{base}{extra}}}")).unwrap()
    }

    #[test]
    fn mixtral_is_recognised() {
        assert_eq!(Family::of_config(&config("")), Ok(Family::Mixtral));
        let nulls = r#", "sliding_window": null, "rope_scaling": null, "hidden_act": "silu",
            "tie_word_embeddings": false"#;
        assert_eq!(Family::of_config(&config(nulls)), Ok(Family::Mixtral));
        let v5 = r#", "rope_parameters": {"rope_type": "default", "rope_theta": 1e6}"#;
        assert_eq!(Family::of_config(&config(v5)), Ok(Family::Mixtral));
    }

    #[test]
    fn qwen3_moe_is_recognised_with_its_dense_layers() {
        let v = |extra: &str| -> Value {
            serde_json::from_str(&format!(
                r#"{{"model_type": "qwen3_moe", "architectures": ["Qwen3MoeForCausalLM"],
                "sliding_window": 4096, "use_sliding_window": false{extra}}}"#
            ))
            .unwrap()
        };
        assert_eq!(Family::of_config(&v("")), Ok(Family::Qwen3Moe));
        let sparse = r#", "mlp_only_layers": [], "decoder_sparse_step": 1"#;
        assert_eq!(Family::of_config(&v(sparse)), Ok(Family::Qwen3Moe));
        let dense = r#", "mlp_only_layers": [0, 3], "decoder_sparse_step": 2"#;
        assert_eq!(Family::of_config(&v(dense)), Ok(Family::Qwen3Moe));
        for (extra, field) in [
            (r#", "use_sliding_window": true"#, "use_sliding_window"),
            (r#", "attention_bias": true"#, "attention_bias"),
        ] {
            let err = Family::of_config(&v(extra)).unwrap_err();
            assert!(err.starts_with(field), "{field}: {err}");
        }
        assert_eq!(Family::Qwen3Moe.qk_norm(), Some(QkNorm::PerHead));
        assert_eq!(Family::Mixtral.qk_norm(), None);
        assert_eq!(Family::lenient(Some("qwen3_moe")), Family::Qwen3Moe);
        assert_eq!(Family::lenient(Some("dbrx")), Family::Mixtral);
    }

    #[test]
    fn olmoe_is_recognised_and_clip_qkv_refused() {
        let v = |extra: &str| -> Value {
            serde_json::from_str(&format!(
                r#"{{"model_type": "olmoe", "architectures": ["OlmoeForCausalLM"], "clip_qkv": null{extra}}}"#
            ))
            .unwrap()
        };
        assert_eq!(Family::of_config(&v("")), Ok(Family::Olmoe));
        assert_eq!(Family::Olmoe.qk_norm(), Some(QkNorm::Whole));
        let err = Family::of_config(&v(r#", "clip_qkv": 8.0"#)).unwrap_err();
        assert!(err.starts_with("clip_qkv"), "{err}");
    }

    #[test]
    fn qwen2_moe_is_recognised_with_its_bias_and_shared_expert() {
        let v: Value = serde_json::from_str(
            r#"{"model_type": "qwen2_moe", "architectures": ["Qwen2MoeForCausalLM"],
            "use_sliding_window": false, "sliding_window": 4096, "mlp_only_layers": []}"#,
        )
        .unwrap();
        assert_eq!(Family::of_config(&v), Ok(Family::Qwen2Moe));
        assert!(Family::Qwen2Moe.qkv_bias() && Family::Qwen2Moe.shared_expert());
        assert!(!Family::Qwen3Moe.qkv_bias() && !Family::Mixtral.shared_expert());
    }

    #[test]
    fn deepseek_v3_is_recognised_with_yarn_and_other_routers_refused() {
        let v = |extra: &str| -> Value {
            serde_json::from_str(&format!(
                r#"{{"model_type": "deepseek_v3", "architectures": ["DeepseekV3ForCausalLM"],
                "rope_scaling": {{"type": "yarn", "factor": 40}}, "scoring_func": "sigmoid",
                "topk_method": "noaux_tc"{extra}}}"#
            ))
            .unwrap()
        };
        assert_eq!(Family::of_config(&v("")), Ok(Family::DeepseekV3));
        assert!(Family::DeepseekV3.router_bias() && Family::DeepseekV3.shared_expert());
        assert!(!Family::DeepseekV3.shared_expert_gate());
        for (extra, field) in [
            (r#", "scoring_func": "softmax""#, "scoring_func"),
            (r#", "topk_method": "greedy""#, "topk_method"),
            (r#", "attention_bias": true"#, "attention_bias"),
            (r#", "rope_scaling": {"type": "longrope"}"#, "rope_scaling"),
        ] {
            let err = Family::of_config(&v(extra)).unwrap_err();
            assert!(err.starts_with(field), "{field}: {err}");
        }
    }

    #[test]
    fn other_families_and_options_are_refused_by_name() {
        let v: Value = serde_json::from_str(r#"{"model_type": "deepseek_v2"}"#).unwrap();
        let err = Family::of_config(&v).unwrap_err();
        assert!(
            err.contains("deepseek_v2") && err.contains("deepseek_v3") && err.contains("mixtral"),
            "{err}"
        );
        let v: Value = serde_json::from_str(r#"{"hidden_size": 8}"#).unwrap();
        assert!(Family::of_config(&v)
            .unwrap_err()
            .contains("model_type is not set"));
        let v: Value = serde_json::from_str(
            r#"{"model_type": "mixtral", "architectures": ["DbrxForCausalLM"]}"#,
        )
        .unwrap();
        assert!(Family::of_config(&v)
            .unwrap_err()
            .contains("DbrxForCausalLM"));
        for (extra, field) in [
            (r#", "sliding_window": 4096"#, "sliding_window"),
            (
                r#", "rope_scaling": {"type": "yarn", "factor": 4.0}"#,
                "rope_scaling",
            ),
            (
                r#", "rope_parameters": {"rope_type": "yarn", "rope_theta": 1e6}"#,
                "rope_parameters",
            ),
            (r#", "hidden_act": "gelu""#, "hidden_act"),
            (r#", "tie_word_embeddings": true"#, "tie_word_embeddings"),
        ] {
            let err = Family::of_config(&config(extra)).unwrap_err();
            assert!(err.starts_with(field), "{field}: {err}");
        }
    }
}
