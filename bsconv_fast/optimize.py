"""optimize(model): an inference copy with every pointwise->depthwise pair fused, BatchNorms folded
and activations fused as epilogues.

Patterns rewritten (official bsconv.pytorch model zoo and equivalent own modules):
  * BSConv-U / BSConv-S followed by BN and an activation (ConvBlock(conv=BSConv, bn, act) of the
    ResNets, Sequential(BSConvU, BN, ReLU) of the MobileNetV1-BSConvU transform): the BN after the
    depthwise folds into the depthwise weights and bias, the activation becomes the out epilogue;
    a BN between the stages folds into the pointwise weights plus an intermediate (mid) bias.
  * Inverted-residual blocks (MobileNetV2/V3 LinearBottleneck): 1x1 expand -> BN -> act ->
    depthwise -> BN -> act become one fused op with mid bias and both activations.
  * The 1x1 convolutions around them run as FusedPointwise (bsconv_fast::pw_packed on the same GEMM
    micro-kernel): inverted-residual projections take the skip connection in their store
    (InvertedResidual), ResNet units add their shortcut (x or its 1x1 projection) and apply the ReLU in
    the last fused layer's store, and run both fused layers as one op where that is faster
    (ResidualUnit), 1x1 heads and classifiers get their BN and act fused.
  * Chains of plain layers in nn.Sequential stacks (nested stacks walked as one, as torchvision's
    Conv2d -> BatchNorm2d -> activation stacks nest): a BSConv layer, or a 1x1 conv and a depthwise
    conv, each with the BN and activation that follow, become one FusedPwDw; any other conv takes the
    BN and activation after it (FusedPointwise, FusedConv, FusedDepthwise for a depthwise conv with no 1x1
    before it, or a Conv2d with the BN in its bias), a large nn.Linear its activation (FusedLinear, the 1x1
    op on the rows).
  * torchvision's blocks (classes from torchvision's modules, whose forward is known): ResNet's stem,
    BasicBlock and Bottleneck with BSConv 3x3 convs (bsconv's BSConvU_Replacer applied), MobileNetV2/V3's
    InvertedResidual with its skip, SqueezeExcitation.
  * Consecutive fused layers of nested nn.Sequential stacks (MobileNetV1's stages) pair up as FusedPair:
    one pw_dw_pair_packed call where the intermediate is large, the two layers otherwise.
  * Remaining ConvBlocks (plain conv -> BN -> act, the stems): the BN folds into the conv's bias, the
    activation into the store (FusedConv) or runs in place; the ResNet stem's max pooling joins it.
  * The memory-bound layers around them run bsconv_fast CPU ops (bsconv_fast.glue): a BatchNorm on
    its own (data_bn on the image) as one channels_last affine pass, max pooling, global average
    pooling, and squeeze-excitation units (pool, 1x1 + act, 1x1, gate, scale). A data_bn right before a
    FusedConv stem folds into it instead (FusedConv.with_input_affine): the stem applies it as it reads
    the image.
"""
import copy

import torch
import torch.nn as nn
import torch.nn.functional as F

from bsconv_fast import _ext, dispatch, frozen, functional, heap, ops, reference
from bsconv_fast.glue import (SE_GATES, Activation, GlobalAvgPool, InputAffine, MaxPool, SqueezeExcite, cpu_op_reason,
                              input_affine_reference)
from bsconv_fast.modules import BSConvS, BSConvU, PackedInference, bn_uses_batch_stats, fold_bn
from bsconv_fast.patching import patch

_ACT_CODES = {nn.ReLU: "relu", nn.ReLU6: "relu6", nn.Hardswish: "hardswish", nn.SiLU: "silu"}
# The official package's own activation modules, matched by name so bsconv stays optional.
_OFFICIAL_ACTS = {"HSwish": "hardswish", "Swish": "silu"}


def activation_code(module):
    """Activation code for `module` (None: identity), or -1 when it cannot be fused."""
    if module is None or isinstance(module, nn.Identity):
        return 0
    name = _ACT_CODES.get(type(module)) or _OFFICIAL_ACTS.get(type(module).__name__)
    return reference.ACTIVATIONS[name] if name else -1


def conv_with_bn(conv, bn):
    """The weight and bias of `conv` with the eval-mode BatchNorm `bn` after it folded in (`bn` None: its own)."""
    return (conv.weight, conv.bias) if bn is None else fold_bn(conv.weight, bn, conv.bias)


class FusedPwDw(PackedInference, nn.Module):
    """Inference layer act2(dw(act1(pw(x) + mid_bias)) + bias) with folded, frozen weights.

    `prefix` is an optional module run first (BSConv-S's first 1x1, its BN folded in)."""

    def __init__(self, pw_weight, mid_bias, dw_weight, bias, stride, padding, dilation, mid_act, out_act,
                 prefix=None):
        super().__init__()
        self.prefix = prefix
        for name, t in (("pw_weight", pw_weight), ("mid_bias", mid_bias), ("dw_weight", dw_weight), ("bias", bias)):
            self.register_buffer(name, None if t is None else t.detach().clone())
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.mid_act, self.out_act = mid_act, out_act

    @property
    def _acts(self):
        return (self.mid_act, self.out_act)

    def _operands(self):
        return self.pw_weight, self.dw_weight, self.mid_bias, self.bias

    def _source_tensors(self):
        b = self._buffers  # direct: nn.Module.__getattr__ costs a microsecond per call on the hot path
        return [t for t in (b["pw_weight"], b["dw_weight"], b["mid_bias"], b["bias"]) if t is not None]

    def _trainable(self):
        return False  # folded buffers; gradients can still flow to the input

    def extra_repr(self):
        acts = {v: k for k, v in reference.ACTIVATIONS.items()}
        return (f"{self.pw_weight.shape[1]}->{self.pw_weight.shape[0]}, kernel={tuple(self.dw_weight.shape[2:])}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"mid_act={acts[self.mid_act]}, out_act={acts[self.out_act]}, mid_bias={self.mid_bias is not None}")

    def _problem(self, x):
        stride, padding, dilation = functional.check_args(x, self.pw_weight, self.dw_weight, self.bias, self.stride,
                                                          self.padding, self.dilation, self.mid_bias)
        return functional.problem_of(x, self.dw_weight, stride, padding, dilation)

    def choice(self, x):
        if self.prefix is not None:
            x = self.prefix(x)
        chosen = dispatch.choose(self._problem(x))
        return chosen.backend.name, chosen.reason

    def forward(self, x, residual=None):
        """`residual` (the output's shape) is added before the output activation."""
        prefix = self._modules.get("prefix")  # None lives in __dict__; nn.Module.__getattr__ is slow here
        if prefix is not None:
            x = prefix(x)
        plan = self._inference_plan(x)
        if plan is not None and (residual is None or not (torch.is_grad_enabled() and residual.requires_grad)):
            return torch.ops.bsconv_fast.pw_dw_packed(x, self._packed_weights(), *plan, residual)
        args = (x, self.pw_weight, self.dw_weight, self.mid_bias, self.bias, self.stride, self.padding, self.dilation,
                self.mid_act)
        if residual is None:
            return functional.pw_dw(*args, self.out_act)
        return reference.activation(functional.pw_dw(*args, 0) + residual, self.out_act)


class FusedDepthwise(FusedPwDw):
    """Inference depthwise conv act(dw(x) + bias) with a folded, frozen weight, where no 1x1 conv comes before it to
    fuse with (MobileNetV2/V3's first block, a MobileNetV1 built from plain layers): bsconv_fast::dw_packed, the
    fused op's depthwise stage on the input rows (its packing holds identity pointwise weights, never read);
    F.conv2d otherwise. Not a fused pointwise->depthwise layer (bsconv_fast_fused does not count it)."""

    def __init__(self, dw_weight, bias, stride, padding, dilation, act):
        channels = dw_weight.shape[0]
        eye = torch.eye(channels, dtype=dw_weight.dtype, device=dw_weight.device)[:, :, None, None]
        super().__init__(eye, None, dw_weight, bias, stride, padding, dilation, 0, act)

    @staticmethod
    def supports(conv):
        return (type(conv) is nn.Conv2d and conv.groups == conv.in_channels == conv.out_channels
                and conv.padding_mode == "zeros" and not isinstance(conv.padding, str))

    @classmethod
    def from_conv(cls, conv, bn=None, act=0):
        weight, bias = conv_with_bn(conv, bn)
        return cls(weight, bias, conv.stride, conv.padding, conv.dilation, act)

    def choice(self, x):
        if self._inference_plan(x) is None:  # what forward then runs: F.conv2d
            return "reference", cpu_op_reason(x, self._buffers["dw_weight"]) or "no packed CPU plan for this input"
        return f"cpu-depthwise ({_ext.cpu_kernel_isa()})", ""

    def forward(self, x, residual=None):
        plan = self._inference_plan(x)
        if plan is not None and (residual is None or not (torch.is_grad_enabled() and residual.requires_grad)):
            return torch.ops.bsconv_fast.dw_packed(x, self._packed_weights(), *plan, residual)
        y = F.conv2d(x, self.dw_weight, self.bias, self.stride, self.padding, self.dilation, x.shape[1])
        return reference.activation(y if residual is None else y + residual, self.out_act)

    def extra_repr(self):
        acts = {v: k for k, v in reference.ACTIVATIONS.items()}
        return (f"channels={self.dw_weight.shape[0]}, kernel={tuple(self.dw_weight.shape[2:])}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, act={acts[self.out_act]}")


class FusedPointwise(PackedInference, nn.Module):
    """Inference 1x1 convolution act(conv1x1(x, weight, stride) + bias + residual) with a folded, frozen
    weight: bsconv_fast::pw_packed on CPU (float32 SIMD, float64 scalar), standard ops otherwise."""

    def __init__(self, weight, bias, stride=(1, 1), act=0):
        super().__init__()
        self.register_buffer("weight", weight.detach().clone())
        self.register_buffer("bias", None if bias is None else bias.detach().clone())
        self.stride, self.act = tuple(stride), act

    @staticmethod
    def supports(conv):
        return (type(conv) is nn.Conv2d and conv.kernel_size == (1, 1) and conv.groups == 1
                and conv.padding == (0, 0) and conv.dilation == (1, 1))

    @classmethod
    def from_conv(cls, conv, bn=None, act=0):
        weight, bias = conv_with_bn(conv, bn)
        return cls(weight, bias, conv.stride, act)

    def _source_tensors(self):
        b = self._buffers
        return [t for t in (b["weight"], b["bias"]) if t is not None]

    def _pack(self):
        return torch.ops.bsconv_fast.pack_pw(self.weight, self.bias)

    backend = "cpu-pointwise"

    def choice(self, x, residual=None):
        reason = cpu_op_reason(x, self._buffers["weight"], residual)
        return ("reference", reason) if reason else (f"{self.backend} ({_ext.cpu_kernel_isa()})", "")

    def forward(self, x, residual=None):
        if not cpu_op_reason(x, self._buffers["weight"], residual):
            return torch.ops.bsconv_fast.pw_packed(x, self._packed_weights(), self._buffers["weight"].shape[0],
                                                   list(self.stride), self.act, residual)
        y = F.conv2d(x, self.weight, self.bias, self.stride)
        return reference.activation(y if residual is None else y + residual, self.act)

    def extra_repr(self):
        acts = {v: k for k, v in reference.ACTIVATIONS.items()}
        return (f"{self.weight.shape[1]}->{self.weight.shape[0]}, stride={self.stride}, act={acts[self.act]}, "
                f"bias={self.bias is not None}")


class FusedLinear(FusedPointwise):
    """Inference nn.Linear act(x @ weight.T + bias) (+ the activation after it in a stack): the input's rows (its
    leading dims flattened) are the 1x1 op's pixels (bsconv_fast::pw_packed). At batch 1 the classifiers' weights
    (5-10 MB) come from memory or the last-level cache, and the op's thread split and kernels beat PyTorch's
    linear. Measured against it (AVX2 kernels, A/B in one process): torchvision mobilenet_v3_large, frozen, 0.95x
    the time on 1 thread, 0.88x on 2, mobilenet_v2 0.97x and 0.94x; the layer alone (1280 -> 1000, 2 threads)
    0.70x at batch 1, 0.51x at 8, 0.73x at 32, 0.85x at 128. (Batch 1 ran the GEMM's 1-pixel tile then; its
    matrix-vector kernel, gemv_panels, has since run in 0.65-0.82x that time.) Small layers stay nn.Linear
    (MIN_WEIGHTS): 512 -> 10 took 13 vs 5 us at batch 1 (the module's Python around the op), 1.5-1.8x at 8-32."""

    backend = "cpu-pointwise"
    MIN_WEIGHTS = 1 << 16

    def __init__(self, weight, bias, act=0):
        super().__init__(weight[:, :, None, None], bias, (1, 1), act)

    @classmethod
    def supports(cls, linear):
        return type(linear) is nn.Linear and linear.weight.numel() >= cls.MIN_WEIGHTS

    @classmethod
    def from_linear(cls, linear, act=0):
        return cls(linear.weight, linear.bias, act)

    def forward(self, x):
        if x.numel() == 0:
            return reference.activation(F.linear(x, self.weight[:, :, 0, 0], self.bias), self.act)
        rows = x.reshape(-1, x.shape[-1])  # any leading dims, as nn.Linear takes them
        return super().forward(rows[:, :, None, None]).reshape(*x.shape[:-1], -1)

    def extra_repr(self):
        return super().extra_repr().replace(", stride=(1, 1)", "")


class FusedConv(FusedPointwise):
    """Inference k x k convolution act(conv(x, weight, stride, padding) + bias) with few input channels
    (the image stems) and a folded, frozen weight, optionally followed by max pooling (`pool`: kernel,
    stride, padding) and optionally preceded by an input affine x * in_scale[c] + in_shift[c] (the
    models' input BatchNorm, see with_input_affine): bsconv_fast::conv_packed / conv_pool_packed on CPU
    (the GEMM micro-kernel reading each patch in place, gathered only at the borders; an NCHW image or
    one with the affine made channels_last a few rows at a time; the pooled stem never writes the
    convolution's output), standard ops otherwise.

    winograd (default: where it applies): the ResNet stem (7x7, stride 2, padding 3, at most 4 input
    channels) in float32 on the AVX2 / AVX-512 kernels runs Winograd's F(4x4, 4x4) on the space-to-depth
    image (backend 'cpu-conv-winograd'): 4x fewer multiply-adds; ResNet-18's stem with its pooling 0.52x
    the direct kernel's time on 1 thread, 0.54x on 2 (benchmarks/winograd_ab.py). Its float32 error is 3-10x
    the direct summation's (relative 7e-7 against float64, measured) and a NaN or inf input spreads over the
    4x4 output tiles that read it. optimize(model, winograd=False), or setting the attribute, keeps the direct kernel."""

    MAX_IN_CHANNELS = 8  # patches of Cin * KH * KW values per pixel: made for the 3-channel image stems
    MAX_POOL_KERNEL = 16  # the pooled stem keeps that many convolution rows per thread
    backend = "cpu-conv"

    def __init__(self, weight, bias, stride, padding, act=0, pool=None, in_affine=None, winograd=True):
        super().__init__(weight, bias, stride, act)
        self.stride, self.padding = list(stride), list(padding)
        self.pool = None if pool is None else [list(v) for v in pool]
        scale, shift = (None, None) if in_affine is None else (t.detach().clone() for t in in_affine)
        self.register_buffer("in_scale", scale)
        self.register_buffer("in_shift", shift)
        self.winograd = winograd

    @property
    def winograd(self):
        return self.__dict__["_winograd"]

    @winograd.setter
    def winograd(self, value):
        """Where it fits (winograd_fits); the weights are packed again for the other kernel."""
        self.__dict__["_winograd"] = bool(value) and self.winograd_fits(self.weight, self.stride, self.padding)
        self.__dict__.pop("_bsconv_fast_packed", None)

    @staticmethod
    def winograd_fits(weight, stride, padding):
        """Whether the Winograd stem computes this convolution (whatever the dtype and CPU)."""
        return tuple(weight.shape[2:]) == (7, 7) and weight.shape[1] <= 4 and stride == [2, 2] and padding == [3, 3]

    def _runs_winograd(self):
        return (self.winograd and self._buffers["weight"].dtype == torch.float32
                and _ext.cpu_kernel_isa() != "scalar")

    @classmethod
    def supports(cls, conv):
        return (type(conv) is nn.Conv2d and conv.groups == 1 and conv.dilation == (1, 1) and conv.kernel_size != (1, 1)
                and conv.padding_mode == "zeros" and not isinstance(conv.padding, str)
                and conv.in_channels <= cls.MAX_IN_CHANNELS)

    @classmethod
    def from_conv(cls, conv, bn=None, act=0):
        weight, bias = conv_with_bn(conv, bn)
        return cls(weight, bias, conv.stride, conv.padding, act)

    def with_pool(self, pool):
        """This stem followed by `pool` (an nn.MaxPool2d that MaxPool supports), or None."""
        if not MaxPool.supports(pool) or nn.modules.utils._pair(pool.kernel_size)[0] > self.MAX_POOL_KERNEL:
            return None
        p = MaxPool.from_pool(pool)
        return FusedConv(self.weight, self.bias, self.stride, self.padding, self.act, (p.kernel, p.stride, p.padding),
                         self._input_affine(), self.winograd)

    def _input_affine(self):
        b = self._buffers
        return None if b["in_scale"] is None else (b["in_scale"], b["in_shift"])

    def with_input_affine(self, affine):
        """This stem with the InputAffine `affine` (x * scale[c] + shift[c], an eval BatchNorm on the image)
        applied to its input first, or None where it has one already or the channels differ. The stem
        ops apply it as they read the rows, exactly where the separate op would have (the zero padding
        after it), and that op's pass over the image with its channels_last copy is gone (ResNet-18, 2
        threads, per-op replay: affine + stem 1575 -> 1543 us and 1541 -> 1474 us in two runs)."""
        scale, shift = affine._buffers["scale"], affine._buffers["shift"]
        if self._input_affine() is not None or scale.shape != (self.weight.shape[1],):
            return None
        return FusedConv(self.weight, self.bias, self.stride, self.padding, self.act, self.pool, (scale, shift),
                         self.winograd)

    def _pack(self):
        w = self.weight
        if self._runs_winograd():
            return torch.ops.bsconv_fast.pack_winograd(w, self.bias)
        return torch.ops.bsconv_fast.pack_pw(w.permute(0, 2, 3, 1).reshape(w.shape[0], -1, 1, 1), self.bias)

    def choice(self, x, residual=None):
        backend, reason = super().choice(x, residual)
        return (backend.replace(self.backend, "cpu-conv-winograd") if self._runs_winograd() else backend), reason

    def forward(self, x):
        b = self._buffers
        w, scale, shift = b["weight"], b["in_scale"], b["in_shift"]
        if not cpu_op_reason(x, w):
            args = (x, self._packed_weights(), w.shape[0], list(w.shape[2:]), self.stride, self.padding, self.act)
            if self.pool is None:
                return torch.ops.bsconv_fast.conv_packed(*args, scale, shift, self._runs_winograd())
            return torch.ops.bsconv_fast.conv_pool_packed(*args, *self.pool, scale, shift, self._runs_winograd())
        if scale is not None:
            x = input_affine_reference(x, scale, shift)
        y = reference.activation(F.conv2d(x, w, self.bias, self.stride, self.padding), self.act)
        return y if self.pool is None else F.max_pool2d(y, *self.pool)

    def extra_repr(self):
        pool = "" if self.pool is None else f", max_pool={self.pool}"
        affine = "" if self._input_affine() is None else ", input_affine=True"
        winograd = ", winograd=True" if self.winograd else ""
        return (f"{super().extra_repr()}, kernel={tuple(self.weight.shape[2:])}, padding={self.padding}{pool}{affine}"
                f"{winograd}")


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 block for inference: fused expand -> depthwise, the squeeze-excitation unit if
    any, then the projection, whose store adds the skip connection."""

    def __init__(self, expand_dw, se, project, skip):
        super().__init__()
        self.expand_dw, self.se, self.project, self.skip = expand_dw, se, project, skip

    def forward(self, x):
        y = self.expand_dw(x)
        if self.se is not None:
            y = self.se(y)
        return self.project(y, x if self.skip else None)


class _PairedLayers(nn.Module):
    """Two FusedPwDw layers, `first` feeding `last`, that run as one bsconv_fast::pw_dw_pair_packed call
    where that pays: the second reads the first's output rows from a ring in the cache as they are made,
    so the intermediate never goes to memory (see pair_plan for where)."""

    # Where pairs pay (A/B in one process, frozen models, 2 threads, batch 1): intermediates of at least
    # 512 KiB per image and 56 rows. resnet18_bsconvu stage 1 (64 channels at 56x56, 784 KiB): its two
    # units 755 vs 802 us, the model 1.008-1.022x faster (four runs), 1.024x on 1 thread, 1.040x at
    # batch 8. mobilenetv1_w1_bsconvu, each pair alone: 32->64 @112 with 64->128 s2 (3 MiB) 1.012x and
    # 1.015x, 128->128 @56 with 128->256 s2 (1.5 MiB) 1.023x and 1.023x; both: 1.006x, 1.011x, 0.999x,
    # 1.011x, 1 thread 1.023x, batch 8 1.009x. At 28-32 rows the pair's row bands recompute the first
    # layer's halo rows and one layer gives up its channel split: resnet18's 128-channel unit at 28x28
    # 591 vs 551 us; mobilenetv1 with its 256-channel pair at 28x28 paired too 0.982x and 0.984x;
    # cifar_mobilenetv1's 128-channel pair at 32x32 0.987x.
    PAIR_MIN_BYTES = 512 << 10
    PAIR_MIN_ROWS = 56

    def pair_plan(self, x):
        """(first's, last's) arguments of pw_dw_pair_packed for input x, or None: the layers run one by one."""
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and x.requires_grad):
            return None  # what the layers do then: plain ops for compile, the differentiable op for autograd
        key = (x.shape[1:], x.dtype, x.device)
        plans = self.__dict__.setdefault("_bsconv_fast_pair_plans", {})
        if key not in plans:
            plans[key] = self._pair_plan(x)
        return plans[key]

    def _pair_allowed(self, x, out_shape):
        """Whether the call this module makes can be the pair's (ResidualUnit: x added, so shapes match)."""
        return True

    def _pair_plan(self, x):
        first, last = self.first, self.last
        if not (isinstance(first, FusedPwDw) and isinstance(last, FusedPwDw)) or first.prefix is not None \
                or last.prefix is not None or x.dim() != 4:
            return None
        a = first._inference_plan(x)
        if a is None:
            return None
        mid = x.new_empty((0, *ops.out_shape(x, *a[:5])[1:]))  # the first layer's output, as a shape
        b = last._inference_plan(mid)
        if b is None or not self._pair_allowed(x, ops.out_shape(mid, *b[:5])):
            return None
        _, c, h, w = mid.shape
        if h < self.PAIR_MIN_ROWS or c * h * w * x.element_size() < self.PAIR_MIN_BYTES:
            return None
        return a, b

    def choice(self, x):
        """For explain(): the pair's backend when both layers run as one call; None when each layer runs
        (and reports) on its own."""
        if self.pair_plan(x) is None:
            return None
        return f"cpu-fused-pair ({_ext.cpu_kernel_isa()})", ""

    def _run_pair(self, x, plan, residual):
        return torch.ops.bsconv_fast.pw_dw_pair_packed(x, self.first._packed_weights(), *plan[0],
                                                       self.last._packed_weights(), *plan[1], residual)


class FusedPair(_PairedLayers):
    """Two consecutive FusedPwDw layers of a sequential stack (MobileNetV1's), as one call where it pays."""

    def __init__(self, first, last):
        super().__init__()
        self.first, self.last = first, last

    def forward(self, x):
        plan = self.pair_plan(x)
        return self.last(self.first(x)) if plan is None else self._run_pair(x, plan, False)


class ResidualUnit(_PairedLayers):
    """ResNet basic unit for inference: relu(body(x) + shortcut(x)), the add and the ReLU in the last
    fused layer's store, which takes x (identity shortcut) or the 1x1 projection of x as its residual.
    The projection runs first, while x is still in the cache from the previous layer: 1.006-1.017x
    faster resnet18_bsconvu than projecting last with the body's output as the projection's residual
    (A/B in one process, 2 threads; 1.011x on 1 thread). With an identity shortcut both fused layers
    run as one call where that pays (_PairedLayers), x read once more for the residual while it is
    still in the cache."""

    def __init__(self, first, last, projection):
        super().__init__()
        self.first, self.last, self.projection = first, last, projection

    def _pair_allowed(self, x, out_shape):
        return self.projection is None and tuple(out_shape[1:]) == tuple(x.shape[1:])

    def forward(self, x):
        if self.projection is None:
            plan = self.pair_plan(x)
            if plan is not None:
                return self._run_pair(x, plan, True)
            return self.last(self.first(x), x)
        shortcut = self.projection(x)
        return self.last(self.first(x), shortcut)


def _is_stack(module):
    """An nn.Sequential that runs its children in order (not a subclass with a forward of its own, such
    as the BSConv modules)."""
    return isinstance(module, nn.Sequential) and type(module).forward is nn.Sequential.forward


def _sequential_layers(module):
    """(parent, name, layer) of the layers a stack of nested stacks runs one after the other, in that
    order: each one's output is the next one's input (nn.Identity layers, no-ops, skipped)."""
    for name, child in module._modules.items():
        if _is_stack(child):
            yield from _sequential_layers(child)
        elif not isinstance(child, nn.Identity):
            yield module, name, child


def _outer_stacks(module):
    """The stacks below and at `module` that are not a child of another stack (nested ones are walked with
    it by _sequential_layers)."""
    stacks = [m for m in module.modules() if _is_stack(m)]
    return [stack for stack in stacks if not any(stack in m._modules.values() for m in stacks)]


def _pairs(layer):
    """Whether `layer` can be one of a FusedPair (a pointwise->depthwise layer without a prefix)."""
    return type(layer) is FusedPwDw and layer.prefix is None


def pair_sequential_layers(module):
    """Wrap consecutive FusedPwDw layers of nested stacks (nn.Sequential) below `module` in FusedPair, two
    at a time in order (the pair decides per input whether it runs as one call)."""
    for stack in _outer_stacks(module):
        layers = list(_sequential_layers(stack))
        i = 0
        while i + 1 < len(layers):
            (pa, na, a), (pb, nb, b) = layers[i], layers[i + 1]
            if _pairs(a) and _pairs(b):
                pa._modules[na], pb._modules[nb] = FusedPair(a, b), nn.Identity()
                i += 2
            else:
                i += 1


def _stack_parts(layers, i):
    """layers[i] with the eval-mode BatchNorm and then the fusable activation that directly follow it (each
    None where absent), and the index after them."""
    bn = act = None
    j = i + 1
    if j < len(layers) and type(layers[j]) is nn.BatchNorm2d and _bn_ok(layers[j]):
        bn, j = layers[j], j + 1
    if j < len(layers) and activation_code(layers[j]) > 0:
        act, j = layers[j], j + 1
    return (layers[i], bn, act), j


def _fuse_in_stack(layers, i):
    """The module that replaces the chain of layers starting at layers[i] and the index after that chain,
    or (None, i + 1): a BSConv layer, or a 1x1 conv and a depthwise conv, each with the BN and activation
    that follow, fused (FusedPwDw); a depthwise conv alone (FusedDepthwise) or any other conv with its BN and
    activation folded (fold_conv); a large nn.Linear with its activation (FusedLinear)."""
    (first, bn, act), j = _stack_parts(layers, i)
    if isinstance(first, (BSConvU, BSConvS)):
        return fuse_bsconv(first, bn, act), j
    if FusedLinear.supports(first):  # its activation only (a BatchNorm2d does not follow a Linear)
        return (FusedLinear.from_linear(first, activation_code(act)), j) if bn is None else (None, i + 1)
    if type(first) is not nn.Conv2d:
        return None, i + 1
    if j < len(layers):
        (dw, bn2, act2), k = _stack_parts(layers, j)
        fused = fuse_pw_dw(first, bn, act, dw, bn2, act2)
        if fused is not None:
            return fused, k
    if FusedDepthwise.supports(first):  # a depthwise conv with no 1x1 conv before it
        return FusedDepthwise.from_conv(first, bn, activation_code(act)), j
    return fold_conv(first, bn, act), j


def fuse_stacks(module):
    """Fuse chains of plain layers in the nn.Sequential stacks below and at `module`, nested stacks walked as
    one (torchvision-style Conv2d -> BatchNorm2d -> activation stacks, nn.Sequential(BSConvU, BN, ReLU)):
    see _fuse_in_stack. A chain's first layer becomes the fused module, the rest nn.Identity
    (collapse_stacks tidies up)."""
    for stack in _outer_stacks(module):
        layers = list(_sequential_layers(stack))
        modules = [layer for _, _, layer in layers]
        i = 0
        while i < len(layers):
            new, j = _fuse_in_stack(modules, i)
            if new is not None:
                for k, (parent, name, _) in enumerate(layers[i:j]):
                    parent._modules[name] = new if k == 0 else nn.Identity()
            i = j


def collapse_stacks(module):
    """Below `module`, replace each stack that fuse_stacks left with nn.Identity layers and at most one other
    layer by that layer (or nn.Identity)."""
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        collapse_stacks(child)
        if not _is_stack(child):
            continue
        layers = list(child._modules.values())
        rest = [m for m in layers if not isinstance(m, nn.Identity)]
        if len(rest) <= 1 < len(layers):
            module._modules[name] = rest[0] if rest else nn.Identity()


def _bn_ok(bn):
    return bn is None or (isinstance(bn, nn.BatchNorm2d) and not bn_uses_batch_stats(bn))


def fuse_bsconv(block, bn=None, act=None):
    """FusedPwDw for a (patched) BSConv-U/-S module followed by an optional BN and activation."""
    code = activation_code(act)
    inner_bn = block._stage_bn()
    if code < 0 or not _bn_ok(bn) or not _bn_ok(inner_bn) or block.dw.padding_mode != "zeros":
        return None
    weight, mid_bias = block._folded_weights()
    dw_weight, bias = block.dw.weight, block.dw.bias
    if bn is not None:
        dw_weight, bias = fold_bn(dw_weight, bn, bias)
    prefix = None
    if isinstance(block, BSConvS):
        bn1 = getattr(block, "bn1", None)
        if not _bn_ok(bn1):
            return None
        prefix = FusedPointwise.from_conv(block.pw1, bn1)
    dw = block.dw
    return FusedPwDw(weight, mid_bias, dw_weight, bias, dw.stride, dw.padding, dw.dilation, 0, code, prefix)


def _is_conv_block(m):
    return type(m).__name__ == "ConvBlock" and hasattr(m, "conv") and hasattr(m, "use_bn")


def _block_parts(block):
    return block.conv, getattr(block, "bn", None) if block.use_bn else None, (
        getattr(block, "activation", None) if block.use_activation else None)


def fuse_pw_dw(pw, bn1, act1, dw, bn2, act2):
    """FusedPwDw for 1x1 conv -> BN -> act -> depthwise conv -> BN -> act (BNs and acts optional: None),
    or None where that chain does not fuse."""
    c1, c2 = activation_code(act1), activation_code(act2)
    if (not FusedPointwise.supports(pw) or pw.stride != (1, 1) or not FusedDepthwise.supports(dw)
            or dw.in_channels != pw.out_channels or min(c1, c2) < 0 or not _bn_ok(bn1) or not _bn_ok(bn2)):
        return None
    weight, mid_bias = pw.weight, pw.bias
    if bn1 is not None:
        weight, mid_bias = fold_bn(weight, bn1, mid_bias)
    dw_weight, bias = dw.weight, dw.bias
    if bn2 is not None:
        dw_weight, bias = fold_bn(dw_weight, bn2, bias)
    return FusedPwDw(weight, mid_bias, dw_weight, bias, dw.stride, dw.padding, dw.dilation, c1, c2)


def fuse_inverted_residual(expand, depthwise):
    """FusedPwDw for ConvBlock(1x1 conv, BN, act) -> ConvBlock(depthwise conv, BN, act)."""
    return fuse_pw_dw(*_block_parts(expand), *_block_parts(depthwise))


def pointwise_from_block(block):
    """FusedPointwise for ConvBlock(1x1 conv, BN, act), or None."""
    return pointwise_from_parts(*_block_parts(block))


def pointwise_from_parts(conv, bn, act):
    """FusedPointwise for 1x1 conv -> BN -> act (BN and act optional: None), or None."""
    code = activation_code(act)
    if not FusedPointwise.supports(conv) or not _bn_ok(bn) or code < 0:
        return None
    return FusedPointwise.from_conv(conv, bn, code)


def fold_conv_block(block):
    """fold_conv for a ConvBlock's conv, BN and activation."""
    return fold_conv(*_block_parts(block))


def fold_conv(conv, bn, act):
    """conv -> BN -> act (BN and act optional: None) with the BN folded: a FusedPointwise for 1x1 convs, a
    FusedConv for the few-channel convs it supports, else a plain Conv2d (with the BN in its bias) and the
    act; None where nothing folds."""
    pointwise = pointwise_from_parts(conv, bn, act)
    if pointwise is not None:
        return pointwise
    if FusedConv.supports(conv) and _bn_ok(bn) and activation_code(act) >= 0:
        return FusedConv.from_conv(conv, bn, activation_code(act))
    if type(conv) is not nn.Conv2d or not _bn_ok(bn) or bn is None:
        return None
    weight, bias = fold_bn(conv.weight, bn, conv.bias)
    folded = copy.deepcopy(conv)
    folded.weight = nn.Parameter(weight.detach().clone(), requires_grad=False)
    folded.bias = nn.Parameter(bias.detach().clone(), requires_grad=False)
    if act is None:
        return folded
    code = activation_code(act)
    return nn.Sequential(folded, Activation(code) if code > 0 else act)


def rewrite_linear_bottleneck(block):
    """InvertedResidual for an official LinearBottleneck (expand and depthwise fused), or None."""
    fused = fuse_inverted_residual(block.conv1, block.conv2)
    project = pointwise_from_block(block.conv3) if _is_conv_block(block.conv3) else None
    if fused is None or project is None or (block.use_res_skip and project.act != 0):
        return None  # an activation before the skip add cannot go into the store
    se = None
    if block.use_se:
        se = rewrite_se_unit(block.se_unit)
        if se is None:
            se = block.se_unit
            _rewrite(se)
    return InvertedResidual(fused, se, project, block.use_res_skip)


def rewrite_se_unit(unit):
    """SqueezeExcite for an official SEUnit (pool -> 1x1 -> act -> 1x1 -> gate, then x * gate), or None."""
    return squeeze_excite(unit.pool, unit.conv1, unit.activation1, unit.conv2, unit.activation2)


def squeeze_excite(pool, squeeze, act, excite, gate):
    """SqueezeExcite for pool -> 1x1 squeeze -> act -> 1x1 excite -> gate, then x * gate (official SEUnit,
    torchvision's SqueezeExcitation), or None."""
    code = activation_code(act)
    gate_fn = SE_GATES.get(type(gate).__name__)
    if (not GlobalAvgPool.supports(pool) or not FusedPointwise.supports(squeeze)
            or not FusedPointwise.supports(excite) or code < 0 or gate_fn is None):
        return None
    return SqueezeExcite(FusedPointwise.from_conv(squeeze, act=code), FusedPointwise.from_conv(excite), gate_fn)


def rewrite_standard_unit(unit):
    """ResidualUnit for an official ResNet StandardUnit whose convolutions fuse, or None."""
    first, last = _fused_conv_block(unit.conv1), _fused_conv_block(unit.conv2)
    if not isinstance(unit.relu, nn.ReLU) or first is None or last is None or last.out_act != 0:
        return None
    projection = None
    if unit.use_projection:
        if not _is_conv_block(unit.projection) or _block_parts(unit.projection)[2] is not None:
            return None
        conv, bn, _ = _block_parts(unit.projection)
        if not FusedPointwise.supports(conv) or not _bn_ok(bn):
            return None
        projection = FusedPointwise.from_conv(conv, bn)
    last.out_act = reference.ACTIVATIONS["relu"]
    return ResidualUnit(first, last, projection)


def _is_torchvision(module, name):
    """Whether `module` is torchvision's class `name`: its forward is known, so its layers can be rewritten (a
    look-alike of another origin may run the same layers differently)."""
    return type(module).__name__ == name and type(module).__module__.startswith("torchvision.")


# torchvision's ResNet blocks; their forward: BasicBlock conv1 -> bn1 -> relu -> conv2 -> bn2, Bottleneck conv1 -> bn1
# -> relu -> conv2 -> bn2 -> relu -> conv3 -> bn3; then + x or downsample(x), relu.
_TV_RESNET_BLOCKS = ("BasicBlock", "Bottleneck")

# torchvision.ops.SqueezeExcitation's forward: these layers in order, then scale * input.
_TV_SE = ("avgpool", "fc1", "activation", "fc2", "scale_activation")


class ResidualChain(nn.Module):
    """body(x), then `last` (a FusedPointwise or FusedPwDw), whose store adds the shortcut: x itself, or
    shortcut(x) computed first (see ResidualUnit). torchvision's ResNet Bottleneck and InvertedResidual."""

    def __init__(self, body, last, shortcut):
        super().__init__()
        self.body, self.last, self.shortcut = body, last, shortcut

    def forward(self, x):
        residual = x if self.shortcut is None else self.shortcut(x)
        return self.last(self.body(x), residual)


def _only_layer(module):
    """The one layer `module` runs: itself, or a stack's single layer besides nn.Identity (None if several)."""
    if not _is_stack(module):
        return module
    layers = [layer for _, _, layer in _sequential_layers(module)]
    return layers[0] if len(layers) == 1 else None


def _projection(downsample):
    """FusedPointwise for a shortcut's projection (1x1 conv -> BN, fused by fuse_stacks), None for no
    projection, False where it does not fuse."""
    if downsample is None:
        return None
    layer = _only_layer(downsample)
    return layer if type(layer) is FusedPointwise and layer.act == 0 else False


def rewrite_resnet_block(block):
    """ResidualUnit (BasicBlock) or ResidualChain (Bottleneck) for a torchvision ResNet block whose 3x3 convs
    are BSConv layers (bsconv.pytorch.BSConvU_Replacer applied to the model), or None."""
    relu, code = block.relu, reference.ACTIVATIONS["relu"]
    projection = _projection(block.downsample)
    if not isinstance(relu, nn.ReLU) or projection is False or not isinstance(block.conv2, (BSConvU, BSConvS)):
        return None
    if type(block).__name__ == "BasicBlock":
        first = fuse_bsconv(block.conv1, block.bn1, relu) if isinstance(block.conv1, (BSConvU, BSConvS)) else None
        last = fuse_bsconv(block.conv2, block.bn2)
        if first is None or last is None:
            return None
        last.out_act = code
        return ResidualUnit(first, last, projection)
    first, mid = pointwise_from_parts(block.conv1, block.bn1, relu), fuse_bsconv(block.conv2, block.bn2, relu)
    last = pointwise_from_parts(block.conv3, block.bn3, None)
    if first is None or mid is None or last is None or type(last) is not FusedPointwise:
        return None
    last.act = code
    return ResidualChain(nn.Sequential(first, mid), last, projection)


def fold_resnet_block_bns(block):
    """A torchvision ResNet block that rewrite_resnet_block leaves (dense 3x3 convs: no replacer applied): each BN
    folded, in place, into the conv before it (fold_conv: the 1x1 convs become FusedPointwise, the 3x3 ones keep
    PyTorch's conv with the BN in their bias), the BN an nn.Identity that the block's forward still calls."""
    names = ("1", "2") if type(block).__name__ == "BasicBlock" else ("1", "2", "3")
    for i in names:
        conv, bn = getattr(block, "conv" + i), getattr(block, "bn" + i)
        folded = fold_conv(conv, bn, None) if bn is not None and type(conv) is nn.Conv2d else None
        if folded is not None:
            setattr(block, "conv" + i, folded)
            setattr(block, "bn" + i, nn.Identity())


def rewrite_skip_stack(block):
    """ResidualChain for torchvision's MobileNetV2/V3 InvertedResidual with its skip connection (x + stack(x),
    the stack in `conv` (V2) or `block` (V3)) once fuse_stacks has fused the stack's last 1x1 conv with its
    BN: the projection's store adds x. None without the skip or where the projection did not fuse."""
    stack = block._modules.get("conv", block._modules.get("block"))
    if not block.use_res_connect or not _is_stack(stack):
        return None
    layers = [layer for _, _, layer in _sequential_layers(stack)]
    if len(layers) < 2 or type(layers[-1]) is not FusedPointwise or layers[-1].act != 0:
        return None
    _rewrite(stack)  # the layers before the projection (a squeeze-excitation unit's)
    layers = [layer for _, _, layer in _sequential_layers(stack)]
    return ResidualChain(nn.Sequential(*layers[:-1]), layers[-1], None)


def fuse_resnet_stem(module):
    """torchvision's ResNet stem (conv1 -> bn1 -> relu -> maxpool, run in that order by its forward) as one
    FusedConv with its pooling in conv1, the other three nn.Identity; `module` is left alone if it is not
    such a ResNet or the stem does not fuse."""
    if not _is_torchvision(module, "ResNet"):
        return
    stem = fold_conv(module.conv1, module.bn1, module.relu) if isinstance(module.relu, nn.ReLU) else None
    stem = stem.with_pool(module.maxpool) if isinstance(stem, FusedConv) else None
    if stem is not None:
        module.conv1, module.bn1, module.relu, module.maxpool = stem, nn.Identity(), nn.Identity(), nn.Identity()


def _fused_conv_block(block):
    return fuse_bsconv(*_block_parts(block)) if _is_conv_block(block) and isinstance(block.conv, (BSConvU, BSConvS)) \
        else None


def _rewrite(module):
    """Rewrite patterns below `module` in place."""
    for name, child in list(module._modules.items()):
        new = None
        kind = type(child).__name__
        if kind == "LinearBottleneck" and _is_conv_block(getattr(child, "conv1", None)):
            new = rewrite_linear_bottleneck(child)
            if new is None:  # at least fuse expand -> depthwise
                fused = fuse_inverted_residual(child.conv1, child.conv2)
                if fused is not None:
                    child.conv1, child.conv2 = fused, nn.Identity()
        elif kind == "StandardUnit" and hasattr(child, "conv1") and hasattr(child, "relu"):
            new = rewrite_standard_unit(child)
        elif kind in _TV_RESNET_BLOCKS and _is_torchvision(child, kind):
            new = rewrite_resnet_block(child)
            if new is None:
                fold_resnet_block_bns(child)
        elif _is_torchvision(child, "InvertedResidual"):
            new = rewrite_skip_stack(child)
        elif kind == "SEUnit" and hasattr(child, "conv1") and hasattr(child, "activation2"):
            new = rewrite_se_unit(child)
        elif _is_torchvision(child, "SqueezeExcitation"):
            new = squeeze_excite(*(getattr(child, a) for a in _TV_SE))
        elif kind == "InitUnitLarge" and _is_conv_block(getattr(child, "conv", None)) and hasattr(child, "pool"):
            stem = fold_conv_block(child.conv)  # the ResNet stem: conv -> BN -> ReLU -> max pool in one op
            new = stem.with_pool(child.pool) if isinstance(stem, FusedConv) else None
        elif _is_conv_block(child) and isinstance(child.conv, (BSConvU, BSConvS)):
            new = fuse_bsconv(*_block_parts(child))
        elif isinstance(child, (BSConvU, BSConvS)):
            new = fuse_bsconv(child)
            if new is None:
                continue  # keep the module whole: its forward uses its own children
        elif _is_conv_block(child):
            new = fold_conv_block(child)
        elif FusedPointwise.supports(child):
            new = FusedPointwise.from_conv(child)
        elif FusedLinear.supports(child):
            new = FusedLinear.from_linear(child)
        elif type(child) is nn.BatchNorm2d and not bn_uses_batch_stats(child):
            new = InputAffine.from_bn(child)  # a BN on its own (the official models' data_bn)
        elif MaxPool.supports(child):
            new = MaxPool.from_pool(child)
        elif GlobalAvgPool.supports(child):
            new = GlobalAvgPool()
        if new is not None:
            module._modules[name] = new
        else:
            _rewrite(child)


def fold_input_affines(module):
    """Fold each InputAffine followed by a FusedConv (the official models' data_bn before their stem) into
    that stem (FusedConv.with_input_affine); the InputAffine becomes nn.Identity."""
    for m in list(module.modules()):
        if not _is_stack(m):
            continue
        names = list(m._modules)
        for a, b in zip(names, names[1:]):
            first, stem = m._modules[a], m._modules[b]
            if isinstance(first, InputAffine) and isinstance(stem, FusedConv):
                folded = stem.with_input_affine(first)
                if folded is not None:
                    m._modules[a], m._modules[b] = nn.Identity(), folded


def _first_real_leaf(module):
    """The first module without children in registration order, nn.Identity skipped (the official models'
    data_bn, or their stem once it is folded in), or None."""
    for m in module.modules():
        if not m._modules and not isinstance(m, nn.Identity):
            return m
    return None


def _to_channels_last(module, args):
    x = args[0]
    if isinstance(x, torch.Tensor) and x.dim() == 4:
        return (x.contiguous(memory_format=torch.channels_last),) + tuple(args[1:])
    return None


def _conv_weights_channels_last(model):
    """The weights of the nn.Conv2d layers left to PyTorch in channels_last, as their inputs are: oneDNN otherwise
    reorders them on every call (torchvision's plain resnet18, 2 threads: 0.90x the time, measured)."""
    for m in model.modules():
        if type(m) is nn.Conv2d and m.weight.dim() == 4:
            m.weight.data = m.weight.data.contiguous(memory_format=torch.channels_last)


def _optimized_copy(model, winograd):
    """optimize()'s rewritten copy of `model` and its number of fused pointwise->depthwise layers."""
    model = copy.deepcopy(model).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    model = patch(model)
    if isinstance(model, (BSConvU, BSConvS)):  # a single layer: fused whole, its children left as they are
        model = fuse_bsconv(model) or model
        fused = int(isinstance(model, FusedPwDw))
    else:
        for module in list(model.modules()):
            fuse_resnet_stem(module)
        fuse_stacks(model)
        _rewrite(model)
        collapse_stacks(model)
        pair_sequential_layers(model)
        fold_input_affines(model)
        if not winograd:
            for module in model.modules():
                if isinstance(module, FusedConv):
                    module.winograd = False
        fused = sum(type(m) is FusedPwDw for m in model.modules())
    return model, fused


def optimize(model, channels_last=True, tune_malloc=True, verbose=False, freeze=False, winograd=True):
    """Inference copy of `model` (eval mode, no gradients): BSConv layers and inverted-residual blocks
    fused with their BatchNorms and activations, other conv+BN pairs folded, and the input turned
    channels_last on entry. The original model is left untouched.

    freeze: return bsconv_fast.freeze() of that copy, which replays the op calls of a recorded forward
    without the per-layer Python (whole models at batch 1 measured 1.00-1.66x faster, more where Python is
    slow; see bsconv_fast.freeze).

    winograd: run the ResNet stems (7x7, stride 2) by Winograd's F(4x4, 4x4) where it applies (see FusedConv):
    ~0.5x the stem's time, float32 error 3-10x the direct summation's (relative 7e-7); False keeps the
    direct kernel.

    tune_malloc: also set the process's glibc heap thresholds so that activations freed by one
    forward are reused by the next instead of page-faulting again (see bsconv_fast.heap; it is
    process-wide and affects every library in the process)."""
    # Ordinary tensors also when called under torch.inference_mode: inference tensors carry no version
    # counter, so packed weights made from them could not be cached (PackedInference) and every forward
    # packed them again (measured: resnet18 optimized inside inference_mode 8.2 vs 5.9 ms, 2 threads).
    with torch.inference_mode(False), torch.no_grad():
        model, fused = _optimized_copy(model, winograd)
        if channels_last:
            _conv_weights_channels_last(model)
    # InputAffine and the stems write channels_last themselves from any input layout
    if channels_last and not isinstance(_first_real_leaf(model), (InputAffine, FusedConv)):
        model.register_forward_pre_hook(_to_channels_last)
    tuned = tune_malloc and heap.tune_malloc()
    object.__setattr__(model, "bsconv_fast_fused", fused)
    if verbose:
        print(f"bsconv_fast.optimize: {fused} fused pointwise->depthwise layers"
              + ("; glibc heap thresholds set (bsconv_fast.heap)" if tuned else ""))
    return frozen.freeze(model) if freeze else model
