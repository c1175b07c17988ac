#!/usr/bin/env bash
# Bind the CUDA library .ci/build_csrc.sh built (build/ci-csrc/libarmor_cuda.so, or one carried from
# elsewhere) as armor_kernels._armor_cuda: the library is copied into the package and the pybind11 layer
# built against it, without compiling a kernel. No GPU is needed: on a machine without one the binding's
# host-side checks run (tests/test_ops.py) and ops.fused_unavailable_reason says why nothing launches.
# Usage: .ci/bind_csrc.sh   (PYTHON=... selects the interpreter; default: python3 on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
lib=build/ci-csrc/libarmor_cuda.so
python="$(command -v "${PYTHON:-python3}")"
[[ "$python" = /* ]] || python="$PWD/$python"  # CMake ignores a relative Python_EXECUTABLE
[[ -f "$lib" ]] || { echo "bind_csrc: $lib missing (run .ci/build_csrc.sh first)" >&2; exit 1; }
cp "$lib" armor_kernels/
log=build/gpu-bind.log
mkdir -p build
if ! { cmake -S . -B build/gpu-bind -DARMOR_PREBUILT_LIB="$PWD/$lib" -DARMOR_OUTPUT_DIR="$PWD/armor_kernels" \
         -DPython_EXECUTABLE="$python" && cmake --build build/gpu-bind; } >"$log" 2>&1; then
  tail -30 "$log" >&2
  echo "bind_csrc: FAILED, full log in $log" >&2
  exit 1
fi
echo "bind_csrc: ok ($(ls armor_kernels/_armor_cuda*.so))"
