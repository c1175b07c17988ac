"""A model read tensor by tensor, so that pruning holds one decoder block at a time, never the model.

`ModelSource(dir)` indexes a Hugging Face directory's safetensors shards; `skeleton()` builds the model
with every parameter on the meta device (buffers a module computes itself, such as rotary frequencies,
are real); `load_rest` fills in what lies outside the decoder blocks (embeddings, final norm, head) and
`load_block(i)` one block, each tensor read on its own with `safe_open`. Peak host memory is then the
non-block tensors + one block + the calibration activations, whatever the depth. The bundled GGUF model
(or any .gguf) is converted once into a cached safetensors directory (`model_source`), so every run streams.
`CheckpointSource(dir)` streams a pruned checkpoint the same way (its evaluation: evaluate.py), each shard
checked against the index's digests as it is read.
"""
from __future__ import annotations

import ctypes
import json
import shutil
import tempfile
from pathlib import Path

import torch
from accelerate import init_empty_weights
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ..errors import InputError, MissingFile
from ..nn import prepare
from .checkpoint import (
    QUANT_METHOD,
    RUN_FILE,
    block_shard,
    check_complete,
    modules_from_tensors,
    read_run,
    read_verified,
)
from .data import cache_dir
from .model import (
    adopt,
    block_linear_keys,
    block_linears,
    check_model_dir,
    decoder_layers,
    layers_prefix,
    load_model,
    resolve_model,
)
from .verify import index_digests


class ModelSource:
    """A local Hugging Face model directory with safetensors weights, read tensor by tensor."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        check_model_dir(self.path)
        self.config = AutoConfig.from_pretrained(self.path)
        self.files: dict[str, Path] = {}
        for shard in sorted(self.path.glob("*.safetensors")):
            with safe_open(shard, "pt") as f:
                for k in f.keys():
                    self.files[k] = shard

    def tokenizer(self):
        return AutoTokenizer.from_pretrained(self.path)

    def skeleton(self, dtype: torch.dtype = torch.float32) -> nn.Module:
        """The model with meta parameters (nothing read yet) and real self-computed buffers, in eval mode."""
        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(self.config, dtype=dtype)
        return model.eval().requires_grad_(False)

    def _read(self, keys: list[str], prefix: str, want: dict[str, torch.Tensor], device, dtype) -> dict:
        out = {}
        for k in keys:
            full = f"{prefix}{k}"
            shard = self.files.get(full)
            if shard is None:
                raise InputError(f"model {str(self.path)!r}: tensor {full!r}, which its config.json implies, is in "
                                 f"none of its shards ({sorted({p.name for p in self.files.values()})})")
            t = self._tensor(shard, full)
            if tuple(t.shape) != tuple(want[k].shape):
                raise InputError(f"model {str(self.path)!r}: tensor {full!r} in {shard.name} has shape "
                                 f"{tuple(t.shape)}, its config.json implies {tuple(want[k].shape)}")
            out[k] = t.to(device, dtype if t.is_floating_point() else t.dtype)
        return out

    def _tensor(self, shard: Path, key: str) -> torch.Tensor:
        with safe_open(shard, "pt") as f:
            return f.get_tensor(key)

    def load_block(self, model: nn.Module, i: int, device, dtype: torch.dtype) -> nn.Module:
        """Decoder block i's linears read in (in place; the block is returned)."""
        block, head = decoder_layers(model)[i], f"{layers_prefix(model)}.{i}."
        keys = {f"{name}.{p}" for name, lin in block_linears(block).items() for p in lin.state_dict()}
        want = {k: v for k, v in block.state_dict().items() if k in keys}
        block.load_state_dict(self._read(list(want), head, want, device, dtype), assign=True, strict=False)
        return block

    def load_rest(self, model: nn.Module, device, dtype: torch.dtype) -> None:
        """Every tensor but the decoder blocks' linears (embeddings, norms, head: small beside them); tied
        weights are tied again."""
        skip = block_linear_keys(model)
        want = {k: v for k, v in model.state_dict().items() if k not in skip}
        tied = getattr(model.config.get_text_config(decoder=True), "tie_word_embeddings", False)
        keys = [k for k in want if not (tied and k == "lm_head.weight" and k not in self.files)]
        model.load_state_dict(self._read(keys, "", want, device, dtype), assign=True, strict=False)
        if tied:
            model.tie_weights()

    def free_block(self, model: nn.Module, i: int) -> None:
        """Drop block i's tensors (back to meta), once it has been pruned and written and has run, and
        hand the freed memory back to the system: glibc raises its mmap threshold after large frees,
        so later block-sized buffers come from a heap that keeps what is freed, and the resident size
        would grow with depth (benchmarks/bench_memory.py measured it). A lower fixed threshold would
        also stop that, but slowed the optimizer by 40-60 %."""
        decoder_layers(model)[i].to("meta")
        trim_heap()


class CheckpointSource(ModelSource):
    """A finished pruned checkpoint directory, read shard by shard: `load_rest` reads model-rest, `load_block(i)`
    block i's shard and puts its pruned modules, their dense copies materialised (or the fused kernels
    prepared, where they apply), into the skeleton. Each shard's bytes are read once and checked against the
    sha256 digests recorded for it (verify.py) before any tensor is built."""

    def __init__(self, path: str | Path):
        check_complete(path)
        super().__init__(path)
        self.model_dtype = getattr(torch, read_run(self.path)["run"]["model_dtype"])
        self.digests = index_digests(self.path)
        self._open: dict[Path, dict[str, torch.Tensor]] = {}

    def _shard(self, path: Path) -> dict[str, torch.Tensor]:
        return read_verified(path, self.digests)[0]

    def _tensor(self, shard: Path, key: str) -> torch.Tensor:
        if shard not in self._open:
            self._open = {shard: self._shard(shard)}  # the shards are read in turn: keep the current one only
        return self._open[shard][key]

    def load_rest(self, model: nn.Module, device, dtype: torch.dtype) -> None:
        try:
            super().load_rest(model, device, dtype)
        finally:
            self._open = {}  # the rest shard's tensors, held only while they are read in

    def load_block(self, model: nn.Module, i: int, device, dtype: torch.dtype) -> nn.Module:
        """Decoder block i's pruned modules from its shard, in `dtype` on `device`, ready to run."""
        block, head, path = decoder_layers(model)[i], f"{layers_prefix(model)}.{i}.", block_shard(self.path, i)
        tensors = self._shard(path)
        local = {k.removeprefix(head): v for k, v in tensors.items() if k.startswith(head)}
        if len(local) != len(tensors) or {k.rsplit(".", 1)[0] for k in local} != set(block_linears(block)):
            raise InputError(f"checkpoint shard {str(path)!r} does not hold block {i}'s linears "
                             f"{sorted(block_linears(block))} under {head!r}")
        modules = modules_from_tensors(local, str(path))
        adopt(block, modules, dtype, device)
        prepare(block, keep_dense=True)  # the evaluator's figures: the fused kernels where they run, else Ŵ
        return block


def checkpoint_source(path: str | Path) -> tuple[ModelSource, torch.dtype]:
    """(source, the run's model dtype) of a run's directory: a CheckpointSource of a pruned one; a dense
    run's (a plain save_pretrained directory) is streamed as the model it is."""
    config = Path(path) / "config.json"
    quant = json.loads(config.read_text()).get("quantization_config") if config.is_file() else None
    if (quant or {}).get("quant_method") == QUANT_METHOD or not (Path(path) / RUN_FILE).is_file():
        src = CheckpointSource(path)
        return src, src.model_dtype
    return ModelSource(path), getattr(torch, read_run(path)["run"]["model_dtype"])


def trim_heap() -> None:
    """glibc's malloc_trim(0): return the free heap to the system (nothing elsewhere)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def model_source(path: str | Path | None) -> ModelSource:
    """The ModelSource of a model argument (model.resolve_model: a local path, a Hub id, None for the bundled
    SmolLM2-135M-Instruct): a Hugging Face directory as it is; a .gguf file converted once into a cached
    safetensors directory."""
    path = resolve_model(path)
    return ModelSource(path) if path.is_dir() else gguf_source(path)


def gguf_source(gguf: Path) -> ModelSource:
    """A .gguf model as a safetensors directory, converted once (dequantised to float32) and cached under
    cache_dir()/models; the conversion is atomic."""
    if not gguf.is_file() or gguf.suffix != ".gguf":
        raise MissingFile(f"model {str(gguf)!r}: expected a Hugging Face directory or a .gguf file")
    folder = cache_dir() / "models" / f"{gguf.stem}-{gguf.stat().st_size}"
    stamp = {"gguf": str(gguf), "bytes": gguf.stat().st_size}
    done = folder / "armor_source.json"
    if not (done.is_file() and json.loads(done.read_text()) == stamp):
        model, tok = load_model(gguf)
        folder.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
        try:
            model.save_pretrained(tmp)
            tok.save_pretrained(tmp)
            (tmp / done.name).write_text(json.dumps(stamp))
            if folder.exists():
                shutil.rmtree(folder)
            tmp.rename(folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return ModelSource(folder)
