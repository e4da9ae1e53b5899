"""Drop-in modules: same constructor/state_dict as bsconv.pytorch, same outputs, BN handling, reg loss."""
import warnings

import pytest
import torch

import bsconv_fast
from bsconv_fast.dispatch import _warned
from helpers import assert_close_to_reference, randomize_bn

B = pytest.importorskip("bsconv.pytorch")
pytestmark = pytest.mark.skipif(not bsconv_fast._ext.available(), reason="C++ extension not built")

U_ARGS = [dict(in_channels=5, out_channels=17, kernel_size=3, stride=2, padding=1),
          dict(in_channels=17, out_channels=33, kernel_size=(3, 5), padding=(1, 2), dilation=(2, 1), bias=False),
          dict(in_channels=33, out_channels=9, kernel_size=5, padding=2, with_bn=True,
               bn_kwargs={"momentum": 0.2})]
S_ARGS = [dict(in_channels=17, out_channels=33, kernel_size=3, padding=1),
          dict(in_channels=33, out_channels=20, kernel_size=5, stride=2, padding=2, p=0.5, with_bn=True),
          dict(in_channels=5, out_channels=7, kernel_size=3, min_mid_channels=2, p=0.1)]


@pytest.mark.parametrize("fast_cls,official_cls,kwargs", [(bsconv_fast.BSConvU, B.BSConvU, a) for a in U_ARGS]
                         + [(bsconv_fast.BSConvS, B.BSConvS, a) for a in S_ARGS])
def test_official_state_dict_loads_and_outputs_match(fast_cls, official_cls, kwargs):
    official = official_cls(**kwargs)
    randomize_bn(official, 1.0, (0.5, 2.0), bias=1.0)
    official.eval()
    fast = fast_cls(**kwargs).eval()
    assert list(fast.state_dict().keys()) == list(official.state_dict().keys())
    fast.load_state_dict(official.state_dict(), strict=True)
    x = torch.randn(3, kwargs["in_channels"], 13, 11)
    with torch.no_grad():
        want = official.double()(x.double())
        got = fast(x)
    assert {"cpu-fused (" + bsconv_fast._ext.cpu_kernel_isa() + ")"} == set(
        bsconv_fast.explain(fast, x).backends().values())
    assert_close_to_reference(got, want, kwargs["in_channels"] + 25, str(kwargs))


def test_reg_loss_matches_official_and_mixin_works_on_patched_model():
    model = B.get_model("cifar_wrn16_1_bsconvs_p1d4", num_classes=10)
    want = model.reg_loss(alpha=0.1)
    bsconv_fast.patch(model)
    assert isinstance(model.backbone.stage1.unit1.conv1.conv, bsconv_fast.BSConvS)
    got = model.reg_loss(alpha=0.1)
    assert torch.allclose(got, want)
    got.backward()  # differentiable w.r.t. the first 1x1 weights
    assert model.backbone.stage1.unit1.conv1.conv.pw1.weight.grad is not None


def test_training_with_bn_between_stages_falls_back_with_warning_and_matches():
    kwargs = U_ARGS[2]
    official = B.BSConvU(**kwargs).train()
    fast = bsconv_fast.BSConvU(**kwargs).train()
    fast.load_state_dict(official.state_dict())
    x = torch.randn(4, 33, 9, 9)
    _warned.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fast(x)
    assert any("batch statistics" in str(w.message) for w in caught)
    backend = bsconv_fast.explain(fast, x).backends()
    assert backend == {"(root)": "reference"}
    want = official(x)
    assert torch.allclose(got, want, atol=1e-5)
    # running statistics were updated identically
    assert torch.allclose(fast.bn.running_mean, official.bn.running_mean)


def test_training_without_bn_is_fused_and_gradients_match():
    kwargs = S_ARGS[0]
    official = B.BSConvS(**kwargs).train()
    fast = bsconv_fast.BSConvS(**kwargs).train()
    fast.load_state_dict(official.state_dict())
    x = torch.randn(2, 17, 12, 12)
    assert "reference" not in bsconv_fast.explain(fast, x).backends().values()
    fast(x).square().sum().backward()
    official(x).square().sum().backward()
    for (name, a), b in zip(fast.named_parameters(), official.parameters()):
        assert torch.allclose(a.grad, b.grad, rtol=1e-4, atol=1e-5), name


def test_padding_mode_reflect_falls_back_and_says_why():
    fast = bsconv_fast.BSConvU(5, 7, 3, padding=1, padding_mode="reflect")
    official = B.BSConvU(5, 7, 3, padding=1, padding_mode="reflect")
    fast.load_state_dict(official.state_dict())
    x = torch.randn(1, 5, 8, 8)
    report = bsconv_fast.explain(fast, x)
    assert report[0]["backend"] == "reference" and "padding_mode" in report[0]["reason"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert torch.allclose(fast(x), official(x), atol=1e-6)


def test_inference_uses_packed_cache_and_sees_weight_updates():
    layer = bsconv_fast.BSConvU(17, 33, 3, padding=1, with_bn=True).eval()
    randomize_bn(layer, 1.0, (0.5, 2.0), bias=1.0)
    x = torch.randn(2, 17, 9, 9)
    with torch.inference_mode():
        first = layer(x)
        packed = layer.__dict__["_bsconv_fast_packed"][1]
        assert layer(x).equal(first) and layer.__dict__["_bsconv_fast_packed"][1] is packed  # reused
    with torch.no_grad():
        layer.dw.weight.mul_(2.0)  # in-place update (as an optimizer step): cache must refresh
        layer.bn.running_mean.add_(0.5)
    with torch.inference_mode():
        second = layer(x)
    assert layer.__dict__["_bsconv_fast_packed"][1] is not packed
    reference = bsconv_fast.patching.unpatch(layer)
    with torch.no_grad():
        assert_close_to_reference(second, reference.double()(x.double()), 17 + 9, "after update")


def test_packed_cache_sees_a_replaced_parameter_and_a_parametrized_weight():
    """The cache check reads a leaf child's own dicts; a new Parameter object, or a weight that a
    parametrization computes from tensors in a grandchild, must still refresh it."""
    layer = bsconv_fast.BSConvU(6, 11, 3, padding=1).eval()
    x = torch.randn(1, 6, 7, 5)
    with torch.no_grad():
        layer(x)
        layer.dw.weight = torch.nn.Parameter(torch.randn_like(layer.dw.weight))
        want = bsconv_fast.reference.bsconv_u(x.double(), layer.pw.weight.double(), layer.dw.weight.double(),
                                              layer.dw.bias.double(), 1, 1)
        assert_close_to_reference(layer(x), want, 6 + 9, "replaced dw weight")
    torch.nn.utils.parametrize.register_parametrization(layer.pw, "weight", _Doubled())
    with torch.no_grad():
        for _ in range(2):  # second pass: after an in-place update of the parametrization's original
            want = bsconv_fast.reference.bsconv_u(x.double(), layer.pw.weight.double(), layer.dw.weight.double(),
                                                  layer.dw.bias.double(), 1, 1)
            assert_close_to_reference(layer(x), want, 6 + 9, "parametrized pw weight")
            layer.pw.parametrizations.weight.original.mul_(-0.5)


class _Doubled(torch.nn.Module):
    def forward(self, w):
        return 2.0 * w


def test_grad_mode_uses_differentiable_op():
    layer = bsconv_fast.BSConvU(5, 7, 3, padding=1)
    x = torch.randn(1, 5, 6, 6)
    y = layer(x)
    assert y.grad_fn is not None
    y.sum().backward()
    assert layer.pw.weight.grad is not None and "_bsconv_fast_packed" not in layer.__dict__


def test_modules_built_under_inference_mode_are_not_cached():
    """Inference tensors have no version counter: their packed weights are never served stale."""
    with torch.inference_mode():
        layer = bsconv_fast.BSConvU(5, 7, 3, padding=1).eval()
        x = torch.randn(1, 5, 6, 6)
        first = layer(x)
        layer.dw.weight.mul_(3.0)  # allowed on inference tensors, invisible to version counters
        second = layer(x)
        want = bsconv_fast.reference.bsconv_u(x, layer.pw.weight, layer.dw.weight, layer.dw.bias, 1, 1)
        assert torch.allclose(second, want, atol=1e-5) and not torch.allclose(first, second)
        assert bsconv_fast.explain(layer, x)[0]["backend"].startswith("cpu-fused")
