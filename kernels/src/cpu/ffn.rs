//! The SwiGLU expert: `y = W_down (silu(W_gate x) * (W_up x))`.

use std::sync::OnceLock;

use half::bf16;

use super::gemv;

/// Batches of at least this many tokens take the SGEMM path.
pub const GEMM_TOKENS: usize = 32;

/// One expert's weights (bf16), plus f32 copies made on first use by a
/// large batch.
#[derive(Debug)]
pub struct Expert {
    pub hidden: usize,
    pub ffn: usize,
    /// `ffn x hidden`.
    pub gate: Vec<bf16>,
    /// `ffn x hidden`.
    pub up: Vec<bf16>,
    /// `hidden x ffn`.
    pub down: Vec<bf16>,
    wide: OnceLock<[Vec<f32>; 3]>,
}

impl Expert {
    pub fn new(hidden: usize, ffn: usize, gate: Vec<bf16>, up: Vec<bf16>, down: Vec<bf16>) -> Self {
        assert_eq!(gate.len(), ffn * hidden);
        assert_eq!(up.len(), ffn * hidden);
        assert_eq!(down.len(), hidden * ffn);
        Self {
            hidden,
            ffn,
            gate,
            up,
            down,
            wide: OnceLock::new(),
        }
    }

    /// Bytes of bf16 weights (what a decode step must stream).
    pub fn weight_bytes(&self) -> usize {
        3 * self.hidden * self.ffn * 2
    }

    fn wide(&self) -> &[Vec<f32>; 3] {
        self.wide.get_or_init(|| {
            [
                super::to_f32(&self.gate),
                super::to_f32(&self.up),
                super::to_f32(&self.down),
            ]
        })
    }
}

fn silu(x: f32) -> f32 {
    x / (1.0 + (-x).exp())
}

/// The activation, stored as bf16 as a GPU kernel would.
fn activation(g: &[f32], u: &[f32]) -> Vec<f32> {
    g.iter()
        .zip(u)
        .map(|(&g, &u)| bf16::from_f32(silu(g) * u).to_f32())
        .collect()
}

/// Reference, for `x` of `n x hidden`.
pub fn swiglu_ref(e: &Expert, x: &[bf16]) -> Vec<bf16> {
    let n = x.len() / e.hidden;
    let xf = super::to_f32(x);
    let (mut g, mut u) = (vec![0.0; n * e.ffn], vec![0.0; n * e.ffn]);
    gemv::matmul_ref(&xf, n, e.hidden, &e.gate, e.ffn, &mut g);
    gemv::matmul_ref(&xf, n, e.hidden, &e.up, e.ffn, &mut u);
    let a = activation(&g, &u);
    let mut y = vec![0.0; n * e.hidden];
    gemv::matmul_ref(&a, n, e.ffn, &e.down, e.hidden, &mut y);
    super::to_bf16(&y)
}

/// Fast: bf16 GEMV streaming the weights once for decode batches, SGEMM on
/// f32 weights from [`GEMM_TOKENS`] tokens up. An empty batch is empty.
pub fn swiglu(e: &Expert, x: &[bf16]) -> Vec<bf16> {
    let n = x.len() / e.hidden;
    if n == 0 {
        return Vec::new();
    }
    let xf = super::to_f32(x);
    let (mut g, mut u) = (vec![0.0; n * e.ffn], vec![0.0; n * e.ffn]);
    let mut y = vec![0.0; n * e.hidden];
    if n >= GEMM_TOKENS {
        let [wg, wu, wd] = e.wide();
        gemv::matmul_f32(&xf, n, e.hidden, wg, e.ffn, &mut g);
        gemv::matmul_f32(&xf, n, e.hidden, wu, e.ffn, &mut u);
        let a = activation(&g, &u);
        gemv::matmul_f32(&a, n, e.ffn, wd, e.hidden, &mut y);
    } else {
        gemv::matmul_bf16(&xf, n, e.hidden, &e.gate, e.ffn, &mut g);
        gemv::matmul_bf16(&xf, n, e.hidden, &e.up, e.ffn, &mut u);
        let a = activation(&g, &u);
        gemv::matmul_bf16(&a, n, e.ffn, &e.down, e.hidden, &mut y);
    }
    super::to_bf16(&y)
}

/// Reusable buffers of [`swiglu_rows`].
#[derive(Debug, Default)]
pub struct FfnScratch {
    x: Vec<f32>,
    g: Vec<f32>,
    u: Vec<f32>,
    y: Vec<f32>,
}

/// Batch-invariant SwiGLU into `out` (`n x hidden`): always the bf16 GEMV
/// path, whose per-token arithmetic does not depend on the batch, so a
/// token's result is the same whichever tokens share its expert call (the
/// price: no SGEMM for large batches). What the MoE runtime runs, on the
/// attention-free expert side and in the reference alike.
pub fn swiglu_rows(e: &Expert, x: &[bf16], out: &mut [bf16], sc: &mut FfnScratch) {
    let n = x.len() / e.hidden;
    assert_eq!(out.len(), n * e.hidden, "output rows");
    if n == 0 {
        return;
    }
    sc.x.resize(n * e.hidden, 0.0);
    sc.g.resize(n * e.ffn, 0.0);
    sc.u.resize(n * e.ffn, 0.0);
    sc.y.resize(n * e.hidden, 0.0);
    gemv::widen(x, &mut sc.x);
    gemv::matmul_bf16(&sc.x, n, e.hidden, &e.gate, e.ffn, &mut sc.g);
    gemv::matmul_bf16(&sc.x, n, e.hidden, &e.up, e.ffn, &mut sc.u);
    for (g, &u) in sc.g.iter_mut().zip(&sc.u) {
        *g = bf16::from_f32(silu(*g) * u).to_f32();
    }
    gemv::matmul_bf16(&sc.g, n, e.ffn, &e.down, e.hidden, &mut sc.y);
    for (o, &y) in out.iter_mut().zip(&sc.y) {
        *o = bf16::from_f32(y);
    }
}
