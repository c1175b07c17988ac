"""benchmarks/bench_linear.py checks every row's output against the reference before timing it: a kernel
that computes the wrong layer stops the benchmark instead of giving a fast row. (Speeds are the
benchmark's business; nothing here asserts one.)"""
import csv
import sys
from pathlib import Path

import pytest

from armor_kernels import ops

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import bench_linear  # noqa: E402  (benchmarks/ is no package: its scripts import their harness by name)

pytestmark = pytest.mark.skipif(ops.cpu_unavailable_reason() is not None, reason="needs the C++ CPU kernels")
ARGV = ["--device", "cpu", "--shapes", "64x128", "--tokens", "1,20", "--reps", "1"]


def test_the_cpu_rows_are_checked_then_written(tmp_path, monkeypatch):
    monkeypatch.setattr(bench_linear, "CYCLE_BYTES", 1 << 16)
    assert bench_linear.main([*ARGV, "--out", str(tmp_path / "b.csv")]) == 0
    with open(tmp_path / "b.csv") as f:
        rows = list(csv.DictReader(f))
    assert {r["method"] for r in rows} >= {"armor_b128", "armor_b128_sparse", "armor_b128_gemm", "sparse24",
                                           "armor_b128_lanes", "armor_b128_permutes", "sparse24_lanes",
                                           "dense_bf16", "dense_fp32", "reference_b128"}
    assert {int(r["tokens"]) for r in rows} == {1, 20}


def test_a_wrong_kernel_stops_the_benchmark(tmp_path, monkeypatch):
    real = ops.cpu_packed_linear

    def off_by_a_bit(x, A, values, idx, B, bias, path=None):  # 10 % off everywhere, whatever the random layer
        return real(x, A, values, idx, B, bias, path=path) * 1.1

    monkeypatch.setattr(bench_linear, "CYCLE_BYTES", 1 << 16)
    monkeypatch.setattr(ops, "cpu_packed_linear", off_by_a_bit)
    with pytest.raises(SystemExit, match=r"armor_b128 64x128 T=1: relative error .* nothing is timed"):
        bench_linear.main([*ARGV, "--out", str(tmp_path / "b.csv")])
    assert not (tmp_path / "b.csv").exists()
