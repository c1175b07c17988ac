"""armor-kernels: ARMOR 2:4 pruning (optimizer, baselines, fused Hopper op).

Native code, each source listed once:
- armor_kernels._armor_cpu: the C++/OpenMP S-step sweep and the packed 2:4 linear (csrc/cpu, bound by
  python/cpu_module.cpp).
  Torch-free, ~20 s to compile; always built when pybind11 is present (pyproject.toml's build
  requirements), else the package installs without it and the PyTorch reference serves.
- armor_kernels._armor_cuda: the fused Hopper kernels, described by CMakeLists.txt (csrc/*.cu,
  python/armor_cuda_binding.cpp). Built when nvcc exists and torch is a CUDA build (under pip's build
  isolation torch is absent: install with --no-build-isolation to get it). ARMOR_BUILD_CUDA=1 forces
  the build (and fails loudly), ARMOR_BUILD_CUDA=0 skips it; ARMOR_BUILD_JOBS parallel compile jobs
  (default 2; the compile cost is in docs/DESIGN.md §9).
"""
import os
import re
import shutil
import subprocess
import sys

from setuptools import Extension, find_packages, setup
from setuptools.command.build_ext import build_ext as setuptools_build_ext

try:
    from pybind11.setup_helpers import Pybind11Extension, build_ext
except ImportError:
    Pybind11Extension, build_ext = None, setuptools_build_ext
    print("armor-kernels: pybind11 not found; building without armor_kernels._armor_cpu", file=sys.stderr)

ROOT = os.path.dirname(os.path.abspath(__file__))
with open(os.path.join(ROOT, "armor_kernels", "__init__.py")) as f:
    VERSION = re.search(r'^__version__ = "([^"]+)"', f.read(), re.M).group(1)


def nvcc():
    default = os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    return shutil.which("nvcc") or (default if os.path.exists(default) else None)


def skip_cuda_reason():
    flag = os.environ.get("ARMOR_BUILD_CUDA")
    if flag in ("0", "1"):
        return "ARMOR_BUILD_CUDA=0" if flag == "0" else None
    try:
        import torch
        cuda_torch = torch.version.cuda is not None
    except ImportError:
        cuda_torch = False
    return None if nvcc() and cuda_torch else ("nvcc not found" if not nvcc() else "torch absent or CPU-only")


class CMakeExtension(Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class BuildExt(build_ext):
    """pybind11's build_ext, plus CMake for the CUDA extension."""

    def build_extension(self, ext):
        if not isinstance(ext, CMakeExtension):
            return super().build_extension(ext)
        tmp = os.path.join(os.path.abspath(self.build_temp), "cmake-armor-cuda")
        out = os.path.dirname(os.path.abspath(self.get_ext_fullpath(ext.name)))
        cfg = ["cmake", "-S", ROOT, "-B", tmp, "-DARMOR_SHARED=OFF", f"-DARMOR_OUTPUT_DIR={out}",
               f"-DPython_EXECUTABLE={sys.executable}"]
        if nvcc():
            cfg.append(f"-DCMAKE_CUDA_COMPILER={nvcc()}")
        subprocess.run(cfg, check=True)
        subprocess.run(["cmake", "--build", tmp, "--parallel", os.environ.get("ARMOR_BUILD_JOBS", "2")], check=True)


ext_modules = []
if Pybind11Extension is not None:
    omp = [] if sys.platform in ("darwin", "win32") else ["-fopenmp"]  # GCC: -fopenmp links libgomp
    ext_modules.append(Pybind11Extension(
        "armor_kernels._armor_cpu",
        ["python/cpu_module.cpp", "csrc/cpu/sweep.cpp", "csrc/cpu/packed_linear.cpp"],
        include_dirs=["csrc/cpu"],
        depends=["csrc/cpu/sweep.h", "csrc/cpu/packed_linear.h"],
        cxx_std=17,
        # -ffp-contract=off: the float group solve rounds like torch's elementwise ops (sweep.cpp).
        extra_compile_args=["-O3", "-ffp-contract=off", *omp],
        extra_link_args=omp,
    ))
reason = skip_cuda_reason()
if reason is None:
    ext_modules.append(CMakeExtension("armor_kernels._armor_cuda"))
else:
    print(f"armor-kernels: skipping the CUDA extension armor_kernels._armor_cuda ({reason}; "
          "ARMOR_BUILD_CUDA=1 forces it)", file=sys.stderr)

setup(
    name="armor-kernels",
    license="Apache-2.0",
    version=VERSION,
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
        "models": ["transformers>=5.0", "gguf>=0.10", "accelerate>=0.30", "rdata>=0.11"],
        # cuobjdump: .ci/check_kernels.py reads the kernels' registers and shared memory with it, and an
        # nvcc install need not include it (the CI machine's does not).
        "cuda": ["pybind11>=2.12", "ninja>=1.11", "nvidia-cutlass==4.2.0.0", "nvidia-cuda-cuobjdump==13.2.86"],
        "test": ["pytest>=8", "pytest-benchmark>=4", "ruff>=0.6"],
        "bench": ["matplotlib>=3.7"],
        "eval": ["lm-eval[hf]==0.4.13"],
        # armor_kernels.integrations.llmcompressor (ArmorModifier); llm-compressor pins transformers <= 5.17 and
        # compressed-tensors 0.19.0, so it lives in its own environment (scripts/setup_llmcompressor.sh).
        "llmcompressor": ["llmcompressor==0.14.0.1", "compressed-tensors==0.19.0", "datasets>=2.16",
                          "accelerate>=0.30"],
    },
    entry_points={"console_scripts": ["armor-kernels=armor_kernels.cli:main"]},
    ext_modules=ext_modules,
    cmdclass={"build_ext": BuildExt},
)
