"""bsconv_fast::pw_dw_pair_packed: two fused layers in one pass, the second reading the first's output rows
from a ring, with x as an optional residual (the ResNet unit). Checked against the float64 composition of
the two layers, against two pw_dw_packed calls, and through optimize() on ResNet units."""
import pytest
import torch
import torch.nn as nn

import bsconv_fast
from bsconv_fast import _ext, reference
from bsconv_fast.optimize import FusedPair
from helpers import assert_close_to_reference, random_problem, ref64

pytestmark = pytest.mark.skipif(not _ext.available(), reason="C++ extension not built")

op = torch.ops.bsconv_fast


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _layer(cin, cout, k, stride, dilation, mid_act, out_act, dtype):
    """A random layer: its float64-reference arguments and the packed op's (packed, then the rest)."""
    _, pw, dw, mb, b = random_problem(0, cin, cout, 1, 1, k, dtype=dtype, mid_bias=True)
    kh, kw = _pair(k)
    s, d = _pair(stride), _pair(dilation)
    p = (d[0] * (kh - 1) // 2, d[1] * (kw - 1) // 2)
    ref_args = (pw, dw, mb, b, s, p, d, mid_act, out_act)
    packed_args = (op.pack(pw, dw, mb, b), cout, [kh, kw], list(s), list(p), list(d), mid_act, out_act)
    return ref_args, packed_args


# (n, c, mid, h, w, (k, stride, dilation) of each layer, residual): the ResNet unit (64 channels at 56x56
# and a small one), a stride-2 first layer, 5x5 and rectangular kernels, dilation, channels off the
# 16-channel panels, images with fewer rows than threads, batch 0.
GRID = [
    (1, 64, 64, 56, 56, (3, 1, 1), (3, 1, 1), True),
    (2, 16, 16, 9, 7, (3, 1, 1), (3, 1, 1), True),
    (3, 17, 24, 13, 11, (3, 2, 1), (5, 1, 1), False),
    (1, 8, 40, 30, 31, ((3, 5), 1, 1), (3, 2, 1), False),
    (2, 20, 33, 12, 10, (3, 1, 2), (3, 1, 1), True),
    (1, 24, 24, 2, 5, (3, 1, 1), (3, 1, 1), True),
    (0, 16, 16, 8, 8, (3, 1, 1), (3, 1, 1), True),
    (1, 128, 125, 15, 13, (3, 1, 1), (3, 1, 1), True),  # 128 channels: 6-pixel x 64-channel tiles (AVX-512)
]


def _run_case(case, dtype, memory_format=torch.channels_last, acts=((1, 2), (3, 1))):
    n, c, mid, h, w, la, lb, residual = case
    x = torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=memory_format)
    ref_a, packed_a = _layer(c, mid, *la, *acts[0], dtype)
    ref_b, packed_b = _layer(mid, c if residual else 12, *lb, *acts[1], dtype)
    out = op.pw_dw_pair_packed(x, *packed_a, *packed_b, residual)
    t = ref64(x, *ref_a)
    pw, dw, mb, b, s, p, d, mid_act, out_act = ref_b
    want = ref64(t, pw, dw, mb, b, s, p, d, mid_act, 0) + (x.double() if residual else 0)
    return x, packed_a, packed_b, out, reference.activation(want, out_act)


@pytest.mark.parametrize("case", GRID, ids=[str(i) for i in range(len(GRID))])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_pair_matches_the_two_layers_in_float64(case, dtype):
    _, c, mid, *_ = case
    _, _, _, out, want = _run_case(case, dtype)
    assert_close_to_reference(out, want, (c + 9) * (mid + 25), str(case))


@pytest.mark.parametrize("case", [GRID[0], GRID[2], GRID[4]], ids=["unit", "stride2", "dilated"])
def test_pair_is_the_same_computation_as_two_calls(case):
    """The pair runs the same micro-kernels in the same order per pixel as two pw_dw_packed calls."""
    x, packed_a, packed_b, out, _ = _run_case(case, torch.float32)
    mid = op.pw_dw_packed(x, *packed_a, None)
    assert torch.equal(out, op.pw_dw_packed(mid, *packed_b, x if case[-1] else None))


def test_pair_keeps_the_input_memory_format():
    case = GRID[1]
    _, c, mid, *_ = case
    x, _, _, out, want = _run_case(case, torch.float32, memory_format=torch.contiguous_format)
    assert out.is_contiguous()
    assert_close_to_reference(out, want, (c + 9) * (mid + 25), "nchw")


def test_pair_opcheck():
    x, packed_a, packed_b, _, _ = _run_case(GRID[1], torch.float32)
    torch.library.opcheck(op.pw_dw_pair_packed.default, (x, *packed_a, *packed_b, True))


def test_pair_errors_name_the_layer_and_the_residual_shape():
    x, packed_a, packed_b, _, _ = _run_case(GRID[2], torch.float32)
    with pytest.raises(RuntimeError, match=r"residual=True .* x's"):
        op.pw_dw_pair_packed(x, *packed_a, *packed_b, True)
    bad_b = (packed_b[0][:-1], *packed_b[1:])
    with pytest.raises(RuntimeError, match=r"\(second layer\): packed has"):
        op.pw_dw_pair_packed(x, *packed_a, *bad_b, False)
    with pytest.raises(RuntimeError, match=r"\(first layer\): bad stride"):
        op.pw_dw_pair_packed(x, packed_a[0], packed_a[1], packed_a[2], [0, 1], *packed_a[4:], *packed_b, False)


# -- through optimize(): the official ResNet unit with an identity shortcut

def _units(c, stride=1):
    """Two official StandardUnits (BSConv-U), eval mode, BatchNorms with random statistics."""
    B = pytest.importorskip("bsconv.pytorch")
    from bsconv.pytorch.resnet import StandardUnit
    torch.manual_seed(5)
    model = B.BSConvU_Replacer().apply(nn.Sequential(StandardUnit(c, c, stride), StandardUnit(c, c, 1))).eval()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.uniform_(-0.5, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)
    return model


def test_optimize_pairs_large_units_and_explain_says_so():
    model = _units(24)
    x = torch.randn(1, 24, 120, 47)  # an intermediate of 24 x 120 x 47 floats: 529 KiB
    fast = bsconv_fast.optimize(model)
    rows = bsconv_fast.explain(fast, x)
    isa = _ext.cpu_kernel_isa()
    assert [r["backend"] for r in rows] == [f"cpu-fused-pair ({isa})"] * 2, str(rows)
    frozen = bsconv_fast.freeze(fast)
    with torch.inference_mode():
        out = frozen(x)
        frozen(x)
        program = frozen.programs()[-1]
    assert program.count("_C_pw_dw_pair_packed(") == 2 and "_C_pw_dw_packed(" not in program, program
    want = model.double()(x.double())
    assert_close_to_reference(out, want, 24 * 4 * 34, "two paired units")


@pytest.mark.parametrize("c, h, w, why", [(160, 27, 31, "fewer rows than PAIR_MIN_ROWS"),
                                          (16, 60, 60, "an intermediate under PAIR_MIN_BYTES")])
def test_optimize_runs_other_units_layer_by_layer(c, h, w, why):
    model = _units(c)
    x = torch.randn(1, c, h, w)
    fast = bsconv_fast.optimize(model)
    backends = [r["backend"] for r in bsconv_fast.explain(fast, x)]
    assert backends == [f"cpu-fused ({_ext.cpu_kernel_isa()})"] * 4, why
    with torch.no_grad():
        assert_close_to_reference(fast(x), model.double()(x.double()), c * 4 * 34, why)


def test_paired_units_train_compile_and_take_gradients_through_the_layers():
    """Gradients and torch.compile do not take the pair (an inference op): the layers run as before."""
    model = _units(16)
    fast = bsconv_fast.optimize(model)
    x = torch.randn(2, 16, 28, 30, requires_grad=True)
    fast(x).sum().backward()
    want_x = x.detach().double().requires_grad_(True)
    model.double()(want_x).sum().backward()
    assert_close_to_reference(x.grad, want_x.grad, 16 * 4 * 34, "input gradient")
    compiled = torch.compile(fast, fullgraph=True, backend="eager")
    with torch.no_grad():
        assert_close_to_reference(compiled(x.detach()), model(want_x.detach()), 16 * 4 * 34, "compiled")


def _stack_layer(cin, cout, stride):
    """The MobileNetV1-BSConvU layer: Sequential(BSConvU, BN, ReLU), BN with random statistics."""
    bn = nn.BatchNorm2d(cout)
    bn.running_mean.uniform_(-0.5, 0.5)
    bn.running_var.uniform_(0.5, 2.0)
    return nn.Sequential(bsconv_fast.BSConvU(cin, cout, 3, stride=stride, padding=1), bn, nn.ReLU())


def test_optimize_pairs_consecutive_layers_across_nested_stacks():
    """Consecutive fused layers of nested nn.Sequentials (MobileNetV1's stages) pair up two at a time in
    order; a pair with a large intermediate runs as one call, the rest layer by layer."""
    torch.manual_seed(7)
    model = nn.Sequential(nn.Sequential(_stack_layer(16, 32, 1)),
                          nn.Sequential(_stack_layer(32, 48, 2), _stack_layer(48, 48, 1), _stack_layer(48, 24, 1)),
                          ).eval()
    fast = bsconv_fast.optimize(model)
    pairs = [m for m in fast.modules() if isinstance(m, FusedPair)]
    assert len(pairs) == 2
    x = torch.randn(1, 16, 80, 70)  # the first pair's intermediate: 32 x 80 x 70 floats, 700 KiB
    isa = _ext.cpu_kernel_isa()
    backends = [r["backend"] for r in bsconv_fast.explain(fast, x)]
    assert backends == [f"cpu-fused-pair ({isa})", f"cpu-fused ({isa})", f"cpu-fused ({isa})"], backends
    frozen = bsconv_fast.freeze(fast)
    with torch.inference_mode():
        out = frozen(x)
        frozen(x)
        program = frozen.programs()[-1]
    assert program.count("_C_pw_dw_pair_packed(") == 1 and program.count("_C_pw_dw_packed(") == 2, program
    # profile() counts the paired layers as it counts them one by one
    assert bsconv_fast.profile(fast, tuple(x.shape)).total_macs == bsconv_fast.profile(model, tuple(x.shape)).total_macs
    assert_close_to_reference(out, model.double()(x.double()), 48 * 4 * 34, "stack")
