"""The C++ CPU kernel (bsconv_fast::pw_dw) against the float64 reference over a parameter grid."""
import json
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

import bsconv_fast
from bsconv_fast import reference
from helpers import assert_close_to_reference, assert_silu_epilogues_match_torch, random_problem, ref64

pytestmark = pytest.mark.skipif(not bsconv_fast._ext.available(), reason="C++ extension not built")

# (n, cin, cout, h, w, kernel, stride, padding, dilation, bias)
GRID = [
    (1, 3, 5, 7, 13, 1, 1, 0, 1, True),
    (3, 5, 17, 13, 7, 3, 1, 1, 1, False),
    (1, 17, 33, 33, 13, 3, 2, 1, 1, True),
    (3, 33, 17, 13, 33, 5, 1, 2, 1, True),
    (1, 5, 33, 33, 33, 5, 2, 2, 1, False),
    (1, 17, 5, 13, 13, 7, 1, 3, 1, True),
    (3, 3, 17, 7, 7, 7, 2, 3, 1, True),
    (1, 33, 33, 13, 13, 3, 1, 2, 2, True),
    (3, 17, 5, 33, 7, 5, 2, 4, 2, False),
    (1, 5, 17, 13, 33, (3, 5), (2, 1), (1, 2), (1, 2), True),
    (1, 17, 33, 7, 13, (1, 3), 1, (0, 1), 1, True),
    (1, 33, 17, 13, 13, 3, 1, 0, 1, True),          # no padding
    (1, 3, 5, 7, 7, 3, 2, 0, 2, True),               # dilation with stride and no padding
    (0, 5, 17, 13, 13, 3, 1, 1, 1, True),            # batch 0
    (1, 520, 530, 7, 9, 3, 1, 1, 1, True),           # large channel counts, not multiples of 16
    (1, 64, 600, 13, 7, 3, 2, 1, 1, False),
    (3, 33, 47, 9, 11, 3, 3, 1, 1, True),            # stride 3
    (1, 5, 17, 5, 5, 3, 1, 4, 1, True),              # padding larger than the kernel reach
    (1, 24, 40, 45, 11, 3, 1, 1, 1, True),           # narrow input over many rows: row bands
    (1, 40, 24, 57, 9, 5, 2, 2, 1, False),           # the same with stride 2 and a 5x5 halo
    (1, 80, 48, 57, 9, 3, 1, 1, 1, True),            # a wide input over many rows: row bands too
    (1, 19, 64, 11, 13, 3, 1, 1, 1, True),           # 64 channels: 6-pixel x 64-channel tiles (AVX-512)
    (1, 29, 125, 9, 17, 3, 2, 1, 1, False),          # a last 128 as two such blocks, with a channel tail
]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


def _run_case(case, dtype, memory_format, act=(0, 0), mid_bias=False):
    n, cin, cout, h, w, k, s, p, d, bias = case
    s, p, d = _pair(s), _pair(p), _pair(d)
    x, pw, dw, mb, b = random_problem(n, cin, cout, h, w, k, dtype, bias, mid_bias)
    x = x.contiguous(memory_format=memory_format)
    out = bsconv_fast.pw_dw(x, pw, dw, mb, b, s, p, d, *act)
    kh, kw = dw.shape[2:]
    assert_close_to_reference(out, ref64(x, pw, dw, mb, b, s, p, d, *act), cin + kh * kw, str(case))
    return x, out


@pytest.mark.parametrize("case", GRID, ids=[str(i) for i in range(len(GRID))])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last],
                         ids=["nchw", "channels_last"])
def test_grid_float32(case, memory_format):
    x, out = _run_case(case, torch.float32, memory_format)
    # output keeps the memory format of the input
    if x.numel() and min(out.shape[2:]) > 1 and out.shape[1] > 1:
        assert out.is_contiguous(memory_format=memory_format)


@pytest.mark.parametrize("case", GRID[:10], ids=[str(i) for i in range(10)])
def test_grid_float64(case):
    _run_case(case, torch.float64, torch.contiguous_format)


@pytest.mark.parametrize("mid_act,out_act", [(1, 0), (2, 2), (3, 3), (4, 4), (0, 1)])
@pytest.mark.parametrize("case", [GRID[2], GRID[9], GRID[15]], ids=["s2", "rect", "wide"])
def test_activations_and_mid_bias(case, mid_act, out_act):
    """act2(dw(act1(pw(x) + b1)) + b2): zero padding applies after act1 (hardswish(0 + b1) != 0)."""
    _run_case(case, torch.float32, torch.channels_last, (mid_act, out_act), mid_bias=True)


def test_non_contiguous_input():
    x = torch.randn(2, 40, 15, 17)[:, ::2, 1:, ::2].transpose(2, 3)  # sliced, strided, transposed
    assert not x.is_contiguous() and not x.is_contiguous(memory_format=torch.channels_last)
    pw = torch.randn(9, 20, 1, 1)
    dw = torch.randn(9, 1, 3, 3)
    out = bsconv_fast.bsconv_u(x, pw, dw, None, 1, 1, 1)
    assert_close_to_reference(out, ref64(x, pw, dw, None, None, (1, 1), (1, 1), (1, 1)), 29, "non-contiguous")


@pytest.mark.parametrize("acts", [(0, 0), (1, 2), (2, 1), (3, 3)], ids=["none", "relu-relu6", "relu6-relu", "hswish"])
def test_nan_inf_propagate_like_reference(acts):
    x, pw, dw, mb, b = random_problem(1, 5, 7, 9, 21, 3, mid_bias=True)
    x[0, 1, 4, 4] = float("nan")  # NaN through both epilogues (relu and relu6 must not turn it into 0)
    x[0, 2, 0, 0] = float("inf")
    out = bsconv_fast.pw_dw(x, pw, dw, mb, b, (1, 1), (1, 1), (1, 1), *acts)
    ref = ref64(x, pw, dw, mb, b, (1, 1), (1, 1), (1, 1), *acts)
    assert torch.isnan(ref).any()
    assert torch.equal(torch.isnan(out), torch.isnan(ref))
    assert torch.equal(torch.isinf(out), torch.isinf(ref))
    y = torch.ops.bsconv_fast.pw_packed(x, torch.ops.bsconv_fast.pack_pw(pw, b), 7, [1, 1], acts[0], None)
    assert torch.equal(torch.isnan(y), torch.isnan(reference.activation(F.conv2d(x.double(), pw.double()), acts[0])))


def test_silu_epilogue_over_float_range():
    """SiLU runs vectorised in the stores (no scalar exp): it must agree with torch's to 2 ulp everywhere."""
    assert_silu_epilogues_match_torch()


_ISA_SCRIPT = """
import json, sys, torch
sys.path.insert(0, {tests!r})
import bsconv_fast
from helpers import assert_close_to_reference, assert_silu_epilogues_match_torch, random_problem, ref64
assert_silu_epilogues_match_torch()
torch.manual_seed(0)
for case in [(1, 17, 33, 13, 11, 3, 2, 1, 1), (3, 5, 40, 7, 9, (3, 5), 1, (1, 2), (2, 1)), (1, 64, 48, 9, 9, 5, 1, 2, 1),
             (2, 24, 40, 6, 29, 3, 1, 1, 1), (1, 24, 40, 7, 37, 3, 2, 1, 1),  # 8- and 4-pixel depthwise steps
             (1, 263, 40, 5, 7, 3, 1, 1, 1)]:  # K >= 256: the weight prefetches' tile split (gemm_columns_pf)
    n, cin, cout, h, w, k, s, p, d = case
    pr = lambda v: (v, v) if isinstance(v, int) else v
    x, pw, dw, mb, b = random_problem(n, cin, cout, h, w, k, mid_bias=True)
    out = bsconv_fast.pw_dw(x, pw, dw, mb, b, pr(s), pr(p), pr(d), 3, 2)
    assert_close_to_reference(out, ref64(x, pw, dw, mb, b, pr(s), pr(p), pr(d), 3, 2), cin + 25, str(case))
    # the depthwise stage alone (dw_packed) on the input rows
    xd = torch.randn(n, cout, h, w).contiguous(memory_format=torch.channels_last)
    eye = torch.eye(cout)[:, :, None, None]
    got = torch.ops.bsconv_fast.dw_packed(xd, torch.ops.bsconv_fast.pack(eye, dw, None, b), cout, list(dw.shape[2:]),
                                          list(pr(s)), list(pr(p)), list(pr(d)), 0, 2)
    want = torch.nn.functional.relu6(torch.nn.functional.conv2d(xd.double(), dw.double(), b.double(), pr(s), pr(p),
                                                                pr(d), cout))
    assert_close_to_reference(got, want, 25, "depthwise only " + str(case))
    # the packed op with a residual added before out_act
    r = torch.randn_like(out)
    packed = torch.ops.bsconv_fast.pw_dw_packed(x, torch.ops.bsconv_fast.pack(pw, dw, mb, b), cout, list(dw.shape[2:]),
                                                list(pr(s)), list(pr(p)), list(pr(d)), 3, 1, r)
    want = torch.relu(ref64(x, pw, dw, mb, b, pr(s), pr(p), pr(d), 3, 0) + r.double())
    assert_close_to_reference(packed, want, cin + 25, "residual " + str(case))
    # two layers in one pass (the second on the first's rows, x as its residual)
    pw2, dw2 = torch.randn(cin, cout, 1, 1) / cout ** 0.5, torch.randn(cin, 1, 3, 3) / 3
    pair = torch.ops.bsconv_fast.pw_dw_pair_packed(
        x, torch.ops.bsconv_fast.pack(pw, dw, mb, b), cout, list(dw.shape[2:]), list(pr(s)), list(pr(p)),
        list(pr(d)), 3, 2, torch.ops.bsconv_fast.pack(pw2, dw2, None, None), cin, [3, 3], [1, 1], [1, 1], [1, 1], 0,
        0, False)
    want = ref64(ref64(x, pw, dw, mb, b, pr(s), pr(p), pr(d), 3, 2), pw2, dw2, None, None, (1, 1), (1, 1), (1, 1))
    assert_close_to_reference(pair, want, (cin + 25) * (cout + 9), "pair " + str(case))
    # the 1x1 op on the same micro-kernel, with a residual and a channel tail
    y = torch.randn(n, cout, (h - 1) // pr(s)[0] + 1, (w - 1) // pr(s)[1] + 1)
    pw_out = torch.ops.bsconv_fast.pw_packed(x, torch.ops.bsconv_fast.pack_pw(pw, b), cout, list(pr(s)), 2, y)
    want = torch.nn.functional.relu6(torch.nn.functional.conv2d(x.double(), pw.double(), b.double(), pr(s)) + y)
    assert_close_to_reference(pw_out, want, cin, "pw " + str(case))
    # one pixel: the matrix-vector kernel (k steps in several chains, a k tail, a channel tail, the
    # channels split over the threads)
    k1, c1 = cin + 250, cout + 300
    x1, w1, b1, r1 = torch.randn(1, k1, 1, 1), torch.randn(c1, k1, 1, 1) / k1 ** 0.5, torch.randn(c1), torch.randn(1, c1)
    r1 = r1[:, :, None, None]
    gemv = torch.ops.bsconv_fast.pw_packed(x1, torch.ops.bsconv_fast.pack_pw(w1, b1), c1, [1, 1], 2, r1)
    want = torch.nn.functional.relu6(torch.nn.functional.conv2d(x1.double(), w1.double(), b1.double()) + r1)
    assert_close_to_reference(gemv, want, k1, "one pixel " + str(case))
    # the stem convolution on the same micro-kernel (gathered patches of the first 3 channels)
    x3, w3 = x[:, :3], torch.randn(cout, 3, 3, 3) / 5
    packed3 = torch.ops.bsconv_fast.pack_pw(w3.permute(0, 2, 3, 1).reshape(cout, -1, 1, 1), b)
    conv = torch.ops.bsconv_fast.conv_packed(x3, packed3, cout, [3, 3], list(pr(s)), [1, 1], 1)
    want = torch.relu(torch.nn.functional.conv2d(x3.double(), w3.double(), b.double(), pr(s), 1))
    assert_close_to_reference(conv, want, 27, "conv " + str(case))
    # the 7x7 RGB stem, whose 21-value patch runs have a micro-kernel of their own (full tiles in place
    # and gathered at the borders)
    x7, w7 = torch.randn(n, 3, 2 * h + 9, 3 * w + 2), torch.randn(cout, 3, 7, 7) / 12
    packed7 = torch.ops.bsconv_fast.pack_pw(w7.permute(0, 2, 3, 1).reshape(cout, -1, 1, 1), b)
    conv7 = torch.ops.bsconv_fast.conv_packed(x7, packed7, cout, [7, 7], [2, 2], [3, 3], 1)
    want = torch.relu(torch.nn.functional.conv2d(x7.double(), w7.double(), b.double(), 2, 3))
    assert_close_to_reference(conv7, want, 147, "7x7 stem " + str(case))
    # the pooled 7x7 stem with an input affine (a folded data_bn), its NCHW rows interleaved a vector at a time
    s7, t7 = torch.rand(3) + 0.5, torch.randn(3)
    stem7 = torch.ops.bsconv_fast.conv_pool_packed(x7, packed7, cout, [7, 7], [2, 2], [3, 3], 1, [3, 3], [2, 2],
                                                   [1, 1], s7, t7)
    x7a = x7.double() * s7.double().view(1, -1, 1, 1) + t7.double().view(1, -1, 1, 1)
    want = torch.nn.functional.max_pool2d(
        torch.relu(torch.nn.functional.conv2d(x7a, w7.double(), b.double(), 2, 3)), 3, 2, 1)
    assert_close_to_reference(stem7, want, 147, "7x7 stem, input affine " + str(case))
    # the same by Winograd's F(4x4, 4x4): on the SIMD kernels only, which the scalar ones say by name
    wino_args = (x7, torch.ops.bsconv_fast.pack_winograd(w7, b), cout, [7, 7], [2, 2], [3, 3], 1, [3, 3], [2, 2],
                 [1, 1], s7, t7, True)
    if bsconv_fast._ext.cpu_kernel_isa() == "scalar":
        try:
            torch.ops.bsconv_fast.conv_pool_packed(*wino_args)
            raise AssertionError("the scalar kernels ran winograd=True")
        except RuntimeError as e:
            assert "winograd=True needs the AVX2 or AVX-512 kernels" in str(e), str(e)
    else:
        assert_close_to_reference(torch.ops.bsconv_fast.conv_pool_packed(*wino_args), want, 147,
                                  "Winograd stem " + str(case))
    # max pooling (NaN winning) alone and after the stem: full 16-channel vectors and a tail
    z = torch.randn(n, cout, h + 2, w + 1).contiguous(memory_format=torch.channels_last)
    z[0, cout - 1, 1, 2] = float("nan")
    pooled = torch.ops.bsconv_fast.max_pool(z, [3, 3], [2, 2], [1, 1])
    want = torch.nn.functional.max_pool2d(z, 3, 2, 1)
    assert torch.equal(pooled.isnan(), want.isnan()) and torch.equal(pooled.nan_to_num(), want.nan_to_num())
    stem = torch.ops.bsconv_fast.conv_pool_packed(x3, packed3, cout, [3, 3], list(pr(s)), [1, 1], 1,
                                                  [3, 3], [2, 2], [1, 1])
    want = torch.nn.functional.max_pool2d(
        torch.relu(torch.nn.functional.conv2d(x3.double(), w3.double(), b.double(), pr(s), 1)), 3, 2, 1)
    assert_close_to_reference(stem, want, 27, "pooled stem " + str(case))
print(json.dumps(bsconv_fast._ext.cpu_kernel_isa()))
"""


@pytest.mark.parametrize("isa", ["avx2", "scalar"])
def test_other_isa_paths(isa):
    """Each kernel family runs (in a fresh process, the ISA is chosen once) and matches."""
    env = dict(os.environ, BSCONV_FAST_ISA=isa, BSCONV_FAST_POISON="1")
    script = _ISA_SCRIPT.format(tests=os.path.dirname(__file__))
    proc = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    used = json.loads(proc.stdout.strip().splitlines()[-1])
    expected = {"scalar": "scalar", "avx2": "avx2-fma"}[isa]
    if expected == "avx2-fma" and bsconv_fast._ext.cpu_kernel_isa() == "scalar":
        pytest.skip("this CPU has no AVX2")
    assert used == expected


def _depthwise_problem(case, dtype=torch.float32):
    """x (channels_last) and the packed depthwise layer of a GRID case on its output channels."""
    n, _, c, h, w, k, s, p, d, bias = case
    _, _, dw, _, b = random_problem(n, c, c, h, w, k, dtype=dtype, bias=bias)
    x = torch.randn(n, c, h, w, dtype=dtype).contiguous(memory_format=torch.channels_last)
    packed = torch.ops.bsconv_fast.pack(torch.eye(c, dtype=dtype)[:, :, None, None], dw, None, b)
    return x, dw, b, packed, [list(_pair(v)) for v in (s, p, d)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("case", GRID, ids=[str(i) for i in range(len(GRID))])
def test_depthwise_only_op(case, dtype):
    """dw_packed: the depthwise stage on the input rows themselves (a depthwise conv with no 1x1 before it),
    every kernel shape, stride, padding and dilation of the grid, channels padded or not, with an activation
    and a residual before it (outputs NaN-poisoned first)."""
    torch.manual_seed(19)
    x, dw, b, packed, (s, p, d) = _depthwise_problem(case, dtype)
    c, kernel = x.shape[1], list(dw.shape[2:])
    before_act = F.conv2d(x.double(), dw.double(), None if b is None else b.double(), s, p, d, c)
    residual = torch.randn(before_act.shape, dtype=dtype).contiguous(memory_format=torch.channels_last)
    for res, act in ((None, 3), (residual, 2)):
        out = torch.ops.bsconv_fast.dw_packed(x, packed, c, kernel, s, p, d, 0, act, res)
        want = reference.activation(before_act + (0 if res is None else res.double()), act)
        assert_close_to_reference(out, want, dw.shape[2] * dw.shape[3], f"{case} act {act}")


def test_depthwise_only_op_validates():
    x, dw, b, packed, (s, p, d) = _depthwise_problem(GRID[2])
    c, kernel = x.shape[1], list(dw.shape[2:])
    torch.library.opcheck(torch.ops.bsconv_fast.dw_packed.default, (x, packed, c, kernel, s, p, d, 0, 1))
    with pytest.raises(RuntimeError, match="keeps its channels"):
        torch.ops.bsconv_fast.dw_packed(x[:, 1:], packed, c, kernel, s, p, d, 0, 1)
    with pytest.raises(RuntimeError, match="mid_act must be 0"):
        torch.ops.bsconv_fast.dw_packed(x, packed, c, kernel, s, p, d, 1, 1)


def test_packed_op_matches_unpacked_and_validates():
    x, pw, dw, mb, b = random_problem(2, 17, 33, 13, 11, (3, 5), mid_bias=True)
    packed = torch.ops.bsconv_fast.pack(pw, dw, mb, b)
    args = ([2, 1], [1, 2], [1, 1], 3, 2)
    got = torch.ops.bsconv_fast.pw_dw_packed(x, packed, 33, [3, 5], *args)
    want = torch.ops.bsconv_fast.pw_dw(x, pw, dw, mb, b, *args)
    assert torch.equal(got, want)
    torch.library.opcheck(torch.ops.bsconv_fast.pw_dw_packed.default, (x, packed, 33, [3, 5], *args))
    torch.library.opcheck(torch.ops.bsconv_fast.pack.default, (pw, dw, mb, b))
    with pytest.raises(RuntimeError, match="packed has"):
        torch.ops.bsconv_fast.pw_dw_packed(x, packed, 32, [3, 5], *args)
    with pytest.raises(RuntimeError, match="dtype of x"):
        torch.ops.bsconv_fast.pw_dw_packed(x.double(), packed, 33, [3, 5], *args)


@pytest.mark.parametrize("case", [GRID[1], GRID[2], GRID[4], GRID[6], GRID[9], GRID[14]],
                         ids=["k3", "k3s2", "k5s2", "k7s2", "rect", "wide"])
@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last], ids=["nchw", "cl"])
def test_packed_residual_before_output_activation(case, memory_format):
    """pw_dw_packed(..., residual): out_act(dw(...) + bias + residual), on the specialised 3x3 / 5x5
    and the generic depthwise paths (ResNet units: the identity add and ReLU in the store)."""
    n, cin, cout, h, w, k, s, p, d, bias = case
    s, p, d = _pair(s), _pair(p), _pair(d)
    x, pw, dw, mb, b = random_problem(n, cin, cout, h, w, k, bias=bias, mid_bias=True)
    x = x.contiguous(memory_format=memory_format)
    before_act = ref64(x, pw, dw, mb, b, s, p, d, 2, 0)
    residual = torch.randn(before_act.shape).contiguous(memory_format=memory_format)
    packed = torch.ops.bsconv_fast.pack(pw, dw, mb, b)
    out = torch.ops.bsconv_fast.pw_dw_packed(x, packed, cout, list(dw.shape[2:]), list(s), list(p), list(d), 2, 1,
                                             residual)
    kh, kw = dw.shape[2:]
    assert_close_to_reference(out, torch.relu(before_act + residual.double()), cin + kh * kw, str(case))
    torch.library.opcheck(torch.ops.bsconv_fast.pw_dw_packed.default,
                          (x, packed, cout, list(dw.shape[2:]), list(s), list(p), list(d), 2, 1, residual))
    with pytest.raises(RuntimeError, match="residual must have the output's shape"):
        torch.ops.bsconv_fast.pw_dw_packed(x, packed, cout, list(dw.shape[2:]), list(s), list(p), list(d), 2, 1,
                                           residual[:, 1:])


def test_large_output_streaming_stores():
    """Outputs beyond the last-level cache are written with non-temporal stores (> 24 MiB here)."""
    x, pw, dw, mb, b = random_problem(8, 16, 64, 113, 111, 3, mid_bias=True)
    x = x.contiguous(memory_format=torch.channels_last)
    out = bsconv_fast.pw_dw(x, pw, dw, mb, b, 1, 1, 1, 2, 1)
    assert out.numel() * 4 > 24 << 20
    assert_close_to_reference(out, ref64(x, pw, dw, mb, b, (1, 1), (1, 1), (1, 1), 2, 1), 16 + 9, "streaming")
