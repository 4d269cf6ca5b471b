"""The build-prerequisite detection of tools/install-prereqs.sh, run against fake filesystem roots.

The bug this guards against: a glob for libclang*.so* matched libclang-cpp.so.14 (the C++
interface library, preinstalled on some images), so libclang-dev, which bindgen needs, was
never installed and a fresh machine could not build llama-cpp-sys-2.
"""
import os
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "install-prereqs.sh"


def status_entry(pkg: str) -> str:
    return f"Package: {pkg}\nStatus: install ok installed\nArchitecture: amd64\nVersion: 1.0\n\n"


def fake_root(tmp_path: Path, packages: list[str], files: list[str], dpkg: bool = True) -> Path:
    root = tmp_path / "root"
    for f in files:
        p = root / f.lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(b"")
    if dpkg:
        d = root / "var/lib/dpkg"
        (d / "info").mkdir(parents=True, exist_ok=True)
        (d / "updates").mkdir(parents=True, exist_ok=True)
        (d / "status").write_text("".join(status_entry(p) for p in packages))
    return root


BROWSER = ["chromium", "chromium-driver"]
# OpenBLAS (build and run time) and pkg-config, which ggml's CMake uses to find it.
BLAS = ["pkg-config", "libopenblas-dev", "libopenblas0-openmp"]
# a C/C++ toolchain and the CMake generator of the CUDA build scripts
BUILD = ["build-essential", "ninja-build"]
BASE = ["cmake", "libclang-dev", *BUILD, *BLAS]


def detect(root: Path, browser: bool = False) -> list[str]:
    """The build packages the script would install (and the browser's too with `browser`)."""
    env = {k: v for k, v in os.environ.items() if k != "LIBCLANG_PATH"}
    env["ILLMREC_PREREQ_ROOT"] = str(root)
    out = subprocess.run(["bash", str(SCRIPT), "--check"], env=env, capture_output=True, text=True, check=True)
    return [p for p in out.stdout.split() if browser or p not in BROWSER]


needs_dpkg = pytest.mark.skipif(shutil.which("dpkg-query") is None, reason="dpkg-query is not installed")


@needs_dpkg
def test_libclang_cpp_alone_is_not_libclang(tmp_path):
    """The image this project's machines start from: cmake absent, libclang-cpp14 present."""
    root = fake_root(tmp_path, ["libclang-cpp14", *BUILD, *BLAS],
                     ["/usr/lib/x86_64-linux-gnu/libclang-cpp.so.14", "/usr/lib/llvm-14/lib/libclang-cpp.so.14"])
    assert detect(root) == ["cmake", "libclang-dev"]


@needs_dpkg
def test_everything_installed_needs_nothing(tmp_path):
    root = fake_root(tmp_path, [*BASE, "libclang-cpp14"], ["/usr/lib/llvm-14/lib/libclang.so"])
    assert detect(root) == []


@needs_dpkg
def test_runtime_libclang_without_dev_package_is_not_enough(tmp_path):
    """libclang1-14 ships libclang.so.1 but not clang's builtin headers, which bindgen needs."""
    root = fake_root(tmp_path, ["cmake", "libclang1-14", *BUILD, *BLAS], ["/usr/lib/llvm-14/lib/libclang.so.1"])
    assert detect(root) == ["libclang-dev"]


def test_without_dpkg_the_exact_library_names_decide(tmp_path):
    only_cpp = fake_root(tmp_path / "a", [], ["/usr/lib/x86_64-linux-gnu/libclang-cpp.so.14"], dpkg=False)
    assert "libclang-dev" in detect(only_cpp)
    real = fake_root(tmp_path / "b", [], ["/usr/lib/llvm-14/lib/libclang-14.so.1"], dpkg=False)
    assert "libclang-dev" not in detect(real)


@needs_dpkg
def test_the_kiosk_browser_test_gets_chromium_and_its_driver(tmp_path):
    without = fake_root(tmp_path / "a", BASE, [])
    assert detect(without, browser=True) == BROWSER
    only_browser = fake_root(tmp_path / "b", [*BASE, "chromium"], [])
    assert detect(only_browser, browser=True) == ["chromium-driver"]
    both = fake_root(tmp_path / "c", [*BASE, *BROWSER], [])
    assert detect(both, browser=True) == []


@needs_dpkg
def test_openblas_for_the_default_build(tmp_path):
    """The default build finds OpenBLAS with pkg-config at build time and opens the OpenMP build
    at run time (src/engine/blas.rs); the pthread runtime alone is not enough."""
    none = fake_root(tmp_path / "a", ["cmake", "libclang-dev", *BUILD], [])
    assert detect(none) == BLAS
    pthread_only = fake_root(tmp_path / "b", ["cmake", "libclang-dev", *BUILD, "pkgconf",
                                              "libopenblas-dev", "libopenblas0-pthread"], [])
    assert detect(pthread_only) == ["libopenblas0-openmp"]


@needs_dpkg
def test_ninja_is_installed_when_missing(tmp_path):
    root = fake_root(tmp_path, [p for p in BASE if p != "ninja-build"], [])
    assert detect(root) == ["ninja-build"]
