"""The pruned checkpoint, format v2: a Hugging Face model directory, safetensors only.

    config.json                    the model's own config, plus quantization_config {"quant_method": "armor",
                                   "format_version": 2, "method", "storage_dtype", "modules": {name: spec}}
    generation_config.json, tokenizer files
    armor_run.json                 run metadata: configuration and its hash, calibration hash, per-linear
                                   reports, number of processes
    model-rest.safetensors         every tensor outside the decoder blocks' pruned linears (embeddings, norms, …)
    model-block-NNNNN.safetensors  decoder block NNNNN's pruned linears under their full state-dict keys,
                                   written atomically when the block is done; the run's hash, the block's
                                   report and its tensors' sha256 are in its metadata, so a resumed run
                                   loses nothing and notices a damaged block
    model.safetensors.index.json   the weight map and every shard's per-tensor sha256, written only when the
                                   last block is done: a partial run never loads as a model, and resuming
                                   works from the block shards

Content digests: every shard records the sha256 of its tensors, the index all of them; loaders check them
before any tensor is built (verify.py). Byte accounting for results: sizes.py.

Per pruned linear `<name>` (e.g. model.layers.3.self_attn.q_proj), the tensors of its module (nn.py):
ArmorLinear `A`, `B` (diagonal blocks, r and c folded in), `S_values`, `S_idx` (portable 2:4), `bias`;
Sparse24Linear (the baselines) `S_values`, `S_idx`, `bias`; both `weight`, an empty uint8 tensor that makes
stock transformers (without this package's plugin, `armor_kernels.integrations.hf`) refuse the directory instead of
building random weights. Values are stored in bf16. A "dense" run is a plain `save_pretrained` directory.
"""
from __future__ import annotations

import copy
import hashlib
import json
import math
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_write, save_json, write_text
from ..errors import InputError, MissingFile
from ..nn import PRUNED_LINEARS, ArmorLinear, Sparse24Linear
from .model import block_linear_keys, block_linears, decoder_layers, layers_prefix
from .verify import INDEX_FILE, SHA256_KEY, check_shard, dtype_itemsize, own_digests, read_verified, shard_header

FORMAT_VERSION = 2
QUANT_METHOD = "armor"
STORAGE_DTYPE = torch.bfloat16  # what a checkpoint stores; the pruned model in memory holds the same values
RUN_FILE = "armor_run.json"
REST_SHARD = "model-rest.safetensors"
def config_hash(config: dict) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def block_shard(out: Path, i: int) -> Path:
    return Path(out) / f"model-block-{i:05d}.safetensors"


def module_specs(model: nn.Module, method: str, blocks_for) -> dict[str, dict]:
    """quantization_config["modules"]: full name -> {"kind": "armor", "block": [bA, bB]} or {"kind": "sparse24"}."""
    prefix, specs = layers_prefix(model), {}
    for i, block in enumerate(decoder_layers(model)):
        for name, lin in block_linears(block).items():
            spec = {"kind": "sparse24"}
            if method == "armor":
                spec = {"kind": "armor", "block": list(blocks_for(f"{i}.{name}", (lin.out_features, lin.in_features)))}
            specs[f"{prefix}.{i}.{name}"] = spec
    return specs


def quantization_config(method: str, modules: dict[str, dict]) -> dict:
    return {"quant_method": QUANT_METHOD, "format_version": FORMAT_VERSION, "method": method,
            "storage_dtype": str(STORAGE_DTYPE).removeprefix("torch."), "modules": modules}


def read_run(out: Path) -> dict:
    """The run metadata of a checkpoint directory (armor_run.json), with errors that name the file."""
    path = Path(out) / RUN_FILE
    try:
        meta = json.loads(path.read_text())
        meta["run"], meta["config_hash"]
    except FileNotFoundError:
        raise MissingFile(f"checkpoint {str(out)!r} has no {RUN_FILE} (not a pruning run's directory)") from None
    except (ValueError, KeyError, TypeError) as e:
        raise InputError(f"checkpoint file {str(path)!r} is unreadable: {e!r}") from e
    return meta


def start_run(out: Path, model: nn.Module, tokenizer, run: dict, chash: str, blocks_for=None) -> None:
    """Write everything but the block shards: tokenizer, config.json with the quantization_config, the
    unpruned tensors and the run metadata. A dense run writes the whole model as it is. blocks_for: ARMOR's
    ("i.name", shape) -> (bA, bB) rule (ArmorOptions.layer_blocks, or the budget's allocation)."""
    out = Path(out)
    tokenizer.save_pretrained(out)
    if run["method"] == "dense":
        model.save_pretrained(out)
    else:
        write_config(out, model, run["method"], module_specs(model, run["method"], blocks_for))
        save_rest(model, out)
    save_json(out / RUN_FILE, {"run": run, "config_hash": chash})


def write_config(out: Path, model: nn.Module, method: str, modules: dict[str, dict]) -> None:
    """config.json (the model's own, with the quantization_config naming the pruned `modules`) and
    generation_config.json, as save_pretrained records them."""
    config = copy.deepcopy(model.config)
    config.architectures = [type(model).__name__]
    config.quantization_config = quantization_config(method, modules)
    write_text(Path(out) / "config.json", config.to_json_string())
    if getattr(model, "generation_config", None) is not None:
        write_text(Path(out) / "generation_config.json", model.generation_config.to_json_string())


def save_rest(model: nn.Module, out: Path) -> None:
    """Everything not pruned (embeddings, norms, lm_head), tied weights once (transformers re-ties them)."""
    skip, seen, rest = block_linear_keys(model), set(), {}
    for k, v in model.state_dict().items():
        if k in skip or v.data_ptr() in seen:
            continue
        seen.add(v.data_ptr())
        rest[k] = v.detach().contiguous().cpu()
    save_shard(Path(out) / REST_SHARD, rest, {"format": "pt"})


def tensor_sha256(t: torch.Tensor) -> str:
    """sha256 of a (CPU) tensor's bytes as safetensors stores them: contiguous, little-endian (this
    machine's order: safetensors writes the memory as it is)."""
    return hashlib.sha256(t.detach().contiguous().view(-1).view(torch.uint8).numpy()).hexdigest()


def save_shard(path: Path, tensors: dict[str, torch.Tensor], metadata: dict) -> None:
    """Write a shard atomically with its tensors' sha256 in its own metadata (SHA256_KEY)."""
    digests = {k: tensor_sha256(v) for k, v in tensors.items()}
    meta = {**metadata, SHA256_KEY: json.dumps(digests, sort_keys=True)}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=meta))


def stored_tensors(prefix: str, modules: dict[str, nn.Module]) -> dict[str, torch.Tensor]:
    """The shard of a block: every pruned module's state dict under full keys, values in STORAGE_DTYPE
    (exact: they were rounded to it when pruned)."""
    out = {}
    for name, mod in modules.items():
        if not isinstance(mod, (*PRUNED_LINEARS, nn.Linear)):
            raise TypeError(f"{name}: expected a pruned linear {PRUNED_LINEARS} or an nn.Linear left dense, got "
                            f"{type(mod).__name__}")
        for k, v in mod.pack().state_dict().items() if isinstance(mod, ArmorLinear) else mod.state_dict().items():
            v = v.detach().to(STORAGE_DTYPE) if v.is_floating_point() else v.detach()
            out[f"{prefix}.{name}.{k}"] = v.contiguous().cpu()
    return out


def save_block(out: Path, i: int, prefix: str, modules: dict[str, nn.Module], chash: str, report: dict) -> None:
    """One block's pruned linears (keys `prefix.name.tensor`), with the run's hash and the block's report."""
    tensors = stored_tensors(prefix, modules)
    meta = {"format": "pt", "config_hash": chash, "block": str(i), "report": json.dumps(report)}
    save_shard(block_shard(out, i), tensors, meta)


def modules_from_tensors(tensors: dict[str, torch.Tensor], where: str) -> dict[str, nn.Module]:
    """name -> ArmorLinear / Sparse24Linear (or an nn.Linear a conversion left dense: a 2-D `weight`)
    rebuilt from `name.tensor` keys (`where` names the source)."""
    modules = {}
    for name in sorted({k.rsplit(".", 1)[0] for k in tensors}):
        get = lambda key: tensors.get(f"{name}.{key}")  # noqa: E731
        try:
            if get("A") is not None:
                modules[name] = ArmorLinear.from_packed(get("A"), get("S_values"), get("S_idx"), get("B"), get("bias"))
            elif get("weight") is not None and get("weight").dim() == 2:
                modules[name] = dense_linear(get("weight"), get("bias"))
            else:
                modules[name] = Sparse24Linear(get("S_values"), get("S_idx"), get("bias"))
        except (ValueError, AttributeError, TypeError) as e:
            raise InputError(f"{where}: tensors of {name!r} are missing or malformed: {e}") from e
    return modules


def dense_linear(weight: torch.Tensor, bias: torch.Tensor | None) -> nn.Linear:
    """An nn.Linear holding exactly these tensors (built on meta: no weight is drawn and thrown away)."""
    lin = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta", dtype=weight.dtype)
    lin.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        lin.bias = nn.Parameter(bias, requires_grad=False)
    return lin


def load_block(out: Path, i: int, prefix: str, chash: str) -> tuple[dict[str, nn.Module], dict]:
    """(name within the block -> module, report) of a finished block shard (resume), checked against the
    digests in its own metadata: DamagedShard, naming the tensor, if it differs."""
    path = block_shard(out, i)
    tensors, meta = read_verified(path, None)  # its own record
    if meta.get("config_hash") != chash:
        raise InputError(f"checkpoint shard {str(path)!r} was written by a different configuration "
                         f"(hash {meta.get('config_hash')!r}, this run {chash!r}); use a new output directory")
    head = f"{prefix}.{i}."
    local = {k.removeprefix(head): v for k, v in tensors.items() if k.startswith(head)}
    if len(local) != len(tensors):
        raise InputError(f"checkpoint shard {str(path)!r} holds tensors outside block {i} (keys not under {head!r})")
    return modules_from_tensors(local, str(path)), json.loads(meta.get("report", "{}"))


def finish_run(out: Path, n_blocks: int, reports: dict, world_size: int = 1) -> None:
    """The last block is done: record the reports, then write the index that makes the directory a model."""
    out = Path(out)
    meta = read_run(out)
    save_json(out / RUN_FILE, {**meta, "reports": reports, "world_size": world_size})
    weight_map, total, digests = {}, 0, {}
    for shard in [out / REST_SHARD] + [block_shard(out, i) for i in range(n_blocks)]:
        with safe_open(shard, "pt") as f:
            for k in f.keys():
                weight_map[k] = shard.name
                sl = f.get_slice(k)
                total += math.prod(sl.get_shape()) * dtype_itemsize(sl.get_dtype())
        # copied from the shard's own record, made when it was written: a shard damaged since is caught
        # at load, not certified here
        own = own_digests(shard, shard_header(shard)[1])
        if own is not None:
            digests[shard.name] = own
    save_json(out / INDEX_FILE, {"metadata": {"total_size": total, "format_version": FORMAT_VERSION,
                                              SHA256_KEY: digests},
                                 "weight_map": dict(sorted(weight_map.items()))})


def missing_blocks(out: Path) -> list[int]:
    """Decoder blocks a pruning run in `out` has not written yet (from config.json's layer count)."""
    config = json.loads((Path(out) / "config.json").read_text())
    return [i for i in range(n_layers(config)) if not block_shard(out, i).exists()]


def n_layers(config: dict) -> int:
    """The decoder block count of a config.json (a multimodal model's in its text_config)."""
    return config.get("num_hidden_layers") or config.get("text_config", {}).get("num_hidden_layers") or 0


def check_complete(out: str | Path) -> None:
    """Raise a clear error unless `out` is a finished checkpoint whose shards all open."""
    out = Path(out)
    try:
        config = json.loads((out / "config.json").read_text())
    except FileNotFoundError:
        raise MissingFile(f"checkpoint {str(out)!r} has no config.json") from None
    except ValueError as e:
        raise InputError(f"checkpoint file {str(out / 'config.json')!r} is not valid JSON: {e}") from e
    index = out / INDEX_FILE
    if (config.get("quantization_config") or {}).get("quant_method") == QUANT_METHOD:
        missing, n = missing_blocks(out), n_layers(config)
        if missing:
            blocks = ", ".join(map(str, missing[:5])) + (", …" if len(missing) > 5 else "")
            raise InputError(f"checkpoint {str(out)!r} is incomplete: block{'s' * (len(missing) > 1)} {blocks} "
                             f"of 0–{n - 1} never written (run the same prune command again to resume)")
        if not index.is_file():
            raise InputError(f"checkpoint {str(out)!r} is incomplete: all its blocks 0–{n - 1} are written but "
                             f"{INDEX_FILE}, written when a run finishes, is missing (run the same prune "
                             "command again to write it)")
    if index.is_file():
        for shard in sorted(set(json.loads(index.read_text())["weight_map"].values())):
            check_shard(out / shard)
