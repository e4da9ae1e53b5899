"""bsconv_fast::conv_packed (the image stems: dense k x k convolution, gathered patches on the GEMM
micro-kernel) and FusedConv, against float64 F.conv2d + activation."""
import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bsconv_fast
from bsconv_fast import reference
from bsconv_fast.optimize import FusedConv
from helpers import assert_close_to_reference, randomize_bn

pytestmark = pytest.mark.skipif(not bsconv_fast._ext.available(), reason="C++ extension not built")

# (n, cin, cout, h, w, kernel, stride, padding): the stems (3x3 s2, 7x7 s2 p3), rectangular kernels,
# mixed strides and paddings, padding wider than the input border, output channels off the
# 16-channel panels, a single input channel, batch 0.
GRID = [
    (1, 3, 32, 29, 31, 3, 2, 1),
    (2, 3, 64, 23, 19, 7, 2, 3),
    (1, 3, 16, 17, 17, 3, 1, 1),
    (3, 4, 5, 9, 13, (3, 5), (1, 2), (1, 2)),
    (1, 1, 70, 11, 7, 5, 3, 2),
    (2, 8, 33, 6, 10, 3, 1, 0),
    (1, 3, 17, 5, 5, 5, 1, 2),
    (0, 3, 8, 7, 7, 3, 2, 1),
]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _problem(n, cin, cout, h, w, k, dtype=torch.float32):
    kh, kw = _pair(k)
    x = torch.randn(n, cin, h, w, dtype=dtype)
    weight = torch.randn(cout, cin, kh, kw, dtype=dtype) / math.sqrt(cin * kh * kw)
    return x, weight, torch.randn(cout, dtype=dtype)


def _packed(weight, bias):
    return torch.ops.bsconv_fast.pack_pw(weight.permute(0, 2, 3, 1).reshape(weight.shape[0], -1, 1, 1), bias)


@pytest.mark.parametrize("case", GRID, ids=[str(i) for i in range(len(GRID))])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_grid(case, memory_format):
    n, cin, cout, h, w, k, s, p = case
    x, weight, bias = _problem(n, cin, cout, h, w, k)
    x = x.contiguous(memory_format=memory_format)
    out = torch.ops.bsconv_fast.conv_packed(x, _packed(weight, bias), cout, list(weight.shape[2:]), list(_pair(s)),
                                            list(_pair(p)), 1)
    want = F.relu(F.conv2d(x.double(), weight.double(), bias.double(), _pair(s), _pair(p)))
    assert_close_to_reference(out, want, weight[0].numel(), str(case))
    assert out.is_contiguous(memory_format=torch.channels_last)  # the stems write channels_last from any layout


def _affine(cin, dtype=torch.float32):
    """An input BatchNorm's scale and shift (away from 1 and 0, so that a missed or misplaced one shows)."""
    return torch.rand(cin, dtype=dtype) + 0.5, torch.randn(cin, dtype=dtype)


def _with_affine(x, scale, shift):
    return x.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)


def _layout(x, layout):
    """x as NCHW, channels_last, or a strided view of a wider tensor (neither)."""
    if layout == "strided":
        wide = torch.randn(*x.shape[:3], x.shape[3] + 3, dtype=x.dtype)
        wide[..., 2:-1] = x
        return wide[..., 2:-1]
    return x.contiguous(memory_format=torch.channels_last if layout == "cl" else torch.contiguous_format)


# Tall inputs too: each thread's window of converted rows (kernel rows + 8 strides) slides down several
# times, and two threads start their windows mid-image.
AFFINE_GRID = GRID + [(2, 3, 24, 53, 17, 3, 1, 1), (2, 3, 32, 67, 41, 7, 2, 3)]


@pytest.mark.parametrize("case", AFFINE_GRID, ids=[str(i) for i in range(len(AFFINE_GRID))])
@pytest.mark.parametrize("layout", ["nchw", "cl", "strided"])
def test_input_affine_applies_before_the_zero_padding(case, layout):
    n, cin, cout, h, w, k, s, p = case
    x, weight, bias = _problem(n, cin, cout, h, w, k)
    x = _layout(x, layout)
    scale, shift = _affine(cin)
    out = torch.ops.bsconv_fast.conv_packed(x, _packed(weight, bias), cout, list(weight.shape[2:]), list(_pair(s)),
                                            list(_pair(p)), 1, scale, shift)
    want = F.relu(F.conv2d(_with_affine(x, scale, shift), weight.double(), bias.double(), _pair(s), _pair(p)))
    assert_close_to_reference(out, want, weight[0].numel(), f"{case} {layout}")
    assert out.is_contiguous(memory_format=torch.channels_last)


# (n, cin, cout, h, w, kernel, stride, padding, pool kernel, pool stride, pool padding): the ResNet stem,
# a pool window taller than the stride (rows shared by pooled rows), no pool padding, stride 1 pools.
POOL_GRID = [
    (1, 3, 64, 45, 37, 7, 2, 3, (3, 3), (2, 2), (1, 1)),
    (2, 3, 19, 23, 29, 3, 1, 1, (3, 2), (2, 1), (1, 0)),
    (3, 4, 33, 17, 13, 5, 2, 2, (2, 2), (2, 2), (0, 0)),
    (1, 3, 8, 9, 11, 3, 1, 1, (5, 5), (1, 1), (2, 2)),
]


@pytest.mark.parametrize("case", POOL_GRID, ids=[str(i) for i in range(len(POOL_GRID))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("layout,affine", [("nchw", False), ("cl", False), ("nchw", True), ("strided", True)])
def test_pooled_stem_matches_conv_then_max_pool(case, dtype, layout, affine):
    n, cin, cout, h, w, k, s, p, pk, ps, pp = case
    x, weight, bias = _problem(n, cin, cout, h, w, k, dtype)
    x[0, 0, h // 2, w // 3] = float("nan")  # a NaN input makes NaN outputs, and the pool must keep them
    x = _layout(x, layout)
    scale, shift = _affine(cin, dtype) if affine else (None, None)
    out = torch.ops.bsconv_fast.conv_pool_packed(x, _packed(weight, bias), cout, [k, k], [s, s], [p, p], 1,
                                                 list(pk), list(ps), list(pp), scale, shift)
    xa = _with_affine(x, scale, shift) if affine else x.double()
    want = F.max_pool2d(F.relu(F.conv2d(xa, weight.double(), bias.double(), s, p)), pk, ps, pp)
    assert torch.equal(out.isnan(), want.isnan())
    assert_close_to_reference(out.nan_to_num(), want.nan_to_num(), cin * k * k, str(case))


def test_pooled_stem_module_and_optimize():
    B = pytest.importorskip("bsconv.pytorch")
    model = B.get_model("resnet10_bsconvu", num_classes=10).eval()
    randomize_bn(model, 0.3, (0.5, 1.5), bias=0.5)
    fast = bsconv_fast.optimize(model)
    stem = fast.backbone.init_unit
    assert isinstance(stem, FusedConv) and stem.pool == [[3, 3], [2, 2], [1, 1]]  # conv, BN, ReLU and max pool
    assert isinstance(fast.backbone.data_bn, nn.Identity) and stem.in_scale is not None  # the input BN too
    x = torch.randn(2, 3, 45, 51)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        got = stem(x)
    assert {e.key for e in prof.key_averages()} >= {"bsconv_fast::conv_pool_packed"}
    assert "aten::max_pool2d" not in {e.key for e in prof.key_averages()}
    with torch.no_grad():
        want = copy.deepcopy(nn.Sequential(model.backbone.data_bn, model.backbone.init_unit)).double()(x.double())
        assert_close_to_reference(got, want, 3 * 49, "pooled stem")
        xg = x.clone().requires_grad_()  # the standard ops under autograd, same values
    out = stem(xg)
    out.sum().backward()
    assert_close_to_reference(out.detach(), want, 3 * 49, "pooled stem, autograd path")
    assert bsconv_fast.profile(fast, (1, 3, 64, 64)).total_macs == bsconv_fast.profile(model, (1, 3, 64, 64)).total_macs


def test_pooled_stem_opcheck_and_bad_arguments():
    x, weight, bias = _problem(2, 3, 10, 12, 11, 3)
    packed = _packed(weight, bias)
    args = (x, packed, 10, [3, 3], [2, 2], [1, 1], 1)
    torch.library.opcheck(torch.ops.bsconv_fast.conv_pool_packed.default, (*args, [3, 3], [2, 2], [1, 1]))
    torch.library.opcheck(torch.ops.bsconv_fast.conv_pool_packed.default,
                          (x.contiguous(memory_format=torch.channels_last), *args[1:], [2, 3], [1, 2], [1, 0]))
    with pytest.raises(RuntimeError, match=r"pool_padding must be in \[0, pool_kernel / 2\]"):
        torch.ops.bsconv_fast.conv_pool_packed(*args, [3, 3], [2, 2], [2, 2])
    with pytest.raises(RuntimeError, match=r"pool_kernel must be in \[1, 16\]"):
        torch.ops.bsconv_fast.conv_pool_packed(*args, [17, 3], [2, 2], [0, 0])
    with pytest.raises(RuntimeError, match="output is too small for pool_kernel"):
        torch.ops.bsconv_fast.conv_pool_packed(*args, [9, 9], [1, 1], [0, 0])
    scale, shift = _affine(3)
    torch.library.opcheck(torch.ops.bsconv_fast.conv_pool_packed.default,
                          (*args, [3, 3], [2, 2], [1, 1], scale, shift))
    with pytest.raises(RuntimeError, match="in_scale and in_shift come together"):
        torch.ops.bsconv_fast.conv_pool_packed(*args, [3, 3], [2, 2], [1, 1], scale, None)


# The Winograd stem (winograd=True: 7x7, stride 2, padding 3, Cin <= 4), (n, cin, cout, h, w): outputs that
# are not whole 4x4 tiles (tiles leave the image on the right and at the bottom), 1 to 4 input channels,
# channels off the 16-channel panels, images taller than one window of converted rows, batch 0.
WINOGRAD_GRID = [(1, 3, 64, 45, 37), (2, 3, 24, 37, 53), (2, 1, 70, 19, 23), (1, 4, 16, 9, 7), (1, 2, 33, 30, 31),
                 (3, 3, 64, 67, 41), (0, 3, 16, 9, 9)]
needs_simd = pytest.mark.skipif(bsconv_fast._ext.available() and bsconv_fast._ext.cpu_kernel_isa() == "scalar",
                                reason="the Winograd stem runs on the AVX2 / AVX-512 kernels")


def _winograd_stem(x, weight, bias, pool, act, scale=None, shift=None):
    packed = torch.ops.bsconv_fast.pack_winograd(weight, bias)
    args = (x, packed, weight.shape[0], [7, 7], [2, 2], [3, 3], act)
    if pool:
        return torch.ops.bsconv_fast.conv_pool_packed(*args, [3, 3], [2, 2], [1, 1], scale, shift, True)
    return torch.ops.bsconv_fast.conv_packed(*args, scale, shift, True)


def _stem_reference(x, weight, bias, pool, act, scale=None, shift=None):
    xd = x.double() if scale is None else _with_affine(x, scale, shift)
    y = reference.activation(F.conv2d(xd, weight.double(), bias.double(), 2, 3), act)
    return F.max_pool2d(y, 3, 2, 1) if pool else y


@needs_simd
@pytest.mark.parametrize("case", WINOGRAD_GRID, ids=[str(i) for i in range(len(WINOGRAD_GRID))])
@pytest.mark.parametrize("pool", [False, True], ids=["conv", "pool"])
@pytest.mark.parametrize("layout,affine,act", [("nchw", False, 1), ("cl", False, 0), ("nchw", True, 4),
                                               ("strided", True, 1)])
def test_winograd_stem_matches_the_direct_convolution(case, pool, layout, affine, act):
    n, cin, cout, h, w = case
    x, weight, bias = _problem(n, cin, cout, h, w, 7)
    x = _layout(x, layout)
    scale, shift = _affine(cin) if affine else (None, None)
    out = _winograd_stem(x, weight, bias, pool, act, scale, shift)
    assert_close_to_reference(out, _stem_reference(x, weight, bias, pool, act, scale, shift), cin * 49,
                              f"{case} {layout}")
    assert out.is_contiguous(memory_format=torch.channels_last)


# (n, h, w, pool kernel, stride, padding, threads): the pooled Winograd stem splits tile rows over threads and
# pools a window that straddles two threads' rows afterwards, from the rows the two saved: boundaries inside
# and between images, windows taller than a tile row (7 rows: 2 tile rows per thread at least), rows no
# window reads (stride 3), more threads than images, one thread.
WINOGRAD_POOLS = [(1, 224, 224, 3, 2, 1, 2), (2, 61, 37, 3, 2, 1, 3), (3, 45, 29, 7, 2, 3, 4), (2, 50, 21, 2, 3, 0, 3),
                  (1, 93, 19, 5, 1, 2, 4), (2, 37, 45, 3, 2, 1, 1)]


@needs_simd
@pytest.mark.parametrize("case", WINOGRAD_POOLS, ids=[str(i) for i in range(len(WINOGRAD_POOLS))])
def test_winograd_stem_pools_across_the_threads_rows(case):
    n, h, w, pk, ps, pp, threads = case
    x, weight, bias = _problem(n, 3, 24, h, w, 7)
    packed = torch.ops.bsconv_fast.pack_winograd(weight, bias)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.ops.bsconv_fast.conv_pool_packed(x, packed, 24, [7, 7], [2, 2], [3, 3], 1, [pk, pk], [ps, ps],
                                                     [pp, pp], None, None, True)
    finally:
        torch.set_num_threads(before)
    want = F.max_pool2d(F.relu(F.conv2d(x.double(), weight.double(), bias.double(), 2, 3)), pk, ps, pp)
    assert_close_to_reference(out, want, 147, str(case))


@needs_simd
def test_winograd_stem_keeps_every_nan_of_the_reference():
    """A NaN input makes NaN every output whose window reads it, and, through the transforms, the other
    outputs of the 4x4 tiles that read it: a superset of the reference's, the rest unchanged."""
    x, weight, bias = _problem(1, 3, 32, 41, 43, 7)
    x[0, 1, 20, 17] = float("nan")
    for pool in (False, True):
        out = _winograd_stem(x, weight, bias, pool, 1)
        want = _stem_reference(x, weight, bias, pool, 1)
        assert want.isnan().any() and out.isnan()[want.isnan()].all()
        finite = ~out.isnan()
        assert finite.sum() > 0.8 * out.numel()
        assert_close_to_reference(out[finite], want[finite], 147, f"finite outputs, pool={pool}")


@needs_simd
def test_winograd_stem_opcheck_and_bad_arguments():
    x, weight, bias = _problem(2, 3, 10, 19, 17, 7)
    packed = torch.ops.bsconv_fast.pack_winograd(weight, bias)
    torch.library.opcheck(torch.ops.bsconv_fast.pack_winograd.default, (weight, bias))
    args = (x, packed, 10, [7, 7], [2, 2], [3, 3], 1)
    torch.library.opcheck(torch.ops.bsconv_fast.conv_packed.default, (*args, None, None, True))
    torch.library.opcheck(torch.ops.bsconv_fast.conv_pool_packed.default,
                          (*args, [3, 3], [2, 2], [1, 1], *_affine(3), True))
    with pytest.raises(RuntimeError, match=r"winograd=True takes a float32 7x7 convolution with stride 2, padding 3"):
        torch.ops.bsconv_fast.conv_packed(x, packed, 10, [7, 7], [1, 1], [3, 3], 1, None, None, True)
    with pytest.raises(RuntimeError, match="winograd=True takes a float32"):
        torch.ops.bsconv_fast.conv_packed(x.double(), packed.double(), 10, [7, 7], [2, 2], [3, 3], 1, None, None,
                                          True)
    with pytest.raises(RuntimeError, match="packed must be the contiguous buffer bsconv_fast::pack_winograd gives"):
        torch.ops.bsconv_fast.conv_packed(x, _packed(weight, bias), 10, [7, 7], [2, 2], [3, 3], 1, None, None, True)
    with pytest.raises(RuntimeError, match=r"pack_winograd: weight must have shape \(Cout, Cin, 7, 7\)"):
        torch.ops.bsconv_fast.pack_winograd(torch.randn(10, 5, 7, 7), None)
    with pytest.raises(RuntimeError, match="pack_winograd: weight must be float32"):
        torch.ops.bsconv_fast.pack_winograd(weight.double(), None)
    with pytest.raises(RuntimeError, match=r"pack_winograd: bias must have shape \(10\)"):
        torch.ops.bsconv_fast.pack_winograd(weight, torch.randn(11))


@needs_simd
def test_optimize_runs_the_resnet_stem_by_winograd_unless_told_not_to():
    B = pytest.importorskip("bsconv.pytorch")
    model = B.get_model("resnet10_bsconvu", num_classes=10).eval()
    randomize_bn(model, 0.3, (0.5, 1.5), bias=0.5)
    x = torch.randn(2, 3, 45, 51)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
    for winograd, backend in ((True, "cpu-conv-winograd"), (False, "cpu-conv ")):
        fast = bsconv_fast.optimize(model, winograd=winograd)
        assert fast.backbone.init_unit.winograd is winograd
        assert bsconv_fast.explain(fast, x).backends()["backbone.init_unit"].startswith(backend)
        with torch.inference_mode():
            assert_close_to_reference(fast(x), want, 3 * 49, f"winograd={winograd}")
    stem = fast.backbone.init_unit
    with torch.inference_mode():
        direct = stem(x)
        stem.winograd = True  # packs again for the Winograd kernel
        assert not torch.equal(stem(x), direct) and torch.allclose(stem(x), direct, rtol=1e-4, atol=1e-4)
    small = FusedConv(torch.randn(8, 3, 3, 3), None, (2, 2), (1, 1))  # a 3x3 stem: Winograd does not apply
    assert small.winograd is False


@pytest.mark.parametrize("act", sorted(reference.ACTIVATIONS.values()))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_module_activations_and_dtypes(act, dtype):
    x, weight, bias = _problem(2, 3, 24, 15, 13, 3, dtype)
    layer = FusedConv(weight, bias, (2, 2), (1, 1), act)
    assert layer.choice(x) == (f"cpu-conv ({bsconv_fast._ext.cpu_kernel_isa()})", "")
    out = layer(x)
    assert out.dtype == dtype
    want = reference.activation(F.conv2d(x.double(), weight.double(), bias.double(), 2, 1), act)
    assert_close_to_reference(out, want, weight[0].numel(), f"act {act} {dtype}")


def test_optimize_folds_the_stem_block():
    common = pytest.importorskip("bsconv.pytorch.common")
    block = common.conv3x3_block(3, 16, stride=2, activation="hswish").eval()
    randomize_bn(block, 0.3, (0.5, 1.5), bias=0.5)
    container = nn.Sequential(block)
    fast = bsconv_fast.optimize(container, channels_last=False)
    assert isinstance(fast[0], FusedConv) and fast[0].act == reference.ACTIVATIONS["hardswish"]
    x = torch.randn(2, 3, 21, 19)
    with torch.no_grad():
        want = block.double()(x.double())
        assert_close_to_reference(fast(x), want, 27, "stem block")


def test_autograd_takes_the_standard_ops_and_says_so():
    x, weight, bias = _problem(1, 3, 8, 9, 9, 3)
    layer = FusedConv(weight, bias, (1, 1), (1, 1), reference.ACTIVATIONS["relu"])
    x.requires_grad_()
    assert layer.choice(x)[0] == "reference" and "autograd" in layer.choice(x)[1]
    out = layer(x)
    out.sum().backward()
    assert torch.isfinite(x.grad).all()
    want = F.relu(F.conv2d(x.detach().double(), weight.double(), bias.double(), 1, 1))
    assert_close_to_reference(out.detach(), want, 27, "autograd path")


def test_supports_only_dense_stems():
    assert FusedConv.supports(nn.Conv2d(3, 32, 3, 2, 1))
    assert not FusedConv.supports(nn.Conv2d(3, 32, 1))               # 1x1: FusedPointwise
    assert not FusedConv.supports(nn.Conv2d(16, 32, 3))              # not a stem
    assert not FusedConv.supports(nn.Conv2d(4, 4, 3, groups=2))
    assert not FusedConv.supports(nn.Conv2d(3, 8, 3, dilation=2))
    assert not FusedConv.supports(nn.Conv2d(3, 8, 3, padding=1, padding_mode="reflect"))
    assert not FusedConv.supports(nn.Conv2d(3, 8, 3, padding="same"))


def test_opcheck_and_bad_arguments():
    x, weight, bias = _problem(2, 3, 10, 8, 9, 3)
    packed = _packed(weight, bias)
    torch.library.opcheck(torch.ops.bsconv_fast.conv_packed.default, (x, packed, 10, [3, 3], [2, 1], [1, 0], 2))
    with pytest.raises(RuntimeError, match="packed must be the contiguous buffer"):
        torch.ops.bsconv_fast.conv_packed(x, packed, 10, [5, 5], [1, 1], [2, 2], 0)
    with pytest.raises(RuntimeError, match="too small"):
        torch.ops.bsconv_fast.conv_packed(x[:, :, :2], packed, 10, [3, 3], [1, 1], [0, 0], 0)
    with pytest.raises(RuntimeError, match="activation code"):
        torch.ops.bsconv_fast.conv_packed(x, packed, 10, [3, 3], [1, 1], [1, 1], 9)
    with pytest.raises(RuntimeError, match="x must be 4-D"):
        torch.ops.bsconv_fast.conv_packed(x[0], packed, 10, [3, 3], [1, 1], [1, 1], 0)
    scale, shift = _affine(3)
    torch.library.opcheck(torch.ops.bsconv_fast.conv_packed.default,
                          (x, packed, 10, [3, 3], [2, 1], [1, 0], 2, scale, shift))
    with pytest.raises(RuntimeError, match="in_scale and in_shift come together"):
        torch.ops.bsconv_fast.conv_packed(x, packed, 10, [3, 3], [1, 1], [1, 1], 0, None, shift)
    with pytest.raises(RuntimeError, match=r"in_scale and in_shift must have shape \(3\), dtype Float"):
        torch.ops.bsconv_fast.conv_packed(x, packed, 10, [3, 3], [1, 1], [1, 1], 0, torch.ones(4), torch.zeros(4))
    with pytest.raises(RuntimeError, match=r"in_scale and in_shift must have shape \(3\), dtype Float"):
        torch.ops.bsconv_fast.conv_packed(x, packed, 10, [3, 3], [1, 1], [1, 1], 0, scale.double(), shift.double())
