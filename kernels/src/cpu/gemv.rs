//! `out[t][j] = sum_i x[t][i] * w[j][i]`: activations (f32, `n x k`) times
//! a bf16 weight matrix (`m x k`, one output feature per row).
//!
//! Decode batches are memory-bound: [`matmul_bf16`] streams every weight
//! row once, widening it to f32 in a row buffer that stays in L1 while all
//! `n` tokens use it. Large batches are compute-bound: [`matmul_f32`] runs
//! `matrixmultiply`'s blocked SGEMM on f32 weights prepared once.

use half::bf16;

/// Reference: the definition, element by element.
pub fn matmul_ref(x: &[f32], n: usize, k: usize, w: &[bf16], m: usize, out: &mut [f32]) {
    for t in 0..n {
        for j in 0..m {
            let mut s = 0.0f32;
            for i in 0..k {
                s += x[t * k + i] * w[j * k + i].to_f32();
            }
            out[t * m + j] = s;
        }
    }
}

/// Widens bf16 to f32 (a 16-bit shift, which vectorises).
#[inline]
pub fn widen(src: &[bf16], dst: &mut [f32]) {
    for (d, s) in dst.iter_mut().zip(src) {
        *d = f32::from_bits(u32::from(s.to_bits()) << 16);
    }
}

/// `sum_i a[i] * b[i]` with `b` in bf16, widened in registers.
pub fn dot_bf16(a: &[f32], b: &[bf16]) -> f32 {
    let n = a.len().min(b.len());
    #[cfg(target_arch = "x86_64")]
    if n >= 8 && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the features were detected; both slices hold n elements.
        return unsafe { avx2::dot_bf16(&a[..n], &b[..n]) };
    }
    a[..n]
        .iter()
        .zip(&b[..n])
        .map(|(x, y)| x * y.to_f32())
        .sum()
}

/// `acc[i] += w * v[i]` with `v` in bf16, widened in registers.
pub fn axpy_bf16(acc: &mut [f32], w: f32, v: &[bf16]) {
    let n = acc.len().min(v.len());
    #[cfg(target_arch = "x86_64")]
    if n >= 8 && is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the features were detected; both slices hold n elements.
        unsafe { avx2::axpy_bf16(&mut acc[..n], w, &v[..n]) };
        return;
    }
    for (a, x) in acc[..n].iter_mut().zip(&v[..n]) {
        *a += w * x.to_f32();
    }
}

/// Fast, for small `n`: each weight row is read from memory once (and from
/// L1 for every further pair of tokens). On x86-64 with AVX2 and FMA
/// (detected at run time) the row is widened and multiplied in registers.
/// Batch-invariant: row `t` of `out` depends only on row `t` of `x`, never
/// on `n` or on where the token sits in the batch.
pub fn matmul_bf16(x: &[f32], n: usize, k: usize, w: &[bf16], m: usize, out: &mut [f32]) {
    assert!(x.len() >= n * k && w.len() >= m * k && out.len() >= n * m);
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
        // SAFETY: the features were detected; the asserts bound every access.
        unsafe { avx2::matmul_bf16(x, n, k, w, m, out) };
        return;
    }
    // Without AVX2: widened in registers, eight accumulators (no buffer,
    // so a decode step allocates nothing on this path either).
    for j in 0..m {
        let row = &w[j * k..(j + 1) * k];
        for t in 0..n {
            out[t * m + j] = dot_widened(&x[t * k..(t + 1) * k], row);
        }
    }
}

/// `sum_i a[i] * b[i]`, `b` widened element by element, in eight
/// independent accumulators the compiler vectorises.
fn dot_widened(a: &[f32], b: &[bf16]) -> f32 {
    let mut acc = [0.0f32; 8];
    let (ca, cb) = (a.chunks_exact(8), b.chunks_exact(8));
    let (ra, rb) = (ca.remainder(), cb.remainder());
    for (x, y) in ca.zip(cb) {
        for i in 0..8 {
            acc[i] += x[i] * y[i].to_f32();
        }
    }
    let mut s: f32 = acc.iter().sum();
    for (x, y) in ra.iter().zip(rb) {
        s += x * y.to_f32();
    }
    s
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;

    use half::bf16;

    /// Eight bf16 at `p` widened to f32.
    #[inline]
    #[target_feature(enable = "avx2,fma")]
    unsafe fn load8(p: *const u16) -> __m256 {
        // SAFETY: the caller guarantees 8 readable u16 at p (16 bytes).
        unsafe {
            _mm256_castsi256_ps(_mm256_slli_epi32(
                _mm256_cvtepu16_epi32(_mm_loadu_si128(p.cast())),
                16,
            ))
        }
    }

    #[inline]
    #[target_feature(enable = "avx2,fma")]
    fn hsum(v: __m256) -> f32 {
        let s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
        let s = _mm_add_ps(s, _mm_movehl_ps(s, s));
        let s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
        _mm_cvtss_f32(s)
    }

    /// See [`super::dot_bf16`].
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `a` and `b` have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn dot_bf16(a: &[f32], b: &[bf16]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr().cast::<u16>());
        let (mut s0, mut s1) = (_mm256_setzero_ps(), _mm256_setzero_ps());
        let mut i = 0;
        // SAFETY: every load reads 8 elements below n.
        unsafe {
            while i + 16 <= n {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), load8(pb.add(i)), s0);
                s1 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i + 8)), load8(pb.add(i + 8)), s1);
                i += 16;
            }
            if i + 8 <= n {
                s0 = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(i)), load8(pb.add(i)), s0);
                i += 8;
            }
        }
        let mut sum = hsum(_mm256_add_ps(s0, s1));
        for j in i..n {
            sum += a[j] * b[j].to_f32();
        }
        sum
    }

    /// See [`super::axpy_bf16`].
    ///
    /// # Safety
    /// AVX2 and FMA must be available; `acc` and `v` have the same length.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn axpy_bf16(acc: &mut [f32], w: f32, v: &[bf16]) {
        let n = acc.len();
        let (pa, pv) = (acc.as_mut_ptr(), v.as_ptr().cast::<u16>());
        let wv = _mm256_set1_ps(w);
        let mut i = 0;
        // SAFETY: every access covers 8 elements below n.
        unsafe {
            while i + 8 <= n {
                let a = _mm256_loadu_ps(pa.add(i));
                _mm256_storeu_ps(pa.add(i), _mm256_fmadd_ps(wv, load8(pv.add(i)), a));
                i += 8;
            }
        }
        for j in i..n {
            acc[j] += w * v[j].to_f32();
        }
    }

    /// See [`super::matmul_bf16`]. Every token's dot product has the same
    /// arithmetic wherever it sits in the batch: chunk `q` of eight
    /// elements goes into accumulator `q % 4`, the four are summed as
    /// `(a0 + a1) + (a2 + a3)`, then the tail. Pairs of tokens share each
    /// widened chunk of a row (eight accumulators stay in registers); a
    /// lone last token runs the same sums on its own. So a token's output
    /// does not depend on the batch (batch invariance: a disaggregated run
    /// matches a single-process one bit for bit).
    ///
    /// # Safety
    /// AVX2 and FMA must be available; slices as asserted by the caller.
    #[target_feature(enable = "avx2,fma")]
    pub unsafe fn matmul_bf16(
        x: &[f32],
        n: usize,
        k: usize,
        w: &[bf16],
        m: usize,
        out: &mut [f32],
    ) {
        let k8 = k / 8 * 8;
        let xp = x.as_ptr();
        let tail = |t: usize, j: usize, i0: usize| -> f32 {
            (i0..k).map(|i| x[t * k + i] * w[j * k + i].to_f32()).sum()
        };
        #[inline]
        #[target_feature(enable = "avx2,fma")]
        fn finish(a: &[__m256; 4]) -> f32 {
            hsum(_mm256_add_ps(
                _mm256_add_ps(a[0], a[1]),
                _mm256_add_ps(a[2], a[3]),
            ))
        }
        for j in 0..m {
            // SAFETY: j < m, i + 8 <= k8 <= k and t + 1 < n keep every load
            // inside w (m x k bf16) and x (n x k f32), as the caller asserted.
            unsafe {
                let row = w.as_ptr().add(j * k).cast::<u16>();
                let mut t = 0;
                while t + 2 <= n {
                    let mut a = [_mm256_setzero_ps(); 4];
                    let mut b = [_mm256_setzero_ps(); 4];
                    let (x0, x1) = (xp.add(t * k), xp.add((t + 1) * k));
                    let mut i = 0;
                    while i + 32 <= k8 {
                        for q in 0..4 {
                            let o = i + 8 * q;
                            let wv = load8(row.add(o));
                            a[q] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0.add(o)), a[q]);
                            b[q] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x1.add(o)), b[q]);
                        }
                        i += 32;
                    }
                    let mut q = 0;
                    while i < k8 {
                        let wv = load8(row.add(i));
                        a[q] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x0.add(i)), a[q]);
                        b[q] = _mm256_fmadd_ps(wv, _mm256_loadu_ps(x1.add(i)), b[q]);
                        i += 8;
                        q += 1;
                    }
                    out[t * m + j] = finish(&a) + tail(t, j, k8);
                    out[(t + 1) * m + j] = finish(&b) + tail(t + 1, j, k8);
                    t += 2;
                }
                if t < n {
                    let mut a = [_mm256_setzero_ps(); 4];
                    let x0 = xp.add(t * k);
                    let mut i = 0;
                    while i + 32 <= k8 {
                        for (q, acc) in a.iter_mut().enumerate() {
                            let o = i + 8 * q;
                            *acc = _mm256_fmadd_ps(
                                load8(row.add(o)),
                                _mm256_loadu_ps(x0.add(o)),
                                *acc,
                            );
                        }
                        i += 32;
                    }
                    let mut q = 0;
                    while i < k8 {
                        a[q] = _mm256_fmadd_ps(load8(row.add(i)), _mm256_loadu_ps(x0.add(i)), a[q]);
                        i += 8;
                        q += 1;
                    }
                    out[t * m + j] = finish(&a) + tail(t, j, k8);
                }
            }
        }
    }
}

/// Fast, for large `n`: blocked SGEMM against f32 weights (`m x k`).
pub fn matmul_f32(x: &[f32], n: usize, k: usize, w: &[f32], m: usize, out: &mut [f32]) {
    assert!(x.len() >= n * k && w.len() >= m * k && out.len() >= n * m);
    if n == 0 || m == 0 {
        return;
    }
    // SAFETY: the asserts above bound every access the strides describe:
    // A = x (n x k, row-major), B = w^T (k x m: element (i, j) at w[j*k + i]),
    // C = out (n x m, row-major).
    unsafe {
        matrixmultiply::sgemm(
            n,
            k,
            m,
            1.0,
            x.as_ptr(),
            k as isize,
            1,
            w.as_ptr(),
            1,
            k as isize,
            0.0,
            out.as_mut_ptr(),
            m as isize,
            1,
        );
    }
}
