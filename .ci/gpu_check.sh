#!/usr/bin/env bash
# The checks only an sm_90 GPU can run, as stages that each fit one 10-minute device command.
#
#   bash .ci/gpu_check.sh OUT_DIR STAGE...     STAGE: build | test | sanitize | bench
#
# Needs python3 with a CUDA torch, cmake, pybind11, and (sanitize) compute-sanitizer. `build` compiles
# csrc unless build/ci-csrc/libarmor_cuda.so exists, i.e. was built elsewhere by .ci/build_csrc.sh (the
# same sm_90a library CI compiles, 1.6 MB) and carried along, which a GPU machine without the
# nvidia-cutlass wheel needs; it binds the library as armor_kernels._armor_cuda. Every stage writes its
# log, and the benchmark its CSV and plot, into OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
out="$1"; shift
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
lib=build/ci-csrc/libarmor_cuda.so
status=0

for stage in "$@"; do
  echo "== $stage"
  case "$stage" in
    build)
      [[ -f "$lib" ]] || PYTHON=python3 ARMOR_BUILD_JOBS=8 bash .ci/build_csrc.sh || exit 1
      cp "$lib" armor_kernels/
      cmake -S . -B build/gpu-bind -DARMOR_PREBUILT_LIB="$PWD/$lib" -DARMOR_OUTPUT_DIR="$PWD/armor_kernels" \
        -DPython_EXECUTABLE="$(command -v python3)" >"$out/build.log" 2>&1 &&
        cmake --build build/gpu-bind >>"$out/build.log" 2>&1 || { tail -30 "$out/build.log"; exit 1; }
      python3 -c "from armor_kernels import ops; import torch; \
print('fused kernels usable:', ops.fused_supported('cuda', torch.bfloat16, 4096, 4096))"
      ;;
    test)
      python3 -m pytest -q -rs tests/test_ops.py tests/test_nn.py 2>&1 | tee "$out/pytest.log" | tail -15
      status=$((status | PIPESTATUS[0]))
      ;;
    sanitize)  # memcheck on one shape per kernel family and path; racecheck on the decode kernels' smem
      k='fused_matches_reference and bf16-384-512 and (True-True-1- or True-True-16- or False-True-300-) or compressor or deterministic'
      compute-sanitizer --tool memcheck --error-exitcode 9 python3 -m pytest -q -x tests/test_ops.py -k "$k" \
        >"$out/sanitizer.log" 2>&1
      status=$((status | $?))
      compute-sanitizer --tool racecheck --error-exitcode 9 python3 -m pytest -q -x tests/test_ops.py \
        -k 'fused_matches_reference and bf16-256-256 and (True-True-1- or True-True-16-)' \
        >>"$out/sanitizer.log" 2>&1
      status=$((status | $?))
      grep -E "ERROR SUMMARY|passed|failed" "$out/sanitizer.log"
      ;;
    bench)
      python3 benchmarks/bench_linear.py --out "$out/linear_$(nvidia-smi --query-gpu=name --format=csv,noheader \
        | tr -cs 'A-Za-z0-9' '_' | sed 's/_$//').csv" 2>&1 | tee "$out/bench_linear.log" | tail -5
      status=$((status | PIPESTATUS[0]))
      ;;
    *) echo "gpu_check: unknown stage $stage" >&2; exit 2 ;;
  esac
done
exit "$status"
