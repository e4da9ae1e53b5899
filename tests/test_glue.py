"""The memory-bound CPU ops around the fused layers (csrc/cpu/glue_cpu.cpp: channel_affine, max_pool,
global_avg_pool) and their modules (bsconv_fast/glue.py), against float64 standard ops. Outputs are
NaN-poisoned before the kernels run (conftest), so an unwritten element fails."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bsconv_fast
from bsconv_fast.glue import GlobalAvgPool, InputAffine, MaxPool, SqueezeExcite
from helpers import assert_close_to_reference, assert_model_drift, randomize_bn

pytestmark = pytest.mark.skipif(not bsconv_fast._ext.available(), reason="C++ extension not built")
ops = torch.ops.bsconv_fast
FORMATS = {"nchw": torch.contiguous_format, "cl": torch.channels_last}


@pytest.mark.parametrize("n,c,h,w", [(1, 3, 37, 29), (2, 1, 5, 7), (3, 5, 9, 13), (1, 16, 7, 5), (2, 19, 11, 3),
                                     (0, 3, 4, 4)])
@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_channel_affine(n, c, h, w, fmt, dtype):
    x = torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=FORMATS[fmt])
    scale, shift = torch.rand(c, dtype=dtype) + 0.5, torch.randn(c, dtype=dtype)
    out = ops.channel_affine(x, scale, shift)
    want = x.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    assert_close_to_reference(out, want, 1, f"affine {fmt}")
    assert out.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("c", [3, 16, 17, 64, 70, 130])  # 64-channel blocks, 16-channel tails, partial tails
@pytest.mark.parametrize("kernel,stride,padding", [((3, 3), (2, 2), (1, 1)), ((2, 2), (2, 2), (0, 0)),
                                                   ((3, 2), (1, 2), (1, 0)), ((5, 5), (3, 3), (2, 2))])
@pytest.mark.parametrize("fmt", FORMATS)
def test_max_pool_matches_torch_exactly(c, kernel, stride, padding, fmt):
    x = torch.randn(2, c, 13, 11).contiguous(memory_format=FORMATS[fmt])
    for ch in {c - 1, c // 2, min(c - 1, 40)}:  # NaN wins its windows, as in torch, in any vector of a block
        x[0, ch, 3 + ch % 7, ch % 11] = float("nan")
    x[1, 0, 0, 0] = float("-inf")
    out = ops.max_pool(x, list(kernel), list(stride), list(padding))
    want = F.max_pool2d(x, kernel, stride, padding)
    assert out.shape == want.shape and out.stride() == want.stride()
    assert torch.equal(out.isnan(), want.isnan())
    assert torch.equal(out.nan_to_num(), want.nan_to_num())


@pytest.mark.parametrize("n,c,h,w", [(1, 1000, 7, 7), (3, 17, 13, 5), (2, 64, 1, 1), (1, 3, 56, 56), (0, 8, 3, 3)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_global_avg_pool(n, c, h, w, dtype):
    x = torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)
    out = ops.global_avg_pool(x)
    assert_close_to_reference(out, x.double().mean((2, 3), keepdim=True), h * w, "global_avg_pool")


def test_opcheck():
    x = torch.randn(2, 5, 9, 7)
    s, t = torch.rand(5), torch.randn(5)
    for xf in (x, x.contiguous(memory_format=torch.channels_last)):
        torch.library.opcheck(ops.channel_affine.default, (xf, s, t))
        torch.library.opcheck(ops.max_pool.default, (xf, [3, 3], [2, 2], [1, 1]))
    torch.library.opcheck(ops.global_avg_pool.default, (x,))


def test_bad_arguments_are_named():
    x = torch.randn(1, 4, 6, 6)
    with pytest.raises(RuntimeError, match=r"scale and shift must have shape \(4\)"):
        ops.channel_affine(x, torch.ones(3), torch.zeros(4))
    with pytest.raises(RuntimeError, match="dtype Float, got \\[4\\] Double"):
        ops.channel_affine(x, torch.ones(4, dtype=torch.double), torch.zeros(4))
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        ops.max_pool(x[0], [3, 3], [2, 2], [1, 1])
    with pytest.raises(RuntimeError, match=r"padding must be in \[0, kernel / 2\]"):
        ops.max_pool(x, [3, 3], [1, 1], [2, 2])
    with pytest.raises(RuntimeError, match="too small"):
        ops.max_pool(x, [7, 7], [1, 1], [0, 0])
    with pytest.raises(RuntimeError, match="supports float32 and float64"):
        ops.global_avg_pool(x.half())
    with pytest.raises(RuntimeError, match="no pixels"):
        ops.global_avg_pool(torch.randn(1, 4, 0, 3))


def test_modules_run_the_ops_and_fall_back_under_autograd():
    bn = nn.BatchNorm2d(6).eval()
    randomize_bn(bn, 0.5, (0.5, 1.5), bias=0.5)
    modules = [(InputAffine.from_bn(bn), bn, "cpu-affine"),
               (MaxPool.from_pool(nn.MaxPool2d(3, 2, 1)), nn.MaxPool2d(3, 2, 1), "cpu-pool"),
               (GlobalAvgPool(), nn.AdaptiveAvgPool2d(1), "cpu-pool")]
    x = torch.randn(2, 6, 11, 9)
    for module, standard, backend in modules:
        with torch.no_grad():
            assert module.choice(x) == (backend, "")
            assert_close_to_reference(module(x), copy.deepcopy(standard).double()(x.double()), 9, backend)
        xg = x.clone().requires_grad_()
        assert module.choice(xg)[0] == "reference" and "autograd" in module.choice(xg)[1]
        out = module(xg)
        out.sum().backward()
        assert torch.isfinite(xg.grad).all()
        assert_close_to_reference(out.detach(), copy.deepcopy(standard).double()(x.double()), 9, backend + " autograd")


def test_unsupported_pools_are_left_alone():
    assert not MaxPool.supports(nn.MaxPool2d(3, 2, 1, ceil_mode=True))
    assert not MaxPool.supports(nn.MaxPool2d(3, 2, 1, dilation=2))
    assert not GlobalAvgPool.supports(nn.AdaptiveAvgPool2d(2))
    assert MaxPool.supports(nn.MaxPool2d(2)) and GlobalAvgPool.supports(nn.AdaptiveAvgPool2d((1, 1)))


def test_optimize_replaces_the_official_stem_and_se_units():
    B = pytest.importorskip("bsconv.pytorch")
    model = B.get_model("cifar_mobilenetv3_small_w7d20_bsconvs_p1d6", num_classes=10).eval()
    randomize_bn(model, 0.3, (0.5, 1.5), bias=0.5)
    fast = bsconv_fast.optimize(model)
    # data_bn folded into the stem, which reads the image as it comes: no conversion on entry
    assert isinstance(fast.backbone.data_bn, nn.Identity) and fast.backbone.init_conv.in_scale is not None
    assert not fast._forward_pre_hooks
    se = [m for m in fast.modules() if isinstance(m, SqueezeExcite)]
    assert se and len(se) == sum(type(m).__name__ == "SEUnit" for m in model.modules())
    x = torch.randn(2, 3, 32, 32)
    with torch.inference_mode():
        got = fast(x)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        eager = model(x)
    assert_model_drift(got, eager, want)
