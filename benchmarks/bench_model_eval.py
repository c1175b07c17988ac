"""A pruned model against its dense model, end to end: the time of the bundled model's evaluation
(perplexity of the first 20 000 tokens of Pride and Prejudice in 512-token windows) on the CPU, the
pruned model as `from_pretrained` loads it (packed: the CPU kernels' path for 512-token windows) and
with `prepare(model, keep_dense=True)` (one matmul of the dense product per layer, what the pruning
pipeline's own evaluation runs): the perplexity difference between the two is the packed path's
rounding.

    python benchmarks/bench_model_eval.py --checkpoint runs/demo/quality [--reps 1] [--out results/model_eval_cpu.csv]

One row per model: its paths, seconds per evaluation (median of --reps), tokens/s, perplexity, and the ratio to
dense. The models run one after the other in the same process, on the same tokens.
"""
from __future__ import annotations

import time

import torch
from harness import bench_args, write_csv

from armor_kernels import paths, prepare
from armor_kernels.integrations.hf import load_pruned_model
from armor_kernels.pipeline.data import EVAL_TOKENS, SEQ_LEN, token_splits
from armor_kernels.pipeline.evaluate import perplexity
from armor_kernels.pipeline.model import load_model
from armor_kernels.pipeline.runtime import cpu_name


def main(argv=None) -> int:
    p = bench_args(__doc__.split("\n")[0], "model_eval_cpu")
    p.add_argument("--checkpoint", required=True, help="a pruned checkpoint directory (e.g. runs/demo/quality)")
    p.add_argument("--model", default=None, help="its dense source model (default: the bundled SmolLM2-135M)")
    p.add_argument("--reps", type=int, default=1)
    args = p.parse_args(argv)
    dense, tok = load_model(args.model)
    tokens = token_splits(tok, None, n_samples=1, seq_len=SEQ_LEN, eval_tokens=EVAL_TOKENS).evaluation
    pruned, _ = load_pruned_model(args.checkpoint)
    pruned_dense_copy, _ = load_pruned_model(args.checkpoint)
    prepare(pruned_dense_copy, keep_dense=True)
    rows = []
    for name, model in (("dense", dense), ("pruned", pruned), ("pruned_dense_copy", pruned_dense_copy)):
        times = []
        for _ in range(args.reps):
            t0 = time.perf_counter()
            ppl = perplexity(model, tokens, seq_len=SEQ_LEN)
            times.append(time.perf_counter() - t0)
        seconds = sorted(times)[len(times) // 2]
        rows.append({"model": name, "checkpoint": args.checkpoint if name != "dense" else "", "device": "cpu",
                     "cpu": cpu_name(), "torch": torch.__version__,
                     "paths": " ".join(sorted(set(paths(model).values()))) or "dense",
                     "threads": torch.get_num_threads(), "dtype": str(next(model.parameters()).dtype),
                     "tokens": len(tokens), "eval_s": round(seconds, 2),
                     "tokens_per_s": round(len(tokens) / seconds, 1), "perplexity": round(ppl, 4)})
    for r in rows:
        r["time_vs_dense"] = round(r["eval_s"] / rows[0]["eval_s"], 3)
        print(r)
    write_csv(rows, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
