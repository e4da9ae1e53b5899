"""Bad input gets a clear error naming the argument; nothing crashes."""
import pytest
import torch

import bsconv_fast


def _ok():
    return torch.randn(1, 5, 8, 8), torch.randn(7, 5, 1, 1), torch.randn(7, 1, 3, 3), torch.randn(7)


@pytest.mark.parametrize("mutate,exc,words", [
    (lambda a: {**a, "x": torch.randn(5, 8, 8)}, ValueError, ["x", "4-D"]),
    (lambda a: {**a, "x": torch.randn(1, 6, 8, 8)}, ValueError, ["pw_weight", "6 channels"]),
    (lambda a: {**a, "pw_weight": torch.randn(7, 5, 3, 3)}, ValueError, ["pw_weight", "(Cout, 5, 1, 1)"]),
    (lambda a: {**a, "dw_weight": torch.randn(7, 2, 3, 3)}, ValueError, ["dw_weight", "(7, 1, kh, kw)"]),
    (lambda a: {**a, "dw_weight": torch.randn(6, 1, 3, 3)}, ValueError, ["dw_weight"]),
    (lambda a: {**a, "bias": torch.randn(6)}, ValueError, ["bias", "(7,)"]),
    (lambda a: {**a, "pw_weight": a["pw_weight"].double()}, TypeError, ["pw_weight", "dtype"]),
    (lambda a: {**a, "x": torch.randint(0, 5, (1, 5, 8, 8))}, TypeError, ["x", "floating-point"]),
    (lambda a: {**a, "x": [1, 2, 3]}, TypeError, ["x", "torch.Tensor"]),
    (lambda a: {**a, "stride": 0}, ValueError, ["stride", "positive"]),
    (lambda a: {**a, "stride": -1}, ValueError, ["stride", "positive"]),
    (lambda a: {**a, "dilation": 0}, ValueError, ["dilation", "positive"]),
    (lambda a: {**a, "padding": -1}, ValueError, ["padding"]),
    (lambda a: {**a, "stride": (1, 2, 3)}, TypeError, ["stride"]),
    (lambda a: {**a, "x": torch.randn(1, 5, 1, 1)}, ValueError, ["too small"]),
])
def test_bad_arguments(mutate, exc, words):
    x, pw, dw, b = _ok()
    args = mutate({"x": x, "pw_weight": pw, "dw_weight": dw, "bias": b, "stride": 1, "padding": 0, "dilation": 1})
    with pytest.raises(exc) as info:
        bsconv_fast.bsconv_u(**args)
    for w in words:
        assert w in str(info.value)


def test_device_mismatch_names_the_argument():
    x, pw, dw, b = _ok()
    meta_pw = pw.to("meta")
    with pytest.raises(ValueError, match="pw_weight is on meta"):
        bsconv_fast.bsconv_u(x, meta_pw, dw, b)


def test_bsconv_s_checks_first_weight():
    x, pw, dw, b = _ok()
    with pytest.raises(ValueError, match="pw1_weight"):
        bsconv_fast.bsconv_s(x, torch.randn(3, 4, 1, 1), torch.randn(7, 3, 1, 1), dw, b)


def test_same_padding_supported_and_asymmetric_rejected():
    x, pw, dw, b = _ok()
    out = bsconv_fast.bsconv_u(x, pw, dw, b, padding="same")
    assert out.shape == (1, 7, 8, 8)
    with pytest.raises(ValueError, match="asymmetrically"):
        bsconv_fast.bsconv_u(x, pw, torch.randn(7, 1, 2, 2), b, padding="same")


def test_cpp_op_validates_too():
    """Direct op calls (bypassing the Python checks) raise RuntimeError, not a crash."""
    if not bsconv_fast._ext.available():
        pytest.skip("C++ extension not built")
    x, pw, dw, b = _ok()
    with pytest.raises(RuntimeError, match="stride must be positive"):
        torch.ops.bsconv_fast.pw_dw(x, pw, dw, None, b, [0, 1], [0, 0], [1, 1], 0, 0)
    with pytest.raises(RuntimeError, match="dw_weight"):
        torch.ops.bsconv_fast.pw_dw(x, pw, torch.randn(3, 1, 3, 3), None, b, [1, 1], [0, 0], [1, 1], 0, 0)
    with pytest.raises(RuntimeError, match="float32 and float64"):
        torch.ops.bsconv_fast.pw_dw(x.half(), pw.half(), dw.half(), None, b.half(), [1, 1], [0, 0], [1, 1], 0, 0)


def test_missing_extension_falls_back_to_reference_with_reason(monkeypatch):
    """A failed build must not crash: the reference runs, explain and a warning say why."""
    from bsconv_fast import _ext, dispatch
    monkeypatch.setattr(_ext, "_C", None)
    monkeypatch.setattr(_ext, "LOAD_ERROR", "ImportError: simulated")
    monkeypatch.setattr(dispatch, "_warned", set())
    layer = bsconv_fast.BSConvU(5, 7, 3, padding=1).eval()
    x = torch.randn(1, 5, 8, 8)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ extension not loaded"):
        out = layer(x)
    report = bsconv_fast.explain(layer, x)
    assert report[0]["backend"] == "reference" and "simulated" in report[0]["reason"]
    assert torch.allclose(out, bsconv_fast.reference.bsconv_u(x, layer.pw.weight, layer.dw.weight, layer.dw.bias, 1, 1))
