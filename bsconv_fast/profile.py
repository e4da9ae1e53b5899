"""Parameter, FLOP and byte counts per module.

`flops` follows the convention of the official bsconv.pytorch.ModelProfiler (the figures of the
BSConv README): conv = output pixels x weight elements (+ one per output element for a bias),
linear alike, BN = 2 per element (1 without affine), ReLU and pooling = 1 per element, other
modules 0. `macs` are the multiply-adds of convolutions and linear layers; `real_flops` counts each
multiply-add as 2 FLOPs plus the element-wise work. `min_bytes` is what a module must move at
least: its input, its output and its parameters once; for a fused BSConv layer the intermediate
is not included, which is the point of fusing it.
"""
import torch
import torch.nn as nn

from bsconv_fast import ops
from bsconv_fast.modules import BSConvS, BSConvU
from bsconv_fast.optimize import FusedDepthwise, FusedPointwise, FusedPwDw, _PairedLayers

FUSED = (BSConvU, BSConvS, FusedPwDw)  # counted as one unit; their children do not run

_POOLS = (nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
          nn.AdaptiveMaxPool1d, nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.AdaptiveAvgPool1d,
          nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


def _count_params(modules):
    return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)


def _conv_counts(weight, bias, out_pixels, out_elems):
    """(paper flops, macs) of a convolution given output pixels (N*OH*OW) and output elements."""
    macs = out_pixels * weight.numel()
    return macs + (out_elems if bias is not None else 0), macs


def _leaf_counts(module, x, y):
    """(paper flops, macs) of a leaf module, following ModelProfiler.count_flops."""
    if isinstance(module, (nn.Conv1d, nn.Conv2d, nn.Conv3d)):
        return _conv_counts(module.weight, module.bias, y[:, 0].numel(), y.numel())
    if isinstance(module, nn.Linear):
        macs = x.numel() * y[-1].numel()
        return macs + (y.numel() if module.bias is not None else 0), macs
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)):
        return x.numel() * (2 if module.affine else 1), 0
    if isinstance(module, nn.ReLU):
        return y.numel(), 0
    if isinstance(module, _POOLS):
        return x.numel(), 0
    return 0, 0


def _dense_counts(module, args, y):
    """(paper flops, macs, params) of an optimize()d FusedPointwise or FusedConv: the convolution, its
    bias, the residual add and the activation (one FLOP per element each, as for FusedPwDw), and a
    pooled stem's max pooling (one per element it reads, as ModelProfiler counts pools)."""
    pixels, pooled = y[:, 0].numel(), getattr(module, "pool", None) is not None
    if pooled:  # y is pooled: the convolution's output is larger
        x, (kh, kw), (sh, sw), (ph, pw) = args[0], module.weight.shape[2:], module.stride, module.padding
        pixels = x.shape[0] * ((x.shape[2] + 2 * ph - kh) // sh + 1) * ((x.shape[3] + 2 * pw - kw) // sw + 1)
    elems = pixels * y.shape[1]
    flops, macs = _conv_counts(module.weight, module.bias, pixels, elems)
    has_residual = len(args) > 1 and args[1] is not None
    flops += (elems if has_residual else 0) + (elems if module.act else 0) + (elems if pooled else 0)
    return flops, macs, sum(t.numel() for t in (module.weight, module.bias) if t is not None)


def _optimized_counts(module, x, y):
    """(paper flops, macs, params) of an optimize()d FusedPwDw layer (BN already folded in; the
    weights are buffers there). Biases count one FLOP per element, activations as ReLU does."""
    n, _, h, w = x.shape
    mid_elems = n * module.pw_weight.shape[0] * h * w
    pw_weight = None if isinstance(module, FusedDepthwise) else module.pw_weight  # its identity is never applied
    macs = (0 if pw_weight is None else n * h * w * pw_weight.numel()) + y[:, 0].numel() * module.dw_weight.numel()
    flops = macs + (mid_elems if module.mid_bias is not None else 0) + (y.numel() if module.bias is not None else 0)
    flops += (mid_elems if module.mid_act else 0) + (y.numel() if module.out_act else 0)
    params = sum(t.numel() for t in (pw_weight, module.mid_bias, module.dw_weight, module.bias) if t is not None)
    return flops, macs, params


def _fused_counts(module, x, y):
    """(paper flops, macs, params) of the fused tail of a BSConv module: last 1x1, BN, depthwise.
    (BSConv-S's first 1x1 and BN run as ordinary child modules and are counted as leaves.)"""
    if isinstance(module, FusedPwDw):
        return _optimized_counts(module, x, y)
    pw, bn, dw = getattr(module, module._pw), getattr(module, module._bn, None), getattr(module, module._dw)
    n, _, h, w = x.shape
    mid_elems = n * pw.out_channels * h * w
    flops, macs = _conv_counts(pw.weight, None, n * h * w, mid_elems)
    if bn is not None:
        flops += mid_elems * (2 if bn.affine else 1)
    dw_flops, dw_macs = _conv_counts(dw.weight, dw.bias, y[:, 0].numel(), y.numel())
    return flops + dw_flops, macs + dw_macs, _count_params([m for m in (pw, bn, dw) if m is not None])


class ProfileReport:
    """Rows per counted module (leaves and fused BSConv layers) and totals."""

    def __init__(self, rows):
        self.rows = rows
        for key in ("params", "flops", "macs", "real_flops", "min_bytes"):
            setattr(self, "total_" + key, sum(r[key] for r in rows))

    def __str__(self):
        cols = ("module", "type", "in_shape", "out_shape", "params", "flops", "macs", "min_bytes")
        total = {"module": "(Total)", "type": "", "in_shape": "", "out_shape": "",
                 "params": self.total_params, "flops": self.total_flops, "macs": self.total_macs,
                 "min_bytes": self.total_min_bytes}
        table = [cols] + [tuple(_fmt(r[c]) for c in cols) for r in self.rows + [total]]
        widths = [max(len(row[i]) for row in table) for i in range(len(cols))]
        return "\n".join("  ".join(c.rjust(w) if i >= 4 else c.ljust(w) for i, (c, w) in enumerate(zip(row, widths)))
                         for row in table)


def _fmt(v):
    return f"{v:,}" if isinstance(v, int) else str(v)


def profile(model, input_size=(1, 3, 224, 224), dtype=torch.float32, device="cpu"):
    """Profile `model` on one random input of `input_size` (forward under no_grad)."""
    rows = []
    handles = []

    def add_row(name, module, x, out, counts):
        flops, macs, params = counts
        esize = out.element_size()
        rows.append({"module": name, "type": type(module).__name__, "in_shape": tuple(x.shape[1:]),
                     "out_shape": tuple(out.shape[1:]), "params": params, "flops": flops, "macs": macs,
                     "real_flops": flops + macs, "min_bytes": (x.numel() + out.numel()) * esize + params * esize})

    def hook(name):
        def fn(module, args, out):
            x = args[0]
            if isinstance(module, _PairedLayers):
                plan = module.pair_plan(x)
                if plan is not None:  # one call for both layers, which count as they do run one by one
                    mid = x.new_empty(ops.out_shape(x, *plan[0][:5]), device="meta")
                    add_row(name + ".first", module.first, x, mid, _optimized_counts(module.first, x, mid))
                    add_row(name + ".last", module.last, mid, out, _optimized_counts(module.last, mid, out))
            elif isinstance(module, FUSED):
                x = _tail_input(module, x)
                add_row(name, module, x, out, _fused_counts(module, x, out))
            elif isinstance(module, FusedPointwise):  # and FusedConv
                add_row(name, module, x, out, _dense_counts(module, args, out))
            else:
                add_row(name, module, x, out, (*_leaf_counts(module, x, out), _count_params([module])))
        return fn

    for name, module in model.named_modules():
        if isinstance(module, FUSED + (_PairedLayers,)) or len(module._modules) == 0:
            handles.append(module.register_forward_hook(hook(name)))
    try:
        with torch.no_grad():
            model(torch.randn(input_size, dtype=dtype, device=device))
    finally:
        for h in handles:
            h.remove()
    return ProfileReport(rows)


def _tail_input(module, x):
    """Shape-only stand-in for the input of the fused tail (after BSConv-S's first 1x1)."""
    first = module.pw1.weight if isinstance(module, BSConvS) else getattr(getattr(module, "prefix", None), "weight", None)
    if first is not None:
        return x.new_empty((x.shape[0], first.shape[0]) + tuple(x.shape[2:]))
    return x
