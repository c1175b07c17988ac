"""top2_mask (armor_kernels/kernels/top2.py): the Triton kernel against the PyTorch reference.

    python benchmarks/bench_top2.py [--reps N] [--out results/top2_cpu.csv]

The score shapes are the weights the optimizer and the baselines mask (SmolLM2-135M's linears and a
4096² layer). CPU rows: the reference alone (there is no CPU kernel; Triton under the interpreter is
not a benchmark); CUDA rows, where a GPU exists: reference against Triton, with a check that both
give the same mask. Default output: results/top2_<cpu|cuda>.csv.
"""
from __future__ import annotations

import torch
from harness import bench_args, cpu_time_s, cuda_vs_reference, write_csv

from armor_kernels.kernels import top2, triton_switch

SHAPES = ((192, 576), (576, 576), (1536, 576), (576, 1536), (4096, 4096))


CUDA = torch.cuda.is_available() and triton_switch.triton is not None


def time_shape(shape, reps):
    """The CPU row of one score shape, and its CUDA row where there is a GPU."""
    score = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    name = "x".join(map(str, shape))
    r = cpu_time_s(lambda: top2.top2_mask_reference(score), reps=reps)
    print(f"cpu  {name}: reference {r * 1e3:8.3f} ms")
    rows = [dict(device="cpu", shape=name, reference_ms=round(r * 1e3, 4), threads=torch.get_num_threads())]
    if CUDA:
        sg = score.cuda()
        assert torch.equal(top2.top2_mask_triton(sg), top2.top2_mask_reference(sg))
        rows.append(cuda_vs_reference(name, dict(shape=name), lambda: top2.top2_mask_reference(sg),
                                      lambda: top2.top2_mask_triton(sg), reps * 10))
    return rows


def main():
    ap = bench_args(__doc__.splitlines()[0], f"top2_{'cuda' if CUDA else 'cpu'}")
    ap.add_argument("--reps", type=int, default=5, help="timed calls per CPU row (x10 per CUDA row)")
    args = ap.parse_args()
    write_csv([row for shape in SHAPES for row in time_shape(shape, args.reps)], args.out)


if __name__ == "__main__":
    main()
