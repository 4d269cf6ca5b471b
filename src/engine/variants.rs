//! Run-time choice among ggml's CPU variants (`libggml-cpu-<name>.so`, built by llama.cpp's
//! GGML_CPU_ALL_VARIANTS; builds with the `cpu-variants` feature): every variant reports a score
//! for this CPU (0 = cannot run), and the best one is loaded, with the AMX variant allowed only
//! when [`crate::engine::cpu`] proved AMX runs.

use crate::engine::cpu::{choose_variant, Choice, Features};
use llama_cpp_sys_2 as sys;
use std::ffi::CString;
use std::path::{Path, PathBuf};

/// Where the variants are: `ILLMREC_CPU_VARIANTS_DIR`, else next to the executable.
fn dir() -> std::result::Result<PathBuf, String> {
    if let Some(d) = std::env::var_os("ILLMREC_CPU_VARIANTS_DIR") {
        return Ok(PathBuf::from(d));
    }
    let exe = std::env::current_exe().map_err(|e| format!("cannot locate the executable: {e}"))?;
    let dir = exe.parent().map(Path::to_path_buf).unwrap_or_default();
    // `cargo test` runs binaries from target/<profile>/deps; the libraries sit one level up.
    if dir.file_name().is_some_and(|n| n == "deps") && !has_variants(&dir) {
        if let Some(up) = dir.parent() {
            return Ok(up.to_path_buf());
        }
    }
    Ok(dir)
}

fn has_variants(dir: &Path) -> bool {
    list(dir).map(|v| !v.is_empty()).unwrap_or(false)
}

fn list(dir: &Path) -> std::io::Result<Vec<(String, PathBuf)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let Some(name) = p.file_name().and_then(|n| n.to_str()) else {
            continue;
        };
        if let Some(v) = name
            .strip_prefix("libggml-cpu-")
            .and_then(|n| n.strip_suffix(".so"))
        {
            out.push((v.to_string(), p.clone()));
        }
    }
    out.sort();
    Ok(out)
}

/// ggml's own score of one variant for this CPU, read without loading it as a backend.
fn score(path: &Path) -> i32 {
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return 0;
    };
    // SAFETY: dlopen/dlsym/dlclose on a file we list; the symbol has ggml's documented
    // signature `int ggml_backend_score(void)` and only reads CPUID.
    unsafe {
        let h = libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL);
        if h.is_null() {
            return 0;
        }
        let f = libc::dlsym(h, c"ggml_backend_score".as_ptr());
        let s = if f.is_null() {
            0
        } else {
            let f: extern "C" fn() -> i32 = std::mem::transmute(f);
            f()
        };
        libc::dlclose(h);
        s
    }
}

pub fn load_best() -> std::result::Result<(Choice, PathBuf), String> {
    let dir = dir()?;
    let found = list(&dir).map_err(|e| format!("cannot read {}: {e}", dir.display()))?;
    if found.is_empty() {
        return Err(format!(
            "no ggml CPU variants (libggml-cpu-*.so) in {}; set ILLMREC_CPU_VARIANTS_DIR",
            dir.display()
        ));
    }
    let scored: Vec<(String, i32)> = found.iter().map(|(n, p)| (n.clone(), score(p))).collect();
    let features = Features::detect();
    let choice = choose_variant(&scored, features.amx_usable()).ok_or_else(|| {
        format!(
            "none of the CPU variants in {} runs on this CPU",
            dir.display()
        )
    })?;
    let path = found
        .iter()
        .find(|(n, _)| *n == choice.name)
        .map(|(_, p)| p.clone())
        .unwrap();
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: registers the backend library with ggml; returns null on failure.
    let reg = unsafe { sys::ggml_backend_load(c.as_ptr()) };
    if reg.is_null() {
        return Err(format!("ggml could not load {}", path.display()));
    }
    Ok((choice, path))
}
