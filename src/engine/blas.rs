//! OpenBLAS for ggml's BLAS backend, loaded at run time.
//!
//! The default build turns on ggml's BLAS backend (`GGML_BLAS=ON`, `.cargo/config.toml`): large
//! matrix products (a prompt's ≥ 32 positions against a weight) go to `cblas_sgemm`, whose
//! OpenBLAS kernels are chosen at run time for the CPU (AVX2, AVX-512, …), while the rest of
//! ggml stays on its portable AVX2 build. ggml's BLAS code calls three functions; this module
//! defines them and forwards them to an OpenBLAS it opens with `dlopen` on first use, because
//! OpenBLAS picks its kernels in a load-time constructor from `OPENBLAS_CORETYPE` or its own CPU
//! table, and an older OpenBLAS (Debian 12 ships 0.3.21) does not know newer CPUs and falls back
//! to SSE3 kernels (2.5× slower here). Opening it ourselves lets [`choose_coretype`] name the
//! kernel family from this CPU's features before the constructor runs. The OpenMP build of
//! OpenBLAS is preferred: it shares ggml's OpenMP threads, where the pthread build's own threads
//! fight ggml's for the cores.
//!
//! `ILLMREC_OPENBLAS=PATH` names the library to open instead of the search. [`ensure`] (called
//! when a model loads) turns a missing library into a [`BlasError`] for the caller to report;
//! every function here is a no-op in a build without the BLAS backend. Nothing here prints or
//! stops the process: should ggml ever call [`cblas_sgemm`] without a library (only a caller that
//! ignored [`ensure`]'s error could), the product is computed by a plain loop instead.

use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt;
use std::sync::OnceLock;

/// Whether this build has ggml's BLAS backend (set by build.rs from `GGML_BLAS`).
pub const BUILT: bool = cfg!(illmrec_blas);

/// Libraries tried in order: the OpenMP builds first (Debian/Ubuntu's alternative directory,
/// Fedora's name), then whatever `libopenblas.so.0` the loader finds.
const CANDIDATES: &[&str] = &[
    "/usr/lib/x86_64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "/usr/lib/aarch64-linux-gnu/openblas-openmp/libopenblas.so.0",
    "libopenblaso.so.0",
    "libopenblas.so.0",
    "libopenblas.so",
];

/// OpenBLAS's `openblas_get_parallel()` value for its OpenMP build.
const OPENBLAS_OPENMP: c_int = 2;

/// What the CPU offers, as far as OpenBLAS's kernel families go.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CpuLevel {
    pub avx2_fma: bool,
    /// AVX-512 F, BW, DQ and VL (what OpenBLAS's SkylakeX kernels use), enabled by the OS.
    pub avx512: bool,
}

impl CpuLevel {
    pub fn detect() -> Self {
        #[cfg(target_arch = "x86_64")]
        {
            CpuLevel {
                avx2_fma: is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma"),
                avx512: is_x86_feature_detected!("avx512f")
                    && is_x86_feature_detected!("avx512bw")
                    && is_x86_feature_detected!("avx512dq")
                    && is_x86_feature_detected!("avx512vl"),
            }
        }
        #[cfg(not(target_arch = "x86_64"))]
        {
            CpuLevel {
                avx2_fma: false,
                avx512: false,
            }
        }
    }
}

/// The `OPENBLAS_CORETYPE` to set, or `None` to leave OpenBLAS's own choice: a value the user
/// set wins; otherwise SkylakeX on AVX-512 CPUs and Haswell on AVX2 ones (every OpenBLAS with
/// run-time dispatch since 0.3.x has both, and their single-precision GEMM is what ggml calls),
/// nothing elsewhere (other architectures, older x86).
pub fn choose_coretype(user: Option<&str>, cpu: CpuLevel) -> Option<&'static str> {
    if user.is_some_and(|u| !u.is_empty()) {
        return None;
    }
    if cpu.avx512 {
        Some("SkylakeX")
    } else if cpu.avx2_fma {
        Some("Haswell")
    } else {
        None
    }
}

type Sgemm = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

struct Lib {
    path: String,
    sgemm: Sgemm,
    set_threads: Option<unsafe extern "C" fn(c_int)>,
    get_parallel: Option<unsafe extern "C" fn() -> c_int>,
    get_config: Option<unsafe extern "C" fn() -> *const c_char>,
    get_corename: Option<unsafe extern "C" fn() -> *const c_char>,
    coretype_set: Option<&'static str>,
}

/// Why OpenBLAS cannot be used (from [`ensure`] and [`describe`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum BlasError {
    /// `ILLMREC_OPENBLAS` names a file that is not an OpenBLAS library that can be opened.
    NotOpenBlas(String),
    /// None of the usual OpenBLAS libraries is installed.
    NotInstalled,
}

impl fmt::Display for BlasError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BlasError::NotOpenBlas(p) => write!(
                f,
                "ILLMREC_OPENBLAS={p} is not an OpenBLAS library that can be opened (no cblas_sgemm)"
            ),
            BlasError::NotInstalled => f.write_str(
                "this build multiplies matrices with OpenBLAS, which is not installed: install \
                 it (Debian/Ubuntu: apt install libopenblas0-openmp) or rebuild with \
                 GGML_BLAS=OFF",
            ),
        }
    }
}

impl std::error::Error for BlasError {}

static LIB: OnceLock<Result<Lib, BlasError>> = OnceLock::new();

unsafe fn sym(handle: *mut c_void, name: &str) -> *mut c_void {
    let c = CString::new(name).unwrap();
    libc::dlsym(handle, c.as_ptr())
}

fn load() -> &'static Result<Lib, BlasError> {
    LIB.get_or_init(|| {
        let user = std::env::var("OPENBLAS_CORETYPE").ok();
        let coretype_set = choose_coretype(user.as_deref(), CpuLevel::detect());
        if let Some(ct) = coretype_set {
            // Read by OpenBLAS's constructor, which runs inside the dlopen below.
            std::env::set_var("OPENBLAS_CORETYPE", ct);
        }
        let chosen = std::env::var("ILLMREC_OPENBLAS")
            .ok()
            .filter(|p| !p.is_empty());
        let candidates: Vec<String> = match &chosen {
            Some(p) => vec![p.clone()],
            None => CANDIDATES.iter().map(|p| p.to_string()).collect(),
        };
        for path in candidates {
            let Ok(c) = CString::new(path.as_str()) else {
                continue;
            };
            // SAFETY: dlopen/dlsym with valid C strings; the handle is never closed, so the
            // function pointers stay valid for the life of the process.
            unsafe {
                let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
                if h.is_null() {
                    continue;
                }
                let sgemm = sym(h, "cblas_sgemm");
                if sgemm.is_null() {
                    continue;
                }
                let opt = |name| {
                    let p = sym(h, name);
                    (!p.is_null()).then_some(p)
                };
                return Ok(Lib {
                    path,
                    sgemm: std::mem::transmute::<*mut c_void, Sgemm>(sgemm),
                    set_threads: opt("openblas_set_num_threads").map(|p| std::mem::transmute(p)),
                    get_parallel: opt("openblas_get_parallel").map(|p| std::mem::transmute(p)),
                    get_config: opt("openblas_get_config").map(|p| std::mem::transmute(p)),
                    get_corename: opt("openblas_get_corename").map(|p| std::mem::transmute(p)),
                    coretype_set,
                });
            }
        }
        Err(match chosen {
            Some(p) => BlasError::NotOpenBlas(p),
            None => BlasError::NotInstalled,
        })
    })
}

/// Whether ggml will call OpenBLAS: this crate defines the functions (`BUILT`) and llama.cpp was
/// compiled with its BLAS backend. A target folder built before `GGML_BLAS=ON` has the first
/// without the second (llama-cpp-sys-2 re-runs CMake only for variables it saw before).
fn needed() -> bool {
    BUILT && super::backend::has_blas_backend()
}

/// Makes sure OpenBLAS is loaded when this build needs it.
pub fn ensure() -> Result<(), BlasError> {
    if !needed() {
        return Ok(());
    }
    load().as_ref().map(|_| ()).map_err(Clone::clone)
}

/// One line for `illmrec info`: which library, its configuration, the kernel family and why.
pub fn describe() -> String {
    if !BUILT {
        return "not in this build (GGML_BLAS=OFF): every matrix product runs on ggml's CPU code"
            .into();
    }
    if !needed() {
        return "not in this llama.cpp build: it was compiled before GGML_BLAS=ON reached it; \
                `cargo clean -p llama-cpp-sys-2 --release` and rebuild"
            .into();
    }
    match load() {
        Err(e) => e.to_string(),
        Ok(lib) => {
            let text = |f: Option<unsafe extern "C" fn() -> *const c_char>| {
                // SAFETY: OpenBLAS returns pointers to static NUL-terminated strings.
                f.map(|f| {
                    unsafe { CStr::from_ptr(f()) }
                        .to_string_lossy()
                        .trim()
                        .to_string()
                })
                .unwrap_or_else(|| "?".into())
            };
            let threads = match lib.get_parallel.map(|f| unsafe { f() }) {
                Some(OPENBLAS_OPENMP) => "OpenMP threads shared with ggml",
                Some(_) => "its own threads (not the OpenMP build: slower beside ggml's threads; install libopenblas0-openmp)",
                None => "threading unknown",
            };
            let why = match lib.coretype_set {
                Some(_) => "set by illmrec from this CPU's features; OPENBLAS_CORETYPE overrides",
                None => "OpenBLAS's own choice or OPENBLAS_CORETYPE",
            };
            format!(
                "OpenBLAS {} ({}), kernels {} ({why}), {threads}",
                lib.path,
                text(lib.get_config),
                text(lib.get_corename),
            )
        }
    }
}

/// CBLAS's `CblasColMajor` (`CblasRowMajor` is 101).
#[cfg(illmrec_blas)]
const COL_MAJOR: c_int = 102;
/// CBLAS's `CblasNoTrans` (`CblasTrans` is 112, `CblasConjTrans` 113: the same for reals).
#[cfg(illmrec_blas)]
const NO_TRANS: c_int = 111;

/// One matrix of a CBLAS call: where it starts, its leading dimension, and (for A and B)
/// whether the call uses its transpose.
#[cfg(any(illmrec_blas, test))]
struct Operand<P> {
    ptr: P,
    ld: usize,
    trans: bool,
}

/// `C = alpha·op(A)·op(B) + beta·C` for an `m`×`k` op(A) and a `k`×`n` op(B), stored row-major
/// or (`col_major`) column-major as CBLAS says, by a plain loop: what [`cblas_sgemm`] computes
/// when no OpenBLAS could be opened, so that ggml (which has no error path) still gets its
/// product. Far slower than OpenBLAS; never used after [`ensure`] passed.
///
/// # Safety
/// The operands describe matrices of these sizes, as CBLAS's contract says.
#[cfg(any(illmrec_blas, test))]
unsafe fn sgemm_loop(
    col_major: bool,
    [m, n, k]: [usize; 3],
    alpha: f32,
    a: Operand<*const f32>,
    b: Operand<*const f32>,
    beta: f32,
    c: Operand<*mut f32>,
) {
    // Element (row, col) of a matrix stored with leading dimension `ld`.
    let at = |row: usize, col: usize, ld: usize| match col_major {
        true => row + col * ld,
        false => row * ld + col,
    };
    for i in 0..m {
        for j in 0..n {
            let mut sum = 0f32;
            for p in 0..k {
                let x = match a.trans {
                    false => *a.ptr.add(at(i, p, a.ld)),
                    true => *a.ptr.add(at(p, i, a.ld)),
                };
                let y = match b.trans {
                    false => *b.ptr.add(at(p, j, b.ld)),
                    true => *b.ptr.add(at(j, p, b.ld)),
                };
                sum += x * y;
            }
            let out = c.ptr.add(at(i, j, c.ld));
            // As in BLAS, C is not read when beta is zero (it may hold anything).
            *out = match beta == 0.0 {
                true => alpha * sum,
                false => alpha * sum + beta * *out,
            };
        }
    }
}

#[cfg(illmrec_blas)]
thread_local! {
    /// The thread count ggml last asked for on the calling thread (0: none yet).
    static WANTED_THREADS: std::cell::Cell<c_int> = const { std::cell::Cell::new(0) };
}

/// Who is inside OpenBLAS now, and the thread count it was last set to: the bookkeeping behind
/// [`cblas_sgemm`]'s turns (pure, so that the policy is unit-tested without OpenBLAS).
///
/// OpenBLAS keeps its thread count process-wide, and its OpenMP build shares one set of thread
/// work buffers between all multi-threaded calls (unless built with `NUM_PARALLEL` > 1),
/// while ggml sets the count per context just before its products. Contexts decoding at once on
/// different threads (`serve --contexts N`, parallel tests, several Python recommenders) got
/// wrong products without any error when such calls overlapped (measured: hidden states off by
/// up to 69 on values of about 30; `tests/llm.rs` `contexts_on_several_threads_equal_each_alone`).
/// So a multi-threaded call runs alone; one-thread calls run in their caller with buffers of
/// their own and may overlap each other while OpenBLAS is set to one thread (what `serve
/// --contexts N --threads 1` does: taking turns there halved its throughput).
#[derive(Debug)]
pub struct Turns {
    /// The thread count OpenBLAS was last set to (0: not yet).
    set: c_int,
    /// Calls inside OpenBLAS now.
    inside: usize,
    /// Multi-threaded callers waiting for the library to empty (one-thread calls stop joining).
    waiting_alone: usize,
}

impl Turns {
    /// Nobody inside, no thread count set yet.
    #[cfg(any(illmrec_blas, test))]
    const fn new() -> Self {
        Turns {
            set: 0,
            inside: 0,
            waiting_alone: 0,
        }
    }

    /// Whether a call that wants `wanted` threads (0: unknown) may start now; if so, it is
    /// counted inside (a call that finds the library empty records `wanted` as its count).
    pub fn enter(&mut self, wanted: c_int) -> bool {
        if self.inside == 0 {
            self.inside = 1;
            if wanted > 0 {
                self.set = wanted;
            }
            return true;
        }
        if wanted == 1 && self.set == 1 && self.waiting_alone == 0 {
            self.inside += 1;
            return true;
        }
        false
    }

    /// A call left OpenBLAS; true when it was the last one inside (wake the waiting callers).
    pub fn leave(&mut self) -> bool {
        self.inside -= 1;
        self.inside == 0
    }
}

#[cfg(illmrec_blas)]
static TURNS: std::sync::Mutex<Turns> = std::sync::Mutex::new(Turns::new());
#[cfg(illmrec_blas)]
static FREED: std::sync::Condvar = std::sync::Condvar::new();

/// ggml's BLAS backend calls this for every large matrix product; calls from different threads
/// take turns (see [`Turns`]).
///
/// # Safety
/// The caller passes a valid CBLAS single-precision GEMM call.
#[cfg(illmrec_blas)]
#[no_mangle]
pub unsafe extern "C" fn cblas_sgemm(
    order: c_int,
    trans_a: c_int,
    trans_b: c_int,
    m: c_int,
    n: c_int,
    k: c_int,
    alpha: f32,
    a: *const f32,
    lda: c_int,
    b: *const f32,
    ldb: c_int,
    beta: f32,
    c: *mut f32,
    ldc: c_int,
) {
    let Ok(lib) = load() else {
        // Only reachable when a caller ignored `ensure`'s error; ggml has no error path.
        let dim = |v: c_int| v.max(0) as usize;
        let operand = |ptr, ld, trans| Operand {
            ptr,
            ld: dim(ld),
            trans: trans != NO_TRANS,
        };
        return sgemm_loop(
            order == COL_MAJOR,
            [m, n, k].map(dim),
            alpha,
            operand(a, lda, trans_a),
            operand(b, ldb, trans_b),
            beta,
            Operand {
                ptr: c,
                ld: dim(ldc),
                trans: false,
            },
        );
    };
    let wanted = WANTED_THREADS.with(|w| w.get());
    let mut turns = TURNS.lock().unwrap_or_else(|e| e.into_inner());
    let mut waiting = false;
    while !turns.enter(wanted) {
        if !waiting && wanted != 1 {
            turns.waiting_alone += 1;
            waiting = true;
        }
        turns = FREED.wait(turns).unwrap_or_else(|e| e.into_inner());
    }
    if waiting {
        turns.waiting_alone -= 1;
    }
    // Under the lock: either alone inside, or one of several one-thread calls while OpenBLAS is
    // already at one thread (the global count does not change). Set on every call, because
    // OpenBLAS's OpenMP build also sets the calling thread's OpenMP thread count here: calling it
    // only when the global count changed left other callers' threads at the default and made
    // `serve --contexts 2 --threads 1` 1.6× slower (measured with the load test).
    if let (true, Some(f)) = (wanted > 0, lib.set_threads) {
        f(wanted);
    }
    drop(turns);
    (lib.sgemm)(
        order, trans_a, trans_b, m, n, k, alpha, a, lda, b, ldb, beta, c, ldc,
    );
    let mut turns = TURNS.lock().unwrap_or_else(|e| e.into_inner());
    if turns.leave() {
        FREED.notify_all();
    }
}

/// ggml calls this before its products with the context's thread count; it is applied to
/// OpenBLAS at the next [`cblas_sgemm`] of the same thread, when that call's turn comes.
///
/// # Safety
/// Plain integer argument.
#[cfg(illmrec_blas)]
#[no_mangle]
pub unsafe extern "C" fn openblas_set_num_threads(n: c_int) {
    WANTED_THREADS.with(|w| w.set(n));
}

/// # Safety
/// No arguments; forwarded to OpenBLAS.
#[cfg(illmrec_blas)]
#[no_mangle]
pub unsafe extern "C" fn openblas_get_parallel() -> c_int {
    load()
        .as_ref()
        .ok()
        .and_then(|l| l.get_parallel)
        .map_or(0, |f| f())
}

#[cfg(test)]
mod tests {
    use super::*;

    const AVX512: CpuLevel = CpuLevel {
        avx2_fma: true,
        avx512: true,
    };
    const AVX2: CpuLevel = CpuLevel {
        avx2_fma: true,
        avx512: false,
    };
    const OLD: CpuLevel = CpuLevel {
        avx2_fma: false,
        avx512: false,
    };

    #[test]
    fn multi_threaded_calls_run_alone_and_one_thread_calls_share() {
        let mut t = Turns::new();
        // The first call sets the count; another 2-thread call waits for it.
        assert!(t.enter(2));
        assert_eq!(t.set, 2);
        assert!(!t.enter(2));
        assert!(
            !t.enter(1),
            "a one-thread call must not run beside a 2-thread one"
        );
        assert!(t.leave());
        // One-thread calls share once the library is set to one thread.
        assert!(t.enter(1));
        assert!(t.enter(1));
        assert!(t.enter(1));
        assert!(!t.enter(3));
        assert!(!t.enter(0), "an unknown count runs alone");
        // A waiting multi-threaded caller stops new one-thread calls from joining.
        t.waiting_alone = 1;
        assert!(!t.enter(1));
        assert!(!t.leave());
        assert!(!t.leave());
        assert!(t.leave());
        assert!(t.enter(3));
        assert_eq!(t.set, 3);
        t.waiting_alone = 0;
        assert!(t.leave());
        // An unknown count keeps whatever was set, and runs alone.
        assert!(t.enter(0));
        assert_eq!(t.set, 3);
        assert!(!t.enter(1));
        assert!(t.leave());
    }

    #[test]
    fn the_fallback_product_follows_cblas_conventions() {
        // A (2×3) · B (3×2) = [[58, 64], [139, 154]].
        let a = [1f32, 2., 3., 4., 5., 6.];
        let b = [7f32, 8., 9., 10., 11., 12.];
        // Their transposes' row-major storage, which is also their column-major storage.
        let a_t = [1f32, 4., 2., 5., 3., 6.];
        let b_t = [7f32, 9., 11., 8., 10., 12.];
        let want = [58f32, 64., 139., 154.];
        let run = |col_major,
                   (a, lda, ta): (&[f32], usize, bool),
                   (b, ldb, tb): (&[f32], usize, bool),
                   c: &mut [f32],
                   beta| {
            let op = |ptr, ld, trans| Operand { ptr, ld, trans };
            // SAFETY: the slices have the sizes the dimensions describe.
            unsafe {
                sgemm_loop(
                    col_major,
                    [2, 2, 3],
                    1.0,
                    op(a.as_ptr(), lda, ta),
                    op(b.as_ptr(), ldb, tb),
                    beta,
                    Operand {
                        ptr: c.as_mut_ptr(),
                        ld: 2,
                        trans: false,
                    },
                )
            }
        };
        let mut c = [f32::NAN; 4];
        run(false, (&a, 3, false), (&b, 2, false), &mut c, 0.0);
        assert_eq!(c, want, "beta 0 ignores what C held");
        let mut c = [0f32; 4];
        run(false, (&a_t, 2, true), (&b_t, 3, true), &mut c, 0.0);
        assert_eq!(c, want, "transposed operands");
        let mut c = [0f32; 4];
        run(true, (&a_t, 2, false), (&b_t, 3, false), &mut c, 0.0);
        assert_eq!(c, [58., 139., 64., 154.], "column-major in and out");
        let mut c = [1f32; 4];
        run(false, (&a, 3, false), (&b, 2, false), &mut c, 2.0);
        assert_eq!(c, want.map(|x| x + 2.0), "beta accumulates");
    }

    #[test]
    fn coretype_follows_the_cpu() {
        assert_eq!(choose_coretype(None, AVX512), Some("SkylakeX"));
        assert_eq!(choose_coretype(None, AVX2), Some("Haswell"));
        assert_eq!(choose_coretype(None, OLD), None);
    }

    #[test]
    fn a_coretype_the_user_set_wins() {
        assert_eq!(choose_coretype(Some("Haswell"), AVX512), None);
        assert_eq!(choose_coretype(Some(""), AVX512), Some("SkylakeX"));
    }
}
