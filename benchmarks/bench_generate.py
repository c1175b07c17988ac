"""Whole models on the CPU, dense against pruned: memory after load, decode tokens/s, prefill time.

    python benchmarks/bench_generate.py --checkpoint runs/demo/quality [--models smollm2,llama1b]

Models (each variant measured in a fresh process, so that its resident memory is its own):
- smollm2: the bundled SmolLM2-135M-Instruct, dense (bf16 and float32, as load_model gives it) against the
  --checkpoint given (the demo's `runs/demo/quality`, or any pruned SmolLM2 directory), loaded by
  `from_pretrained` in bf16: packed, every pruned linear on the path `prepare` picks (the packed CPU kernels).
- llama1b: a Llama-shaped model of Llama-3.2-1B's configuration (hidden 2048, 16 layers, intermediate 8192,
  32 heads / 8 KV heads, its 128 256-token vocabulary, tied head), random weights; pruned: every decoder
  linear an ArmorLinear with random factors (b = 128) and a random 2:4 core, built without any dense linear
  (its peak memory is the packed model's, as a load's). Speed and memory do not
  depend on the values, only on the shapes and paths, so no pruning run is needed for it.
Per variant: peak and final resident memory of the process after load (VmHWM, VmRSS), the bytes of its
parameters and buffers, the 512-token prefill time (batch 1, logits of the last position, as generate's
prefill), and decode tokens/s of `generate` (greedy, a fixed number of new tokens) at batch 1 and 8.
CSV (--out, default benchmarks/results/generate_cpu.csv) and a plot beside it; each row carries the CPU
model, thread count and torch version.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time

import torch
from harness import bench_args, plot_lines, write_csv

from armor_kernels.pipeline.runtime import cpu_name

LLAMA_1B = dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                max_position_embeddings=131072, rope_theta=500000.0, rms_norm_eps=1e-5)
PROMPT, NEW_TOKENS, PREFILL = 8, {"smollm2": 32, "llama1b": 8}, 512
VARIANTS = {"smollm2": ("dense_bf16", "dense_fp32", "pruned_bf16"),
            "llama1b": ("dense_bf16", "dense_fp32", "pruned_bf16")}


def memory_mib() -> tuple[float, float]:
    """(VmRSS, VmHWM) of this process in MiB."""
    fields = dict(line.split(":", 1) for line in open("/proc/self/status"))
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


def random_packed_armor(d_out: int, d_in: int, dtype: torch.dtype):
    """An ArmorLinear of random factors (b = 128) and a random 2:4 core, built packed (values and 2-bit
    positions drawn directly: one of the 6 position pairs per group of 4)."""
    from armor_kernels import ArmorLinear
    pairs = torch.tensor([[0, 1], [0, 2], [0, 3], [1, 2], [1, 3], [2, 3]], dtype=torch.uint8)
    p = pairs[torch.randint(0, 6, (d_out, d_in // 8, 2))]  # two groups per byte
    idx = p[..., 0, 0] | p[..., 0, 1] << 2 | p[..., 1, 0] << 4 | p[..., 1, 1] << 6
    values = (torch.randn(d_out, d_in // 2) / d_in ** 0.5).to(dtype)
    eye = lambda d: (torch.eye(128) + 0.02 * torch.randn(d // 128, 128, 128)).to(dtype)
    return ArmorLinear.from_packed(eye(d_out), values, idx.contiguous(), eye(d_in))


def build(model: str, variant: str, checkpoint: str | None):
    """(model, vocabulary size) of one variant, loaded or built the way a user would."""
    dtype = torch.float32 if variant.endswith("fp32") else torch.bfloat16
    if model == "smollm2":
        if variant.startswith("dense"):
            from armor_kernels.pipeline.model import load_model
            m, _ = load_model(dtype=dtype)
        else:
            from transformers import AutoModelForCausalLM

            import armor_kernels.integrations.hf  # noqa: F401  (registers the format)
            m = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=dtype).eval()
        return m, m.config.vocab_size
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaRMSNorm, LlamaRotaryEmbedding

    from armor_kernels import prepare
    from armor_kernels.pipeline.model import decoder_layers, replace_module
    torch.manual_seed(0)
    config = LlamaConfig(**LLAMA_1B)
    if variant.startswith("dense"):
        return LlamaForCausalLM(config).to(dtype).eval(), config.vocab_size
    # the skeleton on the meta device, so that no dense linear is ever built: the load's peak is the packed
    # model's, as from_pretrained's; every decoder linear packed, then the rest given values
    with torch.device("meta"):
        m = LlamaForCausalLM(config).to(dtype).eval()
    for block in decoder_layers(m):
        for name, lin in list(block.named_modules()):
            if isinstance(lin, torch.nn.Linear):
                replace_module(block, name, random_packed_armor(lin.out_features, lin.in_features, dtype))
    embed = torch.randn(config.vocab_size, config.hidden_size, dtype=dtype).mul_(0.02)
    m.model.embed_tokens.weight = m.lm_head.weight = torch.nn.Parameter(embed)  # tied, as the dense model
    for norm in [mod for mod in m.modules() if isinstance(mod, LlamaRMSNorm)]:
        norm.weight = torch.nn.Parameter(torch.ones(config.hidden_size, dtype=dtype))
    m.model.rotary_emb = LlamaRotaryEmbedding(config).to(dtype)
    meta = [n for n, t in [*m.named_parameters(), *m.named_buffers()] if t.is_meta]
    if meta:
        raise SystemExit(f"bench_generate: the pruned 1B model has tensors without values: {meta[:5]}")
    prepare(m)
    return m, config.vocab_size


def child(model: str, variant: str, checkpoint: str | None) -> dict:
    from armor_kernels.pipeline.runtime import decode_tokens_per_s, held_bytes, path_counts
    t0 = time.perf_counter()
    m, vocab = build(model, variant, checkpoint)
    load_s = time.perf_counter() - t0
    rss, peak = memory_mib()
    held = held_bytes(m)
    with torch.no_grad():
        ids = torch.randint(0, vocab, (1, PREFILL), generator=torch.Generator().manual_seed(0))
        m(ids[:, :16], logits_to_keep=1)  # warm-up
        prefill = []
        for _ in range(2 if model == "smollm2" else 1):
            t0 = time.perf_counter()
            m(ids, logits_to_keep=1)
            prefill.append(time.perf_counter() - t0)
    decode = {batch: decode_tokens_per_s(m, batch=batch, prompt=PROMPT, new_tokens=NEW_TOKENS[model])
              for batch in (1, 8)}
    return dict(model=model, variant=variant, load_s=round(load_s, 1), rss_mib=round(rss, 1),
                peak_rss_mib=round(peak, 1), param_buffer_mib=round(held / 2 ** 20, 1),
                prefill_512_s=round(min(prefill), 3),
                decode_tok_s_b1=round(decode[1], 2), decode_tok_s_b8=round(decode[8], 2),
                paths=path_counts(m))


def main(argv=None) -> int:
    p = bench_args(__doc__.split("\n")[0], "generate_cpu")
    p.add_argument("--checkpoint", default="runs/demo/quality",
                   help="a pruned SmolLM2 checkpoint (default: the demo's)")
    p.add_argument("--models", default="smollm2,llama1b")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)  # MODEL:VARIANT, in a fresh process
    args = p.parse_args(argv)
    if args.child:
        model, variant = args.child.split(":")
        print("RESULT " + json.dumps(child(model, variant, args.checkpoint)), flush=True)
        return 0
    info = dict(cpu=cpu_name(), threads=torch.get_num_threads(), torch=torch.__version__)
    rows = []
    for model in args.models.split(","):
        for variant in VARIANTS[model]:
            done = subprocess.run([sys.executable, __file__, "--child", f"{model}:{variant}", "--checkpoint",
                                   args.checkpoint], capture_output=True, text=True)
            result = [line for line in done.stdout.splitlines() if line.startswith("RESULT ")]
            if done.returncode != 0 or not result:
                print(done.stderr[-3000:], file=sys.stderr)
                raise SystemExit(f"bench_generate: {model}:{variant} failed (exit {done.returncode})")
            rows.append({**info, **json.loads(result[0].removeprefix("RESULT "))})
            print({k: v for k, v in rows[-1].items() if k not in info}, flush=True)
    for r in rows:  # against the model's faster dense variant at batch 1
        dense = [d for d in rows if d["model"] == r["model"] and d["variant"].startswith("dense")]
        best = max(dense, key=lambda d: d["decode_tok_s_b1"])
        r["decode_b1_vs_best_dense"] = round(r["decode_tok_s_b1"] / best["decode_tok_s_b1"], 3)
        bf16 = next(d for d in dense if d["variant"] == "dense_bf16")
        r["rss_vs_dense_bf16"] = round(r["rss_mib"] / bf16["rss_mib"], 3)
        r["values"] = ("random (speed and memory do not depend on them)" if r["model"] == "llama1b" else
                       f"checkpoint {args.checkpoint}" if r["variant"].startswith("pruned") else "the bundled model")
    write_csv(rows, args.out)
    panels = {m: {r["variant"]: [(1, r["decode_tok_s_b1"]), (8, r["decode_tok_s_b8"])] for r in rows if r["model"] == m}
              for m in args.models.split(",")}
    plot_lines(panels, args.out.with_suffix(".png"), xlabel="batch", ylabel="decode tokens/s", xscale="log")
    return 0


if __name__ == "__main__":
    sys.exit(main())
