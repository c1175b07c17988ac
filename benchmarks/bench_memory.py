"""Peak resident memory of streamed pruning + evaluation against model depth and width (CPU), on models written here.

Each model is a Llama (LlamaConfig, the real architecture: RMSNorm, rotary attention, SwiGLU MLP) with
random weights (values irrelevant: N(0, 0.02), norms 1), stored in float32 as several safetensors shards
with a model.safetensors.index.json, a config.json and a word-level tokenizer built from *Emma*. It is
written shard by shard, so the writer never holds the model, then pruned with method "magnitude" (cheap:
memory, not the optimizer, is measured) on 4 calibration windows of 128 tokens from *Emma* (split as the CLI
splits one text file, with 256 evaluation tokens; tokenised once, by the parent), then deleted (one model
on disk at a time).
Two sweeps: depth (2…32 layers at hidden 1024 / intermediate 2816 / 16 heads) and width (hidden 512,
1024, 2048 at 8 layers, intermediate ≈ 2.75 × hidden); vocabulary 4096, so the tensors outside the
blocks are small.

What is measured: what the CLI's `prune` does, in a fresh child process per model (this script with
`--child`): `prune_model(ModelSource(dir), tokenizer, calibration, "magnitude", out)`, then the evaluation
of the written checkpoint on the 256 evaluation tokens (2 windows of 128), streamed block by block from its
shards (`streamed_perplexity(CheckpointSource(out), …)`). Peak RSS is the child's VmHWM from
/proc/self/status, read right after the pruning (prune_peak_rss_bytes) and as the child's last act
(peak_rss_bytes: pruning and evaluation): the high-water mark of the address space it got at exec, so of
that process alone. (Not `ru_maxrss` from wait4/getrusage: Linux carries the
pre-exec high-water mark over exec, and with vfork that is the parent's own, so a big parent shows up in
every child's number.) The baseline is the same child importing the same modules (torch, transformers,
armor_kernels.pipeline) and doing nothing, measured once per allocator; "above baseline" subtracts it.

Every model is measured twice, under glibc's default malloc and with MALLOC_MMAP_THRESHOLD_=131072 (a
fixed mmap threshold, glibc's own starting value). By default glibc raises that threshold after the first
large frees, so later block-sized buffers come from the heap, which keeps what is freed: RSS then creeps
up by roughly half a block per block with no live tensor behind it (the tensors alive between blocks stay
the same; malloc_trim(0) after a block gives the memory back). With the fixed threshold the peak is flat.

Columns (bytes unless named otherwise): one_block_bytes = one decoder block's linears in float32 (the dtype
the blocks run in, --dtype's default), non_block_bytes = everything load_rest reads (embeddings, norms,
head), calib_activation_bytes = the float32 hidden states of all calibration windows (the figure prune.py
logs, in MB, is calib_activation_logged_mb), peak_rss_bytes = the child's VmHWM at its end (prune + eval),
prune_seconds = the child's ModelSource + tokenizer + prune_model, block_loop_seconds = prune_model's own
timer; then, after the columns of earlier runs, prune_peak_rss_bytes = VmHWM after the pruning alone,
eval_seconds = the streamed evaluation, perplexity = its result.

    python benchmarks/bench_memory.py                        # both sweeps -> results/memory_cpu.{csv,png}
    python benchmarks/bench_memory.py --depths 2 4 --widths  # a quick depth-only run
    python benchmarks/bench_memory.py --allocators "glibc default"
"""
from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from harness import bench_args, plot_lines, write_csv

MiB = 2**20
VOCAB = 4096
N_SAMPLES, SEQ_LEN, EVAL_TOKENS = 4, 128, 256
SHARD_BYTES = 200 * MiB  # target shard size (smaller models: at least 2 shards)
DEPTH_SWEEP = dict(hidden=1024, intermediate=2816, heads=16)
WIDTHS = {512: 1408, 1024: 2816, 2048: 5632}  # hidden -> intermediate (Llama's ≈ 2.75 ratio, multiple of 64)
# The child's malloc settings. glibc's default raises its mmap threshold after large frees (up to 32 MiB), so
# later block-sized buffers come from the heap, which keeps freed memory: RSS then creeps up block by block
# with no live tensor behind it. A fixed threshold (128 KiB: glibc's own starting value) turns that off.
ALLOCATORS = {"glibc default": {}, "mmap 128 KiB": {"MALLOC_MMAP_THRESHOLD_": "131072"}}


# ---------------------------------------------------------------- the models


def llama_config(depth: int, hidden: int, intermediate: int, heads: int):
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=VOCAB, hidden_size=hidden, intermediate_size=intermediate,
                       num_hidden_layers=depth, num_attention_heads=heads, num_key_value_heads=heads,
                       max_position_embeddings=2048, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2,
                       pad_token_id=0)


def emma_tokenizer(text: str):
    """A word-level tokenizer of *Emma*'s 4093 most frequent words (and punctuation), offline."""
    from tokenizers import Tokenizer
    from tokenizers.models import WordLevel
    from tokenizers.pre_tokenizers import Whitespace
    from transformers import PreTrainedTokenizerFast

    pre = Whitespace()
    words = Counter(w for w, _ in pre.pre_tokenize_str(text))
    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2}
    for w, _ in words.most_common(VOCAB - len(vocab)):
        vocab[w] = len(vocab)
    backend = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")


def write_model(path: Path, config, tokenizer) -> dict:
    """Random float32 weights in `config`'s architecture as safetensors shards + index, config.json and the
    tokenizer; one shard in memory at a time. Returns the sizes (params, bytes, per block, outside blocks)."""
    import torch
    from accelerate import init_empty_weights
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    with init_empty_weights():
        skeleton = AutoModelForCausalLM.from_config(config)
    shapes = {k: tuple(v.shape) for k, v in skeleton.state_dict().items()}
    nbytes = {k: 4 * int(torch.Size(s).numel()) for k, s in shapes.items()}
    total = sum(nbytes.values())
    target = min(SHARD_BYTES, total // 2 + 1)
    shards, cur, size = [], [], 0
    for k in shapes:
        if cur and size + nbytes[k] > target:
            shards.append(cur)
            cur, size = [], 0
        cur.append(k)
        size += nbytes[k]
    shards.append(cur)
    path.mkdir(parents=True)
    gen = torch.Generator().manual_seed(0)
    weight_map = {}
    for n, keys in enumerate(shards, 1):
        name = f"model-{n:05d}-of-{len(shards):05d}.safetensors"
        tensors = {}
        for k in keys:
            t = torch.empty(shapes[k], dtype=torch.float32)
            tensors[k] = t.fill_(1.0) if k.endswith("norm.weight") else t.normal_(0.0, 0.02, generator=gen)
            weight_map[k] = name
        save_file(tensors, path / name, metadata={"format": "pt"})
        del tensors
    (path / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(path)
    tokenizer.save_pretrained(path)
    block0 = "model.layers.0."
    block_linear = sum(b for k, b in nbytes.items() if k.startswith(block0) and k.endswith("proj.weight"))
    in_blocks = sum(b for k, b in nbytes.items() if k.startswith("model.layers.") and k.endswith("proj.weight"))
    return {"params": total // 4, "model_file_bytes": sum(f.stat().st_size for f in path.glob("*.safetensors")),
            "shards": len(shards), "one_block_bytes": block_linear, "non_block_bytes": total - in_blocks}


# ---------------------------------------------------------------- the child: one measurement


def child(argv: list[str]) -> None:
    """`--child MODEL CALIB OUT RESULT` prunes MODEL into OUT on the calibration tokens in CALIB (a safetensors
    file), then evaluates OUT on CALIB's evaluation tokens, streamed; `--child - - - RESULT` imports the same
    modules and exits (the baseline).
    Writes {seconds, vmhwm_bytes, prune_vmhwm_bytes, eval_seconds, perplexity, activation MB as logged} to
    RESULT."""
    model, calib_file, out, result = argv
    import torch  # noqa: F401  (what every run imports, the baseline included)
    import transformers  # noqa: F401
    from safetensors.torch import load_file

    from armor_kernels.pipeline.evaluate import streamed_perplexity
    from armor_kernels.pipeline.prune import prune_model
    from armor_kernels.pipeline.source import CheckpointSource, ModelSource

    res = {}
    if model != "-":
        logged = []

        class Grab(logging.Handler):
            def emit(self, record):
                logged.append(record.getMessage())

        log = logging.getLogger("armor_kernels")
        log.setLevel(logging.INFO)
        log.addHandler(Grab())
        t0 = time.perf_counter()
        src = ModelSource(model)
        tok = src.tokenizer()
        tokens = load_file(calib_file)
        report = prune_model(src, tok, tokens["calibration"], "magnitude", out)
        res["seconds"] = time.perf_counter() - t0
        res["block_loop_seconds"] = report["seconds"]
        res["prune_vmhwm_bytes"] = _vmhwm()
        t0 = time.perf_counter()
        res["perplexity"] = streamed_perplexity(CheckpointSource(out), tokens["evaluation"], seq_len=SEQ_LEN)
        res["eval_seconds"] = time.perf_counter() - t0
        act = [m for m in logged if m.startswith("calibration activations")]
        res["activation_log"] = act[0] if act else ""
        mb = re.search(r"([\d.]+) MB held", act[0]) if act else None
        res["activation_logged_mb"] = float(mb.group(1)) if mb else None
    res["vmhwm_bytes"] = _vmhwm()
    Path(result).write_text(json.dumps(res))


def _vmhwm() -> int:
    status = Path("/proc/self/status").read_text()
    return int(re.search(r"VmHWM:\s+(\d+) kB", status).group(1)) * 1024


def measure(args: list[str], work: Path, allocator: str) -> dict:
    """Run this script's child in a fresh process under `allocator` (a key of ALLOCATORS): its result, whose
    vmhwm_bytes is the peak RSS of that process alone (see the module docstring)."""
    result = work / "child.json"
    result.unlink(missing_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
    env.update({"HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", **ALLOCATORS[allocator]})
    t0 = time.perf_counter()
    with open(work / "child.log", "w") as logf:
        done = subprocess.run([sys.executable, __file__, "--child", *args, str(result)], stdout=logf,
                              stderr=subprocess.STDOUT, env=env)
    wall = time.perf_counter() - t0
    if done.returncode != 0:
        raise RuntimeError(f"child {args} failed ({done.returncode}):\n{(work / 'child.log').read_text()[-3000:]}")
    return {**json.loads(result.read_text()), "child_wall_seconds": wall}


# ---------------------------------------------------------------- the sweep


def result_columns(m: dict, sizes: dict, hidden: int, base: int) -> dict:
    return {"calib_activation_bytes": N_SAMPLES * SEQ_LEN * hidden * 4,  # float32 hidden states of every window
            "calib_activation_logged_mb": m["activation_logged_mb"],
            "peak_rss_bytes": m["vmhwm_bytes"], "baseline_rss_bytes": base,
            "peak_rss_above_baseline_bytes": m["vmhwm_bytes"] - base,
            "peak_rss_over_model_bytes": round(m["vmhwm_bytes"] / sizes["model_file_bytes"], 4),
            "prune_seconds": round(m["seconds"], 2), "block_loop_seconds": round(m["block_loop_seconds"], 2)}


def eval_columns(m: dict) -> dict:
    """Appended after write_seconds, so that the columns of earlier CSVs keep their place."""
    return {"prune_peak_rss_bytes": m["prune_vmhwm_bytes"], "eval_seconds": round(m["eval_seconds"], 2),
            "perplexity": round(m["perplexity"], 4)}



def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        return child(sys.argv[2:])
    p = bench_args(__doc__.splitlines()[0], "memory_cpu")
    p.add_argument("--depths", type=int, nargs="*", default=[2, 4, 8, 16, 32],
                   help="depth sweep at hidden 1024 / intermediate 2816 (default 2 4 8 16 32)")
    p.add_argument("--widths", type=int, nargs="*", default=[512, 1024, 2048],
                   help=f"width sweep (hidden; one of {sorted(WIDTHS)}) at --width-depth layers")
    p.add_argument("--width-depth", type=int, default=8)
    p.add_argument("--allocators", nargs="+", choices=list(ALLOCATORS), default=list(ALLOCATORS))
    p.add_argument("--work", type=Path, default=None, help="scratch directory (default: a new one in /tmp)")
    args = p.parse_args()

    t_start = time.perf_counter()
    work = Path(tempfile.mkdtemp(prefix="bench_memory.", dir=args.work))
    try:
        from safetensors.torch import save_file

        from armor_kernels.pipeline.data import austen_novels, token_splits

        emma = austen_novels()["Emma"]
        text = work / "emma.txt"
        text.write_text(emma, encoding="utf-8")
        tokenizer = emma_tokenizer(emma)
        # the CLI's split of one text file (evaluation: its last tokens; calibration: windows before them),
        # made once here so that the children measure the pruning and evaluation, not the tokenisation
        splits = token_splits(tokenizer, text, n_samples=N_SAMPLES, seq_len=SEQ_LEN, eval_tokens=EVAL_TOKENS)
        calib_file = work / "calibration.safetensors"
        save_file({"calibration": splits.calibration.contiguous(), "evaluation": splits.evaluation.contiguous()},
                  calib_file)

        base = {}
        for a in args.allocators:
            base[a] = measure(["-", "-", "-"], work, a)["vmhwm_bytes"]
            print(f"baseline (imports only), {a}: peak RSS {base[a] / MiB:.0f} MiB")
        cases = [("depth", d, DEPTH_SWEEP["hidden"], DEPTH_SWEEP["intermediate"], DEPTH_SWEEP["heads"])
                 for d in args.depths]
        cases += [("width", args.width_depth, h, WIDTHS[h], h // 64) for h in args.widths]
        done, rows = {}, []
        for sweep, depth, hidden, inter, heads in cases:
            key = (depth, hidden, inter, heads)
            if key not in done:
                model, out = work / "model", work / "pruned"
                t0 = time.perf_counter()
                sizes = write_model(model, llama_config(depth, hidden, inter, heads), tokenizer)
                written = time.perf_counter() - t0
                done[key] = []
                for a in args.allocators:
                    m = measure([str(model), str(calib_file), str(out)], work, a)
                    shutil.rmtree(out)
                    r = {"allocator": a, "depth": depth, "hidden": hidden, "intermediate": inter, "heads": heads,
                         **sizes, **result_columns(m, sizes, hidden, base[a]), "write_seconds": round(written, 2),
                         **eval_columns(m)}
                    done[key].append(r)
                    print(f"depth {depth:3d} hidden {hidden:5d} {a:14s}: model {r['model_file_bytes'] / MiB:6.0f} "
                          f"MiB, peak RSS {r['peak_rss_bytes'] / MiB:6.0f} MiB "
                          f"({r['peak_rss_above_baseline_bytes'] / MiB:5.0f} above baseline; pruning alone "
                          f"{r['prune_peak_rss_bytes'] / MiB:.0f}), {r['prune_seconds']:.1f} s + eval "
                          f"{r['eval_seconds']:.1f} s", flush=True)
                shutil.rmtree(model)
            rows += [{"sweep": sweep, **r} for r in done[key]]
    finally:
        shutil.rmtree(work, ignore_errors=True)

    write_csv(rows, args.out)
    print("\n| sweep | allocator | depth | hidden | model MiB | one block MiB | non-block MiB | peak RSS MiB, prune "
          "+ eval | peak RSS MiB, prune | above baseline MiB | prune s | eval s |\n" + "|---" * 12 + "|")
    for r in rows:
        print(f"| {r['sweep']} | {r['allocator']} | {r['depth']} | {r['hidden']} | {r['model_file_bytes'] / MiB:.0f} | "
              f"{r['one_block_bytes'] / MiB:.0f} | {r['non_block_bytes'] / MiB:.0f} | "
              f"{r['peak_rss_bytes'] / MiB:.0f} | {r['prune_peak_rss_bytes'] / MiB:.0f} | "
              f"{r['peak_rss_above_baseline_bytes'] / MiB:.0f} | {r['prune_seconds']:.1f} | {r['eval_seconds']:.1f} |")
    print(f"benchmark wall time {time.perf_counter() - t_start:.0f} s")
    gib = lambda b: b / 2**30  # noqa: E731
    panels = {}
    for sweep, title, x in (("depth", f"depth sweep (hidden {DEPTH_SWEEP['hidden']}), x = layers", "depth"),
                            ("width", f"width sweep ({args.width_depth} layers), x = model GiB", "model")):
        sel = [r for r in rows if r["sweep"] == sweep]
        if not sel:
            continue
        xof = (lambda r: r["depth"]) if x == "depth" else (lambda r: gib(r["model_file_bytes"]))
        lines = {f"peak RSS, prune + eval, {a}": [(xof(r), gib(r["peak_rss_bytes"])) for r in sel
                                                  if r["allocator"] == a] for a in args.allocators}
        lines.update({f"peak RSS, prune alone, {a}": [(xof(r), gib(r["prune_peak_rss_bytes"])) for r in sel
                                                      if r["allocator"] == a] for a in args.allocators})
        lines["baseline: imports only"] = [(xof(r), gib(r["baseline_rss_bytes"])) for r in sel
                                           if r["allocator"] == args.allocators[0]]
        lines["model size (float32 files)"] = [(xof(r), gib(r["model_file_bytes"])) for r in sel
                                               if r["allocator"] == args.allocators[0]]
        panels[title] = lines
    plot_lines(panels, args.out.with_suffix(".png"), xlabel="layers | model GiB", ylabel="GiB")


if __name__ == "__main__":
    main()
