"""optimize() on torchvision's own model code, not the copies of tests/torchvision_like.py: an importable
torchvision, or the models of the torchvision wheel file named by BSCONV_FAST_TORCHVISION_WHEEL (the README's
test command downloads one; PyPI's CUDA build does not load against a CPU-only PyTorch, so its model code is
loaded without the package: benchmarks/torchvision_models.load_from_wheel). Skipped with neither."""
import copy
import importlib
import os
import sys

import pytest
import torch
import torch.nn as nn

import bsconv_fast
from bsconv_fast.optimize import FusedConv, FusedDepthwise, FusedLinear, FusedPwDw, ResidualChain, ResidualUnit
from helpers import assert_close_to_reference, randomize_bn

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "benchmarks"))
import torchvision_models  # noqa: E402 - benchmarks/ holds its loader and model builder

pytest.importorskip("bsconv.pytorch")  # the ResNets take its BSConvU_Replacer
pytestmark = pytest.mark.skipif(not bsconv_fast._ext.available(), reason="C++ extension not built")

# what a fused torchvision model must no longer run (see test_optimize._UNFUSED_OPS)
_UNFUSED_OPS = ("aten::batch_norm", "aten::add", "aten::add_", "aten::max_pool2d", "aten::linear", "aten::conv2d",
                "aten::relu", "aten::relu_", "aten::hardtanh_", "bsconv_fast::channel_affine")


def _torchvision_models():
    try:
        return importlib.import_module("torchvision.models")
    except Exception:  # noqa: BLE001 - not installed, or a build that does not load here: try the wheel
        pass
    wheel = os.environ.get("BSCONV_FAST_TORCHVISION_WHEEL")
    if not wheel:
        pytest.skip("no importable torchvision and BSCONV_FAST_TORCHVISION_WHEEL not set")
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]  # what the failed import left
    torchvision_models.load_from_wheel(wheel)
    return importlib.import_module("torchvision.models")


@pytest.fixture(scope="module")
def models():
    return _torchvision_models()


def _build(name, replacer):
    model = torchvision_models.build(name, "bsconvu" if replacer else "none")
    randomize_bn(model, 0.3, (0.5, 1.5), bias=0.5)
    return model


def _blocks(model, name):
    return [m for m in model.modules() if type(m).__name__ == name]


def _expands(block):
    """Whether a MobileNet InvertedResidual starts with a 1x1 expand conv (its stack: `conv` in V2, `block` in V3;
    each entry a Conv2dNormActivation stack)."""
    stack = block._modules.get("conv", block._modules.get("block"))
    return stack[0][0].kernel_size == (1, 1)


@pytest.mark.parametrize("name,replacer", [("mobilenet_v2", False), ("mobilenet_v3_small", False),
                                           ("resnet18", True), ("resnet50", True)])
def test_torchvision_model_runs_fused(models, name, replacer):
    torch.manual_seed(18)
    model = _build(name, replacer)
    fast = bsconv_fast.optimize(model)
    x = torch.randn(1, 3, 67, 61)
    if name.startswith("mobilenet"):
        blocks = _blocks(model, "InvertedResidual")
        # every block with an expand 1x1 conv: expand -> depthwise fused; every block with a skip: the add in the
        # projection's store; the one block without an expand conv runs its depthwise conv alone
        assert fast.bsconv_fast_fused == sum(map(_expands, blocks)) == len(blocks) - 1
        assert sum(isinstance(m, ResidualChain) for m in fast.modules()) == sum(b.use_res_connect for b in blocks)
        assert sum(isinstance(m, FusedDepthwise) for m in fast.modules()) == 1
        assert sum(isinstance(m, FusedLinear) for m in fast.modules()) == len(
            [m for m in model.classifier if isinstance(m, nn.Linear)])
    else:
        blocks = _blocks(model, "BasicBlock" if name == "resnet18" else "Bottleneck")
        unit = ResidualUnit if name == "resnet18" else ResidualChain
        assert sum(isinstance(m, unit) for m in fast.modules()) == len(blocks)
        assert fast.bsconv_fast_fused == len(blocks) * (2 if name == "resnet18" else 1)
        assert isinstance(fast.conv1, FusedConv) and fast.conv1.pool is not None
    assert all(r["backend"] != "pytorch" for r in bsconv_fast.explain(fast, x))
    with torch.inference_mode(), torch.profiler.profile() as prof:
        got = fast(x)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert not any(calls.get(op) for op in _UNFUSED_OPS), calls
    fused_calls = calls.get("bsconv_fast::pw_dw_packed", 0) + 2 * calls.get("bsconv_fast::pw_dw_pair_packed", 0)
    assert fused_calls == sum(type(m) is FusedPwDw for m in fast.modules())
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
    assert_close_to_reference(got, want, 2048 * 9, name)


def test_torchvision_plain_resnet_folds_its_bns(models):
    """torchvision's resnet18 as published (dense 3x3 convs, no replacer): its convs stay PyTorch's, with their BNs
    folded in and channels_last weights; no BN pass left."""
    torch.manual_seed(22)
    model = _build("resnet18", False)
    fast = bsconv_fast.optimize(model)
    x = torch.randn(1, 3, 67, 61)
    with torch.inference_mode(), torch.profiler.profile() as prof:
        got = fast(x)
    calls = {e.key: e.count for e in prof.key_averages()}
    assert not any(calls.get(op) for op in ("aten::batch_norm", "bsconv_fast::channel_affine")), calls
    dense = [m for m in fast.modules() if type(m) is nn.Conv2d]
    assert len(dense) == 16 and all(m.bias is not None and m.weight.is_contiguous(memory_format=torch.channels_last)
                                    for m in dense)
    with torch.no_grad():
        want = copy.deepcopy(model).double()(x.double())
    assert_close_to_reference(got, want, 512 * 9, "resnet18 plain")
