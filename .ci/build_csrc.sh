#!/usr/bin/env bash
# Compile every csrc kernel translation unit for sm_90a through CMakeLists.txt, without Python or a GPU.
# Fails on any compiler error, on ptxas warning C7510 (wgmma pipeline serialised: a performance bug
# that must not land), and on a kernel over Hopper's register or shared-memory limits or with local
# memory (.ci/check_kernels.py, which also compares the table in csrc/README.md).
# Usage: .ci/build_csrc.sh [build_dir]   (PYTHON=... selects the interpreter whose site-packages hold
# nvidia-cutlass and nvidia-cuda-cuobjdump; default: python3 on PATH).
set -euo pipefail
cd "$(dirname "$0")/.."
build_dir="${1:-build/ci-csrc}"
python="$(command -v "${PYTHON:-python3}")"
# CMake ignores a relative Python_EXECUTABLE and would find another interpreter: make it absolute
# (without resolving symlinks, which would leave a virtual environment for its base interpreter).
[[ "$python" = /* ]] || python="$PWD/$python"
nvcc="$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)"
[[ -x "$nvcc" ]] || { echo "build_csrc: nvcc not found (PATH or /usr/local/cuda/bin)" >&2; exit 1; }
"$python" -c "import cutlass_library" 2>/dev/null \
  || { echo "build_csrc: $python lacks nvidia-cutlass (pip install nvidia-cutlass==4.2.0.0)" >&2; exit 1; }

generator=(); command -v ninja >/dev/null && generator=(-G Ninja)
cmake -S . -B "$build_dir" "${generator[@]}" -DARMOR_BUILD_PYTHON=OFF \
  -DCMAKE_CUDA_COMPILER="$nvcc" -DPython_EXECUTABLE="$python" >/dev/null
log="$build_dir/build.log"
# Two kernel TUs at a time fit a 2-core, 24 GB machine (their cost: docs/DESIGN.md §9).
if ! { cmake --build "$build_dir" --parallel "${ARMOR_BUILD_JOBS:-2}" &&
       cmake --build "$build_dir" --target armor_kernel_smem; } >"$log" 2>&1; then
  grep -E "error|Error" "$log" | head -40 >&2
  echo "build_csrc: FAILED, full log in $log" >&2
  exit 1
fi
if grep -n "C7510" "$log" >&2; then
  echo "build_csrc: ptxas warning C7510 (serialised wgmma) in $log: treated as a failure" >&2
  exit 1
fi
"$python" .ci/check_kernels.py "$build_dir"
echo "build_csrc: ok ($(ls "$build_dir"/libarmor_cuda.so))"
