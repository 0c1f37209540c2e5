//! Physical limits measured in the same run.

use std::time::Instant;

/// Single-core `memcpy` bandwidth (GB/s, 1e9 B) of the copy shm makes for
/// one message: `size` bytes from one source buffer into `slots` rotating
/// destinations of `size` bytes (a receive ring's slots), so source and
/// destination are as warm in cache as m2n's. Best of 5 batches.
pub fn memcpy_gbps(size: usize, slots: usize) -> f64 {
    let slots = slots.max(1);
    let src = vec![1u8; size];
    let mut dst = vec![0u8; size * slots];
    let reps = ((64usize << 20) / size.max(1)).clamp(4 * slots, 1 << 16);
    let mut best = f64::MAX;
    for _ in 0..5 {
        let t = Instant::now();
        for i in 0..reps {
            let k = i % slots;
            dst[k * size..(k + 1) * size].copy_from_slice(&src);
            std::hint::black_box(&dst[k * size]);
        }
        best = best.min(t.elapsed().as_secs_f64() / reps as f64);
    }
    size as f64 / best / 1e9
}
