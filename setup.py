"""Build bsconv_fast: the C++ CPU extension always; CUDA sources when a CUDA build of torch
and nvcc are present (or BSCONV_FAST_FORCE_CUDA=1), never when BSCONV_FAST_NO_CUDA=1."""
import glob
import os

from setuptools import find_packages, setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
import torch


def want_cuda():
    if os.environ.get("BSCONV_FAST_NO_CUDA") == "1":
        return False
    if os.environ.get("BSCONV_FAST_FORCE_CUDA") == "1":
        return True
    return torch.version.cuda is not None and CUDA_HOME is not None


def extensions():
    sources = ["csrc/bsconv.cpp", "csrc/program.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    cxx = ["-O3", "-std=c++17", "-fopenmp"]
    if not want_cuda():
        return [CppExtension("bsconv_fast._C", sources, extra_compile_args={"cxx": cxx},
                             extra_link_args=["-fopenmp"])]
    sources += sorted(glob.glob("csrc/cuda/*.cpp")) + sorted(glob.glob("csrc/cuda/*.cu"))
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0;9.0")  # A100 and H100/H200 unless told otherwise
    nvcc = ["-O3", "-std=c++17", "--expt-relaxed-constexpr"]
    return [CUDAExtension("bsconv_fast._C", sources, define_macros=[("BSCONV_FAST_WITH_CUDA", None)],
                          extra_compile_args={"cxx": cxx, "nvcc": nvcc}, extra_link_args=["-fopenmp"])]


setup(
    name="bsconv_fast",
    version="0.1.0",
    description="Fused Blueprint Separable Convolutions (BSConv) for PyTorch: CPU AVX2, Triton, CUDA",
    packages=find_packages(include=["bsconv_fast", "bsconv_fast.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4"],
    extras_require={
        "test": ["pytest>=7", "bsconv==0.4.0", "numpy", "triton>=3.0", "onnx", "onnxruntime", "onnxscript"],
        "bench": ["bsconv==0.4.0", "onnx", "onnxruntime", "onnxscript"],
        "triton": ["triton>=3.0"],
    },
    ext_modules=extensions(),
    cmdclass={"build_ext": BuildExtension.with_options(use_ninja=True)},
    zip_safe=False,
)
