"""bsconv_fast::pw_packed (the 1x1 convolutions around fused layers) and FusedPointwise, against
float64 F.conv2d + residual + activation."""
import math

import pytest
import torch
import torch.nn.functional as F

import bsconv_fast
from bsconv_fast import reference
from bsconv_fast.optimize import FusedPointwise
from helpers import assert_close_to_reference

pytestmark = pytest.mark.skipif(not bsconv_fast._ext.available(), reason="C++ extension not built")

# (n, cin, cout, h, w, stride): odd channel counts (not multiples of 16), strides 1-3 and mixed,
# few pixels (channel split: heads, classifiers) and many pixels (pixel split), batch 0, and
# 64-channel outputs (the kernel's 4-vector column block).
GRID = [
    (1, 3, 5, 7, 13, 1),
    (3, 17, 33, 13, 7, 2),
    (1, 33, 17, 9, 11, 3),
    (2, 40, 47, 5, 9, (1, 2)),
    (2, 520, 530, 3, 5, 1),
    (1, 1023, 1001, 1, 1, 1),
    (1, 64, 19, 31, 29, 1),
    (2, 24, 72, 17, 19, 2),
    (0, 5, 7, 4, 4, 1),
    (1, 33, 64, 9, 13, 1),   # 64 channels: one 6-pixel x 64-channel block (AVX-512)
    (2, 20, 61, 5, 7, 1),    # the same block with a channel tail
    (1, 33, 128, 9, 13, 1),  # 128 channels: two such blocks
    (2, 20, 125, 5, 7, 1),   # the same with a channel tail
    (1, 241, 963, 1, 1, 1),  # squeeze-excitation sizes: under 300K multiply-adds, split over the
    (1, 963, 241, 1, 1, 1),  # threads (two or more) as weight-bound (kWeightBoundPixels)
]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _problem(n, cin, cout, h, w, stride, dtype=torch.float32, residual=True):
    s = _pair(stride)
    x = torch.randn(n, cin, h, w, dtype=dtype)
    weight = torch.randn(cout, cin, 1, 1, dtype=dtype) / math.sqrt(cin)
    bias = torch.randn(cout, dtype=dtype)
    oh, ow = (h - 1) // s[0] + 1, (w - 1) // s[1] + 1
    res = torch.randn(n, cout, oh, ow, dtype=dtype) if residual else None
    return x, weight, bias, res, s


def _ref64(x, weight, bias, res, stride, act):
    y = F.conv2d(x.double(), weight.double(), None if bias is None else bias.double(), stride)
    return reference.activation(y if res is None else y + res.double(), act)


@pytest.mark.parametrize("case", GRID, ids=[str(i) for i in range(len(GRID))])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "plain"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_grid(case, residual, memory_format):
    x, weight, bias, res, s = _problem(*case, residual=residual)
    x = x.contiguous(memory_format=memory_format)
    packed = torch.ops.bsconv_fast.pack_pw(weight, bias)
    act = reference.ACTIVATIONS["relu"] if residual else 0
    out = torch.ops.bsconv_fast.pw_packed(x, packed, weight.shape[0], list(s), act, res)
    assert_close_to_reference(out, _ref64(x, weight, bias, res, s, act), case[1], str(case))
    if x.numel() and min(out.shape[1:]) > 1:
        assert out.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("act", sorted(reference.ACTIVATIONS.values()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_activations_and_dtypes(act, dtype):
    x, weight, bias, res, s = _problem(2, 37, 45, 9, 7, 1, dtype)
    out = FusedPointwise(weight, bias, s, act)(x, res)
    assert out.dtype == dtype
    assert_close_to_reference(out, _ref64(x, weight, bias, res, s, act), 37, f"act {act} {dtype}")


def test_no_bias():
    x, weight, _, res, s = _problem(1, 20, 36, 6, 6, 2)
    out = FusedPointwise(weight, None, s)(x, res)
    assert_close_to_reference(out, _ref64(x, weight, None, res, s, 0), 20, "no bias")


def test_opcheck():
    x, weight, bias, res, s = _problem(2, 17, 21, 5, 7, 2)
    packed = torch.ops.bsconv_fast.pack_pw(weight, bias)
    torch.library.opcheck(torch.ops.bsconv_fast.pack_pw.default, (weight, bias))
    torch.library.opcheck(torch.ops.bsconv_fast.pw_packed.default, (x, packed, 21, list(s), 1, res))
    torch.library.opcheck(torch.ops.bsconv_fast.pw_packed.default, (x, packed, 21, list(s), 0, None))


def test_bad_arguments_are_named():
    x, weight, bias, res, s = _problem(1, 8, 12, 5, 5, 1)
    packed = torch.ops.bsconv_fast.pack_pw(weight, bias)
    with pytest.raises(RuntimeError, match="residual must have the output's shape"):
        torch.ops.bsconv_fast.pw_packed(x, packed, 12, [1, 1], 0, res[:, :, 1:])
    with pytest.raises(RuntimeError, match="packed must be the contiguous buffer"):
        torch.ops.bsconv_fast.pw_packed(x, packed, 17, [1, 1], 0, None)  # another 16-channel panel count
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        torch.ops.bsconv_fast.pw_packed(x[0], packed, 12, [1, 1], 0, None)
    with pytest.raises(RuntimeError, match="bias must have shape"):
        torch.ops.bsconv_fast.pack_pw(weight, bias[1:])
    with pytest.raises(RuntimeError, match="weight must have shape"):
        torch.ops.bsconv_fast.pack_pw(weight.view(12, 8), bias)


def test_autograd_takes_the_standard_ops_and_says_so():
    x, weight, bias, res, s = _problem(1, 9, 11, 5, 5, 1)
    layer = FusedPointwise(weight, bias, s, reference.ACTIVATIONS["hardswish"])
    x.requires_grad_()
    assert layer.choice(x)[0] == "reference" and "autograd" in layer.choice(x)[1]
    out = layer(x, res)
    out.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()
    assert_close_to_reference(out.detach(), _ref64(x.detach(), weight, bias, res, s, 3), 9, "autograd path")
    with torch.no_grad():
        assert layer.choice(x)[0] == f"cpu-pointwise ({bsconv_fast._ext.cpu_kernel_isa()})"


def test_packed_weights_follow_in_place_updates():
    x, weight, bias, _, s = _problem(1, 6, 10, 4, 4, 1, residual=False)
    layer = FusedPointwise(weight, bias, s)
    with torch.no_grad():
        first = layer(x)
        layer.weight.mul_(-1.0)
        second = layer(x)
    assert torch.allclose(second, F.conv2d(x, layer.weight, layer.bias), atol=1e-5)
    assert not torch.allclose(first, second)
