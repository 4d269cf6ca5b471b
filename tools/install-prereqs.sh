#!/usr/bin/env bash
# Installs what building illmrec needs on Debian/Ubuntu beyond Rust and Python 3: cmake (for
# llama.cpp) and libclang-dev (for the bindings). Does nothing when both are present.
set -euo pipefail
missing=()
command -v cmake >/dev/null || missing+=(cmake)
ls /usr/lib/llvm-*/lib/libclang.so* >/dev/null 2>&1 || ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1 || missing+=(libclang-dev)
command -v c++ >/dev/null || missing+=(build-essential)
if [ ${#missing[@]} -eq 0 ]; then
  echo "build prerequisites present"
  exit 0
fi
sudo=""
[ "$(id -u)" = 0 ] || sudo="sudo"
echo "installing ${missing[*]} ..."
$sudo apt-get update -qq
DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
