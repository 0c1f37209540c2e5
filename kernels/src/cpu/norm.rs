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
    rmsnorm_with(x, w, eps, out, &mut Vec::new());
}

/// [`rmsnorm`] with a reusable buffer (`2 x hidden` f32): no allocation
/// once it has grown.
pub fn rmsnorm_with(x: &[bf16], w: &[bf16], eps: f32, out: &mut [bf16], buf: &mut Vec<f32>) {
    let h = w.len();
    buf.resize(2 * h, 0.0);
    let (wf, xf) = buf.split_at_mut(h);
    super::gemv::widen(w, wf);
    for (xr, yr) in x.chunks(h).zip(out.chunks_mut(h)) {
        super::gemv::widen(xr, xf);
        let r = 1.0 / (super::dot(xf, xf) / h as f32 + eps).sqrt();
        for i in 0..h {
            yr[i] = bf16::from_f32(xf[i] * r * wf[i]);
        }
    }
}
