#!/usr/bin/env bash
# The checks only an sm_90 GPU can run, as stages that each fit one 10-minute device command.
#
#   bash .ci/gpu_check.sh OUT_DIR STAGE...     STAGE: build | test | multigpu | sanitize | bench
#
# Needs python3 with a CUDA torch, cmake, pybind11, and (sanitize) compute-sanitizer. `build` compiles
# csrc unless build/ci-csrc/libarmor_cuda.so exists, i.e. was built elsewhere by .ci/build_csrc.sh (the
# same sm_90a library CI compiles, 1.6 MB) and carried along, which a GPU machine without the
# nvidia-cutlass wheel needs; .ci/bind_csrc.sh binds the library as armor_kernels._armor_cuda.
#
# Nothing passes by skipping: `build` and `bench` fail unless the fused path is usable on this machine's
# device (ops.fused_unavailable_reason says why not), and `test` and `sanitize` run with
# ARMOR_REQUIRE_FUSED=1 and ARMOR_REQUIRE_CUDA=1, under which a gpu- or cuda-marked test that skips fails,
# and so does a run in which none of either passed (tests/conftest.py). `test` runs every gpu- and
# cuda-marked test (the fused kernels, torch's semi-structured path), in every file. `sanitize` runs the tests marked sanitize(TOOL) under
# each compute-sanitizer TOOL. `bench` checks every row's output against the reference before timing it
# and fails on a wrong result or on any error of the package's kernels. Every stage writes its log, and the benchmark its CSV and plot, into OUT_DIR.
set -uo pipefail
cd "$(dirname "$0")/.."
out="$1"; shift
mkdir -p "$out"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 ARMOR_REQUIRE_FUSED=1 ARMOR_REQUIRE_CUDA=1
lib=build/ci-csrc/libarmor_cuda.so
status=0

require_fused() {  # exit status 1, with the reason, unless the fused kernels can run on this device
  python3 -c "import sys; from armor_kernels import ops; r = ops.fused_unavailable_reason('cuda'); \
print('fused kernels usable:', 'yes' if r is None else f'NO ({r})'); sys.exit(r is not None)"
}

for stage in "$@"; do
  echo "== $stage"
  case "$stage" in
    build)
      [[ -f "$lib" ]] || PYTHON=python3 ARMOR_BUILD_JOBS=8 bash .ci/build_csrc.sh || exit 1
      PYTHON=python3 bash .ci/bind_csrc.sh || exit 1
      require_fused || exit 1
      ;;
    test)
      python3 -m pytest -q -rs -m "(gpu or cuda) and not multigpu" tests 2>&1 | tee "$out/pytest.log" | tail -15
      status=$((status | PIPESTATUS[0]))
      ;;
    multigpu)  # a machine with two or more GPUs: the tests that place tensors on a second device
      ARMOR_REQUIRE_MULTIGPU=1 python3 -m pytest -q -rs -m multigpu tests 2>&1 | tee "$out/multigpu.log" | tail -15
      status=$((status | PIPESTATUS[0]))
      ;;
    sanitize)  # memcheck on one case per kernel family and path; racecheck on the decode kernels' smem
      : >"$out/sanitizer.log"
      for tool in memcheck racecheck; do
        echo "== compute-sanitizer --tool $tool" >>"$out/sanitizer.log"
        compute-sanitizer --tool "$tool" --error-exitcode 9 \
          python3 -m pytest -q -rs -x tests/test_ops.py --sanitizer "$tool" >>"$out/sanitizer.log" 2>&1
        status=$((status | $?))
      done
      grep -E "^== |ERROR SUMMARY|passed|failed|error" "$out/sanitizer.log"
      ;;
    bench)
      require_fused || { status=1; continue; }
      python3 benchmarks/bench_linear.py --out "$out/linear_$(nvidia-smi --query-gpu=name --format=csv,noheader \
        | tr -cs 'A-Za-z0-9' '_' | sed 's/_$//').csv" 2>&1 | tee "$out/bench_linear.log" | tail -5
      status=$((status | PIPESTATUS[0]))
      ;;
    *) echo "gpu_check: unknown stage $stage" >&2; exit 2 ;;
  esac
done
exit "$status"
