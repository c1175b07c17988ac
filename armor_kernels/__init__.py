"""armor-kernels: ARMOR 2:4 pruning (Liu et al., 2025), its baselines, a fast optimizer and runtime paths that
run a pruned model from its packed form.

    import armor_kernels
    model = armor_kernels.prune(model, texts, tokenizer=tokenizer)   # a transformers causal LM, the "quality" preset
    armor_kernels.paths(model)                                        # what each pruned layer runs on its device

    from armor_kernels import ActivationStats, armor, ArmorLinear     # one layer, as a library
    stats = ActivationStats(d_in); stats.update(x)                    # calibration inputs of one layer
    res = armor(W, stats)                                             # factors, pruned weight, loss history
    layer = ArmorLinear.from_linear(linear, res.factors)              # y = ((x B'ᵀ) Sᵀ) A'ᵀ + bias
"""
__version__ = "0.1.0"  # recorded in every pruning run's configuration; setup.py reads it from here

from .baselines import BASELINES, magnitude, nowag_p, sparsegpt, wanda
from .nn import ArmorLinear, Sparse24Linear, paths, prepare
from .optim import ArmorOptions, ArmorResult, armor
from .stats import ActivationStats

# The model-level API reads through the pipeline (and transformers): imported on first use, so that
# `import armor_kernels` stays as light as the layer-level library.
_LAZY = {"prune": "api", "PruneConfig": "pipeline.config", "PRESETS": "pipeline.config",
         "ReconOptions": "pipeline.reconstruct", "BudgetOptions": "pipeline.budget"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "ActivationStats", "ArmorLinear", "ArmorOptions", "ArmorResult", "BASELINES", "BudgetOptions", "PRESETS",
    "PruneConfig", "ReconOptions", "Sparse24Linear", "armor", "magnitude", "nowag_p", "paths", "prepare", "prune",
    "sparsegpt", "wanda",
]
