//! The compute of a Mixtral-style MoE decode layer.
//!
//! [`cpu`] has, for every kernel, a plain reference version and a fast one
//! (vectorised loops, a bf16 GEMV that streams weights once for decode
//! batches, `matrixmultiply` GEMMs for large ones). Storage is bf16
//! ([`half::bf16`]); accumulation is f32. With the `cuda` feature, [`cuda`]
//! compiles the same kernels from `kernels/cuda/*.cu` with NVRTC.

pub mod cpu;
#[cfg(feature = "cuda")]
pub mod cuda;

pub use half::bf16;

/// The shapes of one decoder layer, from a model configuration.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LayerShape {
    pub hidden: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub experts: usize,
    pub top_k: usize,
    /// Expert FFN intermediate size.
    pub ffn: usize,
    pub rope_theta: f32,
    pub norm_eps: f32,
}

impl LayerShape {
    /// Mixtral-8x22B's layer.
    pub fn mixtral_8x22b() -> Self {
        Self {
            hidden: 6144,
            heads: 48,
            kv_heads: 8,
            head_dim: 128,
            experts: 8,
            top_k: 2,
            ffn: 16384,
            rope_theta: 1e6,
            norm_eps: 1e-5,
        }
    }
    /// DBRX's layer.
    pub fn dbrx() -> Self {
        Self {
            hidden: 6144,
            heads: 48,
            kv_heads: 8,
            head_dim: 128,
            experts: 16,
            top_k: 4,
            ffn: 10752,
            rope_theta: 5e5,
            norm_eps: 1e-5,
        }
    }
    /// Heads, hidden and FFN sizes divided by `factor` (head size kept,
    /// at least one KV head), to fit a small machine.
    pub fn scaled(self, factor: usize) -> Self {
        let f = factor.max(1);
        let kv_heads = (self.kv_heads / f).max(1);
        let heads = (self.heads / f).max(kv_heads) / kv_heads * kv_heads;
        Self {
            hidden: heads * self.head_dim,
            heads,
            kv_heads,
            ffn: self.ffn / f,
            ..self
        }
    }
    /// GQA group: query heads per KV head.
    pub fn group(&self) -> usize {
        self.heads / self.kv_heads
    }
}
