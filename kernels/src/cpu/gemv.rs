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

/// The instruction sets [`matmul_bf16`] can run on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Isa {
    /// 16-wide, tiles of four weight rows by four tokens.
    Avx512,
    /// 8-wide, two tokens per pass.
    Avx2,
    /// What the compiler vectorises.
    Portable,
}

impl Isa {
    /// The instruction sets this machine has, best first (detected at run
    /// time; `Portable` is always there).
    pub fn available() -> Vec<Isa> {
        let mut v = Vec::new();
        #[cfg(target_arch = "x86_64")]
        {
            if is_x86_feature_detected!("avx512f") {
                v.push(Isa::Avx512);
            }
            if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") {
                v.push(Isa::Avx2);
            }
        }
        v.push(Isa::Portable);
        v
    }

    /// The best one, detected once.
    pub fn best() -> Isa {
        static BEST: std::sync::OnceLock<Isa> = std::sync::OnceLock::new();
        *BEST.get_or_init(|| Isa::available()[0])
    }
}

/// Fast, for small `n`: each weight row is read from memory once (and from
/// L1 for every further group of tokens), widened and multiplied in
/// registers on the best instruction set this machine has ([`Isa::best`]).
/// Batch-invariant: row `t` of `out` depends only on row `t` of `x`, never
/// on `n` or on where the token sits in the batch.
pub fn matmul_bf16(x: &[f32], n: usize, k: usize, w: &[bf16], m: usize, out: &mut [f32]) {
    matmul_bf16_on(Isa::best(), x, n, k, w, m, out)
}

/// [`matmul_bf16`] on a given instruction set (one of
/// [`Isa::available`]; another falls back to `Portable`). Each set has its
/// own summation order, so all ranks of a group must use the same one
/// (they do: they run on one kind of machine and take the best).
pub fn matmul_bf16_on(
    isa: Isa,
    x: &[f32],
    n: usize,
    k: usize,
    w: &[bf16],
    m: usize,
    out: &mut [f32],
) {
    assert!(x.len() >= n * k && w.len() >= m * k && out.len() >= n * m);
    #[cfg(target_arch = "x86_64")]
    match isa {
        Isa::Avx512 if is_x86_feature_detected!("avx512f") => {
            // SAFETY: the feature was detected; the assert bounds every access.
            unsafe { avx512::matmul_bf16(x, n, k, w, m, out) };
            return;
        }
        Isa::Avx2 if is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma") => {
            // SAFETY: the features were detected; the assert bounds every access.
            unsafe { avx2::matmul_bf16(x, n, k, w, m, out) };
            return;
        }
        _ => {}
    }
    let _ = isa;
    // Widened in registers, eight accumulators (no buffer, so a decode
    // step allocates nothing on this path either).
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

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use std::arch::x86_64::*;

    use half::bf16;

    /// Weight rows and tokens of one register tile: 16 accumulators.
    const ROWS: usize = 4;
    const TOKENS: usize = 4;

    /// Sixteen bf16 at `p` widened to f32.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn load16(p: *const u16) -> __m512 {
        // SAFETY: the caller guarantees 16 readable u16 at p (32 bytes).
        unsafe {
            _mm512_castsi512_ps(_mm512_slli_epi32(
                _mm512_cvtepu16_epi32(_mm256_loadu_si256(p.cast())),
                16,
            ))
        }
    }

    /// `R` rows times `T` tokens over the first `k16` elements: one
    /// accumulator per pair, chunks of sixteen in order.
    ///
    /// # Safety
    /// AVX-512F; `rows[r]` and `xs[t]` readable for `k16` elements.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn tile<const R: usize, const T: usize>(
        rows: [*const u16; R],
        xs: [*const f32; T],
        k16: usize,
    ) -> [[__m512; T]; R] {
        let mut acc = [[_mm512_setzero_ps(); T]; R];
        let mut i = 0;
        // SAFETY: i + 16 <= k16, within every row and token (the caller).
        unsafe {
            while i < k16 {
                let xv: [__m512; T] = std::array::from_fn(|t| _mm512_loadu_ps(xs[t].add(i)));
                for r in 0..R {
                    let wv = load16(rows[r].add(i));
                    for t in 0..T {
                        acc[r][t] = _mm512_fmadd_ps(wv, xv[t], acc[r][t]);
                    }
                }
                i += 16;
            }
        }
        acc
    }

    /// See [`super::matmul_bf16`]. Every (token, row) dot product has the
    /// same arithmetic wherever the token sits in the batch: the chunks of
    /// sixteen are accumulated in order into one vector, which is reduced,
    /// then the tail (`k % 16` elements) is added in order. Tiles of
    /// [`ROWS`] rows by [`TOKENS`] tokens share every widened weight chunk
    /// and every loaded activation chunk (sixteen independent chains keep
    /// both FMA ports busy); rows and tokens left over run the same sums in
    /// other tiles (a token alone against eight rows: a decode step).
    ///
    /// # Safety
    /// AVX-512F must be available; slices as asserted by the caller.
    #[target_feature(enable = "avx512f")]
    pub unsafe fn matmul_bf16(
        x: &[f32],
        n: usize,
        k: usize,
        w: &[bf16],
        m: usize,
        out: &mut [f32],
    ) {
        // Tokens in groups of TOKENS, each row block's weights in L1 for
        // all of them; then the tokens left over (all of a decode step's
        // when it has fewer than TOKENS) together, in one pass.
        let full = n / TOKENS * TOKENS;
        let mut j = 0;
        while j < m {
            let r = if m - j >= ROWS { ROWS } else { 1 };
            for t in (0..full).step_by(TOKENS) {
                // SAFETY: rows j..j + r <= m and tokens t..t + TOKENS <= n.
                unsafe {
                    if r == ROWS {
                        block::<ROWS, TOKENS>(x, w, k, m, j, t, out);
                    } else {
                        block::<1, TOKENS>(x, w, k, m, j, t, out);
                    }
                }
            }
            j += r;
        }
        // SAFETY: tokens full..n < n, every row (the caller's asserts).
        unsafe {
            match n - full {
                1 => rows_pass::<{ 2 * ROWS }, 1>(x, w, k, m, full, out),
                2 => rows_pass::<ROWS, 2>(x, w, k, m, full, out),
                3 => rows_pass::<ROWS, 3>(x, w, k, m, full, out),
                _ => {}
            }
        }
    }

    /// Every row (in tiles of `R`, then one at a time) against tokens
    /// `t..t + T`.
    ///
    /// # Safety
    /// AVX-512F; `x` holds tokens up to `t + T`, `w` has `m` rows of `k`.
    #[target_feature(enable = "avx512f")]
    unsafe fn rows_pass<const R: usize, const T: usize>(
        x: &[f32],
        w: &[bf16],
        k: usize,
        m: usize,
        t: usize,
        out: &mut [f32],
    ) {
        let mut j = 0;
        while j < m {
            // SAFETY: rows j..j + R (or j) < m; tokens as the caller says.
            unsafe {
                if m - j >= R {
                    block::<R, T>(x, w, k, m, j, t, out);
                    j += R;
                } else {
                    block::<1, T>(x, w, k, m, j, t, out);
                    j += 1;
                }
            }
        }
    }

    /// Rows `j..j + R` against tokens `t..t + T`: each dot product's
    /// vector part in one accumulator ([`tile`]), reduced, plus its tail.
    ///
    /// # Safety
    /// AVX-512F; those rows and tokens exist.
    #[inline]
    #[target_feature(enable = "avx512f")]
    unsafe fn block<const R: usize, const T: usize>(
        x: &[f32],
        w: &[bf16],
        k: usize,
        m: usize,
        j: usize,
        t: usize,
        out: &mut [f32],
    ) {
        let k16 = k / 16 * 16;
        let rows: [*const u16; R] = std::array::from_fn(|a| w[(j + a) * k..].as_ptr().cast());
        let xs: [*const f32; T] = std::array::from_fn(|b| x[(t + b) * k..].as_ptr());
        // SAFETY: each row and token has k >= k16 elements.
        let acc = unsafe { tile::<R, T>(rows, xs, k16) };
        for (a, accs) in acc.iter().enumerate() {
            for (b, v) in accs.iter().enumerate() {
                let (row, tok) = (&w[(j + a) * k..][..k], &x[(t + b) * k..][..k]);
                let tail: f32 = (k16..k).map(|i| tok[i] * row[i].to_f32()).sum();
                out[(t + b) * m + j + a] = _mm512_reduce_add_ps(*v) + tail;
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
