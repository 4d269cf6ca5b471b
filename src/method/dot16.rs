//! Dot products of an f32 query with f16 rows: the inner loop of scoring a catalog.
//!
//! On x86-64 with AVX2, FMA and F16C (checked at run time, once) the halves are widened with
//! `vcvtph2ps` and summed with fused multiply-adds in four 8-lane accumulators, prefetching
//! ahead across page boundaries; elsewhere the
//! rows are widened in chunks by `half` (NEON on aarch64) and summed in eight f32 lanes. Every
//! kernel sums in f32; kernels differ only in summation order (last-bit rounding).

use half::f16;
use half::slice::HalfFloatSliceExt;
use std::sync::OnceLock;

type Kernel = fn(&[f32], &[f16]) -> f32;

fn kernel() -> Kernel {
    static K: OnceLock<Kernel> = OnceLock::new();
    *K.get_or_init(|| {
        #[cfg(target_arch = "x86_64")]
        if std::is_x86_feature_detected!("avx2")
            && std::is_x86_feature_detected!("fma")
            && std::is_x86_feature_detected!("f16c")
        {
            // SAFETY: the features the kernel is compiled for were detected just above.
            return |a, b| unsafe { x86::dot(a, b) };
        }
        dot_portable
    })
}

/// `Σ a[j] · b[j]` in f32. Panics if the lengths differ.
#[inline]
pub fn dot_f16(a: &[f32], b: &[f16]) -> f32 {
    assert_eq!(a.len(), b.len(), "dot_f16: lengths differ");
    kernel()(a, b)
}

/// Name of the kernel [`dot_f16`] uses on this CPU (for benchmark reports).
pub fn kernel_name() -> &'static str {
    #[cfg(target_arch = "x86_64")]
    if kernel() as usize != dot_portable as Kernel as usize {
        return "avx2+fma+f16c";
    }
    "portable"
}

/// The portable kernel: widen 64 halves at a time, then eight independent f32 lanes.
pub fn dot_portable(a: &[f32], b: &[f16]) -> f32 {
    const CHUNK: usize = 64;
    let mut acc = [0f32; 8];
    let mut wide = [0f32; CHUNK];
    for (ac, bc) in a.chunks(CHUNK).zip(b.chunks(CHUNK)) {
        let wide = &mut wide[..bc.len()];
        bc.convert_to_f32_slice(wide);
        let mut ai = ac.chunks_exact(8);
        let mut wi = wide.chunks_exact(8);
        for (x, y) in (&mut ai).zip(&mut wi) {
            for l in 0..8 {
                acc[l] += x[l] * y[l];
            }
        }
        for (x, y) in ai.remainder().iter().zip(wi.remainder()) {
            acc[0] += x * y;
        }
    }
    acc.iter().sum()
}

#[cfg(target_arch = "x86_64")]
mod x86 {
    use half::f16;
    use std::arch::x86_64::*;

    /// Halves ahead of the current position that are prefetched (8 KiB; 4 KiB measured slower
    /// in `illmrec bench-catalog`, no prefetch much slower: 6 against 10-11 GB/s).
    const PREFETCH: usize = 4096;

    /// # Safety
    /// The CPU must have AVX2, FMA and F16C; `a` and `b` have the same length.
    #[target_feature(enable = "avx2,fma,f16c")]
    pub unsafe fn dot(a: &[f32], b: &[f16]) -> f32 {
        let n = a.len();
        let (pa, pb) = (a.as_ptr(), b.as_ptr() as *const u16);
        let mut acc = [_mm256_setzero_ps(); 4];
        let mut j = 0;
        while j + 32 <= n {
            // The hardware prefetcher stops at 4 KiB page boundaries; in a catalog scan the rows
            // follow each other, so fetching one line 8 KiB ahead per line read keeps the stream
            // going across pages (a prefetch never faults, whatever the address).
            _mm_prefetch::<_MM_HINT_T0>(pb.wrapping_add(j + PREFETCH) as *const i8);
            for (l, acc) in acc.iter_mut().enumerate() {
                let o = j + 8 * l;
                let h = _mm_loadu_si128(pb.add(o) as *const __m128i);
                *acc = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(o)), _mm256_cvtph_ps(h), *acc);
            }
            j += 32;
        }
        while j + 8 <= n {
            let h = _mm_loadu_si128(pb.add(j) as *const __m128i);
            acc[0] = _mm256_fmadd_ps(_mm256_loadu_ps(pa.add(j)), _mm256_cvtph_ps(h), acc[0]);
            j += 8;
        }
        let s = _mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3]));
        let q = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
        let q = _mm_add_ps(q, _mm_movehl_ps(q, q));
        let q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 1));
        let mut sum = _mm_cvtss_f32(q);
        while j < n {
            sum += *pa.add(j) * f16::from_bits(*pb.add(j)).to_f32();
            j += 1;
        }
        sum
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(n: usize, seed: u64) -> (Vec<f32>, Vec<f16>) {
        let mut x = seed;
        let mut next = || {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((x >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        let a = (0..n).map(|_| next()).collect();
        let b = (0..n).map(|_| f16::from_f32(next() * 3.0)).collect();
        (a, b)
    }

    /// Every kernel and length (empty, shorter than a vector, with remainders) agrees with an f64
    /// sum of the same halves to f32 rounding.
    #[test]
    fn kernels_match_an_f64_reference() {
        for n in [0, 1, 7, 8, 9, 31, 32, 33, 100, 512, 1536, 1537] {
            let (a, b) = data(n, n as u64 + 1);
            let want: f64 = a.iter().zip(&b).map(|(x, y)| *x as f64 * y.to_f64()).sum();
            let scale: f64 = a
                .iter()
                .zip(&b)
                .map(|(x, y)| (*x as f64 * y.to_f64()).abs())
                .sum::<f64>()
                .max(1e-30);
            for (name, got) in [
                ("dispatch", dot_f16(&a, &b)),
                ("portable", dot_portable(&a, &b)),
            ] {
                let err = (got as f64 - want).abs() / scale;
                assert!(err < 1e-6, "{name} n={n}: {got} vs {want} (rel {err})");
            }
        }
    }

    #[test]
    #[should_panic(expected = "lengths differ")]
    fn lengths_must_match() {
        dot_f16(&[1.0, 2.0], &[f16::ONE]);
    }

    #[test]
    fn kernel_is_named() {
        let name = kernel_name();
        assert!(name == "portable" || name == "avx2+fma+f16c");
    }
}
