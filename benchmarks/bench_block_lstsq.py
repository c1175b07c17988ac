"""block_lstsq (armor_kernels/kernels/block_lstsq.py): the Triton normal equations against the reference.

    python benchmarks/bench_block_lstsq.py [--reps N] [--out results/block_lstsq_cpu.csv]

The shapes are the optimizer's A-step (X = S B per row block, weighted by h: n = d_out / bA blocks of
bA rows, K = d_in) and B-step (columns, unweighted: n = d_in / bB, K = d_out) for SmolLM2-135M's
linears and a 4096² layer. CPU rows: the reference normal equations and the whole `block_lstsq`
(normal equations + Cholesky solve); there is no CPU kernel (Triton under the interpreter is not a
benchmark). CUDA rows, where a GPU exists: reference against Triton normal equations, with a check
that they agree. Default output: results/block_lstsq_<cpu|cuda>.csv.
"""
from __future__ import annotations

import torch
from harness import bench_args, cpu_time_s, cuda_vs_reference, write_csv

from armor_kernels.kernels import block_lstsq as bl
from armor_kernels.kernels import triton_switch

CASES = (  # (label, n, b, K, weighted)
    ("A-step 576x576", 6, 96, 576, True),
    ("B-step 576x576", 6, 96, 576, False),
    ("A-step 1536x576", 12, 128, 576, True),
    ("B-step 1536x576", 6, 96, 1536, False),
    ("A-step 4096x4096", 32, 128, 4096, True),
    ("B-step 4096x4096", 32, 128, 4096, False),
)


CUDA = torch.cuda.is_available() and triton_switch.triton is not None


def time_case(label, n, b, K, weighted, reps):
    """The CPU row of one case, and its CUDA row where there is a GPU."""
    g = torch.Generator().manual_seed(0)
    X, Y = torch.randn(n, b, K, generator=g), torch.randn(n, b, K, generator=g)
    w = torch.rand(K, generator=g) + 0.1 if weighted else None
    case = dict(case=label, n=n, b=b, K=K)
    r = cpu_time_s(lambda: bl.normal_equations_reference(X, Y, w), reps=reps)
    z = cpu_time_s(lambda: bl.block_lstsq(X, Y, w), reps=reps)
    print(f"cpu  {label:18s}: normal equations {r * 1e3:8.2f} ms, block_lstsq {z * 1e3:8.2f} ms")
    rows = [dict(device="cpu", **case, reference_ms=round(r * 1e3, 3), block_lstsq_ms=round(z * 1e3, 3),
                 threads=torch.get_num_threads())]
    if CUDA:
        Xg, Yg, wg = X.cuda(), Y.cuda(), (w.cuda() if w is not None else None)
        for got, want in zip(bl.normal_equations_triton(Xg, Yg, wg), bl.normal_equations_reference(Xg, Yg, wg)):
            torch.testing.assert_close(got, want, atol=2e-6 * K, rtol=1e-5)
        rows.append(cuda_vs_reference(f"{label:18s}", case, lambda: bl.normal_equations_reference(Xg, Yg, wg),
                                      lambda: bl.normal_equations_triton(Xg, Yg, wg), reps * 10))
    return rows


def main():
    ap = bench_args(__doc__.splitlines()[0], f"block_lstsq_{'cuda' if CUDA else 'cpu'}")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per CPU row (x10 per CUDA row)")
    args = ap.parse_args()
    write_csv([row for case in CASES for row in time_case(*case, args.reps)], args.out)


if __name__ == "__main__":
    main()
