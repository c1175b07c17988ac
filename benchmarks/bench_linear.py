"""One ARMOR layer, y = ((x B'ᵀ) Sᵀ) A'ᵀ + bias, against dense and plain 2:4, on one CUDA GPU or the CPU.

    python benchmarks/bench_linear.py [--shapes 4096x4096,...] [--tokens 1,16,...] [--dtype bf16] [--blocks 128]
    python benchmarks/bench_linear.py --device cpu          # the packed CPU kernels (see measure_cpu)
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
Before a method is timed at a size its output is checked against the float32 reference (`check`): a wrong
result, or any error of this package's kernels, stops the benchmark with exit status 1 (torch's cuSPARSELt
rows report their size limits and go on). Time: median of CUDA-event timings of single calls. TFLOP/s
counts the dense-equivalent 2·T·d_out·d_in (so it compares speed, not work done). Bytes: the minimum a
method must move through DRAM (weights once, activations in and out, its own intermediates). Results:
--out (default benchmarks/results/bench_linear.csv, written atomically) and the plot beside it (.png).
"""
from __future__ import annotations

import sys

import torch
import torch.nn.functional as F
from harness import bench_args, cuda_time_us, graphed, plot_lines, write_csv

from armor_kernels import ops
from armor_kernels.factors import block_sizes
from armor_kernels.layout import identity_blocks
from armor_kernels.pipeline.runtime import cpu_name
from armor_kernels.sparse24 import pack_24, unpack_24

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


TORCH_METHODS = ("sparse24", "armor_unfused")  # rows on torch's cuSPARSELt, whose size limits are reported
# A row whose output is further than this from the layer's (relative Frobenius error) stops the benchmark: a
# few units of the storage dtype's rounding (bf16: 2^-8), which the output and the B' product each carry.
TOLERANCE = 2e-2


def f32(*tensors):
    """The tensors in float32 (None stays None): the reference the rows are checked against."""
    return [None if t is None else t.float() for t in tensors]


def check(name: str, got: torch.Tensor, want: torch.Tensor, where: str) -> None:
    """Stop the benchmark (exit status 1) unless a method computes the layer it is timed as."""
    err = ((got.float() - want.float()).norm() / want.float().norm()).item()
    if not err <= TOLERANCE:
        raise SystemExit(f"bench_linear: {name} {where}: relative error {err:.2e} against the reference "
                         f"(tolerance {TOLERANCE}); nothing is timed on a wrong result")


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
        times, where = {}, f"{d_out}x{d_in} b{block} T={T}"
        want = {"armor": ops.reference(*f32(x, A, S, B, bias)), "sparse24": F.linear(*f32(x, S, bias))}
        for name, fn in fns.items():
            try:
                if not name.endswith("_graph") and name != "dense":  # checked before it is timed
                    check(name, fn(), want["armor" if name.startswith("armor") else "sparse24"], where)
                times[name] = cuda_time_us(fn() if name.endswith("_graph") else fn, args.reps)
            except RuntimeError as e:
                if name.removesuffix("_graph") not in TORCH_METHODS:  # this package's kernels: never skipped
                    raise
                print(f"{name} {where}: {e}", file=sys.stderr)  # e.g. a cuSPARSELt size limit: report, go on
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


# --- the CPU ------------------------------------------------------------------------------------------

CPU_SHAPES = "576x576,1536x576,576x1536,4096x4096,14336x4096,4096x14336"  # SmolLM2-135M's, Llama-3-8B's
CPU_TOKENS = "1,4,16,32,64,512,2048"
CYCLE_BYTES = 256 << 20  # weights cycled per timing: far over any last-level cache, as a model's decode reads


def stream_bandwidth() -> float:
    """Bytes/s of summing a 256 MiB float32 tensor (written first: untouched pages read as zeros), with
    torch's threads: the machine's streaming read bandwidth, the ceiling of a memory-bound decode."""
    from harness import cpu_time_s
    t = torch.ones(64 << 20)
    return t.numel() * 4 / cpu_time_s(lambda: t.sum(), reps=7, warmup=2)


def cpu_layers(d_out: int, d_in: int, block: int, copies: int, wrapped: bool):
    """`copies` packed layers (A', S's values and positions, B', bias) in bf16; A' = B' = None unwrapped."""
    bA, bB = block_sizes((d_out, d_in), block)
    out = []
    for _ in range(copies):
        keep = torch.rand(d_out, d_in // 4, 4).argsort(-1)[..., :2]
        S = torch.zeros(d_out, d_in // 4, 4).scatter_(-1, keep, torch.randn(d_out, d_in // 4, 2))
        values, idx = pack_24(S.reshape(d_out, d_in).to(torch.bfloat16))
        A = (torch.randn(d_out // bA, bA, bA) / bA ** 0.5).to(torch.bfloat16) if wrapped else None
        B = (torch.randn(d_in // bB, bB, bB) / bB ** 0.5).to(torch.bfloat16) if wrapped else None
        out.append((A, values, idx, B, torch.randn(d_out).to(torch.bfloat16)))
    return out


def cpu_layer_bytes(layer) -> int:
    return sum(t.numel() * t.element_size() for t in layer if t is not None)


def measure_cpu(d_out: int, d_in: int, args, info: dict, bandwidth: float) -> list[dict]:
    """One shape's rows at every token count: ARMOR at b = 128 and b = 16 (the op's own choice, each CPU
    kernel forced, and up to 64 tokens the sparse kernel's other layout: *_lanes below 16 tokens, *_permutes
    from 16), plain 2:4 (Sparse24Linear's call),
    each as a prepared layer runs it in eager mode (ops.cpu_packed_linear), the reference (through the
    op), dense F.linear in bf16 and in float32. Weights are cycled over enough copies to exceed
    the last-level cache: time = median over reps of (one pass over the copies) / copies."""
    from harness import cpu_time_s
    copies = max(2, min(64, -(-CYCLE_BYTES // (2 * d_out * d_in))))
    dense16 = [torch.randn(d_out, d_in).to(torch.bfloat16) for _ in range(copies)]
    dense32 = [w.float() for w in dense16]
    bias = torch.randn(d_out).to(torch.bfloat16)
    packed = {"armor_b128": cpu_layers(d_out, d_in, 128, copies, True),
              "armor_b16": cpu_layers(d_out, d_in, 16, copies, True),
              "sparse24": cpu_layers(d_out, d_in, 128, copies, False)}
    rows = []
    for T in map(int, args.tokens.split(",")):
        x16 = torch.randn(T, d_in).to(torch.bfloat16)
        x32 = x16.float()
        fns = {"dense_bf16": (lambda k: F.linear(x16, dense16[k], bias), 2 * d_out * d_in, ""),
               "dense_fp32": (lambda k: F.linear(x32, dense32[k], bias.float()), 4 * d_out * d_in, "")}
        for name, layers in packed.items():
            nbytes = cpu_layer_bytes(layers[0])
            A, values, idx, B, b = layers[0]
            want = ops.reference(*f32(x16, A, unpack_24(values, idx), B, b))  # each kernel checked before timing
            for backend in ("auto", "cpu_sparse", "cpu_gemm"):
                label = name if backend == "auto" else f"{name}_{backend.removeprefix('cpu_')}"
                if backend != "auto" and name == "armor_b16":
                    continue  # the crossover is read off b = 128 and plain 2:4
                path = ops.linear_path(T, *[layers[0][i] for i in (0, 1, 3)], S_idx=layers[0][2], backend=backend)
                # the kernels as a prepared layer's eager forward calls them (without the op's dispatch)
                fns[label] = (lambda k, L=layers, p=path: ops.cpu_packed_linear(x16, L[k][0], L[k][1], L[k][2], L[k][3],
                                                                                L[k][4], path=p), nbytes, path)
                check(label, fns[label][0](0), want, f"{d_out}x{d_in} T={T}")
            if name != "armor_b16" and T <= 64:  # the sparse kernel's other layout: what LANES_MIN_TOKENS rests on
                label, lanes_from = (f"{name}_lanes", 1) if T < 16 else (f"{name}_permutes", 1 << 30)
                fns[label] = (lambda k, L=layers, n=lanes_from: ops.cpu_packed_linear(
                    x16, L[k][0], L[k][1], L[k][2], L[k][3], L[k][4], path="cpu_sparse", lanes_from=n),
                    nbytes, "cpu_sparse")
                check(label, fns[label][0](0), want, f"{d_out}x{d_in} T={T}")
        ref = packed["armor_b128"]
        fns["reference_b128"] = (lambda k: ops.linear(x16, ref[k][0], ref[k][1], ref[k][3], ref[k][4], S_idx=ref[k][2],
                                                      backend="reference"), cpu_layer_bytes(ref[0]), "reference")
        big = T >= 512  # compute-bound: one copy, few reps
        times = {}
        for name, (fn, _, _) in fns.items():
            n = 1 if big else copies
            times[name] = cpu_time_s(lambda: [fn(k) for k in range(n)], reps=2 if big else 7) / n
        best_dense = min(times["dense_bf16"], times["dense_fp32"])
        for name, (_, wbytes, path) in fns.items():
            t = times[name]
            moved = wbytes + T * (d_in + d_out) * 2
            rows.append(dict(**info, d_out=d_out, d_in=d_in, tokens=T, method=name, path=path,
                             time_us=round(t * 1e6, 1), bytes=moved, gbps=round(moved / t / 1e9, 2),
                             bandwidth_fraction=round(moved / t / bandwidth, 3),
                             speedup_vs_best_dense=round(best_dense / t, 3)))
        print(" ".join(f"{r['method']}={r['time_us']}us" for r in rows[-len(fns):]), f"[{d_out}x{d_in} T={T}]",
              flush=True)
    return rows


def main_cpu(args) -> int:
    from armor_kernels.kernels.tile_sweep import cpu_ext
    if cpu_ext is None:
        print(f"bench_linear: {ops.cpu_unavailable_reason()}", file=sys.stderr)
        return 2
    bandwidth = stream_bandwidth()
    info = dict(device="cpu", cpu=cpu_name(), cores=torch.get_num_threads(), torch=torch.__version__,
                isa=cpu_ext.packed_isa(), gemm_dtype=str(ops.cpu_gemm_dtype(torch.bfloat16)).removeprefix("torch."),
                stream_gbps=round(bandwidth / 1e9, 2), dtype="bf16")
    print(f"{info['cpu']}, {info['cores']} threads, torch {info['torch']}, packed kernels {info['isa']}, "
          f"streaming read {info['stream_gbps']} GB/s")
    rows = []
    for shape in args.shapes.split(","):
        d_out, d_in = map(int, shape.lower().split("x"))
        rows += measure_cpu(d_out, d_in, args, info, bandwidth)
    write_csv(rows, args.out)
    panels = {}
    for r in rows:
        if r["method"] in ("armor_b128", "armor_b16", "sparse24", "dense_fp32", "reference_b128",
                           "armor_b128_decode", "armor_b128_gemm"):
            panels.setdefault(f"{r['d_out']}x{r['d_in']}", {}).setdefault(r["method"], []).append(
                (r["tokens"], r["speedup_vs_best_dense"]))
    plot_lines(panels, args.out.with_suffix(".png"), xlabel="tokens",
               ylabel="speed-up vs torch's faster dense (bf16/fp32)", xscale="log", yscale="log", hline=1.0,
               legend_outside=True)
    return 0


def main(argv=None) -> int:
    p = bench_args(__doc__.split("\n")[0], "bench_linear")
    p.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    p.add_argument("--shapes", default=None, help=f"comma-separated d_outxd_in (default: {SHAPES} on CUDA, "
                   f"{CPU_SHAPES} on the CPU)")
    p.add_argument("--tokens", default=None, help=f"comma-separated token counts (default {TOKENS} / {CPU_TOKENS})")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--blocks", default="128", help="comma-separated nominal ARMOR block sizes (block-size rule)")
    p.add_argument("--reps", type=int, default=50)
    args = p.parse_args(argv)
    cpu = args.device == "cpu"
    args.shapes = args.shapes or (CPU_SHAPES if cpu else SHAPES)
    args.tokens = args.tokens or (CPU_TOKENS if cpu else TOKENS)
    if cpu:
        if args.out == p.get_default("out"):
            args.out = args.out.with_name("bench_linear_cpu.csv")
        return main_cpu(args)
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
