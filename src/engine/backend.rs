//! The llama.cpp runtime underneath everything: initialising the backend once, routing
//! llama.cpp's and ggml's log (silent unless verbose), the CPU code this build runs, and what
//! the build offers (system info, BLAS backend, GPU offload).

#[cfg(feature = "cpu-variants")]
use anyhow::bail;
use anyhow::{Context as _, Result};
use llama_cpp_2::llama_backend::LlamaBackend;
use llama_cpp_sys_2 as sys;
use std::ffi::{c_char, CStr, CString};
use std::path::Path;
#[cfg(feature = "cpu-variants")]
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Once, OnceLock};

static BACKEND: OnceLock<LlamaBackend> = OnceLock::new();
static VERBOSE: AtomicBool = AtomicBool::new(false);
static LOGGER: Once = Once::new();

/// llama.cpp's and ggml's log, forwarded to stderr only in verbose mode.
unsafe extern "C" fn forward_log(
    _level: sys::ggml_log_level,
    text: *const c_char,
    _user_data: *mut std::ffi::c_void,
) {
    if VERBOSE.load(Ordering::Relaxed) && !text.is_null() {
        use std::io::Write;
        // SAFETY: llama.cpp passes a NUL-terminated string.
        let text = unsafe { CStr::from_ptr(text) }.to_string_lossy();
        let _ = std::io::stderr().write_all(text.as_bytes());
    }
}

/// Routes llama.cpp's and ggml's log through [`forward_log`] before any other call into them
/// (GGUF header reads included), so that nothing reaches stderr unless verbose mode is on.
pub(super) fn install_logger() {
    LOGGER.call_once(|| {
        // SAFETY: a valid callback that lives for the whole process.
        unsafe {
            sys::llama_log_set(Some(forward_log), std::ptr::null_mut());
            sys::ggml_log_set(Some(forward_log), std::ptr::null_mut());
        }
    });
}

/// Lets llama.cpp's own log through to stderr (`--verbose`), or silences it (the default).
pub fn set_verbose(verbose: bool) {
    VERBOSE.store(verbose, Ordering::Relaxed);
    install_logger();
}

/// Initialises llama.cpp once per process (its log stays as [`set_verbose`] set it).
pub(super) fn backend() -> &'static LlamaBackend {
    install_logger();
    BACKEND.get_or_init(|| {
        let b = LlamaBackend::init().expect("llama.cpp backend initialised twice");
        super::kernels::install();
        #[cfg(feature = "cpu-variants")]
        CPU_VARIANT.get_or_init(super::variants::load_best);
        b
    })
}

/// The CPU variant loaded at start-up (builds with the `cpu-variants` feature), or why none was.
#[cfg(feature = "cpu-variants")]
static CPU_VARIANT: OnceLock<std::result::Result<(crate::engine::cpu::Choice, PathBuf), String>> =
    OnceLock::new();

/// Fails when this build loads its CPU code at run time and could not (names the folder).
pub(super) fn check_cpu_backend() -> Result<()> {
    backend();
    #[cfg(feature = "cpu-variants")]
    if let Some(Err(e)) = CPU_VARIANT.get() {
        bail!("{e}");
    }
    Ok(())
}

/// Which CPU code this build runs, and why (for `illmrec info`).
pub fn cpu_build() -> String {
    backend();
    #[cfg(feature = "cpu-variants")]
    {
        match CPU_VARIANT.get() {
            Some(Ok((c, path))) => format!("{} from {} ({})", c.name, path.display(), c.reason),
            Some(Err(e)) => format!("none loaded: {e}"),
            None => "not initialised".into(),
        }
    }
    #[cfg(not(feature = "cpu-variants"))]
    {
        let mut on = Vec::new();
        for (flag, name) in [
            (cfg!(target_feature = "avx2"), "AVX2"),
            (cfg!(target_feature = "avx512f"), "AVX-512"),
        ] {
            if flag {
                on.push(name);
            }
        }
        format!(
            "one CPU build, fixed at compile time (see `backends` for its instruction sets{}); \
             build with `--features cpu-variants` to choose the best of ggml's CPU variants at run time",
            if on.is_empty() { String::new() } else { format!("; Rust code: {}", on.join(", ")) }
        )
    }
}

pub(super) fn path_to_cstring(path: &Path) -> Result<CString> {
    CString::new(path.to_string_lossy().as_bytes())
        .with_context(|| format!("path {} contains a NUL byte", path.display()))
}

/// llama.cpp's description of the compute backends compiled in (CPU features, CUDA, Metal).
pub fn system_info() -> String {
    backend();
    // SAFETY: returns a static C string.
    unsafe {
        CStr::from_ptr(sys::llama_print_system_info())
            .to_string_lossy()
            .into_owned()
    }
}

/// Whether llama.cpp's ggml has its BLAS backend compiled in (registered as "BLAS").
pub fn has_blas_backend() -> bool {
    backend();
    // SAFETY: a NUL-terminated name; the registry is only read.
    unsafe { !sys::ggml_backend_reg_by_name(c"BLAS".as_ptr()).is_null() }
}

/// Whether this build can offload layers to a GPU.
pub fn supports_gpu_offload() -> bool {
    backend();
    // SAFETY: plain query.
    unsafe { sys::llama_supports_gpu_offload() }
}

/// The GPU devices ggml can use in this process ("name (description)"), after the backends
/// (compiled in, or loaded at start-up with `cpu-variants`) registered theirs. Empty on a CPU
/// build, and on a CUDA build where no driver, runtime or device was found.
pub fn gpu_devices() -> Vec<String> {
    backend();
    let text = |p: *const c_char| {
        if p.is_null() {
            String::new()
        } else {
            // SAFETY: ggml returns NUL-terminated strings owned by the device registry.
            unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
        }
    };
    let mut out = Vec::new();
    // SAFETY: read-only queries of ggml's device registry, indices below its count.
    unsafe {
        for i in 0..sys::ggml_backend_dev_count() {
            let dev = sys::ggml_backend_dev_get(i);
            if !dev.is_null()
                && sys::ggml_backend_dev_type(dev) == sys::GGML_BACKEND_DEVICE_TYPE_GPU
            {
                let (name, desc) = (
                    text(sys::ggml_backend_dev_name(dev)),
                    text(sys::ggml_backend_dev_description(dev)),
                );
                out.push(if desc.is_empty() {
                    name
                } else {
                    format!("{name} ({desc})")
                });
            }
        }
    }
    out
}

/// What a request for `n_gpu_layers` gets here, as one line for the user, or None when it gets
/// what it asked for (layers on a GPU, or none asked). `explicit`: the user gave the number
/// (rather than the build's default). Pure: `built` is [`supports_gpu_offload`], `devices`
/// [`gpu_devices`].
pub fn gpu_fallback(
    n_gpu_layers: i32,
    explicit: bool,
    built: bool,
    devices: &[String],
) -> Option<String> {
    if n_gpu_layers <= 0 || !devices.is_empty() {
        return None;
    }
    let why = if built {
        "this build has GPU offload but found no GPU (no device, driver or CUDA runtime)"
    } else {
        "this build has no GPU offload"
    };
    Some(if explicit {
        format!("--n-gpu-layers {n_gpu_layers} asks for a GPU, but {why}; running on the CPU")
    } else {
        format!("{why}; running on the CPU")
    })
}

#[cfg(test)]
mod gpu_tests {
    use super::gpu_fallback;

    #[test]
    fn fallback_is_said_only_when_a_gpu_was_asked_for_and_missing() {
        let gpu = vec!["CUDA0 (NVIDIA H100)".to_string()];
        assert_eq!(gpu_fallback(0, true, true, &[]), None);
        assert_eq!(gpu_fallback(99, true, true, &gpu), None);
        let s = gpu_fallback(99, true, true, &[]).unwrap();
        assert!(
            s.starts_with("--n-gpu-layers 99 asks for a GPU") && s.ends_with("running on the CPU"),
            "{s}"
        );
        assert!(gpu_fallback(99, true, false, &[])
            .unwrap()
            .contains("no GPU offload"));
        let s = gpu_fallback(999, false, true, &[]).unwrap();
        assert!(
            !s.contains("--n-gpu-layers") && s.contains("found no GPU"),
            "{s}"
        );
    }
}
