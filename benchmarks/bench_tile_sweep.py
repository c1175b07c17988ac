"""The S-step tile sweep (armor_kernels/kernels/tile_sweep.py): its kernels against the PyTorch reference.

    python benchmarks/bench_tile_sweep.py [--ref-rows N] [--reps N] [--ref-reps N] [--out PATH.csv]

Time per sweep (passes=1) of T tiles of bA × bB. CPU rows: the C++/OpenMP kernel
(armor_kernels._armor_cpu) against the reference; CUDA rows, where a GPU exists: the Triton kernel
against the reference. The reference is run on the first --ref-rows rows of every tile (0: all rows)
and extrapolated linearly to bA rows (every row step does the same work); its time is the median
of --ref-reps runs. A kernel's time is the median of --reps sweeps of the same tiles in place (the
work of a sweep does not depend on the values). The CPU rows also give the least single-thread CPU
time per tile (insensitive to other load on the machine). Default output:
results/tile_sweep_<cpu|cuda>.csv, with the load average of the run.
"""
from __future__ import annotations

import os
import time

import torch
from harness import bench_args, cpu_time_s, cuda_time_us, write_csv

from armor_kernels.kernels import tile_sweep as ts
from armor_kernels.kernels import triton_switch

SHAPES = ((12, 96, 96), (96, 128, 96), (256, 128, 128))


def make(T, bA, bB, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(bA) + 0.2 * torch.randn(T, bA, bA, generator=g) / bA ** 0.5
    Bt = torch.eye(bB) + 0.2 * torch.randn(T, bB, bB, generator=g) / bB ** 0.5
    S = torch.randn(T, bA, bB, generator=g) * (torch.rand(T, bA, bB, generator=g) < 0.5)
    R = torch.randn(T, bA, bB, generator=g)
    return R, A, Bt, S


def cpu_1thread_s_per_tile(R, A, Bt, S, reps):
    """Least CPU seconds per tile of the C++ sweep on one thread (time.thread_time)."""
    T, bA, bB = S.shape
    Rc, Sc = R.clone(), S.clone()
    best = float("inf")
    for _ in range(reps):
        t = time.thread_time()
        ts.cpu_ext.sweep_tiles(Rc.data_ptr(), A.data_ptr(), Bt.data_ptr(), Sc.data_ptr(), T, bA, bB, 1, 1)
        best = min(best, (time.thread_time() - t) / T)
    return best


def reference_s(R, A, Bt, S, rows, reps, sync=lambda: None):
    """Median seconds of sweep_tiles_reference over the first `rows` rows of every tile (`reps` runs
    after one warm-up), extrapolated to all bA rows: S[:, :rows] and A[:, :, :rows] as views, R whole,
    so each row step does exactly the work it does in a full sweep. -> (seconds for a full sweep, rows
    measured)."""
    bA = S.shape[1]
    rows = bA if rows <= 0 else min(rows, bA)
    Rc, Sc = R.clone(), S.clone()

    def run():
        ts.sweep_tiles_reference(Rc, A[:, :, :rows], Bt, Sc[:, :rows], 1)
        sync()
    return cpu_time_s(run, reps=reps, warmup=1) * bA / rows, rows


def main():
    device = "cuda" if torch.cuda.is_available() else "cpu"
    ap = bench_args(__doc__.splitlines()[0], f"tile_sweep_{device}")
    ap.add_argument("--ref-rows", type=int, default=16, help="reference rows per tile to time (0: all)")
    ap.add_argument("--reps", type=int, default=5, help="timed sweeps per kernel")
    ap.add_argument("--ref-reps", type=int, default=3, help="timed sweeps of the reference")
    args = ap.parse_args()
    load = round(os.getloadavg()[0], 2)
    print(f"load average {load}, torch {torch.__version__}, threads {torch.get_num_threads()}, cpus {os.cpu_count()}, "
          f"C++ module {ts.cpu_ext.build_info() if ts.cpu_ext is not None else 'not built'}, "
          f"cuda {torch.cuda.get_device_name() if device == 'cuda' else 'none'}")
    rows_out = []
    for T, bA, bB in SHAPES:
        R, A, Bt, S = make(T, bA, bB)
        macs = T * bA * (2 * bA * bB + 2 * bB * bB)
        if ts.cpu_ext is not None:
            Rc, Sc = R.clone(), S.clone()
            c = cpu_time_s(lambda: ts.sweep_tiles_cpu(Rc, A, Bt, Sc, 1), reps=args.reps)
            c1 = cpu_1thread_s_per_tile(R, A, Bt, S, args.reps)
            r, rows = reference_s(R, A, Bt, S, args.ref_rows, args.ref_reps)
            print(f"cpu  T={T:4d} {bA}x{bB}: C++ {c * 1e3:8.2f} ms/sweep wall ({macs / c / 1e9:5.2f} GMAC/s), "
                  f"1 thread {c1 * 1e3:.3f} ms CPU/tile ({macs / T / c1 / 1e9:5.2f} GMAC/s)   reference "
                  f"{r:8.2f} s/sweep ({'measured' if rows == bA else f'{rows} of {bA} rows, extrapolated'})"
                  f"   speed-up {r / c:8.0f}x")
            rows_out.append(dict(device="cpu", T=T, bA=bA, bB=bB, cpp_ms=round(c * 1e3, 3),
                                 cpp_1thread_cpu_ms_per_tile=round(c1 * 1e3, 4), ref_s=round(r, 3),
                                 ref_rows=rows, speedup=round(r / c, 1), threads=torch.get_num_threads(),
                                 load_avg=load))
        else:
            print("cpu: armor_kernels._armor_cpu is not built (or ARMOR_CPU_EXT=0): no CPU rows")
        if device == "cuda" and triton_switch.triton is not None:
            Rg, Ag, Btg, Sg = (t.cuda() for t in (R, A, Bt, S))
            k = cuda_time_us(lambda: ts.sweep_tiles_triton(Rg, Ag, Btg, Sg, 1), reps=args.reps * 4, warmup=2)
            r, rows = reference_s(Rg, Ag, Btg, Sg, args.ref_rows, args.ref_reps, sync=torch.cuda.synchronize)
            print(f"cuda T={T:4d} {bA}x{bB}: Triton {k:10.1f} us/sweep ({macs / k / 1e3:6.1f} GMAC/s)   "
                  f"reference {r:8.2f} s/sweep   speed-up {r * 1e6 / k:8.0f}x")
            rows_out.append(dict(device="cuda", T=T, bA=bA, bB=bB, triton_us=round(k, 1), ref_s=round(r, 3),
                                 ref_rows=rows, speedup=round(r * 1e6 / k, 1)))
    if not rows_out:
        raise SystemExit("nothing to time: neither the C++ module nor a CUDA device with triton")
    write_csv(rows_out, args.out)


if __name__ == "__main__":
    main()
