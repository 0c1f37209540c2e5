//! What a checkpoint holds: the Hugging Face names and shapes of every
//! tensor of a model, in its family's layout, and the names of its files.
//! Read by the loader ([`super::weights`], which checks a checkpoint
//! against it) and by the random-checkpoint writer ([`super::init`]).

use super::family::{Family, QkNorm};
use super::ModelConfig;

/// The single-file checkpoint's name.
pub const SINGLE_FILE: &str = "model.safetensors";
/// The sharded checkpoint's index.
pub const INDEX_FILE: &str = "model.safetensors.index.json";

/// Hugging Face names shared by the families (and Mixtral's experts).
pub mod names {
    pub const EMBED: &str = "model.embed_tokens.weight";
    pub const NORM: &str = "model.norm.weight";
    pub const LM_HEAD: &str = "lm_head.weight";
    pub fn layer(i: usize, rest: &str) -> String {
        format!("model.layers.{i}.{rest}")
    }
    pub fn expert(i: usize, j: usize, w: &str) -> String {
        format!("model.layers.{i}.block_sparse_moe.experts.{j}.{w}.weight")
    }
}

/// One of an expert's three projections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Proj {
    /// `ffn x hidden`, through silu.
    Gate,
    /// `ffn x hidden`.
    Up,
    /// `hidden x ffn`.
    Down,
}

/// Layer `i`'s router in `family`'s names.
pub fn router(family: Family, i: usize) -> String {
    match family {
        Family::Mixtral => names::layer(i, "block_sparse_moe.gate.weight"),
        Family::Qwen3Moe | Family::Olmoe | Family::Qwen2Moe | Family::DeepseekV3 => {
            names::layer(i, "mlp.gate.weight")
        }
    }
}

/// Layer `i`'s router score-correction bias (DeepSeek-V3, `experts`, f32).
pub fn router_bias(i: usize) -> String {
    names::layer(i, "mlp.gate.e_score_correction_bias")
}

fn proj_name(p: Proj) -> &'static str {
    match p {
        Proj::Gate => "gate_proj",
        Proj::Up => "up_proj",
        Proj::Down => "down_proj",
    }
}

/// Layer `i`'s dense MLP, projection `p` (the layers without experts).
pub fn dense_mlp(i: usize, p: Proj) -> String {
    names::layer(i, &format!("mlp.{}.weight", proj_name(p)))
}

/// Multi-head latent attention's tensors of layer `i` (DeepSeek-V3).
pub mod mla {
    use super::names;
    pub fn q_a(i: usize) -> String {
        names::layer(i, "self_attn.q_a_proj.weight")
    }
    pub fn q_a_norm(i: usize) -> String {
        names::layer(i, "self_attn.q_a_layernorm.weight")
    }
    pub fn q_b(i: usize) -> String {
        names::layer(i, "self_attn.q_b_proj.weight")
    }
    /// The single query projection, when `q_lora_rank` is null.
    pub fn q(i: usize) -> String {
        names::layer(i, "self_attn.q_proj.weight")
    }
    pub fn kv_a(i: usize) -> String {
        names::layer(i, "self_attn.kv_a_proj_with_mqa.weight")
    }
    pub fn kv_a_norm(i: usize) -> String {
        names::layer(i, "self_attn.kv_a_layernorm.weight")
    }
    pub fn kv_b(i: usize) -> String {
        names::layer(i, "self_attn.kv_b_proj.weight")
    }
    pub fn o(i: usize) -> String {
        names::layer(i, "self_attn.o_proj.weight")
    }
}

/// Expert `j` of layer `i`, projection `p`, in `family`'s names.
pub fn expert(family: Family, i: usize, j: usize, p: Proj) -> String {
    match family {
        Family::Mixtral => names::expert(
            i,
            j,
            match p {
                Proj::Gate => "w1",
                Proj::Down => "w2",
                Proj::Up => "w3",
            },
        ),
        Family::Qwen3Moe | Family::Olmoe | Family::Qwen2Moe | Family::DeepseekV3 => {
            names::layer(i, &format!("mlp.experts.{j}.{}.weight", proj_name(p)))
        }
    }
}

/// Layer `i`'s query and key norms (name, length), in the families that
/// have them: `head_dim` each when per head, else the projections' widths.
pub fn qk_norms(c: &ModelConfig, i: usize) -> Option<[(String, usize); 2]> {
    let (q, k) = match c.family.qk_norm()? {
        QkNorm::PerHead => (c.head_dim, c.head_dim),
        QkNorm::Whole => (c.heads * c.head_dim, c.kv_heads * c.head_dim),
    };
    Some([
        (names::layer(i, "self_attn.q_norm.weight"), q as usize),
        (names::layer(i, "self_attn.k_norm.weight"), k as usize),
    ])
}

/// Layer `i`'s query, key and value biases (name, length), in the
/// families that have them.
pub fn qkv_biases(c: &ModelConfig, i: usize) -> Option<[(String, usize); 3]> {
    let (q, kv) = (
        (c.heads * c.head_dim) as usize,
        (c.kv_heads * c.head_dim) as usize,
    );
    c.family.qkv_bias().then(|| {
        [
            (names::layer(i, "self_attn.q_proj.bias"), q),
            (names::layer(i, "self_attn.k_proj.bias"), kv),
            (names::layer(i, "self_attn.v_proj.bias"), kv),
        ]
    })
}

/// Layer `i`'s shared expert, projection `p`: Qwen2-MoE's
/// `shared_expert`, DeepSeek-V3's `shared_experts` (its experts fused
/// into one MLP).
pub fn shared_expert(family: Family, i: usize, p: Proj) -> String {
    let block = match family {
        Family::DeepseekV3 => "shared_experts",
        _ => "shared_expert",
    };
    names::layer(i, &format!("mlp.{block}.{}.weight", proj_name(p)))
}

/// Layer `i`'s shared expert's sigmoid gate (`1 x hidden`).
pub fn shared_expert_gate(i: usize) -> String {
    names::layer(i, "mlp.shared_expert_gate.weight")
}

/// What a tensor does in the model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Embedding,
    /// An RMSNorm weight (per-head query and key norms included).
    Norm,
    Query,
    Key,
    Value,
    /// Attention's output projection.
    Output,
    /// The router's gate.
    Router,
    /// The router's score-correction bias (stored in f32).
    ScoreBias,
    /// An expert's gate projection (`w1`).
    ExpertGate,
    /// An expert's down projection (`w2`).
    ExpertDown,
    /// An expert's up projection (`w3`).
    ExpertUp,
    /// A query, key or value bias.
    Bias,
    /// The shared expert's down projection (its gate and up projections
    /// are [`Kind::ExpertGate`] and [`Kind::ExpertUp`]).
    SharedDown,
    /// The shared expert's sigmoid gate.
    SharedGate,
    LmHead,
}

/// One tensor of a checkpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
    pub kind: Kind,
}

/// Every tensor of the model described by `c`, in checkpoint order.
pub fn tensor_specs(c: &ModelConfig) -> Vec<TensorSpec> {
    let (h, v, f) = (c.hidden as usize, c.vocab as usize, c.ffn as usize);
    let (qd, kvd) = (
        (c.heads * c.head_dim) as usize,
        (c.kv_heads * c.head_dim) as usize,
    );
    let spec = |name: String, shape: Vec<usize>, kind: Kind| TensorSpec { name, shape, kind };
    let mut t = vec![spec(names::EMBED.into(), vec![v, h], Kind::Embedding)];
    for i in 0..c.layers as usize {
        let l = |rest: &str| names::layer(i, rest);
        t.push(spec(l("input_layernorm.weight"), vec![h], Kind::Norm));
        match &c.mla {
            Some(m) => {
                let heads = c.heads as usize;
                let (ql, kvl) = (m.q_lora_rank as usize, m.kv_lora_rank as usize);
                let (qk, rope) = (m.qk_head_dim() as usize, m.qk_rope_head_dim as usize);
                let (nope, vd) = (m.qk_nope_head_dim as usize, m.v_head_dim as usize);
                if ql > 0 {
                    t.push(spec(mla::q_a(i), vec![ql, h], Kind::Query));
                    t.push(spec(mla::q_a_norm(i), vec![ql], Kind::Norm));
                    t.push(spec(mla::q_b(i), vec![heads * qk, ql], Kind::Query));
                } else {
                    t.push(spec(mla::q(i), vec![heads * qk, h], Kind::Query));
                }
                t.push(spec(mla::kv_a(i), vec![kvl + rope, h], Kind::Key));
                t.push(spec(mla::kv_a_norm(i), vec![kvl], Kind::Norm));
                t.push(spec(
                    mla::kv_b(i),
                    vec![heads * (nope + vd), kvl],
                    Kind::Value,
                ));
                t.push(spec(mla::o(i), vec![h, heads * vd], Kind::Output));
            }
            None => {
                t.push(spec(l("self_attn.q_proj.weight"), vec![qd, h], Kind::Query));
                t.push(spec(l("self_attn.k_proj.weight"), vec![kvd, h], Kind::Key));
                t.push(spec(
                    l("self_attn.v_proj.weight"),
                    vec![kvd, h],
                    Kind::Value,
                ));
                t.push(spec(
                    l("self_attn.o_proj.weight"),
                    vec![h, qd],
                    Kind::Output,
                ));
                for (name, len) in qkv_biases(c, i).into_iter().flatten() {
                    t.push(spec(name, vec![len], Kind::Bias));
                }
                for (name, len) in qk_norms(c, i).into_iter().flatten() {
                    t.push(spec(name, vec![len], Kind::Norm));
                }
            }
        }
        t.push(spec(
            l("post_attention_layernorm.weight"),
            vec![h],
            Kind::Norm,
        ));
        if c.is_dense(i) {
            let d = c.dense_ffn as usize;
            t.push(spec(dense_mlp(i, Proj::Gate), vec![d, h], Kind::ExpertGate));
            t.push(spec(dense_mlp(i, Proj::Up), vec![d, h], Kind::ExpertUp));
            t.push(spec(dense_mlp(i, Proj::Down), vec![h, d], Kind::ExpertDown));
            continue;
        }
        t.push(spec(
            router(c.family, i),
            vec![c.experts as usize, h],
            Kind::Router,
        ));
        if c.family.router_bias() {
            t.push(spec(
                router_bias(i),
                vec![c.experts as usize],
                Kind::ScoreBias,
            ));
        }
        for j in 0..c.experts as usize {
            let e = |p| expert(c.family, i, j, p);
            t.push(spec(e(Proj::Gate), vec![f, h], Kind::ExpertGate));
            t.push(spec(e(Proj::Down), vec![h, f], Kind::ExpertDown));
            t.push(spec(e(Proj::Up), vec![f, h], Kind::ExpertUp));
        }
        if c.family.shared_expert() && c.shared_ffn > 0 {
            let s = c.shared_ffn as usize;
            let sh = |p| shared_expert(c.family, i, p);
            t.push(spec(sh(Proj::Gate), vec![s, h], Kind::ExpertGate));
            t.push(spec(sh(Proj::Up), vec![s, h], Kind::ExpertUp));
            t.push(spec(sh(Proj::Down), vec![h, s], Kind::SharedDown));
            if c.family.shared_expert_gate() {
                t.push(spec(shared_expert_gate(i), vec![1, h], Kind::SharedGate));
            }
        }
    }
    t.push(spec(names::NORM.into(), vec![h], Kind::Norm));
    t.push(spec(names::LM_HEAD.into(), vec![v, h], Kind::LmHead));
    t
}
