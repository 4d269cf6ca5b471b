//! Build script: only for the `cpu-variants` feature. llama.cpp is then built as shared libraries
//! with one CPU library per instruction-set level (ggml's GGML_CPU_ALL_VARIANTS); this copies
//! them, and the shared libraries under the names the binary asks for, next to the binaries
//! (target/<profile>/), and makes the binaries look for libraries in their own folder
//! (rpath `$ORIGIN`), so `target/release/` can be copied to another machine as one folder.

use std::path::{Path, PathBuf};

fn copy_if_changed(from: &Path, to: &Path) {
    let same = std::fs::read(to).ok() == std::fs::read(from).ok();
    if !same {
        let tmp = to.with_extension("tmp-copy");
        std::fs::copy(from, &tmp).unwrap_or_else(|e| panic!("copy {}: {e}", from.display()));
        std::fs::rename(&tmp, to).unwrap();
    }
}

/// ggml's source folder, from the CMake cache of llama-cpp-sys-2's build (its `ggml_cmake_dir`
/// lies under its OUT_DIR, whose `build/CMakeCache.txt` names the sources).
fn ggml_source_dir() -> Option<PathBuf> {
    let cmake = PathBuf::from(std::env::var_os("DEP_LLAMA_GGML_CMAKE_DIR")?);
    let cache = cmake
        .ancestors()
        .map(|d| d.join("build").join("CMakeCache.txt"))
        .find(|c| c.is_file())?;
    let cache = std::fs::read_to_string(cache).ok()?;
    cache
        .lines()
        .find_map(|l| l.strip_prefix("ggml_SOURCE_DIR:STATIC="))
        .map(PathBuf::from)
}

/// src/engine/kernels.cpp: the AVX-512 attention and GEGLU backend (x86_64, static builds). It includes
/// ggml's backend interface header (`ggml-backend-impl.h`, not installed), read from the same
/// llama.cpp sources llama-cpp-sys-2 built.
fn build_kernels(variants: bool) {
    println!("cargo:rerun-if-changed=src/engine/kernels.cpp");
    println!("cargo::rustc-check-cfg=cfg(illmrec_kernels)");
    let x86 = std::env::var("CARGO_CFG_TARGET_ARCH").is_ok_and(|a| a == "x86_64");
    if !x86 || variants {
        return;
    }
    let Some(ggml) = ggml_source_dir() else {
        println!("cargo:warning=ggml's sources not found; building without the AVX-512 kernels");
        return;
    };
    cc::Build::new()
        .cpp(true)
        .file("src/engine/kernels.cpp")
        .include(ggml.join("include"))
        .include(ggml.join("src"))
        .flag("-std=c++17")
        .flag("-fopenmp")
        .opt_level(3)
        .warnings(false)
        .compile("illmrec_kernels");
    println!("cargo:rustc-cfg=illmrec_kernels");
}

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    build_kernels(std::env::var_os("CARGO_FEATURE_CPU_VARIANTS").is_some());
    // ggml's BLAS backend (GGML_BLAS, on by default through .cargo/config.toml; llama-cpp-sys-2
    // reads the same variable, and turns it off on Apple). In the static build its three
    // OpenBLAS functions are defined by src/engine/blas.rs, which opens OpenBLAS at run time.
    println!("cargo:rerun-if-env-changed=GGML_BLAS");
    println!("cargo::rustc-check-cfg=cfg(illmrec_blas)");
    let blas = std::env::var("GGML_BLAS")
        .is_ok_and(|v| matches!(v.to_ascii_uppercase().as_str(), "ON" | "1" | "TRUE" | "YES"));
    let apple = std::env::var("CARGO_CFG_TARGET_VENDOR").is_ok_and(|v| v == "apple");
    if blas && !apple && std::env::var_os("CARGO_FEATURE_CPU_VARIANTS").is_none() {
        println!("cargo:rustc-cfg=illmrec_blas");
        // A target folder built before GGML_BLAS=ON reached llama-cpp-sys-2 keeps its llama.cpp
        // without the BLAS backend (llama-cpp-sys-2 only re-runs CMake for variables it saw).
        if let Some(cmake) = std::env::var_os("DEP_LLAMA_GGML_CMAKE_DIR") {
            let lib = PathBuf::from(cmake);
            let lib = lib.parent().unwrap_or(&lib);
            if !lib.join("libggml-blas.a").is_file() && !lib.join("libggml-blas.so").is_file() {
                println!(
                    "cargo:warning=llama.cpp was built without its BLAS backend (before \
                     GGML_BLAS=ON); run `cargo clean -p llama-cpp-sys-2 --release` and rebuild"
                );
            }
        }
    }
    if std::env::var_os("CARGO_FEATURE_CPU_VARIANTS").is_none() {
        return;
    }
    println!("cargo:rerun-if-env-changed=DEP_LLAMA_BACKENDS_DIR");
    let backends = PathBuf::from(
        std::env::var("DEP_LLAMA_BACKENDS_DIR")
            .expect("llama-cpp-sys-2 did not report its backends folder"),
    );
    let out = PathBuf::from(std::env::var("OUT_DIR").unwrap());
    let profile_dir = out
        .ancestors()
        .nth(3)
        .expect("OUT_DIR layout")
        .to_path_buf();
    for e in std::fs::read_dir(&backends).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        // The CPU variants, and the BLAS backend when GGML_BLAS is on (it links OpenBLAS itself).
        if (name.starts_with("libggml-cpu-") || name == "libggml-blas.so") && name.ends_with(".so")
        {
            copy_if_changed(&p, &profile_dir.join(&name));
        }
    }
    // The binaries need libllama.so.0, libggml.so.0, ... (their sonames).
    let lib = backends.parent().unwrap().join("lib");
    for e in std::fs::read_dir(&lib).unwrap() {
        let p = e.unwrap().path();
        let name = p.file_name().unwrap().to_string_lossy().into_owned();
        if name.ends_with(".so.0") {
            copy_if_changed(
                &std::fs::canonicalize(&p).unwrap(),
                &profile_dir.join(&name),
            );
        }
    }
    println!("cargo:rustc-link-arg-bins=-Wl,-rpath,$ORIGIN");
    println!("cargo:rustc-link-arg-examples=-Wl,-rpath,$ORIGIN/..");
}
