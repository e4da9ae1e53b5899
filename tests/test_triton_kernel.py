"""The Triton kernel against the float64 reference: on CUDA when present, otherwise in Triton's
interpreter on CPU tensors (small shapes), plus backend selection for CUDA problems."""
import os

import pytest
import torch

import bsconv_fast
from bsconv_fast import dispatch
from helpers import assert_close_to_reference, random_problem, ref64

triton = pytest.importorskip("triton")
from bsconv_fast.triton.pw_dw import pw_dw_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
if DEVICE == "cpu" and os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("no GPU and TRITON_INTERPRET is not set", allow_module_level=True)

# (n, cin, cout, h, w, kernel, stride, padding, dilation): k 3/5, stride 1/2, dilation 2, odd sizes,
# channel counts that are not multiples of 16.
CASES = [
    (1, 5, 17, 9, 11, 3, 1, 1, 1),
    (2, 17, 20, 13, 7, 5, 2, 2, 1),
    (1, 3, 33, 11, 13, 3, 1, 2, 2),
    (1, 40, 24, 7, 9, (3, 5), (2, 1), (1, 2), (1, 1)),
    (3, 33, 70, 15, 17, 5, 1, 4, 2),
    (1, 20, 9, 10, 10, 7, 2, 3, 1),
    (1, 9, 5, 6, 5, 3, 2, 0, 2),
]
TOL_DTYPES = [torch.float32, torch.float16]


def _pair(v):
    return (v, v) if isinstance(v, int) else tuple(v)


@pytest.mark.parametrize("dtype", TOL_DTYPES, ids=["fp32", "fp16"])
@pytest.mark.parametrize("case", CASES, ids=[str(i) for i in range(len(CASES))])
@pytest.mark.parametrize("acts", [(0, 0), (3, 2), (4, 1)], ids=["linear", "hswish-relu6", "silu-relu"])
def test_triton_matches_reference(case, dtype, acts):
    n, cin, cout, h, w, k, s, p, d = case
    s, p, d = _pair(s), _pair(p), _pair(d)
    x, pw, dw, mb, b = random_problem(n, cin, cout, h, w, k, dtype, mid_bias=acts != (0, 0))
    x, pw, dw = x.to(DEVICE), pw.to(DEVICE), dw.to(DEVICE)
    mb = mb.to(DEVICE) if mb is not None else None
    b = b.to(DEVICE)
    out = pw_dw_triton(x, pw, dw, mb, b, s, p, d, *acts)
    kh, kw = dw.shape[2:]
    assert_close_to_reference(out.cpu(), ref64(x.cpu(), pw.cpu(), dw.cpu(), None if mb is None else mb.cpu(),
                                               b.cpu(), s, p, d, *acts), cin + kh * kw, f"{case} {dtype}")


def test_triton_channels_last_and_batch_zero():
    x, pw, dw, _, b = random_problem(2, 6, 18, 9, 9, 3)
    x = x.to(DEVICE).contiguous(memory_format=torch.channels_last)
    out = pw_dw_triton(x, pw.to(DEVICE), dw.to(DEVICE), None, b.to(DEVICE), (1, 1), (1, 1), (1, 1), 0, 0)
    assert out.is_contiguous(memory_format=torch.channels_last)
    assert_close_to_reference(out.cpu(), ref64(x.cpu(), pw, dw, None, b, (1, 1), (1, 1), (1, 1)), 15, "cl")
    empty = pw_dw_triton(x[:0], pw.to(DEVICE), dw.to(DEVICE), None, None, (1, 1), (1, 1), (1, 1), 0, 0)
    assert empty.shape == (0, 18, 9, 9)


def _cuda_problem(dtype=torch.float16, kernel=(3, 3), mode="zeros"):
    return dispatch.Problem("cuda", dtype, kernel, (1, 1), (1, 1), (1, 1), mode)


def test_dispatch_picks_triton_for_cuda_problems():
    if not bsconv_fast._ext.available():
        pytest.skip("C++ extension not built (it holds the op schema)")
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        assert dispatch.choose(_cuda_problem(dtype)).backend.name == "gpu-fused (triton)"


@pytest.mark.parametrize("problem,words", [
    (_cuda_problem(torch.float64), "dtype torch.float64"),
    (_cuda_problem(kernel=(9, 9)), "larger than 7x7"),
    (_cuda_problem(mode="reflect"), "padding_mode"),
])
def test_dispatch_explains_cuda_fallbacks(problem, words):
    choice = dispatch.choose(problem)
    assert choice.backend.name == "reference" and words in choice.reason


@pytest.mark.parametrize("layout", ["nchw", "channels_last", "strided"])
def test_triton_output_layout_matches_fake_kernel(layout):
    """torch.compile/export trust the fake kernel's strides: the Triton output must have the same."""
    from bsconv_fast import ops
    x, pw, dw, _, b = random_problem(2, 8, 12, 9, 11, 3)
    x = x.to(DEVICE)
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "strided":
        x = torch.randn(2, 16, 11, 18, device=DEVICE)[:, ::2, :, ::2].transpose(2, 3)[:, :, :9]
    out = pw_dw_triton(x, pw.to(DEVICE), dw.to(DEVICE), None, b.to(DEVICE), (1, 1), (1, 1), (1, 1), 0, 0)
    fake = ops.empty_output(x, ops.pw_dw_out_shape(x, pw, dw, (1, 1), (1, 1), (1, 1)))
    assert out.shape == fake.shape and out.stride() == fake.stride()
    assert_close_to_reference(out.cpu(), ref64(x.cpu(), pw, dw, None, b, (1, 1), (1, 1), (1, 1)), 17, layout)
