"""Inference modules for the layers around the fused ones, which optimize() puts in place of the
official models' input BatchNorm, stem activations, max pooling, global pooling and
squeeze-excitation units. Each runs a bsconv_fast CPU op (csrc/cpu/glue_cpu.cpp) when it can and
the standard PyTorch ops otherwise (autograd, torch.compile tracing, other devices and dtypes);
`choice(x)` says which and why, for explain()."""
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.modules.utils import _pair

from bsconv_fast import _ext
from bsconv_fast.modules import bn_affine

_static_reasons = {}  # (x dtype, x device, parameter dtype, parameter device) -> reason


def cpu_op_reason(x, param=None, residual=None):
    """'' when a bsconv_fast inference op can run on `x` (with its parameter `param` and an optional
    `residual` input), else why the standard ops run instead."""
    if torch.compiler.is_compiling():
        return "torch.compile traces the standard ops"
    if torch.is_grad_enabled() and (x.requires_grad or (residual is not None and residual.requires_grad)):
        return "autograd needs the standard ops"
    key = (x.dtype, x.device, None if param is None else param.dtype, None if param is None else param.device)
    reason = _static_reasons.get(key)
    if reason is None:
        reason = _static_reasons[key] = _static_reason(x.dtype, x.device, param)
    return reason


def _static_reason(dtype, device, param):
    if not _ext.available():
        return "the C++ extension is not loaded"
    if device.type != "cpu" or (param is not None and param.device.type != "cpu"):
        return "the bsconv_fast inference ops are CPU-only"
    if dtype not in (torch.float32, torch.float64) or (param is not None and param.dtype != dtype):
        return f"dtype {dtype} (needs float32/float64, the parameters' dtype)"
    return ""


class GlueOp(nn.Module):
    """A module that runs one bsconv_fast CPU op (named by `backend`) or its standard equivalent."""

    backend = "cpu-glue"

    def _param(self):
        return None

    def choice(self, x):
        reason = cpu_op_reason(x, self._param())
        return ("reference", reason) if reason else (self.backend, "")


def input_affine_reference(x, scale, shift):
    """x * scale[c] + shift[c] with the standard ops (InputAffine's and the stems' fallback)."""
    return torch.addcmul(shift.view(1, -1, 1, 1), x, scale.view(1, -1, 1, 1))


class InputAffine(GlueOp):
    """y = x * scale[c] + shift[c], written channels_last: an eval-mode BatchNorm (the official models'
    `data_bn` on the image). An NCHW input is transposed in the same pass."""

    backend = "cpu-affine"

    def __init__(self, scale, shift):
        super().__init__()
        self.register_buffer("scale", scale.detach().clone())
        self.register_buffer("shift", shift.detach().clone())

    @classmethod
    def from_bn(cls, bn):
        return cls(*bn_affine(bn))

    def _param(self):
        return self._buffers["scale"]

    def forward(self, x):
        b = self._buffers
        if not cpu_op_reason(x, b["scale"]):
            return torch.ops.bsconv_fast.channel_affine(x, b["scale"], b["shift"])
        return input_affine_reference(x, b["scale"], b["shift"])


class MaxPool(GlueOp):
    """k x k max pooling (dilation 1, floor mode, padding at most half the kernel)."""

    backend = "cpu-pool"

    def __init__(self, kernel, stride, padding):
        super().__init__()
        self.kernel, self.stride, self.padding = list(kernel), list(stride), list(padding)

    @staticmethod
    def supports(pool):
        if type(pool) is not nn.MaxPool2d or pool.ceil_mode or pool.return_indices or _pair(pool.dilation) != (1, 1):
            return False
        return all(2 * p <= k for p, k in zip(_pair(pool.padding), _pair(pool.kernel_size)))

    @classmethod
    def from_pool(cls, pool):
        return cls(_pair(pool.kernel_size), _pair(pool.stride or pool.kernel_size), _pair(pool.padding))

    def forward(self, x):
        if not cpu_op_reason(x):
            return torch.ops.bsconv_fast.max_pool(x, self.kernel, self.stride, self.padding)
        return F.max_pool2d(x, self.kernel, self.stride, self.padding)

    def extra_repr(self):
        return f"kernel={self.kernel}, stride={self.stride}, padding={self.padding}"


class GlobalAvgPool(GlueOp):
    """Mean over H x W, as an (N, C, 1, 1) tensor (nn.AdaptiveAvgPool2d(1))."""

    backend = "cpu-pool"

    @staticmethod
    def supports(pool):
        return type(pool) is nn.AdaptiveAvgPool2d and _pair(pool.output_size) == (1, 1)

    def forward(self, x):
        if not cpu_op_reason(x):
            return torch.ops.bsconv_fast.global_avg_pool(x)
        return F.adaptive_avg_pool2d(x, 1)


# Activation codes (bsconv_fast.ACTIVATIONS) applied in place to a tensor the caller owns.
_IN_PLACE = {1: F.relu_, 2: lambda t: F.hardtanh_(t, 0.0, 6.0), 3: lambda t: F.hardswish(t, inplace=True),
             4: lambda t: F.silu(t, inplace=True)}


class Activation(nn.Module):
    """Activation `code` applied in place: it follows a convolution whose fresh output nobody else
    holds (the official HSwish module runs four ops where F.hardswish runs one)."""

    def __init__(self, code):
        super().__init__()
        self.code = code

    def forward(self, x):
        return _IN_PLACE[self.code](x)

    def extra_repr(self):
        return f"code={self.code}"


# The squeeze-excitation gates of the official models, matched by class name (bsconv is optional).
SE_GATES = {"HSigmoid": F.hardsigmoid, "Hardsigmoid": F.hardsigmoid, "Sigmoid": torch.sigmoid}


class SqueezeExcite(nn.Module):
    """x * gate(excite(squeeze(mean(x)))): the official SEUnit with its 1x1 convolutions on the GEMM
    micro-kernel (squeeze's activation in its store) and the global mean on bsconv_fast's pool."""

    def __init__(self, squeeze, excite, gate):
        super().__init__()
        self.pool, self.squeeze, self.excite = GlobalAvgPool(), squeeze, excite
        self.gate = gate

    def forward(self, x):
        s = self.excite(self.squeeze(self.pool(x)))
        return x * self.gate(s)
