"""armor-kernels: ARMOR 2:4 pruning (Liu et al., 2025), its baselines, a fast optimizer and a
fused Hopper inference op.

    from armor_kernels import ActivationStats, armor, ArmorLinear
    stats = ActivationStats(d_in); stats.update(x)          # calibration inputs of one layer
    res = armor(W, stats)                                   # factors, pruned weight, loss history
    layer = ArmorLinear.from_linear(linear, res.factors)    # y = ((x B'ᵀ) Sᵀ) A'ᵀ + bias
"""
__version__ = "0.1.0"  # recorded in every pruning run's configuration; setup.py reads it from here

from .baselines import BASELINES, Pruned, magnitude, nowag_p, sparsegpt, wanda
from .factors import (
                      ActivationStats,
                      ArmorFactors,
                      block_size_for,
                      block_sizes,
                      denormalize,
                      normalize,
                      output_error,
                      proxy_loss,
                      tile_losses,
)
from .nn import ArmorLinear, Sparse24Linear, paths, prepare
from .optim import ArmorOptions, ArmorResult, armor
from .sparse24 import check_24, pack_24, unpack_24

__all__ = [
    "ActivationStats", "ArmorFactors", "ArmorLinear", "ArmorOptions", "ArmorResult", "BASELINES", "Pruned", "armor",
    "block_size_for", "block_sizes", "check_24", "denormalize", "magnitude", "normalize", "nowag_p",
    "output_error", "pack_24", "paths", "prepare", "proxy_loss", "sparsegpt", "Sparse24Linear", "tile_losses",
    "unpack_24", "wanda",
]
