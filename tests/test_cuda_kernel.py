"""The hand-written CUDA kernel: nvcc compile gate (sm_80, sm_90), its host-side tile choice run
without a GPU, GPU backend selection, and correctness against the reference when a GPU exists."""
import os
import shutil
import subprocess

import pytest
import torch

import bsconv_fast
from bsconv_fast import dispatch
from helpers import assert_close_to_reference, random_problem, ref64

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
KERNEL = os.path.join(ROOT, "csrc", "cuda", "pw_dw_kernel.cu")
NVCC = shutil.which("nvcc")
needs_nvcc = pytest.mark.skipif(NVCC is None, reason="nvcc not installed")
ARCHS = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]


@needs_nvcc
def test_kernel_translation_unit_compiles_for_sm80_and_sm90(tmp_path):
    out = subprocess.run([NVCC, "-std=c++17", "-O3", "-Werror", "all-warnings", "-c", KERNEL, *ARCHS,
                          "-o", str(tmp_path / "k.o")], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-4000:]


HARNESS = r"""
#include <cstdio>
#include "pw_dw_kernel.cuh"
using namespace bsconv_fast::cuda;
int main() {
  const int cases[][6] = {{3,3,1,1,1,1}, {3,3,2,2,1,1}, {5,5,1,1,1,1}, {5,5,2,2,1,1}, {7,7,1,1,1,1},
                          {7,7,2,2,2,2}, {3,5,1,2,2,1}, {1,1,1,1,1,1}};
  for (const auto& c : cases) {
    PwDwParams p{};
    p.KH = c[0]; p.KW = c[1]; p.SH = c[2]; p.SW = c[3]; p.DH = c[4]; p.DW = c[5];
    const TileConfig t = choose_tile(p);
    std::printf("%d %d %d %d %d %d %d %d %d %d %d %zu\n", c[0], c[1], c[2], c[3], c[4], c[5],
                t.th, t.tw, t.cb, t.hin, t.win, t.smem_bytes);
  }
}
"""


@needs_nvcc
def test_tile_choice_fits_shared_memory_and_registers(tmp_path):
    """choose_tile is host code: compile it with a small main and check its answers, no GPU needed."""
    src = tmp_path / "harness.cu"
    src.write_text(HARNESS)
    exe = tmp_path / "harness"
    build = subprocess.run([NVCC, "-std=c++17", "-I", os.path.dirname(KERNEL), str(src), KERNEL, "-o", str(exe),
                            "-gencode", "arch=compute_80,code=sm_80"], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-4000:]
    rows = [list(map(int, line.split())) for line in subprocess.run([str(exe)], capture_output=True, text=True,
                                                                     check=True).stdout.splitlines()]
    assert len(rows) == 8
    for kh, kw, sh, sw, dh, dw, th, tw, cb, hin, win, smem in rows:
        assert smem > 0 and smem <= 48 * 1024
        assert hin == (th - 1) * sh + (kh - 1) * dh + 1 and win == (tw - 1) * sw + (kw - 1) * dw + 1
        assert hin * win * cb <= 256 * 16  # per-thread accumulators of stage 1
        assert smem == 4 * (hin * win * cb + hin * win * 32 + cb * 33)
    assert rows[0][6:9] == [8, 8, 32]  # 3x3 stride 1: the largest tile


def _problem():
    return dispatch.Problem("cuda", torch.float16, (3, 3), (1, 1), (1, 1), (1, 1))


def test_gpu_backend_order_follows_environment(monkeypatch):
    monkeypatch.delenv("BSCONV_FAST_GPU_KERNEL", raising=False)
    assert [b.name for b in dispatch.gpu_backends()] == ["gpu-fused (triton)", "gpu-fused (cuda)"]
    monkeypatch.setenv("BSCONV_FAST_GPU_KERNEL", "cuda")
    assert [b.name for b in dispatch.gpu_backends()] == ["gpu-fused (cuda)", "gpu-fused (triton)"]


def test_cuda_backend_says_when_not_built(monkeypatch):
    if not bsconv_fast._ext.available():
        pytest.skip("C++ extension not built")
    monkeypatch.setattr(dispatch, "cuda_kernel_built", lambda: False)
    assert dispatch.CudaFused().why_not(_problem()) == "extension built without CUDA sources"
    monkeypatch.setattr(dispatch, "cuda_kernel_built", lambda: True)
    assert dispatch.CudaFused().why_not(_problem()) is None
    assert "larger than 7x7" in dispatch.CudaFused().why_not(
        dispatch.Problem("cuda", torch.float16, (9, 9), (1, 1), (4, 4), (1, 1)))


gpu = pytest.mark.skipif(not (torch.cuda.is_available() and dispatch.cuda_kernel_built()),
                         reason="needs a GPU and a CUDA build of the extension")


@gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("case", [(1, 5, 17, 9, 11, 3, 1, 1, 1), (2, 33, 70, 15, 17, 5, 2, 2, 1),
                                  (3, 64, 48, 14, 14, 3, 1, 2, 2), (1, 20, 9, 10, 10, 7, 2, 3, 1)])
def test_cuda_kernel_matches_reference(case, dtype):
    n, cin, cout, h, w, k, s, p, d = case
    x, pw, dw, mb, b = random_problem(n, cin, cout, h, w, k, dtype, mid_bias=True)
    args = [t.cuda() for t in (x, pw, dw, mb, b)]
    out = torch.ops.bsconv_fast.pw_dw_cuda(*args, [s, s], [p, p], [d, d], 3, 2)
    assert_close_to_reference(out.cpu(), ref64(x, pw, dw, mb, b, (s, s), (p, p), (d, d), 3, 2), cin + k * k,
                              f"{case} {dtype}")
