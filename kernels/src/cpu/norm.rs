//! RMSNorm: `y = x / sqrt(mean(x^2) + eps) * w`, per token.

use half::bf16;

pub fn rmsnorm_ref(x: &[bf16], w: &[bf16], eps: f32, out: &mut [bf16]) {
    let h = w.len();
    for (xr, yr) in x.chunks(h).zip(out.chunks_mut(h)) {
        let ss: f32 = xr.iter().map(|v| v.to_f32() * v.to_f32()).sum::<f32>() / h as f32;
        let r = 1.0 / (ss + eps).sqrt();
        for i in 0..h {
            yr[i] = bf16::from_f32(xr[i].to_f32() * r * w[i].to_f32());
        }
    }
}

/// Fast: the weight widened once, eight accumulators for the sum of squares.
pub fn rmsnorm(x: &[bf16], w: &[bf16], eps: f32, out: &mut [bf16]) {
    let h = w.len();
    let mut wf = vec![0.0f32; h];
    super::gemv::widen(w, &mut wf);
    let mut xf = vec![0.0f32; h];
    for (xr, yr) in x.chunks(h).zip(out.chunks_mut(h)) {
        super::gemv::widen(xr, &mut xf);
        let r = 1.0 / (super::dot(&xf, &xf) / h as f32 + eps).sqrt();
        for i in 0..h {
            yr[i] = bf16::from_f32(xf[i] * r * wf[i]);
        }
    }
}
