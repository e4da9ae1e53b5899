"""optimize(): BN folding, activation epilogues and inverted-residual fusion, against the unfused
float64 model; the original model stays untouched."""
import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import bsconv_fast
from bsconv_fast import _ext
import torchvision_like as tv
from bsconv_fast.optimize import (FusedConv, FusedDepthwise, FusedLinear, FusedPointwise, FusedPwDw, InvertedResidual, ResidualChain, ResidualUnit,
                                  fuse_inverted_residual)
from bsconv_fast.glue import SqueezeExcite
from helpers import assert_close_to_reference, assert_model_drift, randomize_bn

B = pytest.importorskip("bsconv.pytorch")
common = pytest.importorskip("bsconv.pytorch.common")
pytestmark = pytest.mark.skipif(not bsconv_fast._ext.available(), reason="C++ extension not built")


# (model, fused pointwise->depthwise layers): BSConv-U + BN + ReLU (MobileNetV1, ResNet), BSConv-S with
# BN inside (WRN), inverted residuals with ReLU6 (V2), ReLU/Hardswish and SE units (V3).
MODELS = [("cifar_mobilenetv1_w1d4_bsconvu", 13), ("cifar_resnet20_bsconvu", 19), ("cifar_wrn16_1_bsconvs_p1d4", 13),
          ("cifar_mobilenetv2_w1d4_bsconvs_p1d6", 17), ("cifar_mobilenetv3_small_w7d20_bsconvs_p1d6", 11),
          ("cifar_mobilenetv3_large_w7d20_bsconvs_p1d6", 15)]


@pytest.mark.parametrize("name,fused", MODELS)
def test_optimized_official_model_matches(name, fused):
    model = B.get_model(name, num_classes=10).eval()
    randomize_bn(model, 0.3, (0.5, 1.5), bias=0.5)
    before = copy.deepcopy(model.state_dict())
    x = torch.randn(2, 3, 32, 32)
    fast = bsconv_fast.optimize(model)
    assert fast.bsconv_fast_fused == fused
    assert sum(type(m) is FusedPwDw for m in fast.modules()) == fused
    backends = set(bsconv_fast.explain(fast, x).backends().values())
    isa = bsconv_fast._ext.cpu_kernel_isa()
    # every layer on a bsconv_fast kernel: fused pairs, 1x1 convs, the stem (a BSConv in some), the input
    # BN (folded into a FusedConv stem where there is one) and the pools
    assert {f"cpu-fused ({isa})", "cpu-pool"} <= backends
    assert ("cpu-affine" in backends) == (f"cpu-conv ({isa})" not in backends)
    assert backends <= {f"cpu-fused ({isa})", f"cpu-fused-pair ({isa})", f"cpu-pointwise ({isa})", f"cpu-conv ({isa})",
                        "cpu-affine", "cpu-pool"}
    with torch.inference_mode():
        got = fast(x)
        with torch.profiler.profile() as prof:
            fast(x)
    calls = {e.key: e.count for e in prof.key_averages()}
    # every fused layer runs fused: on its own, or two of a ResNet unit in one call
    assert calls.get("bsconv_fast::pw_dw_packed", 0) + 2 * calls.get("bsconv_fast::pw_dw_pair_packed", 0) == fused
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        eager = model(x)
    assert_model_drift(got, eager, want, name)
    for k, v in model.state_dict().items():  # the original is untouched
        assert torch.equal(v, before[k]), k


def _block(cin, cout, k, stride, act, use_bn=True, groups=1):
    blk = common.ConvBlock(cin, cout, k, stride, k // 2, groups=groups, use_bn=use_bn, activation=act)
    randomize_bn(blk, 0.3, (0.5, 1.5), bias=0.5)
    return blk.eval()


@pytest.mark.parametrize("act1", ["relu", "relu6", "hswish", "silu"])
@pytest.mark.parametrize("act2", ["relu", "hswish"])
@pytest.mark.parametrize("k,stride", [(3, 1), (5, 2)])
def test_inverted_residual_epilogues(act1, act2, k, stride):
    # the official Swish calls F.sigmoid(inplace=True), which torch rejects: SiLU stands in for it
    expand = _block(7, 19, 1, 1, "relu" if act1 == "silu" else act1)
    if act1 == "silu":
        expand.activation = nn.SiLU()
    depthwise = _block(19, 19, k, stride, act2, groups=19)
    fused = fuse_inverted_residual(expand, depthwise)
    assert fused is not None
    x = torch.randn(2, 7, 13, 11)
    with torch.no_grad():
        want = copy.deepcopy(depthwise).double()(copy.deepcopy(expand).double()(x.double()))
        got = fused(x)
    assert_close_to_reference(got, want, 7 + k * k, f"{act1}/{act2}")


def test_unfusable_activation_is_left_alone():
    expand = _block(4, 8, 1, 1, "relu")
    expand.activation = nn.GELU()  # no GELU epilogue: must not be fused
    depthwise = _block(8, 8, 3, 1, "relu", groups=8)
    assert fuse_inverted_residual(expand, depthwise) is None


def test_optimize_single_layer_and_double_dtype():
    layer = bsconv_fast.BSConvS(9, 21, 3, padding=1, with_bn=True).eval()
    randomize_bn(layer, 0.3, (0.5, 1.5), bias=0.5)
    fast = bsconv_fast.optimize(layer, channels_last=False)
    assert isinstance(fast, FusedPwDw) and fast.prefix is not None
    x = torch.randn(2, 9, 10, 10)
    with torch.no_grad():
        want = copy.deepcopy(layer).double()(x.double())
        assert_close_to_reference(fast(x), want, 9 + 9, "bsconv_s fp32")
        # folded in float32 by optimize(), so float64 execution keeps float32-level agreement
        assert_close_to_reference(fast.double()(x.double()).float(), want, 9 + 9, "bsconv_s fp64")
        assert fast(x.double()).dtype == torch.float64


def test_fused_layer_repacks_after_in_place_buffer_update():
    layer = bsconv_fast.BSConvU(6, 10, 3, padding=1).eval()
    fast = bsconv_fast.optimize(layer, channels_last=False)
    x = torch.randn(1, 6, 7, 7)
    with torch.inference_mode():
        first = fast(x)
    with torch.no_grad():
        fast.dw_weight.mul_(-1.0)
    with torch.inference_mode():
        second = fast(x)
    want = bsconv_fast.reference.pw_dw(x, fast.pw_weight, fast.dw_weight, None, fast.bias, 1, 1, 1)
    assert torch.allclose(second, want, atol=1e-5) and not torch.allclose(first, second)


# (model, InvertedResidual blocks, ResidualUnits, of which with a 1x1 projection shortcut)
STRUCTURE = [("cifar_mobilenetv2_w1d4_bsconvs_p1d6", 17, 0, 0), ("cifar_mobilenetv3_large_w7d20_bsconvs_p1d6", 15, 0, 0),
             ("cifar_resnet20_bsconvu", 0, 9, 2)]


@pytest.mark.parametrize("name,inverted,units,projections", STRUCTURE)
def test_blocks_become_one_module_with_the_skip_in_the_store(name, inverted, units, projections):
    """Inverted residuals: projection + skip add in one pw_packed call; ResNet units: a projection
    shortcut takes the body's output and the ReLU in its store; no aten add/relu left for them."""
    model = B.get_model(name, num_classes=10).eval()
    randomize_bn(model, 0.3, (0.5, 1.5), bias=0.5)
    fast = bsconv_fast.optimize(model)
    assert sum(isinstance(m, InvertedResidual) for m in fast.modules()) == inverted
    res_units = [m for m in fast.modules() if isinstance(m, ResidualUnit)]
    assert len(res_units) == units and sum(u.projection is not None for u in res_units) == projections
    pointwise = sum(type(m) is FusedPointwise for m in fast.modules())  # not the stem (FusedConv)
    x = torch.randn(3, 3, 32, 32)
    with torch.inference_mode():
        with torch.profiler.profile() as prof:
            got = fast(x)
    counts = {e.key: e.count for e in prof.key_averages()}
    assert counts.get("bsconv_fast::pw_packed", 0) == pointwise
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
        eager = model(x)
    assert_model_drift(got, eager, want, name)


def test_fused_layer_residual_fast_and_autograd_paths_agree():
    layer = bsconv_fast.BSConvU(6, 10, 3, padding=1, bias=True).eval()
    fast = bsconv_fast.optimize(layer, channels_last=False)
    fast.out_act = bsconv_fast.ACTIVATIONS["relu"]
    x, r = torch.randn(2, 6, 9, 7), torch.randn(2, 10, 9, 7)
    with torch.inference_mode():
        packed = fast(x, r)
    r.requires_grad_()
    differentiable = fast(x, r)
    differentiable.sum().backward()
    want = torch.relu(bsconv_fast.reference.pw_dw(x.double(), fast.pw_weight.double(), fast.dw_weight.double(), None,
                                                  fast.bias.double(), 1, 1, 1) + r.detach().double())
    assert_close_to_reference(packed, want, 6 + 9, "packed")
    assert_close_to_reference(differentiable.detach(), want, 6 + 9, "autograd")
    assert torch.equal(r.grad, (want > 0).float())


def test_optimize_under_inference_mode_makes_ordinary_tensors():
    """Inference tensors have no version counter, so packed weights made from them cannot be cached: optimize()
    called under torch.inference_mode, or given a model built there, must still make ordinary tensors, else
    every forward packs its weights again (the frozen program twice as long, resnet18 1.4x the time)."""
    B = pytest.importorskip("bsconv.pytorch")
    x = torch.randn(1, 3, 32, 32)
    model = B.get_model("cifar_mobilenetv1_w1_bsconvu", num_classes=10).eval()
    with torch.inference_mode():
        built_inside = B.get_model("cifar_mobilenetv1_w1_bsconvu", num_classes=10).eval()
        built_inside.load_state_dict(model.state_dict())
        optimized = [bsconv_fast.optimize(m, freeze=True) for m in (model, built_inside)]
    optimized.append(bsconv_fast.optimize(model, freeze=True))
    firsts = []
    for frozen in optimized:
        assert not any(t.is_inference() for t in frozen.model.state_dict().values())
        with torch.inference_mode():
            frozen(x)
            frozen(x)
        firsts.append(frozen.programs()[-1].splitlines()[0])  # "# replayed from C++ (..., N calls)"
    assert firsts[0] == firsts[1] == firsts[2] and "calls" in firsts[0]


# ---- chains of plain layers in nn.Sequential stacks, and torchvision's blocks (tests/torchvision_like.py)

# what must not run once a model's layers are fused: the BNs, the separate activations and adds, BN passes
_UNFUSED_OPS = ("aten::batch_norm", "aten::add", "aten::add_", "aten::relu", "aten::relu_", "aten::hardtanh_",
                "aten::max_pool2d", "bsconv_fast::channel_affine")


def _op_calls(fast, x):
    with torch.inference_mode(), torch.profiler.profile() as prof:
        fast(x)
    return {e.key: e.count for e in prof.key_averages()}


def _assert_matches_float64(fast, model, x, reduction, what):
    with torch.inference_mode():
        got = fast(x)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
    assert_close_to_reference(got, want, reduction, what)


def test_plain_layer_stacks_fuse_like_torchvision_mobilenet_v2():
    torch.manual_seed(11)
    model = tv.mobilenet_v2(8).eval()
    randomize_bn(model, 0.3, (0.5, 1.5), bias=0.5)
    fast = bsconv_fast.optimize(model)
    # the three expand -> depthwise chains (Conv2dNormActivation stacks nested in the block's stack)
    assert fast.bsconv_fast_fused == 3 == sum(type(m) is FusedPwDw for m in fast.modules())
    assert sum(isinstance(m, ResidualChain) for m in fast.modules()) == 2  # the blocks with a skip: the add in the store
    x = torch.randn(2, 3, 37, 45)
    calls = _op_calls(fast, x)
    # the depthwise conv of the block without expansion (no 1x1 before it) runs alone, its BN and ReLU6 in it
    assert calls.get("bsconv_fast::pw_dw_packed") == 3 and calls.get("bsconv_fast::dw_packed") == 1, calls
    assert not any(calls.get(op) for op in _UNFUSED_OPS + ("aten::conv2d",)), calls
    backends = [r["backend"] for r in bsconv_fast.explain(fast, x)]
    assert "pytorch" not in backends and backends.count(f"cpu-depthwise ({_ext.cpu_kernel_isa()})") == 1, backends
    _assert_matches_float64(fast, model, x, 48 * 9, "mobilenet_v2-like")


def test_plain_layer_stacks_fuse_like_torchvision_mobilenet_v3():
    torch.manual_seed(15)
    model = tv.mobilenet_v3(8).eval()
    randomize_bn(model, 0.3, (0.5, 1.5), bias=0.5)
    fast = bsconv_fast.optimize(model)
    assert fast.bsconv_fast_fused == 3
    assert sum(isinstance(m, SqueezeExcite) for m in fast.modules()) == 3  # torchvision's SqueezeExcitation
    assert sum(isinstance(m, ResidualChain) for m in fast.modules()) == 1  # the last block: the skip in the store
    # the classifier: both Linears large enough, the first with its Hardswish in the store
    linears = [m for m in fast.modules() if isinstance(m, FusedLinear)]
    assert [m.act for m in linears] == [bsconv_fast.ACTIVATIONS["hardswish"], 0]
    x = torch.randn(2, 3, 41, 35)
    calls = _op_calls(fast, x)
    assert calls.get("bsconv_fast::pw_dw_packed") == 3 and calls.get("bsconv_fast::global_avg_pool") == 4, calls
    assert not any(calls.get(op) for op in _UNFUSED_OPS + ("aten::conv2d", "aten::hardswish_", "aten::linear")), calls
    assert all(r["backend"] != "pytorch" for r in bsconv_fast.explain(fast, x))
    _assert_matches_float64(fast, model, x, 48 * 25, "mobilenet_v3-like")


def test_root_stack_of_bsconv_bn_act_folds():
    torch.manual_seed(12)
    model = nn.Sequential(bsconv_fast.BSConvU(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(),
                          bsconv_fast.BSConvU(16, 12, 5, stride=2, padding=2), nn.BatchNorm2d(12), nn.ReLU6()).eval()
    randomize_bn(model, 0.3, (0.5, 1.5), bias=0.5)
    fast = bsconv_fast.optimize(model)
    assert fast.bsconv_fast_fused == 2
    x = torch.randn(1, 8, 19, 23)
    calls = _op_calls(fast, x)
    assert calls.get("bsconv_fast::pw_dw_packed") == 2 and not any(calls.get(op) for op in _UNFUSED_OPS), calls
    _assert_matches_float64(fast, model, x, 16 * 25, "root stack")


def _chain(kind):
    """1x1 conv -> BN -> act -> depthwise conv -> BN -> ReLU, changed as `kind` says."""
    pw = nn.Conv2d(6, 10, 1, stride=2 if kind == "pw_stride" else 1, bias=kind == "pw_bias")
    bn1 = nn.BatchNorm2d(10, track_running_stats=kind != "batch_stats_bn")
    act = nn.GELU() if kind == "gelu" else nn.Hardswish()
    dw = nn.Conv2d(10, 20 if kind == "multiplier" else 10, 3, padding=1, groups=10,
                   padding_mode="reflect" if kind == "reflect" else "zeros")
    return nn.Sequential(pw, bn1, act, dw, nn.BatchNorm2d(dw.out_channels), nn.ReLU()).eval()


@pytest.mark.parametrize("kind", ["plain", "pw_bias", "gelu", "batch_stats_bn", "pw_stride", "reflect", "multiplier"])
def test_stack_chains_fuse_only_where_exact(kind):
    torch.manual_seed(13)
    model = _chain(kind)
    randomize_bn(model, 0.3, (0.5, 1.5), bias=0.5)
    fast = bsconv_fast.optimize(model)
    fuses = kind in ("plain", "pw_bias")
    assert fast.bsconv_fast_fused == int(fuses)
    if not fuses:  # the 1x1 conv still takes its BN where that BN uses running statistics
        pointwise = [m for m in fast.modules() if isinstance(m, FusedPointwise)]
        assert len(pointwise) == 1 and (pointwise[0].bias is not None) == (kind != "batch_stats_bn")
        assert any(type(m) is nn.BatchNorm2d for m in fast.modules()) == (kind == "batch_stats_bn")
        # the depthwise conv alone with its BN and ReLU, where it is one (zero padding, no channel multiplier)
        alone = sum(isinstance(m, FusedDepthwise) for m in fast.modules())
        assert alone == (kind not in ("reflect", "multiplier")), alone
    _assert_matches_float64(fast, model, torch.randn(2, 6, 15, 13), 6 + 9, kind)


@pytest.mark.parametrize("block", [tv.BasicBlock, tv.Bottleneck])
def test_torchvision_resnet_with_bsconv_replacer_runs_fused(block):
    torch.manual_seed(14)
    model = B.BSConvU_Replacer().apply(tv.ResNet(block)).eval()  # bsconv's recipe: every 3x3 conv a BSConv-U
    randomize_bn(model, 0.3, (0.5, 1.5), bias=0.5)
    fast = bsconv_fast.optimize(model)
    fused = 4 if block is tv.BasicBlock else 2
    assert fast.bsconv_fast_fused == fused
    units = [m for m in fast.modules() if isinstance(m, ResidualUnit if block is tv.BasicBlock else ResidualChain)]
    assert len(units) == 2 and all(u.projection if hasattr(u, "projection") else u.shortcut for u in units[1:])
    assert isinstance(fast.conv1, FusedConv) and fast.conv1.pool is not None  # conv1 -> bn1 -> relu -> maxpool
    x = torch.randn(2, 3, 45, 39)
    calls = _op_calls(fast, x)
    assert calls.get("bsconv_fast::pw_dw_packed", 0) + 2 * calls.get("bsconv_fast::pw_dw_pair_packed", 0) == fused
    assert not any(calls.get(op) for op in _UNFUSED_OPS + ("aten::conv2d",)), calls
    _assert_matches_float64(fast, model, x, 32 * 9, block.__name__)


def test_look_alike_blocks_of_another_origin_are_left_to_their_forward():
    """A class named like torchvision's, with its attributes, from another module: its forward may run them
    differently (here the ReLU before the add is missing), so only its layers are rewritten one by one."""

    class BasicBlock(tv.BasicBlock):  # defined here: __module__ is this test module
        def forward(self, x):
            return self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x

    torch.manual_seed(16)
    model = B.BSConvU_Replacer().apply(nn.Sequential(BasicBlock(8, 8))).eval()
    randomize_bn(model, 0.3, (0.5, 1.5), bias=0.5)
    fast = bsconv_fast.optimize(model)
    assert not any(isinstance(m, ResidualUnit) for m in fast.modules()) and fast.bsconv_fast_fused == 2
    x = torch.randn(2, 8, 17, 19)
    with torch.no_grad():
        assert (model(x) < 0).any()  # the look-alike's output has negatives: a ReLU in the store would show
    _assert_matches_float64(fast, model, x, 8 * 9, "look-alike")


@pytest.mark.parametrize("shape", [(1, 300), (5, 300), (2, 3, 300), (300,)])
def test_fused_linear_matches_and_small_layers_stay(shape):
    torch.manual_seed(17)
    linear = nn.Linear(300, 257)
    fast = FusedLinear.from_linear(linear, bsconv_fast.ACTIVATIONS["silu"])
    x = torch.randn(shape)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        got = fast(x)
    assert {e.key: e.count for e in prof.key_averages()}.get("bsconv_fast::pw_packed") == 1  # every shape: rows
    want = F.silu(F.linear(x.double(), linear.weight.double(), linear.bias.double()))
    assert_close_to_reference(got, want, 300, f"linear {shape}")
    assert FusedLinear.supports(linear) and not FusedLinear.supports(nn.Linear(512, 10))


def test_depthwise_alone_reports_and_runs_its_fallback():
    """FusedDepthwise falls back to F.conv2d (not the identity pointwise its packing holds) and says so."""
    torch.manual_seed(20)
    conv = nn.Conv2d(6, 6, 3, padding=2, dilation=2, groups=6)
    layer = FusedDepthwise.from_conv(conv, act=bsconv_fast.ACTIVATIONS["relu6"])
    x = torch.randn(2, 6, 9, 11)
    assert layer.choice(x) == (f"cpu-depthwise ({_ext.cpu_kernel_isa()})", "")
    backend, reason = layer.choice(x.requires_grad_())
    assert backend == "reference" and "autograd" in reason
    y = layer(x)
    y.sum().backward()
    want = F.relu6(F.conv2d(x.detach().double(), conv.weight.double(), conv.bias.double(), 1, 2, 2, 6))
    assert_close_to_reference(y.detach(), want, 9, "fallback")
    assert x.grad is not None and torch.isfinite(x.grad).all()
    with torch.inference_mode():
        assert_close_to_reference(layer(x.detach()), want, 9, "dw_packed")


@pytest.mark.parametrize("block", [tv.BasicBlock, tv.Bottleneck])
def test_torchvision_resnet_without_replacer_folds_its_bns(block):
    """Dense 3x3 convs (no BSConv replacer): each block's BNs fold into its convs (1x1 ones on the 1x1 op), no BN
    pass left; the block keeps its own forward."""
    torch.manual_seed(21)
    model = tv.ResNet(block).eval()
    randomize_bn(model, 0.3, (0.5, 1.5), bias=0.5)
    fast = bsconv_fast.optimize(model)
    x = torch.randn(2, 3, 45, 39)
    calls = _op_calls(fast, x)
    assert not any(calls.get(op) for op in ("aten::batch_norm", "bsconv_fast::channel_affine")), calls
    blocks = [m for m in fast.modules() if type(m) is block]
    assert len(blocks) == 2 and all(type(getattr(b, name)) is nn.Identity for b in blocks
                                    for name in ("bn1", "bn2") + (("bn3",) if block is tv.Bottleneck else ()))
    # the 3x3 conv of 16 input channels stays PyTorch's conv, its BN in its bias (8-channel ones: FusedConv), its
    # weight channels_last as its input (oneDNN would reorder it on every call)
    dense = [m for m in fast.modules() if type(m) is nn.Conv2d]
    assert dense and all(m.bias is not None and m.weight.is_contiguous(memory_format=torch.channels_last)
                         for m in dense)
    _assert_matches_float64(fast, model, x, 64 * 9, block.__name__)
