"""armor-kernels: ARMOR 2:4 pruning (optimizer, baselines, fused Hopper op)."""
from setuptools import find_packages, setup

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
)
