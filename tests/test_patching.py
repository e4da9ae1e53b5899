"""patch / unpatch on the official model zoo: same outputs, fast path really used, reversible."""
import pytest
import torch
import torch.nn as nn

import bsconv_fast
from helpers import assert_close_to_reference, randomize_bn

B = pytest.importorskip("bsconv.pytorch")
pytestmark = pytest.mark.skipif(not bsconv_fast._ext.available(), reason="C++ extension not built")

MODELS = [("cifar_mobilenetv1_w1d4_bsconvu", 13), ("cifar_resnet20_bsconvu", 19), ("cifar_wrn16_2_bsconvs_p1d4", 13),
          ("cifar_preresnet20_bsconvs_p1d8", 19), ("resnet10_bsconvu", 8)]


@pytest.mark.parametrize("name,count", MODELS)
def test_patched_official_model_matches(name, count):
    model = B.get_model(name, num_classes=10).eval()
    randomize_bn(model, 0.2, (0.8, 1.2))
    size = 64 if not name.startswith("cifar") else 32
    x = torch.randn(2, 3, size, size)
    with torch.no_grad():
        want = model.double()(x.double())
        model.float()
        patched = bsconv_fast.patch(model)
        assert patched is model and model.bsconv_fast_patched == count
        report = [row for row in bsconv_fast.explain(model, x) if row["backend"] != "pytorch"]  # the stem, the head
        assert len(report) == count
        assert {row["backend"] for row in report} == {f"cpu-fused ({bsconv_fast._ext.cpu_kernel_isa()})"}
        with torch.profiler.profile() as prof:
            got = model(x)
    # under no_grad the modules run the packed-weight op; either op is the fused kernel
    calls = sum(e.count for e in prof.key_averages() if e.key in ("bsconv_fast::pw_dw", "bsconv_fast::pw_dw_packed"))
    assert calls == count, f"fused op called {calls} times, expected {count}"
    assert_close_to_reference(got, want, 4096, name)


def test_unpatch_restores_official_classes_and_weights():
    model = B.get_model("cifar_wrn16_1_bsconvs_p1d4", num_classes=10).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    bsconv_fast.patch(model)
    assert not any(isinstance(m, B.BSConvS) for m in model.modules())
    bsconv_fast.unpatch(model)
    assert sum(isinstance(m, B.BSConvS) for m in model.modules()) == 13
    assert not any(isinstance(m, (bsconv_fast.BSConvS, bsconv_fast.BSConvU)) for m in model.modules())
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k])


def test_patch_recognises_equivalent_own_sequential_and_root_module():
    seq = torch.nn.Sequential()
    seq.add_module("pw", torch.nn.Conv2d(6, 10, 1, bias=False))
    seq.add_module("dw", torch.nn.Conv2d(10, 10, 3, padding=1, groups=10))
    x = torch.randn(1, 6, 9, 9)
    want = seq(x)
    fused = bsconv_fast.patch(seq)
    assert isinstance(fused, bsconv_fast.BSConvU) and fused.pw is seq.pw
    assert torch.allclose(fused(x), want, atol=1e-5)
    assert isinstance(bsconv_fast.unpatch(fused), torch.nn.Sequential)


def test_patch_leaves_non_bsconv_sequential_alone():
    seq = torch.nn.Sequential()
    seq.add_module("pw", torch.nn.Conv2d(6, 10, 1, bias=True))  # a bias on the 1x1: not BSConv
    seq.add_module("dw", torch.nn.Conv2d(10, 10, 3, padding=1, groups=10))
    assert bsconv_fast.patch(seq) is seq and seq.bsconv_fast_patched == 0


def test_explain_lists_unpatched_layers():
    model = B.get_model("cifar_resnet20_bsconvu", num_classes=10).eval()
    report = bsconv_fast.explain(model, torch.randn(1, 3, 32, 32))
    bsconv = [r for r in report if r["backend"] != "pytorch"]
    assert len(bsconv) == 19 and all("not patched" in r["reason"] for r in bsconv)
    assert "not patched" in str(report)
    # every other convolution, the BSConv layers' own pointwise and depthwise children excluded
    inside = tuple(name + "." for name, m in model.named_modules() if isinstance(m, B.BSConvU))
    others = [name for name, m in model.named_modules() if isinstance(m, nn.Conv2d) and not name.startswith(inside)]
    assert [r["module"] for r in report if r["backend"] == "pytorch"] == others and len(others) == 3
    assert all(r["reason"].endswith("runs in PyTorch") for r in report if r["backend"] == "pytorch")


def test_explain_names_the_convolutions_left_to_pytorch():
    """optimize() has no kernel for a plain ResNet's dense 3x3 convolutions: explain lists each of them, in the
    order they run, and nothing inside the fused modules."""
    model = B.get_model("cifar_resnet20", num_classes=10).eval()
    optimized = bsconv_fast.optimize(model, tune_malloc=False)
    report = bsconv_fast.explain(optimized, torch.randn(1, 3, 32, 32))
    left = [r for r in report if r["backend"] == "pytorch"]
    assert len(left) == 18 and all(r["reason"].startswith("dense 3x3 conv") for r in left)
    assert left[0]["reason"] == "dense 3x3 conv 16->16, not in a BSConv or fused layer: runs in PyTorch"
    fused = [r["module"] for r in report if r["backend"] != "pytorch"]
    assert fused and not any(r["module"].startswith(tuple(f + "." for f in fused)) for r in left)
