"""Backend choice. Each backend says whether it supports a problem and, if not, why; the first
that fits runs. `explain` and the one-time fallback warnings are built on the same answers."""
import dataclasses
import importlib.util
import os
import warnings

import torch

from bsconv_fast import _ext


@dataclasses.dataclass(frozen=True)
class Problem:
    device_type: str
    dtype: torch.dtype
    kernel: tuple
    stride: tuple
    padding: tuple
    dilation: tuple
    padding_mode: str = "zeros"


class Backend:
    name = "?"

    def why_not(self, problem):
        """None when this backend runs `problem`, else a short reason."""
        raise NotImplementedError


class CpuFused(Backend):
    dtypes = (torch.float32, torch.float64)

    @property
    def name(self):
        return f"cpu-fused ({_ext.cpu_kernel_isa()})"

    def why_not(self, p):
        if p.device_type != "cpu":
            return "input is not on the CPU"
        if not _ext.available():
            return f"C++ extension not loaded ({_ext.LOAD_ERROR})"
        if p.dtype not in self.dtypes:
            return f"dtype {p.dtype} (CPU kernel: float32, float64)"
        if p.padding_mode != "zeros":
            return f"padding_mode={p.padding_mode!r} (fused kernels pad with zeros only)"
        return None


GPU_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
GPU_MAX_KERNEL = 7  # the haloed tile grows with the kernel; larger ones are left to the reference


def _gpu_limits(p, kernel_name):
    """Reason a GPU kernel cannot run `p` (dtype, kernel size, padding mode), or None."""
    if p.dtype not in GPU_DTYPES:
        return f"dtype {p.dtype} ({kernel_name}: float32, float16, bfloat16)"
    if max(p.kernel) > GPU_MAX_KERNEL:
        return f"kernel {p.kernel} larger than {GPU_MAX_KERNEL}x{GPU_MAX_KERNEL} ({kernel_name})"
    if p.padding_mode != "zeros":
        return f"padding_mode={p.padding_mode!r} (fused kernels pad with zeros only)"
    return None


def _gpu_common(p):
    if p.device_type != "cuda":
        return "input is not on a CUDA device"
    if not _ext.available():
        return f"C++ extension not loaded ({_ext.LOAD_ERROR})"
    return None


class TritonFused(Backend):
    name = "gpu-fused (triton)"

    def why_not(self, p):
        reason = _gpu_common(p)
        if reason is None and importlib.util.find_spec("triton") is None:
            reason = "triton is not installed (pip install triton)"
        return reason or _gpu_limits(p, "Triton kernel")


def cuda_kernel_built():
    """True when the extension was built with the hand-written CUDA kernel (bsconv_fast::pw_dw_cuda)."""
    return _ext.available() and torch._C._dispatch_has_kernel_for_dispatch_key("bsconv_fast::pw_dw_cuda", "CUDA")


class CudaFused(Backend):
    name = "gpu-fused (cuda)"

    def why_not(self, p):
        reason = _gpu_common(p)
        if reason is None and not cuda_kernel_built():
            reason = "extension built without CUDA sources"
        return reason or _gpu_limits(p, "CUDA kernel")


def gpu_backends():
    """GPU backends in preference order. Triton leads until a table measured on a GPU says where
    the CUDA kernel wins; BSCONV_FAST_GPU_KERNEL=cuda puts the CUDA kernel first."""
    if os.environ.get("BSCONV_FAST_GPU_KERNEL") == "cuda":
        return [CudaFused(), TritonFused()]
    return [TritonFused(), CudaFused()]


class Reference(Backend):
    name = "reference"

    def why_not(self, p):
        return None


def backends():
    return [CpuFused(), *gpu_backends(), Reference()]


@dataclasses.dataclass
class Choice:
    backend: Backend
    rejected: dict  # backend name -> reason, for every backend tried before the chosen one

    @property
    def reason(self):
        """Why the reference runs (empty for a fused backend)."""
        if self.backend.name != "reference":
            return ""
        relevant = [r for r in self.rejected.values() if not r.startswith("input is not on")]
        return "; ".join(relevant) or "; ".join(self.rejected.values())


def choose(problem):
    rejected = {}
    for backend in backends():
        reason = backend.why_not(problem)
        if reason is None:
            return Choice(backend, rejected)
        rejected[backend.name] = reason
    raise AssertionError("the reference backend accepts every problem")


_warned = set()


def warn_fallback(reason):
    """Warn once per distinct reason that a BSConv layer runs the (unfused) reference."""
    if reason and reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"bsconv_fast: running the unfused reference because: {reason}. "
                      "bsconv_fast.explain(model, x) lists the affected layers.", RuntimeWarning, stacklevel=3)
