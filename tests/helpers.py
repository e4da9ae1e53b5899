"""Shared test helpers: float64 reference comparison with dtype-keyed tolerances."""
import math

import torch

import bsconv_fast
from bsconv_fast import reference

# Relative error ||out - ref|| / ||ref|| allowed per dtype, and the per-element absolute error
# allowed per unit of sqrt(reduction length) * max|ref| (accumulation-order differences grow with it).
REL_TOL = {torch.float32: 1e-5, torch.float64: 1e-12, torch.float16: 2e-3, torch.bfloat16: 1e-2}
ABS_TOL = {torch.float32: 2e-7, torch.float64: 1e-15, torch.float16: 5e-4, torch.bfloat16: 4e-3}


def assert_close_to_reference(out, ref64, reduction, what=""):
    """out: result in its dtype; ref64: the same computed in float64."""
    assert out.shape == ref64.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref64.shape)}"
    assert not torch.isnan(out).any() or torch.isnan(ref64).any(), f"{what}: NaN in output (unwritten element?)"
    if out.numel() == 0:
        return
    diff = (out.double() - ref64)
    scale = ref64.abs().max().item() or 1.0
    rel = diff.norm().item() / (ref64.norm().item() or 1.0)
    max_abs = diff.abs().max().item()
    atol = ABS_TOL[out.dtype] * math.sqrt(reduction) * scale * 10
    assert rel <= REL_TOL[out.dtype], f"{what}: relative error {rel:.3g} > {REL_TOL[out.dtype]}"
    assert max_abs <= atol, f"{what}: max abs error {max_abs:.3g} > {atol:.3g}"


def random_problem(n, cin, cout, h, w, k, dtype=torch.float32, bias=True, mid_bias=False):
    kh, kw = (k, k) if isinstance(k, int) else k
    x = torch.randn(n, cin, h, w, dtype=dtype)
    pw = torch.randn(cout, cin, 1, 1, dtype=dtype) / math.sqrt(cin)
    dw = torch.randn(cout, 1, kh, kw, dtype=dtype) / math.sqrt(kh * kw)
    b = torch.randn(cout, dtype=dtype) if bias else None
    mb = torch.randn(cout, dtype=dtype) if mid_bias else None
    return x, pw, dw, mb, b


def ref64(x, pw, dw, mb, b, stride, padding, dilation, mid_act=0, out_act=0):
    d = lambda t: None if t is None else t.double()  # noqa: E731
    return reference.pw_dw(d(x), d(pw), d(dw), d(mb), d(b), stride, padding, dilation, mid_act, out_act)


def fused_backend_used(module, x):
    return set(bsconv_fast.explain(module, x).backends().values())


def randomize_bn(module, mean, var, bias=None):
    """Non-trivial BatchNorm statistics (and affine parameters unless bias is None), so folding them is
    really exercised: running_mean ~ U(-mean, mean), running_var ~ U(*var), weight ~ U(0.5, 1.5),
    bias ~ U(-bias, bias)."""
    for m in module.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-mean, mean)
            m.running_var.uniform_(*var)
            if bias is not None:
                m.weight.data.uniform_(0.5, 1.5)
                m.bias.data.uniform_(-bias, bias)


def assert_model_drift(got, eager, want, what=""):
    """A whole fp32 network drifts from its float64 run (`want`) by itself (`eager`, the unmodified
    model in fp32); the optimized one (`got`) may not drift much more, and never has NaN."""
    rel = lambda out: ((out.double() - want).norm() / want.norm()).item()  # noqa: E731
    assert not torch.isnan(got).any(), f"{what}: NaN"
    assert rel(got) <= max(1e-5, 4 * rel(eager)), f"{what}: relative error {rel(got):.3g}, eager fp32 {rel(eager):.3g}"
