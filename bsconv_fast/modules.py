"""Drop-in BSConv modules. Same constructor, children and state_dict keys as
bsconv.pytorch.BSConvU / BSConvS (bsconv==0.4.0), so official checkpoints load with strict=True;
forward runs the fused pointwise->depthwise op whenever a backend fits."""
import math
from collections import OrderedDict

import torch
import torch.nn as nn

from bsconv_fast import dispatch, functional


def bn_affine(bn):
    """An eval-mode BatchNorm as y = x * scale + shift (per channel): (scale, shift)."""
    scale = torch.rsqrt(bn.running_var + bn.eps)
    if bn.weight is not None:
        scale = scale * bn.weight
    shift = -bn.running_mean * scale
    if bn.bias is not None:
        shift = shift + bn.bias
    return scale, shift


def fold_bn(weight, bn, bias=None):
    """Fold an eval-mode BatchNorm that follows a conv (any groups; `bias` is the conv's, if any):
    returns the scaled weight and the bias that together replace conv + BN."""
    scale, shift = bn_affine(bn)
    if bias is not None:
        shift = shift + bias * scale
    return weight * scale.view(-1, 1, 1, 1), shift


def bn_uses_batch_stats(bn):
    buffers = bn._buffers  # direct, not nn.Module.__getattr__: asked on every call of a module with a BN
    mean = buffers["running_mean"] if "running_mean" in buffers else bn.running_mean
    return bn.training or mean is None


class PackedInference:
    """CPU inference through bsconv_fast::pw_dw_packed, with the weights packed once.

    Subclasses give `_problem(x)`, `_operands()` -> (pw_weight, dw_weight, mid_bias, bias) as the
    kernel takes them, `_source_tensors()` (what those operands are computed from), `_acts` and
    `_trainable()`. Plans are validated once per input signature; packed weights are cached until
    a source tensor changes (in-place updates bump version counters; .to() changes the storage)."""

    _acts = (0, 0)

    def _inference_plan(self, x):
        """Arguments of pw_dw_packed after the packed weights, or None when the packed CPU path does
        not apply: autograd needs the differentiable op, compile traces the plain op, and only the
        CPU backend has a packed layout."""
        if torch.compiler.is_compiling() or (torch.is_grad_enabled() and (x.requires_grad or self._trainable())):
            return None
        key = (x.shape[1:], x.dtype, x.device)
        plans = self.__dict__.setdefault("_bsconv_fast_plans", {})
        if key not in plans:
            problem = self._problem(x)
            fused = dispatch.choose(problem).backend.name.startswith("cpu-fused")
            out_channels = self._operands()[0].shape[0]
            plans[key] = (out_channels, list(problem.kernel), list(problem.stride), list(problem.padding),
                          list(problem.dilation), *self._acts) if fused else None
        return plans[key]

    def _pack(self):
        return torch.ops.bsconv_fast.pack(*self._operands())

    def _packed_weights(self):
        tensors = self._source_tensors()
        cached = self.__dict__.get("_bsconv_fast_packed")
        # Hot path (every inference call): the same tensor objects, storages and version counters.
        try:
            if cached is not None and len(cached[0]) == len(tensors) and all(
                    t is s and t._version == v and t.data_ptr() == p for t, (s, v, p) in zip(tensors, cached[0])):
                return cached[1]
        except RuntimeError:  # a copy made in inference mode: inference tensors, no version counter
            pass
        with torch.no_grad():
            packed = self._pack()
        # Inference tensors (made under inference_mode) carry no version counter, so an in-place
        # update could not be seen: never serve them from the cache.
        if not any(t.is_inference() for t in tensors):
            self.__dict__["_bsconv_fast_packed"] = (tuple((t, t._version, t.data_ptr()) for t in tensors), packed)
        return packed


class _FusedSequential(PackedInference, nn.Sequential):
    """Shared forward: children up to the last 1x1 run as they are; the last 1x1 (+ BN) and the
    depthwise conv run fused."""

    # Names of the last pointwise conv, the BN after it (if any) and the depthwise conv.
    _pw, _bn, _dw = "pw", "bn", "dw"

    @classmethod
    def from_children(cls, children):
        """Wrap existing child modules (a name -> module mapping; weights shared, nothing copied)."""
        module = cls.__new__(cls)
        nn.Sequential.__init__(module, OrderedDict(children))
        return module

    def _prefix(self, x):
        return x

    def _stage_bn(self):
        return self._modules.get(self._bn)  # direct: nn.Module.__getattr__ is slow on the hot path

    def _module_reason(self):
        """Why this module cannot run fused regardless of the input, or ''."""
        bn = self._stage_bn()
        if bn is not None and bn_uses_batch_stats(bn):
            return "BatchNorm between pointwise and depthwise uses batch statistics (training mode)"
        return ""

    def _problem(self, x):
        dw = getattr(self, self._dw)
        stride, padding, dilation = functional.check_args(
            x, getattr(self, self._pw).weight, dw.weight, dw.bias, dw.stride, dw.padding, dw.dilation)
        return functional.problem_of(x, dw.weight, stride, padding, dilation, dw.padding_mode)

    def choice(self, x):
        """(backend name, reason) for input x of the fused stage; reason is '' on a fused backend."""
        x = self._prefix(x)
        reason = self._module_reason()
        if reason:
            return "reference", reason
        chosen = dispatch.choose(self._problem(x))
        return chosen.backend.name, chosen.reason

    def forward(self, x):
        x = self._prefix(x)
        reason = self._module_reason()
        if reason:
            dispatch.warn_fallback(reason)
            return self._unfused_tail(x)
        plan = self._inference_plan(x)
        if plan is not None:
            return torch.ops.bsconv_fast.pw_dw_packed(x, self._packed_weights(), *plan)
        weight, mid_bias = self._folded_weights()
        dw = getattr(self, self._dw)
        return functional.pw_dw(x, weight, dw.weight, mid_bias, dw.bias, dw.stride, dw.padding,
                                dw.dilation, padding_mode=dw.padding_mode)

    def _folded_weights(self):
        """(pointwise weight, mid bias) with an eval-mode BN between the stages folded in."""
        weight = getattr(self, self._pw).weight
        bn = self._stage_bn()
        return fold_bn(weight, bn) if bn is not None else (weight, None)

    def _trainable(self):
        return any(p.requires_grad for p in self._source_tensors())

    def _source_tensors(self):
        # Read on every inference call (_packed_weights): a leaf child's tensors straight from its
        # dicts, ~7x cheaper than parameters() + buffers() (21 vs 3 us measured; the whole op on a
        # 16 -> 16 @4 layer takes ~9). A child with children of its own (a parametrized weight) keeps
        # its tensors there: the generic walk then.
        tensors = []
        for name in (self._pw, self._bn, self._dw):
            m = self._modules.get(name)
            if m is None:
                continue
            if m._modules:
                tensors += list(m.parameters()) + list(m.buffers())
            else:
                tensors += [t for d in (m._parameters, m._buffers) for t in d.values() if t is not None]
        return tensors

    def _operands(self):
        weight, mid_bias = self._folded_weights()
        dw = getattr(self, self._dw)
        return weight, dw.weight, mid_bias, dw.bias

    def _unfused_tail(self, x):
        names = [self._pw, self._bn, self._dw]
        for name in names:
            child = getattr(self, name, None)
            if child is not None:
                x = child(x)
        return x


class BSConvU(_FusedSequential):
    """BSConv-U: 1x1 pointwise (no bias), optional BN, kxk depthwise (children: pw, [bn], dw)."""

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True,
                 padding_mode="zeros", with_bn=False, bn_kwargs=None):
        super().__init__()
        bn_kwargs = bn_kwargs or {}
        self.add_module("pw", nn.Conv2d(in_channels, out_channels, (1, 1), bias=False))
        if with_bn:
            self.add_module("bn", nn.BatchNorm2d(out_channels, **bn_kwargs))
        self.add_module("dw", nn.Conv2d(out_channels, out_channels, kernel_size, stride, padding, dilation,
                                        groups=out_channels, bias=bias, padding_mode=padding_mode))


def mid_channels(in_channels, p, min_mid_channels):
    return min(in_channels, max(min_mid_channels, math.ceil(p * in_channels)))


class BSConvS(_FusedSequential):
    """BSConv-S: 1x1 (Cin->M), [BN], 1x1 (M->Cout), [BN], kxk depthwise
    (children: pw1, [bn1], pw2, [bn2], dw). Keeps the orthonormal regularisation `_reg_loss`."""

    _pw, _bn, _dw = "pw2", "bn2", "dw"

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, bias=True,
                 padding_mode="zeros", p=0.25, min_mid_channels=4, with_bn=False, bn_kwargs=None):
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be in [0, 1], got {p}")
        bn_kwargs = bn_kwargs or {}
        mid = mid_channels(in_channels, p, min_mid_channels)
        self.add_module("pw1", nn.Conv2d(in_channels, mid, (1, 1), bias=False))
        if with_bn:
            self.add_module("bn1", nn.BatchNorm2d(mid, **bn_kwargs))
        self.add_module("pw2", nn.Conv2d(mid, out_channels, (1, 1), bias=False))
        if with_bn:
            self.add_module("bn2", nn.BatchNorm2d(out_channels, **bn_kwargs))
        self.add_module("dw", nn.Conv2d(out_channels, out_channels, kernel_size, stride, padding, dilation,
                                        groups=out_channels, bias=bias, padding_mode=padding_mode))

    def _prefix(self, x):
        children = self._modules  # direct, as _stage_bn: this runs on every inference call
        x = children["pw1"](x)
        bn1 = children.get("bn1")
        return bn1(x) if bn1 is not None else x

    def _reg_loss(self):
        W = self[0].weight[:, :, 0, 0]
        WWt = torch.mm(W, torch.transpose(W, 0, 1))
        I = torch.eye(WWt.shape[0], device=WWt.device)
        return torch.norm(WWt - I, p="fro")

