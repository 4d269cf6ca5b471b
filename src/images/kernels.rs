//! The integer kernels of the MobileNet graph ([`super::mobilenet`]): XNNPACK's fp32
//! requantization, depthwise convolution, the exact i16×i16→i32 matrix product (with an AVX2
//! `vpmaddwd` kernel chosen at run time, a plain loop elsewhere) and im2col. Every path gives the
//! same integers.

/// XNNPACK's fp32 requantization: `clamp(acc · scale)` rounded half to even, as (q − zp).
pub(super) struct Requant {
    pub(super) scale: f32,
    pub(super) lo: f32,
    pub(super) hi: f32,
}

impl Requant {
    #[inline(always)]
    pub(super) fn apply(&self, acc: i32) -> i16 {
        // Round half to even by the 1.5·2^23 trick (exact for |v| < 2^22; v is within ±255
        // after the clamp): the same as `round_ties_even`, without a libm call.
        const MAGIC: f32 = 12_582_912.0;
        let v = (acc as f32 * self.scale).max(self.lo).min(self.hi);
        ((v + MAGIC) - MAGIC) as i16
    }
}

/// Geometry of a depthwise layer.
#[derive(Clone, Copy)]
pub(super) struct DwShape {
    pub(super) size: usize,
    pub(super) c: usize,
    pub(super) k: usize,
    pub(super) stride: usize,
    pub(super) out: usize,
    pub(super) pad: usize,
}

/// A depthwise convolution over channels-last i16 activations (AVX2 build of the same loop
/// where the CPU has it).
pub(super) fn depthwise(
    x: &[i16],
    w: &[i16],
    bias: &[i32],
    g: &DwShape,
    rq: &Requant,
    y: &mut [i16],
) {
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has the feature the function is compiled for.
            return unsafe { depthwise_avx2(x, w, bias, g, rq, y) };
        }
    }
    depthwise_generic(x, w, bias, g, rq, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn depthwise_avx2(
    x: &[i16],
    w: &[i16],
    bias: &[i32],
    g: &DwShape,
    rq: &Requant,
    y: &mut [i16],
) {
    depthwise_generic(x, w, bias, g, rq, y)
}

#[inline(always)]
fn depthwise_generic(x: &[i16], w: &[i16], bias: &[i32], g: &DwShape, rq: &Requant, y: &mut [i16]) {
    let DwShape {
        size,
        c,
        k,
        stride,
        out,
        pad,
    } = *g;
    let mut acc = vec![0i32; c];
    for oy in 0..out {
        for ox in 0..out {
            acc.copy_from_slice(bias);
            for ky in 0..k {
                let iy = (oy * stride + ky) as isize - pad as isize;
                if iy < 0 || iy >= size as isize {
                    continue;
                }
                for kx in 0..k {
                    let ix = (ox * stride + kx) as isize - pad as isize;
                    if ix < 0 || ix >= size as isize {
                        continue;
                    }
                    let src = &x[(iy as usize * size + ix as usize) * c..][..c];
                    let wk = &w[(ky * k + kx) * c..][..c];
                    for ((a, s), w) in acc.iter_mut().zip(src).zip(wk) {
                        *a += *s as i32 * *w as i32;
                    }
                }
            }
            let dst = &mut y[(oy * out + ox) * c..][..c];
            for (d, a) in dst.iter_mut().zip(&acc) {
                *d = rq.apply(*a);
            }
        }
    }
}

/// Width of the k-blocks of the matrix kernel (k is padded to a multiple of it).
pub(super) const LANES: usize = 32;

/// `out[i][j] = requant(bias[j] + Σ_k a[i][k]·w[j][k])` for a [m×kp], w [n×kp] (kp a multiple of
/// [`LANES`]), out [m×n]: the exact integer product, with AVX2's `vpmaddwd` when the CPU has it
/// (chosen at run time; `wp` is `w` packed for it), else a plain loop.
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm(
    a: &[i16],
    m: usize,
    kp: usize,
    w: &[i16],
    wp: &[i16],
    n: usize,
    bias: &[i32],
    rq: &Requant,
    out: &mut [i16],
) {
    debug_assert!(kp.is_multiple_of(LANES));
    #[cfg(target_arch = "x86_64")]
    {
        if std::arch::is_x86_feature_detected!("avx2") {
            // SAFETY: the CPU has the feature the function is compiled for; it checks the
            // slice lengths before reading through pointers.
            if n.is_multiple_of(16) {
                return unsafe { gemm_avx2(a, m, kp, wp, n, bias, rq, out) };
            }
        }
    }
    gemm_generic(a, m, kp, w, n, bias, rq, out)
}

/// AVX2: blocks of 4 rows × 16 output channels; each `vpmaddwd` multiplies a broadcast pair of
/// inputs with the same pair of 8 channels' weights (`wp`, packed by [`pack_pairs`]), so the
/// sums come out as vectors of channels and are requantized 8 at a time.
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
#[allow(clippy::too_many_arguments)]
unsafe fn gemm_avx2(
    a: &[i16],
    m: usize,
    kp: usize,
    wp: &[i16],
    n: usize,
    bias: &[i32],
    rq: &Requant,
    out: &mut [i16],
) {
    use std::arch::x86_64::*;
    assert!(a.len() >= m * kp && wp.len() >= n * kp && out.len() >= m * n && bias.len() >= n);
    assert!(kp.is_multiple_of(2) && n.is_multiple_of(16));
    let (scale, lo, hi) = (
        _mm256_set1_ps(rq.scale),
        _mm256_set1_ps(rq.lo),
        _mm256_set1_ps(rq.hi),
    );
    let store = |acc: __m256i, j: usize, row: &mut [i16]| {
        let b = _mm256_loadu_si256(bias.as_ptr().add(j) as *const __m256i);
        let f = _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_add_epi32(acc, b)), scale);
        // Rounds half to even (the default MXCSR mode), as XNNPACK does.
        let q = _mm256_cvtps_epi32(_mm256_min_ps(_mm256_max_ps(f, lo), hi));
        let mut v = [0i32; 8];
        _mm256_storeu_si256(v.as_mut_ptr() as *mut __m256i, q);
        for (d, x) in row[j..j + 8].iter_mut().zip(v) {
            *d = x as i16;
        }
    };
    let rows4 = m / 4 * 4;
    for i0 in (0..m).step_by(4) {
        let nrows = if i0 < rows4 { 4 } else { m - i0 };
        for j0 in (0..n).step_by(16) {
            let mut acc = [[_mm256_setzero_si256(); 2]; 4];
            for kk in 0..kp / 2 {
                let w = wp.as_ptr().add((kk * n + j0) * 2);
                let w0 = _mm256_loadu_si256(w as *const __m256i);
                let w1 = _mm256_loadu_si256(w.add(16) as *const __m256i);
                for (i, acc_i) in acc.iter_mut().enumerate().take(nrows) {
                    let pair =
                        (a.as_ptr().add((i0 + i) * kp + 2 * kk) as *const i32).read_unaligned();
                    let x = _mm256_set1_epi32(pair);
                    acc_i[0] = _mm256_add_epi32(acc_i[0], _mm256_madd_epi16(x, w0));
                    acc_i[1] = _mm256_add_epi32(acc_i[1], _mm256_madd_epi16(x, w1));
                }
            }
            for (i, acc_i) in acc.iter().enumerate().take(nrows) {
                let row = &mut out[(i0 + i) * n..][..n];
                store(acc_i[0], j0, row);
                store(acc_i[1], j0 + 8, row);
            }
        }
    }
}

/// Weights [n][kp] reordered as [kp/2][n][2] (pairs of consecutive k per channel), the layout
/// of the AVX2 kernel.
pub(super) fn pack_pairs(w: &[i16], n: usize, kp: usize) -> Vec<i16> {
    let mut out = vec![0i16; n * kp];
    for j in 0..n {
        for k in 0..kp {
            out[((k / 2) * n + j) * 2 + k % 2] = w[j * kp + k];
        }
    }
    out
}

#[inline(always)]
#[allow(clippy::too_many_arguments)]
fn gemm_generic(
    a: &[i16],
    m: usize,
    kp: usize,
    w: &[i16],
    n: usize,
    bias: &[i32],
    rq: &Requant,
    out: &mut [i16],
) {
    for i in 0..m {
        let row = &a[i * kp..][..kp];
        let dst = &mut out[i * n..][..n];
        for (j, d) in dst.iter_mut().enumerate() {
            let col = &w[j * kp..][..kp];
            *d = rq.apply(dot(row, col) + bias[j]);
        }
    }
}

/// Σ a·b in i32 (the pattern compilers turn into `pmaddwd`).
#[inline(always)]
fn dot(a: &[i16], b: &[i16]) -> i32 {
    a.iter().zip(b).map(|(x, y)| *x as i32 * *y as i32).sum()
}

/// Rows of k×k×c input patches, each zero-padded to kp (zero = the input's zero point, which is
/// also what lies outside the image).
#[allow(clippy::too_many_arguments)]
pub(super) fn im2col(
    x: &[i16],
    size: usize,
    c: usize,
    k: usize,
    stride: usize,
    out: usize,
    pad: usize,
    kp: usize,
    dst: &mut Vec<i16>,
) {
    dst.clear();
    dst.resize(out * out * kp, 0);
    let mut row = 0;
    for oy in 0..out {
        for ox in 0..out {
            let patch = &mut dst[row * kp..][..kp];
            for ky in 0..k {
                let iy = (oy * stride + ky) as isize - pad as isize;
                if iy < 0 || iy >= size as isize {
                    continue;
                }
                for kx in 0..k {
                    let ix = (ox * stride + kx) as isize - pad as isize;
                    if ix < 0 || ix >= size as isize {
                        continue;
                    }
                    patch[(ky * k + kx) * c..][..c]
                        .copy_from_slice(&x[(iy as usize * size + ix as usize) * c..][..c]);
                }
            }
            row += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_matrix_kernel_gives_the_same_integers() {
        let (m, kp, n) = (13, 64, 48);
        let a: Vec<i16> = (0..m * kp).map(|i| ((i * 37 % 511) as i16) - 255).collect();
        let w: Vec<i16> = (0..n * kp).map(|i| ((i * 91 % 401) as i16) - 200).collect();
        let bias: Vec<i32> = (0..n as i32).map(|j| j * 1000 - 20000).collect();
        let rq = Requant {
            scale: 1e-4,
            lo: 0.0,
            hi: 255.0,
        };
        let mut fast = vec![0i16; m * n];
        let mut plain = vec![0i16; m * n];
        gemm(
            &a,
            m,
            kp,
            &w,
            &pack_pairs(&w, n, kp),
            n,
            &bias,
            &rq,
            &mut fast,
        );
        gemm_generic(&a, m, kp, &w, n, &bias, &rq, &mut plain);
        assert_eq!(fast, plain);
        assert!(plain.iter().any(|&v| v > 0 && v < 255));
    }
}
