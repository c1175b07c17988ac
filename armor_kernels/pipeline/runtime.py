"""What a loaded model costs when it runs: the bytes it holds and its greedy decode speed."""
from __future__ import annotations

import platform
import time
from collections import Counter

import torch
from torch import nn

from ..nn import paths, pruned_linears


def cpu_name() -> str:
    """The CPU's model name (/proc/cpuinfo), for the rows of a measurement."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _tensors(obj):
    """The plain tensors inside what `prepare` keeps on a layer (a tensor, a NamedTuple of them, a tensor
    subclass holding its own)."""
    if isinstance(obj, torch.Tensor):
        if type(obj) is not torch.Tensor and hasattr(obj, "__tensor_flatten__"):
            for name in obj.__tensor_flatten__()[0]:
                yield from _tensors(getattr(obj, name))
        else:
            yield obj
    elif isinstance(obj, tuple):
        for item in obj:
            yield from _tensors(item)


def held_bytes(model: nn.Module) -> int:
    """Bytes of every tensor the model holds, each storage once: parameters, buffers, and what `prepare`
    built beside them (dense copies, the fused kernels' or torch's semi-structured operands)."""
    found = list(model.parameters()) + list(model.buffers())
    for m in pruned_linears(model).values():
        for extra in (m.dense_weight, m.fused, m.semi):
            found.extend(_tensors(extra))
    storages = {}
    for t in found:
        s = t.untyped_storage()
        storages[(s.device, s.data_ptr())] = s.nbytes()
    return sum(storages.values())


def path_counts(model: nn.Module) -> str:
    """How many pruned linears take each path (nn.layer_path), e.g. "cpu_packed:210"; "dense" for none."""
    counts = Counter(paths(model).values())
    return " ".join(f"{p}:{n}" for p, n in sorted(counts.items())) or "dense"


def decode_tokens_per_s(model: nn.Module, *, batch: int = 1, prompt: int = 8, new_tokens: int = 32,
                        reps: int = 5, seed: int = 0) -> float:
    """Greedy `generate` tokens/s at `batch` (random prompts of `prompt` tokens, exactly `new_tokens` new
    ones each): the median of `reps` runs after a two-token warm-up (one run's figure moves by tens of
    percent on a machine that runs anything else)."""
    device = next(model.parameters()).device
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(seed))
    ids = ids.to(device)
    kw = dict(do_sample=False, pad_token_id=0)

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    speeds = []
    with torch.no_grad():
        model.generate(ids, max_new_tokens=2, min_new_tokens=2, **kw)
        for _ in range(reps):
            sync()
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=new_tokens, min_new_tokens=new_tokens, **kw)
            sync()
            speeds.append(batch * new_tokens / (time.perf_counter() - t0))
    return sorted(speeds)[len(speeds) // 2]
