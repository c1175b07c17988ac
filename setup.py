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

# --- armor_kernels._armor_cuda: the fused Hopper kernels (csrc/*.cu, python/armor_cuda_binding.cpp), built
# by CMakeLists.txt when nvcc exists and torch is a CUDA build (under pip's build isolation torch is
# absent: install with --no-build-isolation to get it). ARMOR_BUILD_CUDA=1 forces the build (and fails
# loudly), ARMOR_BUILD_CUDA=0 skips it. Compiling takes ~5 min and ~5 GB per parallel job (ARMOR_BUILD_JOBS).
import os as _os
import shutil as _shutil
import subprocess as _subprocess

from setuptools import Extension as _Extension
from setuptools.command.build_ext import build_ext as _setuptools_build_ext


def _nvcc():
    default = _os.path.join(_os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc")
    return _shutil.which("nvcc") or (default if _os.path.exists(default) else None)


def _skip_cuda_reason():
    flag = _os.environ.get("ARMOR_BUILD_CUDA")
    if flag in ("0", "1"):
        return "ARMOR_BUILD_CUDA=0" if flag == "0" else None
    try:
        import torch
        cuda_torch = torch.version.cuda is not None
    except ImportError:
        cuda_torch = False
    return None if _nvcc() and cuda_torch else ("nvcc not found" if not _nvcc() else "torch absent or CPU-only")


class _CMakeExtension(_Extension):
    def __init__(self, name):
        super().__init__(name, sources=[])


class _BuildExt(cmdclass.get("build_ext", _setuptools_build_ext)):
    def build_extension(self, ext):
        if not isinstance(ext, _CMakeExtension):
            return super().build_extension(ext)
        tmp = _os.path.join(_os.path.abspath(self.build_temp), "cmake-armor-cuda")
        cfg = ["cmake", "-S", _os.path.dirname(_os.path.abspath(__file__)), "-B", tmp, "-DARMOR_SHARED=OFF",
               f"-DARMOR_OUTPUT_DIR={_os.path.dirname(_os.path.abspath(self.get_ext_fullpath(ext.name)))}",
               f"-DPython_EXECUTABLE={_sys.executable}"]
        if _nvcc():
            cfg.append(f"-DCMAKE_CUDA_COMPILER={_nvcc()}")
        _subprocess.run(cfg, check=True)
        _subprocess.run(["cmake", "--build", tmp, "--parallel", _os.environ.get("ARMOR_BUILD_JOBS", "2")], check=True)


_reason = _skip_cuda_reason()
if _reason is None:
    ext_modules.append(_CMakeExtension("armor_kernels._armor_cuda"))
    cmdclass["build_ext"] = _BuildExt
else:
    print(f"armor-kernels: skipping the CUDA extension armor_kernels._armor_cuda ({_reason}; "
          "ARMOR_BUILD_CUDA=1 forces it)", file=_sys.stderr)
# --- end _armor_cuda

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
