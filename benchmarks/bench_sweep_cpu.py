"""S-step sweep on the CPU: C++/OpenMP kernel (armor_kernels._armor_cpu) vs the PyTorch reference.

    python benchmarks/bench_sweep_cpu.py [--ref-rows N] [--csv benchmarks/results/sweep_cpu.csv]

Time per sweep (passes=1) of T tiles of bA × bB. The reference is run on the first --ref-rows rows of
every tile (0: all rows) and extrapolated linearly to bA rows (every row step does the same work). The C++ time is the median of several sweeps on fresh copies of the same inputs.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import time

import torch

from armor_kernels.kernels import mask_select as ms

SHAPES = ((12, 96, 96), (96, 128, 96), (256, 128, 128))


def make(T, bA, bB, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(bA) + 0.2 * torch.randn(T, bA, bA, generator=g) / bA ** 0.5
    Bt = torch.eye(bB) + 0.2 * torch.randn(T, bB, bB, generator=g) / bB ** 0.5
    S = torch.randn(T, bA, bB, generator=g) * (torch.rand(T, bA, bB, generator=g) < 0.5)
    R = torch.randn(T, bA, bB, generator=g)
    return R, A, Bt, S


def time_cpu(R, A, Bt, S, reps):
    """(median wall seconds per sweep with torch.get_num_threads() threads,
        min CPU seconds per tile on one thread: insensitive to other load on the machine)."""
    ts, cpu = [], []
    T = S.shape[0]
    for _ in range(reps):
        Rc, Sc = R.clone(), S.clone()
        t = time.perf_counter()
        ms.sweep_tiles_cpu(Rc, A, Bt, Sc, 1)
        ts.append(time.perf_counter() - t)
    for _ in range(reps):
        Rc, Sc = R.clone(), S.clone()
        t = time.thread_time()
        ms._armor_cpu.sweep_tiles(Rc.data_ptr(), A.data_ptr(), Bt.data_ptr(), Sc.data_ptr(),
                                  T, S.shape[1], S.shape[2], 1, 1)
        cpu.append((time.thread_time() - t) / T)
    return statistics.median(ts), min(cpu)


def time_ref(R, A, Bt, S, rows):
    """sweep_tiles_reference over the first `rows` rows of every tile: S[:, :rows] and A[:, :, :rows]
    as views, R whole, so each row step does exactly the work it does in a full sweep."""
    bA = S.shape[1]
    rows = bA if rows <= 0 else min(rows, bA)
    Rc, Sc = R.clone(), S.clone()
    t = time.perf_counter()
    ms.sweep_tiles_reference(Rc, A[:, :, :rows], Bt, Sc[:, :rows], 1)
    return time.perf_counter() - t, rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--ref-rows", type=int, default=16, help="reference rows per tile to time (0: all)")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--csv", default="")
    args = ap.parse_args()
    if ms._armor_cpu is None:
        raise SystemExit("armor_kernels._armor_cpu is not built")
    print(f"torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"module {ms._armor_cpu.build_info()}")
    rows_out = []
    for T, bA, bB in SHAPES:
        R, A, Bt, S = make(T, bA, bB)
        ms.sweep_tiles_cpu(R.clone(), A, Bt, S.clone(), 1)                      # warm-up
        c, c1 = time_cpu(R, A, Bt, S, args.reps)
        r, rows = time_ref(R, A, Bt, S, args.ref_rows)
        r_full = r * bA / rows
        macs = T * bA * (2 * bA * bB + 2 * bB * bB)
        print(f"T={T:4d} {bA}x{bB}: C++ {c * 1e3:8.2f} ms/sweep wall ({macs / c / 1e9:5.2f} GMAC/s), "
              f"1 thread {c1 * 1e3:.3f} ms CPU/tile ({macs / T / c1 / 1e9:5.2f} GMAC/s)   "
              f"reference {r_full:8.2f} s/sweep ({'measured' if rows == bA else f'{rows} of {bA} rows, extrapolated'})"
              f"   speed-up {r_full / c:8.0f}x")
        rows_out.append(dict(T=T, bA=bA, bB=bB, cpp_ms=round(c * 1e3, 3), cpp_1thread_cpu_ms_per_tile=round(c1 * 1e3, 4), ref_s=round(r_full, 3),
                             ref_rows=rows, speedup=round(r_full / c, 1), threads=torch.get_num_threads()))
    if args.csv:
        with open(args.csv, "w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=list(rows_out[0]))
            w.writeheader()
            w.writerows(rows_out)


if __name__ == "__main__":
    main()
