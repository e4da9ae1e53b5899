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
            if m.running_mean is not None:  # None: a BN that always normalises with the batch's statistics
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


def assert_silu_epilogues_match_torch():
    """The SIMD SiLU (a vector exp) in the 1x1 op's store and in both stages of the fused op, vs torch's
    SiLU of the same float32 pre-activations, to 2 ulp: finite values over float's whole range (exp
    overflowing and underflowing) through an identity weight (the store sees exactly x), and +-inf /
    NaN as the bias of a zero weight (an identity weight would turn them into inf * 0 = NaN)."""
    torch.manual_seed(1)
    c = 37  # two full AVX-512 vectors and a tail
    x = torch.cat([torch.linspace(-120, 120, 1901), torch.randn(400) * 3,
                   torch.tensor([0.0, -0.0, 88.7, 88.8, -88.8, 87.5, -87.5, 1e-30, -1e-30])])
    x = x[torch.randperm(x.numel())][: (x.numel() // c) * c].reshape(1, -1, c).permute(0, 2, 1).unsqueeze(-1)
    x = x.contiguous(memory_format=torch.channels_last)  # (1, c, P, 1)
    special = torch.randn(c) * 50
    special[[0, 5, 17, 36]] = torch.tensor([float("inf"), float("-inf"), float("nan"), float("-inf")])
    cases = [(x, torch.eye(c), None), (x[:, :, :3], torch.zeros(c, c), special)]
    for inp, weight, bias in cases:
        pre = torch.nn.functional.conv2d(inp, weight.reshape(c, c, 1, 1), bias)
        want = torch.nn.functional.silu(pre)
        packed = torch.ops.bsconv_fast.pack_pw(weight.reshape(c, c, 1, 1), bias)
        got = torch.ops.bsconv_fast.pw_packed(inp, packed, c, [1, 1], 4, None)
        torch.testing.assert_close(got, want, rtol=2.5e-7, atol=1e-37, equal_nan=True)
        # the fused op: SiLU after the 1x1 (a 1x1 depthwise of weight 1 passes it on), then after the depthwise
        ones = torch.ones(c, 1, 1, 1)
        for mid_bias, out_bias, acts in ((bias, None, (4, 0)), (None, bias, (0, 4))):
            got = bsconv_fast.pw_dw(inp, weight.reshape(c, c, 1, 1), ones, mid_bias, out_bias, (1, 1), (0, 0), (1, 1),
                                    *acts)
            torch.testing.assert_close(got, want, rtol=2.5e-7, atol=1e-37, equal_nan=True)
