"""Command line: demo (the README's first command), prune, eval, compare, and the checkpoint tools.

    python -m armor_kernels demo                       # the bundled model: quality, size and speed vs dense
    python -m armor_kernels prune --method armor --out runs/armor
    python -m armor_kernels eval --checkpoint runs/armor
    python -m armor_kernels compare --out runs/compare  # every method: CSV + Markdown table
    python -m armor_kernels export-dense runs/armor runs/armor-dense   # plain HF checkpoint
    python -m armor_kernels convert DENSE_DIR NEW_DIR   # a dense checkpoint with 2:4 zeros -> packed
    python -m armor_kernels inspect runs/armor          # per layer: shape, blocks, bytes, path on sm_90
    python -m armor_kernels lm-eval-task runs/task      # eval's windows as an offline lm-eval task
    python -m armor_kernels lm-eval --model hf --model_args pretrained=runs/armor ...   # lm-eval's CLI
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import sys
import time
from pathlib import Path

import torch

from .atomic import save_csv, save_json, write_text
from .errors import InputError
from .optim import ArmorOptions
from .optim.options import OBJECTIVES, OPTIMIZERS, STARTS
from .pipeline.budget import BudgetOptions
from .pipeline.config import METHODS, PRESETS, PROTOCOLS, PruneConfig, prune_config
from .pipeline.data import EVAL_TOKENS, N_SAMPLES, SEQ_LEN, token_splits
from .pipeline.distributed import Dist, PeerStopped
from .pipeline.evaluate import streamed_perplexity
from .pipeline.lock import RunLocked
from .pipeline.prune import prune_model
from .pipeline.reconstruct import TARGETS, ReconOptions
from .pipeline.sizes import checkpoint_sizes, dense_bf16_linear_bytes
from .pipeline.source import CheckpointSource, ModelSource, checkpoint_source, model_source

COLUMNS = ["method", "perplexity", "calibration_s", "eval_s", "linear_bytes", "dense_bf16_linear_bytes",
           "linear_bytes_ratio", "checkpoint_bytes", "mean_loss", "mean_start_loss"]


CHOICES = {"optimizer": OPTIMIZERS, "objective": OBJECTIVES, "start": STARTS}  # the str-valued ArmorOptions
def _data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="a Hugging Face Hub id (org/name), a local HF directory (safetensors) or a .gguf file; "
                        "default: the bundled SmolLM2-135M")
    p.add_argument("--text", default=None, help=".txt file or directory of .txt; default: Jane Austen's novels")
    p.add_argument("--n-samples", type=int, default=N_SAMPLES, help=f"calibration windows (default {N_SAMPLES})")
    p.add_argument("--seq-len", type=int, default=SEQ_LEN, help=f"tokens per window (default {SEQ_LEN})")
    p.add_argument("--eval-tokens", type=int, default=EVAL_TOKENS,
                   help=f"evaluation tokens (default {EVAL_TOKENS}; with --eval-text, 0: the whole file)")
    p.add_argument("--eval-text", default=None,
                   help="one .txt file to evaluate on (e.g. WikiText-2's test split); calibration then comes from "
                        "every document of --text. Default: a document of --text (Pride and Prejudice)")
    p.add_argument("--eval-seq-len", type=int, default=None,
                   help="tokens per evaluation window (default: --seq-len; the WikiText-2 protocol uses 2048 or 4096)")
    p.add_argument("--seed", type=int, default=0, help="calibration sampling and ARMOR's seed (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N; default auto: cuda when present, else cpu")


def _pipeline_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--protocol", choices=PROTOCOLS, default="sequential",
                   help="sequential: each block calibrated on the pruned blocks before it; dense: on the dense "
                        "model's outputs (the paper's). Default sequential")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="dtype the blocks run in while pruning (bf16 for big models; the optimizer keeps its own "
                        "precision). Default float32")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep the calibration activations in host memory, one batch on the device at a time")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the final perplexity (streamed block by block from the written checkpoint)")
    p.add_argument("--asymmetric", type=float, default=None, metavar="DAMP",
                   help="asymmetric calibration: fit each linear, on the pruned model's inputs, to the dense model's "
                        "output on its own inputs, shrunk toward W by DAMP x mean diag H (protocol sequential; "
                        "stats.asymmetric_weight). Default off")
    p.add_argument("--budget", type=float, default=None, metavar="F",
                   help="ARMOR: one model-wide budget, A and B at most F of the linears' parameters in total, block "
                        "sizes allocated per layer from each layer's measured loss (pipeline/budget.py); replaces "
                        "--overhead's per-layer rule")
    p.add_argument("--budget-probe-iters", type=int, default=BudgetOptions.probe_iters,
                   help=f"iterations of each budget probe (default {BudgetOptions.probe_iters})")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="a named configuration of ARMOR (pipeline/config.py's PRESETS; prune: --method armor "
                        "implied): its values become the defaults, flags given besides it win")
    _recon_args(p)


def _recon_args(p: argparse.ArgumentParser) -> None:
    """One --recon-* flag per ReconOptions field (but seed, shared with the data), its default the library's."""
    g = p.add_argument_group("block-wise reconstruction (ReconOptions; off unless --recon-steps > 0)")
    for f in dataclasses.fields(ReconOptions):
        if f.name == "seed":
            continue
        flag = "--recon-" + f.name
        if f.name == "target":
            g.add_argument(flag, choices=TARGETS, default=f.default, help=f"default {f.default}")
        else:
            g.add_argument(flag, type=type(f.default), default=f.default, help=f"default {f.default}")


def _budget_options(args) -> BudgetOptions | None:
    return None if args.budget is None else BudgetOptions(args.budget, args.budget_probe_iters)


def _prune_config(args, method: str) -> PruneConfig:
    """The PruneConfig of the flags (a preset's values are their defaults: _preset_defaults)."""
    if args.preset is not None and method != PRESETS[args.preset].method:
        raise InputError(f"--preset {args.preset}: is a configuration of method {PRESETS[args.preset].method}, "
                         f"got --method {method}")
    recon = _recon_options(args)
    return PruneConfig(method, options=_armor_options(args) if method == "armor" else None, protocol=args.protocol,
                       recon=recon if recon.enabled else None, asymmetric=args.asymmetric,
                       budget=_budget_options(args))


def _preset_defaults(config: PruneConfig) -> dict:
    """The flags' values (argparse dests) that give `config`: _prune_config's inverse, seeds aside (--seed)."""
    recon = config.recon or ReconOptions()
    return {"method": config.method, "protocol": config.protocol, "asymmetric": config.asymmetric,
            "budget": None if config.budget is None else config.budget.fraction,
            "budget_probe_iters": (config.budget or BudgetOptions(1.0)).probe_iters,
            **{f.name: getattr(config.options, f.name) for f in dataclasses.fields(ArmorOptions) if f.name != "seed"},
            **{"recon_" + f.name: getattr(recon, f.name) for f in dataclasses.fields(ReconOptions) if f.name != "seed"}}


def config_flags(config: PruneConfig) -> list[str]:
    """The `prune` flags that give `config` (seeds aside: --seed): --method and every value that differs from
    its flag's default; `_prune_config` of them is `config` again."""
    if config.batch_size != PruneConfig.batch_size:
        raise InputError(f"config_flags: batch_size {config.batch_size} has no flag (the CLI calibrates in batches "
                         f"of {PruneConfig.batch_size})")
    base = vars(parser().parse_args(["prune", "--out", "-", "--method", config.method]))
    flags = ["--method", config.method]
    for dest, value in _preset_defaults(config).items():
        if dest == "method" or value == base[dest]:
            continue
        name = "--" + dest.replace("_", "-")
        flags += [name if value else "--no-" + name[2:]] if isinstance(value, bool) else [name, str(value)]
    return flags


def _recon_options(args) -> ReconOptions:
    return ReconOptions(**{f.name: args.seed if f.name == "seed" else getattr(args, "recon_" + f.name)
                           for f in dataclasses.fields(ReconOptions)})


def _prune_args(p: argparse.ArgumentParser) -> None:
    """One flag per ArmorOptions field (but seed, shared with the data), its default the library's."""
    g = p.add_argument_group("ARMOR options (ArmorOptions; defaults are the library's)")
    for f in dataclasses.fields(ArmorOptions):
        if f.name == "seed":
            continue
        flag, default = "--" + f.name.replace("_", "-"), f.default
        if f.name in CHOICES:
            g.add_argument(flag, choices=CHOICES[f.name], default=default, help=f"default {default}")
        elif isinstance(default, bool):
            g.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=f"default {default}")
        else:
            kind = int if f.type in ("int", "int | None") else float
            g.add_argument(flag, type=kind, default=default,
                           help=f"default {default}" if default is not None else
                           "default: the optimizer's own" if f.name in ("iters", "tol") else "default: none")


def _armor_options(args) -> ArmorOptions:
    return ArmorOptions(**{f.name: getattr(args, f.name) for f in dataclasses.fields(ArmorOptions)})


def _mean(layers: dict, key: str):
    vals = [r[key] for r in layers.values() if key in r]
    return round(sum(vals) / len(vals), 6) if vals else ""


class Dense:
    """The source model (streamed: nothing read until asked), its tokenizer and the token splits, each
    made once and only when needed."""

    def __init__(self, args):
        self.args = args

    @functools.cached_property
    def source(self) -> ModelSource:
        return model_source(self.args.model)

    @functools.cached_property
    def tokenizer(self):
        return self.source.tokenizer()

    @functools.cached_property
    def splits(self):
        a = self.args
        return token_splits(self.tokenizer, a.text, n_samples=a.n_samples, seq_len=a.seq_len,
                            eval_tokens=a.eval_tokens, seed=a.seed, eval_text=a.eval_text)


def run_method(config: PruneConfig, args, out: Path, dense: Dense) -> dict:
    """Prune (or resume) one configuration into `out` and evaluate what was written, streamed block by block
    (the dense model: from its source), unless --no-eval. A finished result is read back; one without
    perplexity (--no-eval) is evaluated now if asked. The result's "method" is the run's name, out's."""
    method, done, evaluate = config.method, out / "result.json", not args.no_eval
    if done.exists():
        result = json.loads(done.read_text())
        if result["perplexity"] is not None or not evaluate:
            return result
        return _evaluate(result, method, args, out, dense)
    dist = Dist.from_env(args.device)  # under torchrun: every rank prunes, rank 0 evaluates and reports
    splits = dense.splits
    skeleton = dense.source.skeleton()
    dense_bytes = dense_bf16_linear_bytes(skeleton)
    if method == "dense":  # nothing to prune
        report = {"layers": {}, "seconds": 0.0}
    else:
        report = prune_model(dense.source, dense.tokenizer, splits.calibration, config, out,
                             device=args.device, source=args.model or "bundled SmolLM2-135M-Instruct",
                             dtype=getattr(torch, args.dtype), offload=args.offload_activations, dist=dist)
        if not dist.is_writer:
            return None
    sizes = checkpoint_sizes(out, skeleton) if method != "dense" else {}
    result = {
        "method": out.name, "perplexity": None, "calibration_s": round(report["seconds"], 1),
        "eval_s": None, "dense_bf16_linear_bytes": dense_bytes,
        "linear_bytes": sizes.get("linear_bytes", dense_bytes), "checkpoint_bytes": sizes.get("checkpoint_bytes", ""),
        "linear_bytes_ratio": round(sizes.get("linear_bytes", dense_bytes) / dense_bytes, 4),
        "mean_loss": _mean(report["layers"], "loss"),  # ARMOR: relative, in the run's objective
        "mean_start_loss": _mean(report["layers"], "start_loss"),
        "per_block_bytes": sizes.get("per_block", []),
    }
    if not evaluate:
        save_json(done, result)
        return result
    return _evaluate(result, method, args, out, dense)


def _evaluate(result: dict, method: str, args, out: Path, dense: Dense) -> dict:
    """`result` with the perplexity of what `out` holds (the dense model: its source), saved."""
    t0 = time.perf_counter()
    src = dense.source if method == "dense" else CheckpointSource(out)
    dtype = torch.float32 if method == "dense" else src.model_dtype
    ppl = streamed_perplexity(src, dense.splits.evaluation, seq_len=args.eval_seq_len or args.seq_len,
                              device=args.device, dtype=dtype)
    result = {**result, "perplexity": round(ppl, 4), "eval_s": round(time.perf_counter() - t0, 1)}
    save_json(out / "result.json", result)
    return result


def write_table(rows: list[dict], out: Path, seconds: float) -> str:
    save_csv(out / "results.csv", rows, COLUMNS)
    fmt = lambda v: f"{v:.4f}" if isinstance(v, float) else "" if v is None else str(v)  # noqa: E731
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in COLUMNS) + " |" for r in rows]
    md = "\n".join(lines) + f"\n\nTotal run time: {seconds:.0f} s (methods resumed from earlier runs count as 0).\n"
    write_text(out / "results.md", md)
    return md


def cmd_compare(args, methods) -> None:
    # every flag is checked against every method before anything is read
    configs = {m: PruneConfig("dense") if m == "dense" else _prune_config(args, m) for m in methods}
    out = Path(args.out)
    t0 = time.perf_counter()
    dense = Dense(args)
    rows = [run_method(configs[m], args, out / m, dense) for m in methods]
    if None not in rows:  # rank 0 of a torchrun, or the only process
        print(write_table(rows, out, time.perf_counter() - t0))


def cmd_demo(args) -> None:
    """What the package is for, on one model: the recommended configuration beside dense and SparseGPT, each
    pruned (or resumed) and evaluated, then loaded as a user loads it (bf16, `prepare`d on --device) for its
    memory and decode speed: runs/demo/demo.md and .csv."""
    from .pipeline.demo import DEMO_RUNS, demo_table

    out, dense = Path(args.out), Dense(args)
    t0 = time.perf_counter()
    configs = {name: prune_config(name) for name in DEMO_RUNS}
    configs = {n: c.with_seed(args.seed) if c.method == "armor" else c for n, c in configs.items()}
    rows = [run_method(config, args, out / name, dense) for name, config in configs.items()]
    if None not in rows:
        print(demo_table(rows, out, args.model, args.device, time.perf_counter() - t0))


def cmd_prune(args) -> None:
    if args.method is None:
        raise InputError("prune: --method is required (or --preset NAME)")
    config = _prune_config(args, args.method)  # a flag that does not fit the method fails before anything is read
    if run_method(config, args, Path(args.out), Dense(args)) is not None:
        print(json.dumps(json.loads((Path(args.out) / "result.json").read_text()), indent=2))


def cmd_eval(args) -> None:
    """Perplexity streamed block by block: a checkpoint from its verified shards, else the dense --model."""
    src, dtype = checkpoint_source(args.checkpoint) if args.checkpoint else (model_source(args.model), torch.float32)
    if isinstance(src, CheckpointSource):
        sizes = checkpoint_sizes(Path(args.checkpoint), src.skeleton())
    else:  # the dense --model, or a dense run's directory
        sizes = {"dense_bf16_linear_bytes": dense_bf16_linear_bytes(src.skeleton())}
    seq_len = args.eval_seq_len or args.seq_len
    splits = token_splits(src.tokenizer(), args.text, n_samples=1, seq_len=seq_len, eval_tokens=args.eval_tokens,
                          eval_text=args.eval_text)
    ppl = streamed_perplexity(src, splits.evaluation, seq_len=seq_len, device=args.device, dtype=dtype)
    print(json.dumps({"perplexity": round(ppl, 4), **sizes}, indent=2))


def cmd_export_dense(args) -> None:
    from .integrations.hf import export_dense
    export_dense(args.checkpoint, args.out, dtype=getattr(torch, args.dtype) if args.dtype else None)
    print(f"wrote {args.out}: a plain Hugging Face checkpoint (no plugin needed to load it)")


def cmd_convert(args) -> None:
    from .pipeline.convert import from_dense_24, report_lines
    print("\n".join(report_lines(from_dense_24(args.src, args.dst, strict=args.strict), Path(args.dst))))


def cmd_inspect(args) -> None:
    from .pipeline.summary import format_report, inspect_checkpoint
    report = inspect_checkpoint(args.checkpoint, getattr(torch, args.dtype))
    print(json.dumps(report, indent=2) if args.json else format_report(report))


class _Parser(argparse.ArgumentParser):
    def __init__(self, *args, **kwargs):  # no abbreviations: `--pre quality` must not pass for a flag it is not
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message):  # one line, as for every other mistake
        self.exit(2, f"armor-kernels: error: {message} (see `{self.prog} --help`)\n")


def parser(preset: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; with a preset's name, that preset's values are the pruning flags' defaults."""
    ap = _Parser(prog="armor-kernels", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--debug", action="store_true", help="show the Python traceback of an error (anywhere on the line)")
    sub = ap.add_subparsers(dest="cmd", required=True, parser_class=_Parser)
    pruning = []
    p = sub.add_parser("demo", help="the bundled model (or --model) pruned by the quality preset and by SparseGPT: "
                                    "bytes, perplexity, loaded memory and decode speed beside dense, in one table")
    p.add_argument("--out", default="runs/demo")
    _data_args(p)
    p.set_defaults(no_eval=False, dtype="float32", offload_activations=False)
    p = sub.add_parser("prune", help="prune a model with one method into a checkpoint directory")
    p.add_argument("--method", choices=METHODS, default=None, help="required unless --preset gives it")
    p.add_argument("--out", required=True)
    _data_args(p), _pipeline_args(p), _prune_args(p), pruning.append(p)
    p = sub.add_parser("eval", help="perplexity and size of a checkpoint (or of a dense model)")
    p.add_argument("--checkpoint", default=None, help="checkpoint directory; without it the dense --model")
    _data_args(p)
    p = sub.add_parser("compare", help="every method on one model: results.csv + results.md")
    p.add_argument("--out", default="runs/compare")
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(METHODS))
    _data_args(p), _pipeline_args(p), _prune_args(p), pruning.append(p)
    p = sub.add_parser("export-dense", help="write a pruned checkpoint as a plain dense Hugging Face checkpoint")
    p.add_argument("checkpoint")
    p.add_argument("out")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default=None,
                   help="weights' dtype (default: the pruning run's model dtype)")
    p = sub.add_parser("convert", help="pack a dense Hugging Face checkpoint whose linears are 2:4 with zeros stored "
                                       "(e.g. llm-compressor's SparseGPT/Wanda 2:4 output): every exactly-2:4 block "
                                       "linear is packed; the others are named and kept dense")
    p.add_argument("src")
    p.add_argument("dst")
    p.add_argument("--strict", action="store_true", help="refuse a linear that is not 2:4")
    p = sub.add_parser("inspect", help="per layer: kind, shape, blocks, stored bytes, the path on an sm_90 GPU")
    p.add_argument("checkpoint")
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.add_argument("--dtype", choices=["bfloat16", "float16", "float32"], default="bfloat16",
                   help="the dtype the model would be loaded in on the GPU (default bfloat16)")
    sub.add_parser("lm-eval", help="lm-eval's own CLI with the armor plugin registered: lm-eval ARGS...",
                   add_help=False)
    sub.add_parser("lm-eval-task", add_help=False,
                   help="write the offline lm-eval task of eval's windows: lm-eval-task DIR [--model M]")
    if preset is not None:
        defaults = _preset_defaults(PRESETS[preset])
        for p in pruning:
            p.set_defaults(**{k: v for k, v in defaults.items() if k != "method" or p.prog.endswith(" prune")})
    return ap


COMMANDS = {"demo": cmd_demo, "compare": lambda a: cmd_compare(a, a.methods),
            "prune": cmd_prune, "eval": cmd_eval, "export-dense": cmd_export_dense, "convert": cmd_convert,
            "inspect": cmd_inspect}
# What this package raises on a user's mistake (missing or corrupt files, bad options, too little text, a
# directory another run holds): one line, exit 2. Anything else keeps its traceback.
USER_ERRORS = (InputError, RunLocked)


def _say(line: str) -> None:
    """One line on stderr in one write: the ranks of a torchrun job share the stream, and print()'s separate
    write of the newline lets their lines run into each other."""
    sys.stderr.write(line + "\n")
    sys.stderr.flush()


def _early(argv: list[str]) -> argparse.Namespace:
    """--debug and --preset, wherever they are on the line (the full parse checks --preset's place and name)."""
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--debug", action="store_true")
    early.add_argument("--preset", default=None)
    return early.parse_known_args(argv)[0]


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] in (["lm-eval"], ["lm-eval-task"]):  # everything after it is lm-eval's / the task writer's
        from .integrations import lm_eval
        return (lm_eval.main if argv[0] == "lm-eval" else lm_eval.write_task_main)(argv[1:])
    early = _early(argv)
    try:
        args = parser(early.preset if early.preset in PRESETS else None).parse_args(argv)
        if getattr(args, "device", None) == "auto":
            args.device = "cuda" if torch.cuda.is_available() else "cpu"
        torch.manual_seed(getattr(args, "seed", 0))
        COMMANDS[args.cmd](args)
    except USER_ERRORS as e:
        if early.debug:
            raise
        _say(f"armor-kernels: error: {e}")
        return 2
    except PeerStopped as e:  # one line, and a non-zero exit torchrun reports
        _say(str(e))
        return 1
    except KeyboardInterrupt:
        _say("armor-kernels: interrupted; finished blocks are saved, the same command resumes")
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
