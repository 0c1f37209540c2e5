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
        Family::Qwen3Moe | Family::Olmoe => names::layer(i, "mlp.gate.weight"),
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
        Family::Qwen3Moe | Family::Olmoe => names::layer(
            i,
            &format!(
                "mlp.experts.{j}.{}.weight",
                match p {
                    Proj::Gate => "gate_proj",
                    Proj::Up => "up_proj",
                    Proj::Down => "down_proj",
                }
            ),
        ),
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
    /// An expert's gate projection (`w1`).
    ExpertGate,
    /// An expert's down projection (`w2`).
    ExpertDown,
    /// An expert's up projection (`w3`).
    ExpertUp,
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
        for (name, len) in qk_norms(c, i).into_iter().flatten() {
            t.push(spec(name, vec![len], Kind::Norm));
        }
        t.push(spec(
            l("post_attention_layernorm.weight"),
            vec![h],
            Kind::Norm,
        ));
        t.push(spec(
            router(c.family, i),
            vec![c.experts as usize, h],
            Kind::Router,
        ));
        for j in 0..c.experts as usize {
            let e = |p| expert(c.family, i, j, p);
            t.push(spec(e(Proj::Gate), vec![f, h], Kind::ExpertGate));
            t.push(spec(e(Proj::Down), vec![h, f], Kind::ExpertDown));
            t.push(spec(e(Proj::Up), vec![f, h], Kind::ExpertUp));
        }
    }
    t.push(spec(names::NORM.into(), vec![h], Kind::Norm));
    t.push(spec(names::LM_HEAD.into(), vec![v, h], Kind::LmHead));
    t
}
