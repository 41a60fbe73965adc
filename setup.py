"""Builds fastprune._C, the op library (C++ always, CUDA when available).

FASTPRUNE_CUDA=auto (default) builds the CUDA kernels when torch was built with
CUDA and a toolkit is found; FASTPRUNE_CUDA=1 requires them; FASTPRUNE_CUDA=0
skips them. Torch must already be installed: build with
``pip install --no-build-isolation -e .`` so the extension compiles against the
torch you run (an isolated build would fetch another torch and its headers).
"""
import glob
import os
import sys

from setuptools import setup

try:
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
except ImportError:
    sys.exit("fastprune: torch must be installed before building, e.g. `pip install torch==2.13.0`, "
             "then `pip install --no-build-isolation -e .`")


def want_cuda() -> bool:
    mode = os.environ.get("FASTPRUNE_CUDA", "auto").lower()
    if mode not in ("auto", "0", "1"):
        sys.exit(f"fastprune: FASTPRUNE_CUDA must be auto, 0 or 1, got {mode!r}")
    available = torch.version.cuda is not None and CUDA_HOME is not None
    if mode == "1" and not available:
        reason = "torch was built without CUDA" if torch.version.cuda is None else "no CUDA toolkit found (set CUDA_HOME)"
        sys.exit(f"fastprune: FASTPRUNE_CUDA=1 but {reason}; install a CUDA build of torch and the toolkit, "
                 "or build with FASTPRUNE_CUDA=0")
    return mode == "1" or (mode == "auto" and available)


# ops.cpp declares the ops; composite/ holds device-generic kernels (ATen only), cpu/ and
# cuda/ the per-device ones, one file per op family in both.
sources = ["csrc/ops.cpp", "csrc/buffer_cache.cpp", "csrc/cpu_isa.cpp"] + sorted(glob.glob("csrc/composite/*.cpp")) + sorted(
    glob.glob("csrc/cpu/*.cpp"))
# -fno-math-errno lets sqrt vectorise (as torch builds it).
extra = {"cxx": ["-O3", "-fopenmp", "-fno-math-errno"]}
Extension = CppExtension
if want_cuda():
    sources += sorted(glob.glob("csrc/cuda/*.cu"))
    extra["nvcc"] = ["-O3", "--expt-relaxed-constexpr"]
    Extension = CUDAExtension

setup(
    ext_modules=[Extension("fastprune._C", sources, extra_compile_args=extra, extra_link_args=["-fopenmp"])],
    cmdclass={"build_ext": BuildExtension},
)
