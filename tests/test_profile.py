"""profile(): the official FLOP/parameter convention (figures of the BSConv README, CIFAR10 tables)."""
import pytest

import bsconv_fast

B = pytest.importorskip("bsconv.pytorch")

# (model, params [M], FLOPs [M]) as printed in the official README (CIFAR10, 32x32 input).
README = [("cifar_mobilenetv1_w1_bsconvu", 3.22, 254.64), ("cifar_mobilenetv1_w1", 3.22, 179.34),
          ("cifar_mobilenetv1_w1d2_bsconvu", 0.82, 65.98), ("cifar_wrn16_2_bsconvs_p1d4", 0.06, 11.85),
          ("cifar_wrn16_4_bsconvu", 0.36, 66.59), ("cifar_mobilenetv2_w1_bsconvs_p1d6", 2.24, 92.40)]


@pytest.mark.parametrize("name,params,flops", README)
@pytest.mark.parametrize("patched", [False, True], ids=["unpatched", "patched"])
def test_readme_figures(name, params, flops, patched):
    model = B.get_model(name, num_classes=10).eval()
    if patched:
        bsconv_fast.patch(model)
    report = bsconv_fast.profile(model, (1, 3, 32, 32))
    assert round(report.total_params / 1e6, 2) == params
    assert round(report.total_flops / 1e6, 2) == flops


def test_matches_official_profiler_exactly():
    model = B.get_model("cifar_wrn16_2_bsconvs_p1d4", num_classes=10).eval()
    official = B.ModelProfiler(model, input_size=(1, 3, 32, 32))
    ours = bsconv_fast.profile(bsconv_fast.patch(model), (1, 3, 32, 32))
    assert ours.total_flops == official.total_flop_count
    assert ours.total_params == official.total_parameter_count


def test_fused_layer_bytes_exclude_the_intermediate():
    layer = bsconv_fast.BSConvU(32, 64, 3, padding=1, bias=False)
    report = bsconv_fast.profile(layer, (1, 32, 56, 56))
    (row,) = report.rows
    assert row["min_bytes"] == 4 * (32 * 56 * 56 + 64 * 56 * 56 + 32 * 64 + 64 * 9)
    assert row["macs"] == 56 * 56 * (32 * 64 + 64 * 9)
    assert report.total_real_flops == 2 * row["macs"]
    assert "(Total)" in str(report)


@pytest.mark.parametrize("name", ["cifar_mobilenetv2_w1d4_bsconvs_p1d6", "cifar_resnet20_bsconvu",
                                  "cifar_wrn16_1_bsconvs_p1d4", "cifar_mobilenetv3_small_w7d20_bsconvs_p1d6"])
def test_optimized_model_counts_the_same_multiply_adds(name):
    """BN folding and fusion change no multiply-add: profile(optimize(model)) counts every 1x1 the
    rewrite moved into FusedPointwise / InvertedResidual / ResidualUnit (and BSConv-S prefixes)."""
    model = B.get_model(name, num_classes=10).eval()
    want = bsconv_fast.profile(model, (1, 3, 32, 32))
    got = bsconv_fast.profile(bsconv_fast.optimize(model), (1, 3, 32, 32))
    assert got.total_macs == want.total_macs
    assert got.total_params <= want.total_params  # folded BatchNorms leave no parameters of their own
