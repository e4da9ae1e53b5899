"""torch.library registration: autograd (gradcheck), opcheck, torch.compile without graph breaks."""
import pytest
import torch

import bsconv_fast
from bsconv_fast import reference
from helpers import random_problem

pytestmark = pytest.mark.skipif(not bsconv_fast._ext.available(), reason="C++ extension not built")


@pytest.mark.parametrize("mid_act,out_act,stride,dilation", [(0, 0, 1, 1), (3, 2, 2, 1), (4, 3, 1, 2), (1, 4, 2, 2)])
def test_gradcheck_float64(mid_act, out_act, stride, dilation):
    x, pw, dw, mb, b = random_problem(2, 3, 5, 7, 6, (3, 2), torch.float64, mid_bias=True)
    inputs = [t.requires_grad_() for t in (x, pw, dw, mb, b)]

    def f(x, pw, dw, mb, b):
        return bsconv_fast.pw_dw(x, pw, dw, mb, b, stride, 1, dilation, mid_act, out_act)

    assert torch.autograd.gradcheck(f, inputs, eps=1e-6, atol=1e-7)


def test_grads_match_reference_float32():
    x, pw, dw, mb, b = random_problem(3, 17, 33, 13, 11, 3, torch.float32, mid_bias=True)
    ins = [t.clone().requires_grad_() for t in (x, pw, dw, mb, b)]
    ins64 = [t.double().requires_grad_() for t in (x, pw, dw, mb, b)]
    gy = torch.randn(3, 33, 7, 6)
    bsconv_fast.pw_dw(*ins, 2, 1, 1, 3, 2).backward(gy)
    reference.pw_dw(*ins64, 2, 1, 1, 3, 2).backward(gy.double())
    for name, a, r in zip(("x", "pw", "dw", "mid_bias", "bias"), ins, ins64):
        rel = (a.grad.double() - r.grad).norm() / r.grad.norm()
        assert rel < 1e-5, f"grad of {name}: relative error {rel:.3g}"


def test_backward_does_not_keep_the_intermediate():
    """Only inputs and weights are saved for backward (the intermediate is recomputed)."""
    x, pw, dw, _, b = random_problem(1, 8, 64, 32, 32, 3)
    x.requires_grad_()
    y = bsconv_fast.bsconv_u(x, pw, dw, b, 1, 1)
    saved = [t for t in y.grad_fn.saved_tensors] if hasattr(y.grad_fn, "saved_tensors") else []
    sizes = {t.numel() for t in saved if isinstance(t, torch.Tensor)}
    intermediate = 64 * 32 * 32
    assert intermediate not in sizes


@pytest.mark.parametrize("with_bias", [True, False])
def test_opcheck(with_bias):
    x, pw, dw, mb, b = random_problem(2, 5, 17, 9, 7, 3, torch.float32, bias=with_bias, mid_bias=with_bias)
    x.requires_grad_()
    args = (x, pw, dw, mb, b, [2, 1], [1, 1], [1, 2], 3, 2)
    torch.library.opcheck(torch.ops.bsconv_fast.pw_dw.default, args)


def test_opcheck_channels_last():
    x, pw, dw, _, b = random_problem(2, 5, 17, 9, 7, 3)
    x = x.contiguous(memory_format=torch.channels_last)
    torch.library.opcheck(torch.ops.bsconv_fast.pw_dw.default, (x, pw, dw, None, b, [1, 1], [1, 1], [1, 1], 0, 0))


def test_compile_fullgraph_patched_model():
    bsconv = pytest.importorskip("bsconv.pytorch")
    model = bsconv.get_model("cifar_resnet20_bsconvu", num_classes=10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        want = model(x)
        bsconv_fast.patch(model)
        compiled = torch.compile(model, fullgraph=True)  # Inductor
        got = compiled(x)
    assert torch.allclose(got, want, rtol=1e-4, atol=1e-5)


def test_compile_keeps_one_op():
    """The compiled graph holds the fused op as one call (not decomposed into convolutions)."""
    x, pw, dw, _, b = random_problem(1, 5, 17, 9, 7, 3)
    graphs = []

    def backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    f = torch.compile(lambda x: bsconv_fast.bsconv_u(x, pw, dw, b, 1, 1), fullgraph=True, backend=backend)
    out = f(x)
    targets = [n.target for g in graphs for n in g.graph.nodes if n.op == "call_function"]
    assert any(str(t).startswith("bsconv_fast.pw_dw") for t in targets), targets
    assert not any("convolution" in str(t) for t in targets)
    assert torch.allclose(out, reference.bsconv_u(x, pw, dw, b, 1, 1), rtol=1e-4, atol=1e-5)


def test_export_sees_one_op_per_layer():
    bsconv = pytest.importorskip("bsconv.pytorch")
    model = bsconv_fast.patch(bsconv.get_model("cifar_resnet20_bsconvu", num_classes=10).eval())
    x = torch.randn(1, 3, 32, 32)
    exported = torch.export.export(model, (x,))
    targets = [str(n.target) for n in exported.graph.nodes if n.op == "call_function"]
    assert sum(t.startswith("bsconv_fast.pw_dw") for t in targets) == 19
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), model(x), rtol=1e-4, atol=1e-5)
