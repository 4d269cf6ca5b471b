//! illmrec's AVX-512 kernels for ggml (`src/engine/kernels.cpp`), registered with ggml at start-up.
//!
//! The default build compiles ggml's CPU code for AVX2 only (portable). After OpenBLAS took the
//! matrix products, two of ggml's AVX2 operations were the largest costs left: flash attention
//! (it converts the f16 KV cache to f32 again for every 64-query tile and head) and the GEGLU
//! activation (a scalar loop through an f16 lookup table). `src/engine/kernels.cpp` is a ggml backend
//! of these two operations (`GGML_OP_FLASH_ATTN_EXT`, `GGML_OP_GLU` with GEGLU) whose kernels
//! are compiled for AVX-512 and used only when the CPU has it (checked at run time): registered
//! as an "ACCEL" device, like ggml's BLAS backend, it gets every such operation it supports
//! from llama.cpp's scheduler, on the same host buffers. `ILLMREC_KERNELS=ggml` leaves them to
//! ggml (read once, before the first model loads).

use std::sync::OnceLock;

/// Whether this build has the backend (x86_64 static builds; see build.rs).
pub const BUILT: bool = cfg!(illmrec_kernels);

#[cfg(illmrec_kernels)]
extern "C" {
    fn illmrec_kernels_register();
    fn illmrec_kernels_attention_calls() -> u64;
    fn illmrec_kernels_geglu_calls() -> u64;
}

/// Why the backend is or is not in use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Registered: ggml hands it the operations it supports.
    On,
    /// `ILLMREC_KERNELS=ggml`.
    OffByUser,
    /// The CPU lacks AVX-512F (or FMA/F16C).
    NoAvx512,
    /// This build has no backend (not x86_64, or the `cpu-variants` build).
    NotBuilt,
}

/// The policy, pure: whether to register, from the build, the variable and the CPU.
pub fn decide(built: bool, env: Option<&str>, cpu_ok: bool) -> State {
    if !built {
        State::NotBuilt
    } else if env.is_some_and(|v| v.trim().eq_ignore_ascii_case("ggml")) {
        State::OffByUser
    } else if !cpu_ok {
        State::NoAvx512
    } else {
        State::On
    }
}

static STATE: OnceLock<State> = OnceLock::new();

/// Whether the CPU (and the OS's saved vector state) offers what the kernels are compiled for:
/// AVX-512F, FMA and F16C.
#[cfg(illmrec_kernels)]
fn cpu_ok() -> bool {
    is_x86_feature_detected!("avx512f")
        && is_x86_feature_detected!("fma")
        && is_x86_feature_detected!("f16c")
}

/// Registers the backend if [`decide`] says so (once per process; call before contexts exist).
pub fn install() -> State {
    *STATE.get_or_init(|| {
        #[cfg(illmrec_kernels)]
        {
            let env = std::env::var("ILLMREC_KERNELS").ok();
            let state = decide(true, env.as_deref(), cpu_ok());
            if state == State::On {
                // SAFETY: runs once (under this OnceLock), on a CPU that runs the kernels.
                unsafe { illmrec_kernels_register() };
            }
            state
        }
        #[cfg(not(illmrec_kernels))]
        decide(false, None, false)
    })
}

/// Operations the backend has computed in this process: (attention, GEGLU).
pub fn calls() -> (u64, u64) {
    #[cfg(illmrec_kernels)]
    // SAFETY: reads two atomic counters.
    unsafe {
        (
            illmrec_kernels_attention_calls(),
            illmrec_kernels_geglu_calls(),
        )
    }
    #[cfg(not(illmrec_kernels))]
    (0, 0)
}

/// One line for `illmrec info`: `on` or `off` first (scripts read that word), then why.
pub fn describe() -> String {
    match install() {
        State::On => {
            "on: attention and GEGLU run on illmrec's AVX-512 kernels (src/engine/kernels.cpp); \
                      ILLMREC_KERNELS=ggml leaves them to ggml"
                .into()
        }
        State::OffByUser => "off: ggml's CPU kernels (ILLMREC_KERNELS=ggml)".into(),
        State::NoAvx512 => "off: ggml's CPU kernels (this CPU has no AVX-512)".into(),
        State::NotBuilt => {
            "off: ggml's CPU kernels (this build has no AVX-512 kernel backend)".into()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn registers_only_when_built_allowed_and_supported() {
        assert_eq!(decide(true, None, true), State::On);
        assert_eq!(decide(true, Some("on"), true), State::On);
        assert_eq!(decide(true, Some("ggml"), true), State::OffByUser);
        assert_eq!(decide(true, Some(" GGML "), true), State::OffByUser);
        assert_eq!(decide(true, None, false), State::NoAvx512);
        assert_eq!(decide(false, None, true), State::NotBuilt);
    }
}
