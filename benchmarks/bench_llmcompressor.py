"""llm-compressor's own SparseGPT and Wanda beside this package's, and ARMOR run through ArmorModifier.

    .venv-llmc/bin/python benchmarks/bench_llmcompressor.py [--rows NAME ...] [--runs-dir runs/llmcompressor]

Runs in the llm-compressor environment (scripts/setup_llmcompressor.sh: llmcompressor 0.14.0.1, transformers
5.17). Every llm-compressor row is `oneshot(model=<the bundled SmolLM2-135M as a float32 safetensors
directory>, dataset=<the package's calibration windows>, recipe=...)` with exactly the tokens `prune`
calibrates on (pipeline.data.token_splits: 32 windows x 512 tokens of the five other Austen novels,
seed 0), in their order (shuffle_calibration_samples=False) and in batches of 8 like `prune`:
  llmc-sparsegpt  SparseGPTModifier(sparsity=0.5, mask_structure="2:4", ignore=["re:.*lm_head"]): its
                  defaults (block_size 128, dampening_frac 0.01, targets Linear); lm_head ignored as in its
                  own example recipe, so that the decoder blocks' linears are pruned, as by `prune`
  llmc-wanda      WandaPruningModifier(sparsity=0.5, mask_structure="2:4", ignore=["re:.*lm_head"])
  llmc-armor      ArmorModifier() (the library's defaults, b = 128), saved with save_armor and evaluated
                  from the directory `from_pretrained` loads
  llmc-quality    ArmorModifier(config="quality"): the recommended configuration (model-wide budget,
                  block-wise reconstruction) through the package's pipeline at oneshot's initialisation;
                  saved and evaluated as llmc-armor
  dense           the unpruned model, evaluated here: the control for this environment's transformers
Each model is evaluated with the package's evaluator (pipeline.evaluate.perplexity) on both texts of
bench_frontier.py (the first 20 000 tokens of Pride and Prejudice; the Python Language Reference). The
package's own rows (sparsegpt, wanda, armor-b128, quality, dense) are read from bench_frontier.py's CSV, whose
runs used the same calibration tokens (`prune`, sequential protocol, float32). A row's result is kept in the
runs directory and reused; the rows not named by --rows are kept from the CSV this script wrote before (their
`environment` column says what measured them), and every comparison column is computed again.
"""
from __future__ import annotations

import csv
import json
import shutil
import time
from pathlib import Path

import torch
from harness import RESULTS, bench_args, write_csv
from torch import nn

from armor_kernels.atomic import save_json, write_text
from armor_kernels.integrations.hf import load_pruned_model
from armor_kernels.nn import ArmorLinear
from armor_kernels.pipeline.data import EVAL_TOKENS, SEQ_LEN, python_reference, token_splits
from armor_kernels.pipeline.evaluate import perplexity
from armor_kernels.pipeline.model import block_linears, decoder_layers
from armor_kernels.pipeline.sizes import checkpoint_sizes, dense_bf16_linear_bytes
from armor_kernels.pipeline.source import model_source
from armor_kernels.sparse24 import violations_24

ROWS = ("dense", "llmc-sparsegpt", "llmc-wanda", "llmc-armor", "llmc-quality")
ARMOR_ROWS = {"llmc-armor": {}, "llmc-quality": {"config": "quality"}}  # ArmorModifier's arguments
PACKAGE_ROWS = {"sparsegpt": "sparsegpt", "wanda": "wanda", "armor-b128": "armor", "quality": "quality",
                "dense": "dense"}  # frontier run -> the llm-compressor row it is compared with (llmc-<name>)
NUMBERS = ("ppl_pride_and_prejudice", "ppl_python_reference", "prune_s", "linear_bytes_ratio", "linears_24",
           "mean_loss")
FRONTIER_CSV = RESULTS / "frontier_smollm2_cpu.csv"
PEER_KW = dict(sparsity=0.5, mask_structure="2:4", ignore=["re:.*lm_head"])
ONESHOT_KW = dict(batch_size=8, shuffle_calibration_samples=False)
PACKAGE = "armor-kernels `prune` (frontier CSV)"


def recipe(name: str):
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier

    from armor_kernels.integrations.llmcompressor import ArmorModifier
    if name in ARMOR_ROWS:
        return ArmorModifier(**ARMOR_ROWS[name])
    return {"llmc-sparsegpt": SparseGPTModifier, "llmc-wanda": WandaPruningModifier}[name](**PEER_KW)


def number(text: str) -> int | float:
    return int(text) if text.lstrip("-").isdigit() else float(text)


def check_24(model) -> int:
    """How many decoder-block linears the model holds, after checking each is exactly 2:4 along d_in: the
    weight of an nn.Linear (a peer's), the S of an ArmorLinear (W = A'·S·B' is dense)."""
    n = 0
    for i, block in enumerate(decoder_layers(model)):
        for name, lin in block.named_modules():
            if isinstance(lin, ArmorLinear) or (type(lin) is nn.Linear and name in block_linears(block)):
                bad = violations_24(lin.sparse_core() if isinstance(lin, ArmorLinear) else lin.weight.detach())
                if bad:
                    raise AssertionError(f"block {i} {name}: {bad} groups of 4 hold more than two non-zeros")
                n += 1
    return n


def run_row(name: str, model_dir: Path, calib: torch.Tensor, texts: dict, runs_dir: Path) -> dict:
    cache = runs_dir / f"{name}.json"
    if cache.exists():
        return json.loads(cache.read_text())
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    row, t0 = {"row": name}, time.perf_counter()
    if name == "dense":
        model, prune_s = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval(), 0.0
    else:
        modifier = recipe(name)
        dataset = Dataset.from_dict({"input_ids": calib.tolist()})
        model = oneshot(model=str(model_dir), dataset=dataset, recipe=modifier,
                        num_calibration_samples=len(calib), **ONESHOT_KW)
        prune_s = time.perf_counter() - t0
        if name in ARMOR_ROWS:
            from armor_kernels.integrations.llmcompressor import save_armor
            out = runs_dir / name
            shutil.rmtree(out, ignore_errors=True)
            save_armor(model, modifier, out)
            sizes = checkpoint_sizes(out, model)
            row["linear_bytes_ratio"] = round(sizes["linear_bytes"] / dense_bf16_linear_bytes(model), 4)
            model = load_pruned_model(out)[0]  # evaluated as loaded, not as left in memory
            row["mean_loss"] = round(sum(r["loss"] for r in modifier._reports.values()) / len(modifier._reports), 6)
        row["linears_24"] = check_24(model)
    model.eval()
    row["prune_s"] = round(prune_s, 1)
    with torch.no_grad():
        for text, tokens in texts.items():
            row[f"ppl_{text}"] = round(perplexity(model, tokens, seq_len=SEQ_LEN), 4)
    save_json(cache, row)
    return row


def main(argv=None) -> int:
    p = bench_args(__doc__.split("\n")[0], "llmcompressor_smollm2_cpu")
    p.add_argument("--rows", nargs="+", choices=ROWS, default=list(ROWS))
    p.add_argument("--runs-dir", type=Path, default=Path("runs/llmcompressor"))
    p.add_argument("--md-out", type=Path, default=RESULTS / "llmcompressor_smollm2_cpu.md")
    p.add_argument("--timing", default="", help="what else ran on the cores meanwhile (the measured rows' `timing` "
                   "column: prune_s is a wall time, a speed measurement only on an otherwise idle machine)")
    args = p.parse_args(argv)
    args.runs_dir.mkdir(parents=True, exist_ok=True)
    src = model_source(None)
    tok = src.tokenizer()
    splits = token_splits(tok)  # the CLI's defaults: 32 x 512 calibration tokens, seed 0; Pride and Prejudice
    texts = {"pride_and_prejudice": splits.evaluation,
             "python_reference": token_splits(tok, {"python_reference": python_reference()}, n_samples=1,
                                              seq_len=SEQ_LEN, eval_tokens=EVAL_TOKENS).evaluation}
    import llmcompressor
    import transformers
    env = (f"llmcompressor {llmcompressor.__version__}, transformers {transformers.__version__}, "
           f"torch {torch.__version__}")
    with open(FRONTIER_CSV) as f:
        frontier = {r["run"]: r for r in csv.DictReader(f)}
    measured = {}
    for name in args.rows:
        row = run_row(name, src.path, splits.calibration, texts, args.runs_dir)
        measured[name] = {"implementation": "llm-compressor" if name.startswith("llmc-") else "this environment",
                          **row, "environment": env, "timing": args.timing}
        print(measured[name], flush=True)
    kept = {}
    if args.out.exists():  # the rows not measured this time, as the last run measured them
        with open(args.out) as f:
            kept = {r["row"]: {k: number(v) if k in NUMBERS else v for k, v in r.items() if v != ""}
                    for r in csv.DictReader(f) if r["row"] in ROWS and r["implementation"] != PACKAGE}
    rows = [measured.get(name) or kept[name] for name in ROWS if name in measured or name in kept]
    for r in rows:  # llm-compressor saves 2:4 dense; packed by `convert` they take the bytes of `prune`'s 2:4 rows
        if r["row"] in ("llmc-sparsegpt", "llmc-wanda"):
            r["linear_bytes_ratio"] = float(frontier["sparsegpt"]["linear_bytes_ratio"])
    for run in PACKAGE_ROWS:
        r = frontier[run]
        rows.append({"implementation": PACKAGE, "row": run, "environment": "bench_frontier.py (its CSV)",
                     **{k: float(r[k]) for k in ("linear_bytes_ratio", "prune_s", "ppl_pride_and_prejudice",
                                                 "ppl_python_reference")}})
    own = {PACKAGE_ROWS[r["row"]]: r for r in rows if r["implementation"] == PACKAGE}
    for r in rows:
        peer = own.get(r["row"].removeprefix("llmc-"))
        if peer is not None and peer is not r:
            for text in ("pride_and_prejudice", "python_reference"):
                r[f"vs_package_{text}"] = round(r[f"ppl_{text}"] / peer[f"ppl_{text}"] - 1, 4)
    write_csv(rows, args.out)
    cols = ["row", "implementation", "linear_bytes_ratio", "ppl_pride_and_prejudice", "ppl_python_reference",
            "vs_package_pride_and_prejudice", "vs_package_python_reference", "prune_s"]
    md = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    md += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    write_text(args.md_out, "\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
