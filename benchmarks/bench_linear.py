"""One ARMOR layer, y = ((x B'ᵀ) Sᵀ) A'ᵀ + bias, against dense and plain 2:4, on one CUDA GPU.

    python benchmarks/bench_linear.py [--shapes 4096x4096,...] [--tokens 1,16,...] [--dtype bf16]

Methods, per (d_out x d_in, tokens):
  dense, dense_graph          F.linear (cuBLAS), eager and replayed from a CUDA graph
  sparse24, sparse24_graph    torch 2:4 (to_sparse_semi_structured, cuSPARSELt) on S alone
  armor_unfused               B' by bmm, S by cuSPARSELt, A' by bmm: the official three-op path
  armor, armor_graph          torch.ops.armor.linear with the sm90 compressed S: the fused sparse
                              tensor-core GEMM where it applies (column `path`; the PyTorch reference
                              otherwise), eager and graphed
  armor_decode, ..._graph     torch.ops.armor.linear with the portable packed S, up to 16 tokens: the
                              decode kernels (split-K stream over S). Both run at decode sizes so that
                              the op's choice per token count rests on these numbers
Time: median of CUDA-event timings of single calls. TFLOP/s counts the dense-equivalent 2·T·d_out·d_in
(so it compares speed, not work done). Bytes: the minimum a method must move through DRAM (weights
once, activations in and out, its own intermediates). Results: benchmarks/results/bench_linear.csv
(written atomically) and bench_linear.png.
"""
from __future__ import annotations

import argparse
import csv
import os
import statistics
import sys
import tempfile
from pathlib import Path

import torch
import torch.nn.functional as F

from armor_kernels import ops
from armor_kernels.factors import block_sizes
from armor_kernels.sparse24 import pack_24

# Llama-7B/13B/3-8B/70B-style shapes from the issue, then the bundled SmolLM2-135M's projections
# (q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536).
SHAPES = "4096x4096,11008x4096,4096x11008,14336x4096,28672x8192,576x576,192x576,1536x576,576x1536"
TOKENS = "1,16,128,2048,8192"
RESULTS = Path(__file__).resolve().parent / "results"


def time_us(fn, reps: int, warmup: int = 5) -> float:
    for _ in range(warmup):
        fn()
    start = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    end = [torch.cuda.Event(enable_timing=True) for _ in range(reps)]
    for s, e in zip(start, end):
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return statistics.median(s.elapsed_time(e) for s, e in zip(start, end)) * 1e3


def graphed(fn):
    """fn captured once in a CUDA graph; returns the replay."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()  # warm-up (lazy inits, plan creation) outside the capture
    torch.cuda.current_stream().wait_stream(side)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    return g.replay


def layer(d_out: int, d_in: int, dtype: torch.dtype, block: int):
    """Random ARMOR factors of the right structure (timings do not depend on the values)."""
    bA, bB = block_sizes((d_out, d_in), block)
    A = torch.randn(d_out // bA, bA, bA, device="cuda", dtype=dtype) / bA ** 0.5
    B = torch.randn(d_in // bB, bB, bB, device="cuda", dtype=dtype) / bB ** 0.5
    keep = torch.rand(d_out, d_in // 4, 4, device="cuda").argsort(-1)[..., :2]
    mask = torch.zeros(d_out, d_in // 4, 4, device="cuda").scatter_(-1, keep, 1.0).reshape(d_out, d_in)
    S = (torch.randn(d_out, d_in, device="cuda") * mask).to(dtype)
    bias = torch.randn(d_out, device="cuda", dtype=dtype)
    return A, S, B, bias


def bytes_moved(method: str, d_out: int, d_in: int, T: int, bA: int, bB: int, esize: int) -> int:
    act = (T * d_in + T * d_out) * esize
    dense_w = d_out * d_in * esize
    s24 = dense_w // 2 + d_out * d_in // 8  # kept values + 2 bits of metadata per kept value
    blocks = (d_out * bA + d_in * bB) * esize
    xb = 2 * T * d_in * esize  # B'-transformed activations written and read back
    return {
        "dense": dense_w + act,
        "sparse24": s24 + act,
        "armor_unfused": s24 + blocks + act + xb + 2 * T * d_out * esize,  # + (xb Sᵀ) written and read
        "armor": s24 + blocks + act + xb,
        "armor_decode": s24 + blocks + act + xb,  # its fp32 partial sums stay in L2
    }[method.removesuffix("_graph")]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default=SHAPES, help="comma-separated d_outxd_in")
    p.add_argument("--tokens", default=TOKENS, help="comma-separated token counts")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--block", type=int, default=128, help="nominal ARMOR block size")
    p.add_argument("--reps", type=int, default=50)
    p.add_argument("--out", type=Path, default=RESULTS / "bench_linear.csv")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_linear: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.",
              file=sys.stderr)
        return 2
    from torch.sparse import to_sparse_semi_structured
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.cuda.get_device_name()
    rows = []
    for shape in args.shapes.split(","):
        d_out, d_in = map(int, shape.lower().split("x"))
        A, S, B, bias = layer(d_out, d_in, dtype, args.block)
        bA, bB = A.shape[1], B.shape[1]
        W = ops.block_diag_apply(ops.block_diag_apply(S.T.contiguous(), A).T.contiguous(), B.transpose(1, 2))
        S_sp = to_sparse_semi_structured(S)
        fused = ops.fused_supported("cuda", dtype, d_out, d_in, bA, bB)
        sm90 = ops.pack_sm90(S) if fused else None
        values, idx = pack_24(S)
        decode_max = ops._armor_cuda.DECODE_MAX_TOKENS if fused else 0
        for T in map(int, args.tokens.split(",")):
            x = torch.randn(T, d_in, device="cuda", dtype=dtype)
            # cuSPARSELt takes the sparse operand first: y = (S · xᵀ)ᵀ, with xᵀ padded by torch as needed.
            fns = {
                "dense": lambda: F.linear(x, W, bias),
                "sparse24": lambda: F.linear(x, S_sp, bias),
                "armor_unfused": lambda: ops.block_diag_apply(
                    F.linear(ops.block_diag_apply(x, B), S_sp), A) + bias,
                "armor": lambda: ops.linear(x, A, S, B, bias, sm90=sm90),
            }
            if T <= decode_max:
                fns["armor_decode"] = lambda: ops.linear(x, A, values, B, bias, S_idx=idx)
            for name in [n for n in fns if n != "armor_unfused"]:
                fns[name + "_graph"] = lambda fn=fns[name]: graphed(fn)  # captured when first timed
            times = {}
            for name, fn in fns.items():
                try:
                    times[name] = time_us(fn() if name.endswith("_graph") else fn, args.reps)
                except RuntimeError as e:  # e.g. a cuSPARSELt size limit: report, keep going
                    print(f"{name} {shape} T={T}: {e}", file=sys.stderr)
            for name, t in times.items():
                rows.append(dict(
                    device=device, dtype=args.dtype, d_out=d_out, d_in=d_in, tokens=T, bA=bA, bB=bB,
                    method=name, path=op_path(name, fused),
                    time_us=round(t, 2), tflops=round(2 * T * d_out * d_in / t / 1e6, 2),
                    bytes=bytes_moved(name, d_out, d_in, T, bA, bB, S.element_size()),
                    speedup_vs_dense=round(times["dense"] / t, 3) if "dense" in times else ""))
            print(" ".join(f"{r['method']}={r['time_us']}us" for r in rows[-len(times):]), f"[{shape} T={T}]")
    write_csv(rows, args.out)
    plot(rows, args.out.with_suffix(".png"))
    return 0


def op_path(method: str, fused: bool) -> str:
    """Which implementation of torch.ops.armor.linear a method ran."""
    if not method.startswith("armor") or method == "armor_unfused":
        return ""
    if not fused:
        return "reference"
    return "decode" if method.startswith("armor_decode") else "sparse_gemm"


def write_csv(rows, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
    with os.fdopen(fd, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    os.replace(tmp, path)  # readers never see a half-written file
    print(f"wrote {path}")


def plot(rows, path: Path) -> None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    shapes = sorted({(r["d_out"], r["d_in"]) for r in rows}, key=lambda s: -s[0] * s[1])
    fig, axes = plt.subplots(1, len(shapes), figsize=(3.2 * len(shapes), 3.2), sharey=True, squeeze=False)
    for ax, (d_out, d_in) in zip(axes[0], shapes):
        sel = [r for r in rows if (r["d_out"], r["d_in"]) == (d_out, d_in) and r["speedup_vs_dense"] != ""]
        for method in dict.fromkeys(r["method"] for r in sel):
            pts = sorted((r["tokens"], r["speedup_vs_dense"]) for r in sel if r["method"] == method)
            ax.plot(*zip(*pts), marker="o", label=method)
        ax.set(xscale="log", title=f"{d_out}x{d_in}", xlabel="tokens")
        ax.axhline(1.0, color="gray", lw=0.5)
    axes[0][0].set_ylabel("speed-up vs dense cuBLAS (eager)")
    axes[0][-1].legend(fontsize=6)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".png")
    os.close(fd)
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())
