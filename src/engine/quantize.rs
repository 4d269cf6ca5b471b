//! llama.cpp's model quantizer ([`quantize`]) and the types `illmrec quantize` offers.

use super::backend::{backend, path_to_cstring};
use super::{check_threads, GgufInfo};
use anyhow::{ensure, Context as _, Result};
use llama_cpp_sys_2 as sys;
use std::path::Path;

/// Quantizes a GGUF model with llama.cpp's quantizer (`type_name` as in llama-quantize:
/// q8_0, q4_k_m, ...). Writes to a temporary file and renames it into place.
pub fn quantize(input: &Path, output: &Path, type_name: &str, n_threads: i32) -> Result<()> {
    let ftype = quant_type(type_name)?;
    check_threads(n_threads)?;
    GgufInfo::read(input)?;
    backend();
    let c_in = path_to_cstring(input)?;
    crate::store::fsutil::write_atomic_path(output, |tmp| {
        let c_tmp = path_to_cstring(tmp)?;
        // SAFETY: default params are valid; paths are valid C strings.
        let rc = unsafe {
            let mut params = sys::llama_model_quantize_default_params();
            params.ftype = ftype;
            params.nthread = n_threads;
            // Allows going from one quantized type to another (or back to f32/f16): the result
            // carries the input's quantization error, which is the point when measuring it.
            params.allow_requantize = true;
            sys::llama_model_quantize(c_in.as_ptr(), c_tmp.as_ptr(), &params)
        };
        ensure!(
            rc == 0,
            "llama.cpp failed to quantize {} to {type_name} (code {rc}; run with --verbose to see its log)",
            input.display()
        );
        Ok(())
    })
}

/// The quantization types offered by `illmrec quantize`.
pub const QUANT_TYPES: &[(&str, sys::llama_ftype)] = &[
    ("f32", sys::LLAMA_FTYPE_ALL_F32),
    ("f16", sys::LLAMA_FTYPE_MOSTLY_F16),
    ("bf16", sys::LLAMA_FTYPE_MOSTLY_BF16),
    ("q8_0", sys::LLAMA_FTYPE_MOSTLY_Q8_0),
    ("q6_k", sys::LLAMA_FTYPE_MOSTLY_Q6_K),
    ("q5_k_m", sys::LLAMA_FTYPE_MOSTLY_Q5_K_M),
    ("q5_0", sys::LLAMA_FTYPE_MOSTLY_Q5_0),
    ("q4_k_m", sys::LLAMA_FTYPE_MOSTLY_Q4_K_M),
    ("q4_0", sys::LLAMA_FTYPE_MOSTLY_Q4_0),
    ("q3_k_m", sys::LLAMA_FTYPE_MOSTLY_Q3_K_M),
    ("q2_k", sys::LLAMA_FTYPE_MOSTLY_Q2_K),
];

fn quant_type(name: &str) -> Result<sys::llama_ftype> {
    let lower = name.to_ascii_lowercase();
    QUANT_TYPES
        .iter()
        .find(|(n, _)| *n == lower)
        .map(|(_, t)| *t)
        .with_context(|| {
            let names: Vec<&str> = QUANT_TYPES.iter().map(|(n, _)| *n).collect();
            format!(
                "unknown quantization type '{name}' (expected one of {})",
                names.join(", ")
            )
        })
}
