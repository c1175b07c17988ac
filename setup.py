"""armor-kernels: ARMOR 2:4 pruning (optimizer, baselines, fused Hopper op)."""
from setuptools import find_packages, setup

# --- armor_kernels._armor_cpu: the C++/OpenMP S-step sweep (csrc/cpu, bound by python/cpu_module.cpp;
# torch-free, so it compiles in ~20 s). pybind11 comes from pyproject.toml's build requirements; an
# environment without it (pip install --no-build-isolation) installs without the module, and
# mask_select.sweep_tiles then runs the PyTorch reference.
import sys as _sys

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:
    Pybind11Extension = build_ext = None
    print("armor-kernels: pybind11 not found; building without armor_kernels._armor_cpu", file=_sys.stderr)

ext_modules = []
cmdclass = {}
if Pybind11Extension is not None:
    _omp = [] if _sys.platform in ("darwin", "win32") else ["-fopenmp"]   # GCC: -fopenmp links libgomp
    ext_modules.append(Pybind11Extension(
        "armor_kernels._armor_cpu",
        ["python/cpu_module.cpp", "csrc/cpu/sweep.cpp"],
        include_dirs=["csrc/cpu"],
        depends=["csrc/cpu/sweep.h"],
        cxx_std=17,
        # -ffp-contract=off: the float group solve rounds like torch's elementwise ops (sweep.cpp).
        extra_compile_args=["-O3", "-ffp-contract=off", *_omp],
        extra_link_args=_omp,
    ))
    cmdclass["build_ext"] = build_ext
# --- end _armor_cpu

setup(
    name="armor-kernels",
    version="0.1.0",
    description="ARMOR 2:4 pruning: block-diagonal x 2:4 sparse x block-diagonal factorisation, "
    "its optimizer, baselines and a fused Hopper inference op",
    packages=find_packages(include=["armor_kernels", "armor_kernels.*"]),
    python_requires=">=3.10",
    install_requires=[
        "torch>=2.11,<2.15",
        "numpy>=1.24",
        "safetensors>=0.4",
        "tqdm>=4.60",
    ],
    extras_require={
        "triton": ["triton>=3.4"],
        "models": ["transformers>=4.46", "gguf>=0.10", "accelerate>=0.30", "rdata>=0.11"],
        "cuda": ["pybind11>=2.12", "ninja>=1.11", "nvidia-cutlass==4.2.0.0"],
        "test": ["pytest>=8", "pytest-benchmark>=4"],
    },
    entry_points={"console_scripts": ["armor-kernels=armor_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
