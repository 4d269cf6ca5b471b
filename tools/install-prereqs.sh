#!/usr/bin/env bash
# Installs what building illmrec needs on Debian/Ubuntu beyond Rust and Python 3: cmake (llama.cpp),
# ninja-build (the generator tools/cuda's CMake builds use; they fall back to Make without it),
# libclang-dev (bindgen, for llama-cpp-sys-2's bindings: it loads libclang.so and needs clang's
# builtin headers, which libclang-dev pulls in), a C/C++ toolchain, pkg-config and OpenBLAS (the
# default build's matrix products: libopenblas-dev for ggml's CMake to find it, libopenblas0-openmp
# for src/engine/blas.rs to open at run time, the build that shares ggml's OpenMP threads); for the kiosk's browser test
# (tools/tests/test_kiosk_browser.py), Debian's headless-capable chromium and chromium-driver.
# Does nothing when all are present.
#
# Detection asks dpkg which packages are installed, never a file glob: a glob such as libclang*.so*
# matches libclang-cpp.so.14 (the C++ interface library, preinstalled on some images), which is not
# the library bindgen loads. On a system without dpkg it looks for the exact files bindgen loads.
#
#   --check   print the packages that would be installed (one line, empty when none) and exit 0
# ILLMREC_PREREQ_ROOT (default /) points the detection at another filesystem root; the test suite
# uses it with a fake root and dpkg database (tools/tests/test_install_prereqs.py).
set -euo pipefail
root=${ILLMREC_PREREQ_ROOT:-/}
root=${root%/}

installed() { # installed PKG: dpkg says "install ok installed"
  dpkg-query --admindir="$root/var/lib/dpkg" -W -f='${Status}' "$1" 2>/dev/null | grep -q '^install ok installed$'
}
has_dpkg() { command -v dpkg-query >/dev/null && [ -f "$root/var/lib/dpkg/status" ]; }
on_path() { [ -z "$root" ] && command -v "$1" >/dev/null; }
libclang_files() { # the names clang-sys searches for, excluding libclang-cpp (another library)
  compgen -G "$root/usr/lib/llvm-*/lib/libclang.so*" >/dev/null ||
    compgen -G "$root/usr/lib/llvm-*/lib/libclang-[0-9]*.so*" >/dev/null ||
    compgen -G "$root/usr/lib/*/libclang.so*" >/dev/null ||
    compgen -G "$root/usr/lib/*/libclang-[0-9]*.so*" >/dev/null
}

missing=()
if has_dpkg; then
  installed cmake || on_path cmake || missing+=(cmake)
  installed libclang-dev || [ -n "${LIBCLANG_PATH:-}" ] || missing+=(libclang-dev)
  installed build-essential || { on_path cc && on_path c++ && on_path make; } || missing+=(build-essential)
  installed ninja-build || on_path ninja || missing+=(ninja-build)
  installed pkgconf || installed pkg-config || on_path pkg-config || missing+=(pkg-config)
  installed libopenblas-dev || missing+=(libopenblas-dev)
  installed libopenblas0-openmp || missing+=(libopenblas0-openmp)
  installed chromium || on_path chromium || missing+=(chromium)
  installed chromium-driver || on_path chromedriver || missing+=(chromium-driver)
else
  on_path cmake || missing+=(cmake)
  libclang_files || [ -n "${LIBCLANG_PATH:-}" ] || missing+=(libclang-dev)
  { on_path cc && on_path c++ && on_path make; } || missing+=(build-essential)
  on_path ninja || missing+=(ninja-build)
  on_path pkg-config || missing+=(pkg-config)
  compgen -G "$root/usr/lib/*/libopenblas*.so*" >/dev/null || compgen -G "$root/usr/lib/*/*/libopenblas*.so*" >/dev/null ||
    compgen -G "$root/usr/lib64/libopenblas*.so*" >/dev/null || missing+=(libopenblas-dev)
  on_path chromium || [ -e "$root/usr/bin/chromium" ] || missing+=(chromium)
  on_path chromedriver || [ -e "$root/usr/bin/chromedriver" ] || missing+=(chromium-driver)
fi

if [ "${1:-}" = --check ]; then
  echo "${missing[*]}"
  exit 0
fi
if [ ${#missing[@]} -eq 0 ]; then
  echo "build prerequisites present"
  exit 0
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
echo "installing ${missing[*]} ..."
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
