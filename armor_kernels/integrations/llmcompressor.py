"""ARMOR as an llm-compressor modifier: `oneshot(..., recipe=ArmorModifier(...))`, then `save_armor`.

    from llmcompressor import oneshot
    from armor_kernels.integrations.llmcompressor import ArmorModifier, save_armor

    modifier = ArmorModifier(overhead=0.05)               # ArmorOptions' fields, with the library's defaults
    model = oneshot(model=MODEL_DIR, dataset=ds, recipe=modifier)
    save_armor(model, modifier, OUT)          # format v2: from_pretrained(OUT) (armor_kernels.integrations.hf)

`ArmorModifier(config="quality")` (a preset's name or a PruneConfig, armor_kernels.pipeline.config) prunes
with the package's whole pipeline instead, model-wide budget and block-wise reconstruction included: at
oneshot's initialisation, on its calibration windows (unpadded, of one length), every decoder block's
linears, one block at a time on the model's device, exactly as `armor_kernels.prune(model, windows, config)`
does; the model's linears then stay nn.Linear holding the loaded product, as below. The config holds the
optimizer's options, so it is refused beside ArmorOptions' fields, `targets` or `ignore`.

In a YAML recipe the modifier is found by name once registered (llm-compressor looks only inside its
own package otherwise): `ModifierFactory.register("ArmorModifier", ArmorModifier)`.

How it sits in llm-compressor's sequential pipeline (one decoder block per subgraph, the pruned block's
outputs feeding the next unless `propagate_error=False`):
- `calibrate_module` (a forward hook on every targeted linear) adds each call's input to the linear's
  ActivationStats, as the package's own pipeline does; the full H only where the options need it.
- `compress_modules` (once per subgraph) prunes the block's linears with `pipeline.prune.prune_block_linears`,
  the code `python -m armor_kernels prune` runs. The modifier keeps each layer as stored (a packed bf16
  ArmorLinear); the model's linear stays an nn.Linear (the pipeline's offloading wraps it and later
  modifiers expect one) whose `weight` and `bias` become exactly what `from_pretrained` of the saved
  directory computes with: the dense product A'·S·B' of the stored values, in the model's dtype. They are
  written with `update_offload_parameter`, as llm-compressor's SparseGPT writes its weights, so offloaded
  models work.
- `save_armor` writes the directory a `prune` run writes (the same checkpoint functions, so the same
  shards, digests and index); llm-compressor's own `output_dir` would save the dense product instead.

Names: ArmorOptions' own, but its `start` (the factors the descent starts from) is `armor_start` here:
every llm-compressor modifier has a `start` already, the step at which its lifecycle starts.

Against `python -m armor_kernels prune`, on the same calibration windows in the same batches and order
(oneshot's `batch_size=8, shuffle_calibration_samples=False`, and at most 16 windows: oneshot visits more of
one length permuted, `dataset_order`, which the per-block path cannot undo): the inputs of the first block's linears
before its attention (q, k, v) are the same sums bit for bit, and so are their factors. Everything after
the first attention differs in float32 rounding: llm-compressor traces the model and hands each block the
causal mask as an explicit float tensor, so SDPA runs its masked kernel, where `prune` passes no mask (SDPA's
causal path); the statistics then differ by ~1e-7 relative. With `propagate_error=False` each block sees
the dense model's outputs, as with `prune --protocol dense`; with the default (`--protocol sequential`)
the pruned block's outputs also differ in rounding, llm-compressor computing them with the dense product
in one matmul and `prune` with the factors, x·B'ᵀ·Sᵀ·A'ᵀ. The factors then move by bf16 ulps: on the
tests' tiny Llama the masks are equal, the losses agree to ~1e-6 relative and the dense products to
~5e-4 (tests/test_integrations_llmcompressor.py asserts the exact part and bounds the rest).
"""
from __future__ import annotations

import copy
from contextlib import ExitStack
from dataclasses import fields
from importlib.metadata import version
from pathlib import Path
from typing import Any, get_type_hints

import torch
from compressed_tensors.utils import align_module_device, update_offload_parameter
from llmcompressor.modifiers.pruning.sparsegpt.sgpt_base import SparsityModifierBase
from pydantic import PrivateAttr, create_model, field_validator, model_validator
from torch import nn

from .. import __version__
from ..atomic import save_json
from ..errors import InputError
from ..nn import ArmorLinear
from ..optim import ArmorOptions
from ..pipeline.checkpoint import (
    FORMAT_VERSION,
    RUN_FILE,
    STORAGE_DTYPE,
    config_hash,
    dense_linear,
    finish_run,
    save_block,
    save_rest,
    write_config,
)
from ..pipeline.config import prune_config, run_config
from ..pipeline.model import block_linears, check_supported, decoder_layers, layers_prefix, replace_module
from ..pipeline.prune import prune_block_linears, prune_model
from ..stats import ActivationStats

__all__ = ["ArmorModifier", "save_armor"]

# ArmorOptions' field -> the modifier's, where llm-compressor's Modifier already uses the name
RENAMED = {"start": "armor_start"}
# the modifier's field -> ArmorOptions' field, for every field of ArmorOptions
OPTION_FIELDS = {RENAMED.get(f.name, f.name): f.name for f in fields(ArmorOptions)}
# what a user sets besides ArmorOptions' fields (the rest of the base classes' fields are llm-compressor's
# bookkeeping or refused values of sparsity settings)
SELECTION_FIELDS = ("targets", "ignore", "sparsity", "mask_structure")


def dataset_order(windows: torch.Tensor, sampler) -> torch.Tensor:
    """Windows of one length, as oneshot's loader yielded them, back in its dataset's order where its sampler
    meant no other. Without shuffling, llm-compressor's LengthAwareSampler visits rows by descending length
    with torch's unstable argsort, which permutes rows of equal length (32 windows arrive as rows 16, 31, 30,
    …, 17, 0, 15, …, 1; 16 or fewer keep their order): order decides which windows reconstruction holds
    back (the last ones) and the rounding of every sum, so the same windows would give another model than
    `prune`'s. A shuffling sampler's order is kept."""
    order = getattr(sampler, "order", None)
    if type(sampler).__name__ != "LengthAwareSampler" or order is None:
        return windows
    return windows[torch.as_tensor(list(order)[:len(windows)]).argsort()]


class _ArmorModifier(SparsityModifierBase):
    """The methods and validators of ArmorModifier; its ARMOR fields are added from ArmorOptions below."""

    sparsity: float | list[float] | None = 0.5
    mask_structure: str = "2:4"
    targets: str | list[str] | None = None  # None: the model's decoder block class (resolved at initialize)
    config: Any = None  # a PruneConfig or a preset's name: the package's pipeline prunes (module docstring)

    _where: dict = PrivateAttr(default_factory=dict)      # linear -> (block index, name inside the block)
    _prefix: str = PrivateAttr(default="")               # the decoder blocks' state-dict prefix
    _stats: dict = PrivateAttr(default_factory=dict)      # linear -> ActivationStats, until compressed
    _pruned: dict = PrivateAttr(default_factory=dict)     # full name -> the stored (packed bf16) ArmorLinear
    _reports: dict = PrivateAttr(default_factory=dict)    # full name -> prune_linear's report
    _calib: Any = PrivateAttr(default=None)                # config: the calibration windows it pruned on

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data):
        if not isinstance(data, dict):
            return data
        if isinstance(data.get("start"), str):
            raise InputError(f"start: ArmorModifier's `start` is llm-compressor's lifecycle step (a number); the "
                             f"factors ARMOR starts from are `armor_start`, got start={data['start']!r}")
        unknown = sorted(set(data) - set(cls.model_fields))
        if unknown:
            raise InputError(f"ArmorModifier: unknown option(s) {unknown}; expected ArmorOptions' "
                             f"{sorted(OPTION_FIELDS)} or {list(SELECTION_FIELDS)}")
        return data

    @field_validator("sparsity")
    @classmethod
    def _half(cls, value):
        if value != 0.5:
            raise InputError(f"expected 0.5 (2:4 keeps exactly half of every layer's weights), got {value!r}")
        return value

    @field_validator("mask_structure")
    @classmethod
    def _two_four(cls, value):
        if value != "2:4":
            raise InputError(f"expected '2:4' (ARMOR's S is 2:4 along d_in), got {value!r}")
        return value

    @field_validator("sparsity_profile")
    @classmethod
    def _uniform(cls, value):
        if value is not None:
            raise InputError(f"expected None (every layer is 2:4; per-layer sparsities do not apply), got {value!r}")
        return value

    @field_validator("config")
    @classmethod
    def _prune_config(cls, value):
        if value is None:
            return None
        config = prune_config(value)
        if config.method != "armor":
            raise InputError(f"config: ArmorModifier prunes with ARMOR, got a config of method {config.method!r}")
        return config

    @model_validator(mode="after")
    def _valid_options(self):
        if self.config is not None:
            given = [name for name, opt in OPTION_FIELDS.items()
                     if getattr(self, name) != getattr(ArmorOptions(), opt)]
            given += [name for name in ("targets", "ignore") if getattr(self, name)]
            if given:
                raise InputError(f"config: holds ARMOR's options and prunes every linear of the decoder blocks; "
                                 f"got it with {given} (set them in the PruneConfig, or drop `config`)")
        _ = self.options  # ArmorOptions' own checks, with the modifier's field names
        return self

    @property
    def options(self) -> ArmorOptions:
        """The ArmorOptions this modifier prunes with."""
        if self.config is not None:
            return self.config.options
        try:
            return ArmorOptions(**{opt: getattr(self, name) for name, opt in OPTION_FIELDS.items()})
        except ValueError as e:
            msg = str(e)
            for opt, name in RENAMED.items():
                msg = name + msg[len(opt):] if msg.startswith(f"{opt}:") else msg
            raise InputError(msg) from None

    # --- llm-compressor's lifecycle -------------------------------------------------------------------

    def on_initialize(self, state, **kwargs) -> bool:
        model = state.model
        check_supported(model)  # mixture-of-experts blocks are refused, as by `prune`
        layers = decoder_layers(model)
        if self.targets is None:
            self.targets = [type(layers[0]).__name__]
        self._prefix = layers_prefix(model)
        self._where = {lin: (i, name) for i, block in enumerate(layers) for name, lin in block_linears(block).items()}
        if self.config is not None:
            self._prune_with_config(model, state.data.calib)
            return True
        return super().on_initialize(state, **kwargs)

    def _prune_with_config(self, model: nn.Module, calib) -> None:
        """The package's pipeline on oneshot's calibration windows; each pruned layer then kept as stored
        and put back in the model as an nn.Linear of its loaded product."""
        from ..api import calibration_tokens

        if calib is None:
            raise InputError("config: ArmorModifier calibrates on oneshot's dataset; oneshot was given none")
        self._calib = dataset_order(calibration_tokens(calib), getattr(calib, "sampler", None))
        dtype = next(model.parameters()).dtype
        report = prune_model(model, None, self._calib, self.config, None)["layers"]
        for i, block in enumerate(decoder_layers(model)):
            for name, mod in list(block.named_modules()):
                if not isinstance(mod, ArmorLinear):
                    continue
                full = f"{self._prefix}.{i}.{name}"
                self._pruned[full] = copy.deepcopy(mod).to("cpu", STORAGE_DTYPE)  # its stored bf16 values, exactly
                self._reports[full] = report[f"{i}.{name}"]
                bias = None if mod.bias is None else mod.bias.detach().to(dtype)
                # trainable as the model's other linears are, like those the per-block path leaves in place
                replace_module(block, name, dense_linear(mod.to_dense(dtype), bias).requires_grad_())

    def on_calibration_start(self, state, event, **kwargs):
        if self.config is not None:  # pruned at initialisation
            return
        super().on_calibration_start(state, event, **kwargs)  # hooks every targeted, not ignored, layer
        # the base class names a module matched by a class target "name." (hence the strip)
        outside = [name.rstrip(".") for mod, name in self._module_names.items() if mod not in self._where]
        if outside:
            self.remove_hooks()
            raise InputError(f"targets: ArmorModifier prunes nn.Linear layers inside the decoder blocks "
                             f"({self._prefix}.*; the checkpoint format stores nothing else pruned), got "
                             f"{outside[:5]}{' …' if len(outside) > 5 else ''}; narrow `targets` or `ignore` them")

    def calibrate_module(self, module: nn.Module, args: tuple, _output) -> None:
        stats = self._stats.get(module)
        if stats is None:
            stats = self._stats[module] = ActivationStats(module.in_features, full=self.options.needs_full_stats,
                                                          device=args[0].device)
        stats.update(args[0])

    def compress_modules(self) -> None:
        """Prune the linears calibrated since the last call (one decoder block's), block by block."""
        blocks: dict[int, dict[str, nn.Module]] = {}
        for mod in self._stats:
            i, name = self._where[mod]
            blocks.setdefault(i, {})[name] = mod
        for i in sorted(blocks):
            linears = blocks[i]
            stats = {name: self._stats.pop(mod) for name, mod in linears.items()}
            with torch.no_grad(), ExitStack() as onloaded:
                for mod in linears.values():
                    onloaded.enter_context(align_module_device(mod))
                device = next(iter(linears.values())).weight.device
                pruned, report = prune_block_linears(linears, stats, "armor", self.options, device)
                # each layer as from_pretrained builds it (its stored values in the model's dtype), densified
                used = {name: copy.deepcopy(pruned[name]).to(device, lin.weight.dtype) for name, lin in linears.items()}
                dense = {name: (mod.to_dense(), mod.bias) for name, mod in used.items()}
            for name, lin in linears.items():
                weight, bias = dense[name]
                update_offload_parameter(lin, "weight", weight)
                if bias is not None:
                    update_offload_parameter(lin, "bias", bias)
                full = f"{self._prefix}.{i}.{name}"
                self._pruned[full] = pruned[name].cpu()
                self._reports[full] = report[name]

    def on_finalize(self, state, **kwargs) -> bool:
        self.remove_hooks()
        if self._stats:
            raise InputError(f"ArmorModifier: {len(self._stats)} calibrated linears were never compressed "
                             "(the pipeline ended before their subgraph did)")
        if self.config is not None:
            return True
        names = {mod: f"{self._prefix}.{i}.{name}" for mod, (i, name) in self._where.items()}
        never = [names[mod] for mod in self._module_names if names[mod] not in self._pruned]
        if never:
            raise InputError(f"ArmorModifier: linear(s) {never[:5]} saw no calibration tokens (a mixture-of-experts "
                             "expert, say); pruning them from empty statistics is refused")
        return True


_HINTS = get_type_hints(ArmorOptions)

ArmorModifier = create_model(
    "ArmorModifier",
    __base__=_ArmorModifier,
    __module__=__name__,
    __doc__="""ARMOR 2:4 pruning (W ≈ A·S·B per linear) as an llm-compressor modifier.

    Fields: ArmorOptions' (optimizer, block_size, overhead, iters, tol, passes, extrapolation, lr, patience,
    seed, time_budget, objective, shrink, and its `start` as `armor_start`), with the library's defaults;
    `targets` (default: the model's decoder block class, so embeddings and lm_head stay dense) and `ignore`
    (module names or `re:` patterns left dense). `sparsity` is 0.5 and `mask_structure` "2:4", the only
    values accepted. `config`: a PruneConfig or a preset's name ("quality"), pruned by the package's own
    pipeline (module docstring) in place of those fields. After oneshot, `save_armor(model, modifier, OUT)`
    writes the pruned checkpoint.
    """,
    **{name: (_HINTS[opt], next(f.default for f in fields(ArmorOptions) if f.name == opt))
       for name, opt in OPTION_FIELDS.items()},
)


def _last_oneshot_modifier() -> ArmorModifier:
    """The ArmorModifier of llm-compressor's active session (oneshot keeps its recipe until the next run)."""
    from llmcompressor.core import active_session

    recipe = active_session().lifecycle.recipe
    found = [m for m in (recipe.modifiers if recipe is not None else []) if isinstance(m, ArmorModifier)]
    if len(found) != 1:
        raise InputError(f"modifier: None means the ArmorModifier of the recipe oneshot ran last; expected one, "
                         f"found {len(found)}: pass the modifier")
    return found[0]


def save_armor(model: nn.Module, modifier: ArmorModifier | None, out: str | Path, tokenizer=None) -> Path:
    """Write the model `oneshot` pruned with `modifier` as a format-v2 directory (pipeline/checkpoint.py):
    `from_pretrained(out)` with `armor_kernels.integrations.hf` imported gives the in-memory model's logits. Targeted
    linears are stored as ArmorLinear; linears of the blocks that were ignored are stored dense (in bf16, the
    format's storage dtype); everything outside the blocks as it is. modifier None: the ArmorModifier of
    the recipe oneshot ran last (a YAML recipe's). tokenizer: default, the one in the model's own
    directory. Returns `out`."""
    out = Path(out)
    if modifier is None:
        modifier = _last_oneshot_modifier()
    if not isinstance(modifier, ArmorModifier):
        raise TypeError(f"modifier: expected the ArmorModifier oneshot ran, got {type(modifier).__name__}")
    if not modifier._pruned:
        raise InputError("modifier: it has pruned nothing; pass it to oneshot(recipe=...) first")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise InputError(f"out: expected a new or empty directory, got {str(out)!r}, which exists and is not empty")
    layers, prefix = decoder_layers(model), layers_prefix(model)
    names = {f"{prefix}.{i}.{name}" for i, block in enumerate(layers) for name in block_linears(block)}
    if prefix != modifier._prefix or not set(modifier._pruned) <= names:
        raise InputError(f"model: expected the model this modifier pruned (linears under {modifier._prefix!r}), "
                         f"got a {type(model).__name__} without {sorted(set(modifier._pruned) - names)[:3]}")
    if tokenizer is None:
        from transformers import AutoTokenizer
        tokenizer = AutoTokenizer.from_pretrained(model.name_or_path)
    producer = {"llmcompressor": version("llmcompressor"), "modifier": "ArmorModifier",
                "targets": modifier.targets, "ignore": modifier.ignore}
    if modifier.config is not None:  # the record a `prune` run with this configuration writes
        run = {**run_config(modifier.config, modifier._calib, model, str(model.name_or_path)), "producer": producer}
    else:
        run = {
            "package_version": __version__, "format_version": FORMAT_VERSION, "method": "armor",
            "options": modifier.options.to_config(), "storage_dtype": str(STORAGE_DTYPE).removeprefix("torch."),
            "model_dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
            "model_source": str(model.name_or_path), "producer": producer,
            "model_config": {**model.config.to_dict(), "_name_or_path": None, "architectures": [type(model).__name__]},
        }
    chash = config_hash(run)
    out.mkdir(parents=True, exist_ok=True)
    # the order a pruning run writes in: run file, tokenizer and the rest, the blocks, config.json, the index
    save_json(out / RUN_FILE, {"run": run, "config_hash": chash})
    tokenizer.save_pretrained(out)
    save_rest(model, out)
    specs, reports = {}, {}
    for i, block in enumerate(layers):
        modules, block_report = {}, {}
        for name, lin in block_linears(block).items():
            full = f"{prefix}.{i}.{name}"
            stored: ArmorLinear | None = modifier._pruned.get(full)
            if stored is None:
                modules[name] = lin
                continue
            modules[name], block_report[name] = stored, modifier._reports[full]
            specs[full] = {"kind": "armor", "block": [stored.A.shape[1], stored.B.shape[1]]}
        save_block(out, i, f"{prefix}.{i}", modules, chash, block_report)
        reports.update({f"{i}.{name}": r for name, r in block_report.items()})
    write_config(out, model, "armor", specs)
    finish_run(out, len(layers), reports)
    return out
