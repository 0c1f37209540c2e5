//! Rotary position embeddings, rotate-half (GPT-NeoX / Mixtral) layout, on
//! `[tokens, heads, head_dim]`.

use half::bf16;

pub fn rope_ref(x: &mut [bf16], heads: usize, head_dim: usize, positions: &[u32], theta: f32) {
    let half = head_dim / 2;
    for (t, &pos) in positions.iter().enumerate() {
        for h in 0..heads {
            let base = (t * heads + h) * head_dim;
            for i in 0..half {
                let freq = theta.powf(-2.0 * i as f32 / head_dim as f32);
                let (s, c) = (pos as f32 * freq).sin_cos();
                let (x0, x1) = (x[base + i].to_f32(), x[base + i + half].to_f32());
                x[base + i] = bf16::from_f32(x0 * c - x1 * s);
                x[base + i + half] = bf16::from_f32(x1 * c + x0 * s);
            }
        }
    }
}

/// Fast: frequencies once, sines and cosines once per token for all heads.
pub fn rope(x: &mut [bf16], heads: usize, head_dim: usize, positions: &[u32], theta: f32) {
    rope_with(x, heads, head_dim, positions, theta, &mut Vec::new());
}

/// [`rope`] with a reusable buffer for its tables (`3 x head_dim / 2`
/// f32): no allocation once it has grown.
pub fn rope_with(
    x: &mut [bf16],
    heads: usize,
    head_dim: usize,
    positions: &[u32],
    theta: f32,
    buf: &mut Vec<f32>,
) {
    let half = head_dim / 2;
    buf.clear();
    buf.extend((0..half).map(|i| theta.powf(-2.0 * i as f32 / head_dim as f32)));
    buf.resize(3 * half, 0.0);
    let (inv, rest) = buf.split_at_mut(half);
    let (sin, cos) = rest.split_at_mut(half);
    for (t, &pos) in positions.iter().enumerate() {
        for i in 0..half {
            (sin[i], cos[i]) = (pos as f32 * inv[i]).sin_cos();
        }
        for h in 0..heads {
            let v = &mut x[(t * heads + h) * head_dim..][..head_dim];
            let (a, b) = v.split_at_mut(half);
            for i in 0..half {
                let (x0, x1) = (a[i].to_f32(), b[i].to_f32());
                a[i] = bf16::from_f32(x0 * cos[i] - x1 * sin[i]);
                b[i] = bf16::from_f32(x1 * cos[i] + x0 * sin[i]);
            }
        }
    }
}
