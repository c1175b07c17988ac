"""One ARMOR layer, y = ((x B'ᵀ) Sᵀ) A'ᵀ + bias, against dense and plain 2:4, on one CUDA GPU.

    python benchmarks/bench_linear.py [--shapes 4096x4096,...] [--tokens 1,16,...] [--dtype bf16] [--blocks 128]
    python benchmarks/bench_linear.py --shapes 576x576,192x576,1536x576,576x1536,4096x4096 \
        --blocks 128,64,32,16 --out benchmarks/results/bench_linear_padded.csv   # padded / expanded layouts

Methods, per (d_out x d_in, nominal block, tokens):
  dense, dense_graph          F.linear (cuBLAS), eager and replayed from a CUDA graph
  sparse24, sparse24_graph    torch 2:4 (to_sparse_semi_structured, cuSPARSELt) on S alone
  sparse24_fused, ..._graph   S alone on this package's sparse GEMM (Sparse24Linear after prepare_fused:
                              identity A' and B', ops.fused_operands), forced to the sparse GEMM
  armor_unfused               B' by bmm, S by cuSPARSELt, A' by bmm: the official three-op path
  armor, armor_graph          the layer through ops.fused_operands / fused_linear (padded and block-
                              expanded where its blocks or sizes are not the kernels' own, layout.py),
                              forced to the sparse GEMM, eager and graphed
  armor_decode, ..._graph     the same operands forced to the decode kernels (split-K stream over the
                              packed S), up to 16 tokens. Both run at decode sizes so that the op's own
                              choice (decode up to ops.DECODE_MAX_TOKENS) rests on these numbers
Columns `path`: the implementation the op ran (ops.linear_path on the operands it was given); `layout`
and `flop_ratio`: the kernels' layout of the layer and the sparse GEMM's extra work in it
(LayerLayout.describe, flop_ratio); bA, bB: the layer's own blocks (the block-size rule at --blocks).
Time: median of CUDA-event timings of single calls. TFLOP/s counts the dense-equivalent 2·T·d_out·d_in
(so it compares speed, not work done). Bytes: the minimum a method must move through DRAM (weights
once, activations in and out, its own intermediates). Results: --out (default
benchmarks/results/bench_linear.csv, written atomically) and the plot beside it (.png).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from harness import bench_args, cuda_time_us, graphed, plot_lines, write_csv

from armor_kernels import ops
from armor_kernels.factors import block_sizes
from armor_kernels.layout import identity_blocks
from armor_kernels.sparse24 import pack_24

# d_out x d_in of Llama-2-7B's projections (attention 4096x4096, MLP 11008x4096 and 4096x11008), the MLP up
# projections of Llama-3-8B (14336x4096) and Llama-70B (28672x8192), then the bundled SmolLM2-135M's
# (q/o 576x576, k/v 192x576, gate/up 1536x576, down 576x1536).
SHAPES = "4096x4096,11008x4096,4096x11008,14336x4096,28672x8192,576x576,192x576,1536x576,576x1536"
TOKENS = "1,16,128,2048,8192"


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
        "sparse24_fused": s24 + act + xb,
        "armor_unfused": s24 + blocks + act + xb + 2 * T * d_out * esize,  # + (xb Sᵀ) written and read
        "armor": s24 + blocks + act + xb,
        "armor_decode": s24 + blocks + act + xb,  # its fp32 partial sums stay in L2
    }[method.removesuffix("_graph")]


def measure(d_out: int, d_in: int, block: int, dtype: torch.dtype, args, device: str, to_sparse) -> list[dict]:
    """Every method's rows for one layer shape and nominal block size, at every token count."""
    A, S, B, bias = layer(d_out, d_in, dtype, block)
    bA, bB = A.shape[1], B.shape[1]
    W = ops.block_diag_apply(ops.block_diag_apply(S.T.contiguous(), A).T.contiguous(), B.transpose(1, 2))
    S_sp = to_sparse(S)
    values, idx = pack_24(S)
    fused = ops.fused_supported("cuda", dtype, d_out, d_in, bA, bB)
    f = ops.fused_operands(A, values, idx, B, bias, compress=fused)
    f24 = ops.fused_operands(identity_blocks(d_out, dtype, "cuda"), values, idx, identity_blocks(d_in, dtype, "cuda"),
                             bias, compress=fused)
    rows = []
    for T in map(int, args.tokens.split(",")):
        x = torch.randn(T, d_in, device="cuda", dtype=dtype)
        # cuSPARSELt takes the sparse operand first: y = (S · xᵀ)ᵀ, with xᵀ padded by torch as needed.
        fns = {
            "dense": lambda: F.linear(x, W, bias),
            "sparse24": lambda: F.linear(x, S_sp, bias),
            "armor_unfused": lambda: ops.block_diag_apply(F.linear(ops.block_diag_apply(x, B), S_sp), A) + bias,
        }
        paths = {}
        if fused:  # forced backends: each row measures one kernel family, whatever the op would pick
            fns["sparse24_fused"] = lambda: ops.fused_linear(x, f24, backend="sparse_gemm")
            fns["armor"] = lambda: ops.fused_linear(x, f, backend="sparse_gemm")
            paths = {"sparse24_fused": "sparse_gemm", "armor": "sparse_gemm"}
            if T <= ops.DECODE_MAX_TOKENS:
                fns["armor_decode"] = lambda: ops.fused_linear(x, f, backend="decode")
                paths["armor_decode"] = "decode"
        else:
            fns["armor"] = lambda: ops.fused_linear(x, f)
            paths["armor"] = "reference"
        for name in [n for n in fns if n != "armor_unfused"]:
            fns[name + "_graph"] = lambda fn=fns[name]: graphed(fn)  # captured when first timed
        times = {}
        for name, fn in fns.items():
            try:
                times[name] = cuda_time_us(fn() if name.endswith("_graph") else fn, args.reps)
            except RuntimeError as e:  # e.g. a cuSPARSELt size limit: report, keep going
                print(f"{name} {d_out}x{d_in} b{block} T={T}: {e}", file=sys.stderr)
        for name, t in times.items():
            rows.append(dict(
                device=device, dtype=args.dtype, d_out=d_out, d_in=d_in, block=block, tokens=T, bA=bA, bB=bB,
                layout=f.layout.describe(), flop_ratio=round(f.layout.flop_ratio, 4),
                method=name, path=paths.get(name.removesuffix("_graph"), ""),
                time_us=round(t, 2), tflops=round(2 * T * d_out * d_in / t / 1e6, 2),
                bytes=bytes_moved(name, d_out, d_in, T, bA, bB, S.element_size()),
                speedup_vs_dense=round(times["dense"] / t, 3) if "dense" in times else ""))
        print(" ".join(f"{r['method']}={r['time_us']}us" for r in rows[-len(times):]),
              f"[{d_out}x{d_in} b{block} T={T}]")
    return rows


def main(argv=None) -> int:
    p = bench_args(__doc__.split("\n")[0], "bench_linear")
    p.add_argument("--shapes", default=SHAPES, help="comma-separated d_outxd_in")
    p.add_argument("--tokens", default=TOKENS, help="comma-separated token counts")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--blocks", default="128", help="comma-separated nominal ARMOR block sizes (block-size rule)")
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_linear: needs a CUDA GPU (torch.cuda.is_available() is False); nothing measured.",
              file=sys.stderr)
        return 2
    reason = ops.fused_unavailable_reason("cuda")
    if reason is not None:
        print(f"bench_linear: the armor rows run the PyTorch reference: {reason}", file=sys.stderr)
    from torch.sparse import to_sparse_semi_structured
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype]
    device = torch.cuda.get_device_name()
    rows = []
    for shape in args.shapes.split(","):
        for block in map(int, args.blocks.split(",")):
            d_out, d_in = map(int, shape.lower().split("x"))
            rows += measure(d_out, d_in, block, dtype, args, device, to_sparse_semi_structured)
    write_csv(rows, args.out)
    shapes = sorted({(r["d_out"], r["d_in"]) for r in rows}, key=lambda s: -s[0] * s[1])
    panels = {f"{d_out}x{d_in}": {} for d_out, d_in in shapes}
    first_block = int(args.blocks.split(",")[0])
    for r in rows:
        baseline = r["method"].startswith(("dense", "sparse24"))  # the same at every block: plotted once
        if r["speedup_vs_dense"] != "" and not (baseline and r["block"] != first_block):
            lines = panels[f"{r['d_out']}x{r['d_in']}"]
            label = r["method"] if baseline else f"{r['method']} b{r['block']}"
            lines.setdefault(label, []).append((r["tokens"], r["speedup_vs_dense"]))
    plot_lines(panels, args.out.with_suffix(".png"), xlabel="tokens", ylabel="speed-up vs dense cuBLAS (eager)",
               xscale="log", hline=1.0)
    return 0


if __name__ == "__main__":
    sys.exit(main())
