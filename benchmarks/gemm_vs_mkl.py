"""The CPU 1x1 op's GEMM against MKL's sgemm, the same shapes in one process, interleaved.

Times `bsconv_fast::pw_packed` (packed weights, bias, no activation; channels_last input, so the GEMM is
pixels x Cin times Cin x Cout) and `torch.addmm` on the same matrices (torch's MKL sgemm, bias added the
same way), both called as bare ops (one dispatcher call each, the output allocated per call), inputs hot in
the cache. It answers one question: is the micro-kernel itself behind a tuned BLAS at these sizes, or is
whatever a layer or a model loses elsewhere (depthwise stage, cold weights, thread split)?

usage: python benchmarks/gemm_vs_mkl.py THREADS [CIN,COUT,HW ...]   (default: the MobileNetV1 / ResNet-18
1x1 shapes at batch 1). Prints one line per shape: median microseconds, GFLOP/s, MKL time / ours.
"""
import sys

import torch

from bsconv_fast import heap
from bsconv_fast.bench import git_commit, machine_line, time_interleaved

DEFAULT_SHAPES = ["32,64,112", "64,64,56", "128,128,28", "256,256,14", "512,512,14", "512,512,7", "1024,1024,7"]


def compare(cin, cout, hw, reps=200):
    gen = torch.Generator().manual_seed(cin * 7919 + cout * 31 + hw)
    w = torch.randn(cout, cin, 1, 1, generator=gen) * cin ** -0.5
    b = torch.randn(cout, generator=gen)
    x = torch.randn(1, cin, hw, hw, generator=gen).contiguous(memory_format=torch.channels_last)
    packed = torch.ops.bsconv_fast.pack_pw(w, b)
    a = x.permute(0, 2, 3, 1).reshape(hw * hw, cin)  # the same memory, pixels x Cin
    wt = w.reshape(cout, cin).t().contiguous()
    ours = lambda: torch.ops.bsconv_fast.pw_packed(x, packed, cout, [1, 1], 0, None)  # noqa: E731
    mkl = lambda: torch.addmm(b, a, wt)  # noqa: E731
    got = ours().permute(0, 2, 3, 1).reshape(hw * hw, cout)
    torch.testing.assert_close(got, mkl(), rtol=1e-4, atol=1e-4)  # the same product, or the timing is moot
    t_ours, t_mkl = time_interleaved([ours, mkl], reps, 10, block=10)
    flops = 2.0 * hw * hw * cin * cout
    return t_ours, t_mkl, flops


def main(argv):
    threads = int(argv[0]) if argv else 1
    shapes = argv[1:] or DEFAULT_SHAPES
    torch.set_num_threads(threads)
    heap.tune_malloc()
    print(f"# {threads} thread(s); {machine_line()}; commit {git_commit()}")
    with torch.inference_mode():
        for spec in shapes:
            cin, cout, hw = (int(v) for v in spec.split(","))
            t_ours, t_mkl, flops = compare(cin, cout, hw)
            print(f"1x1 {cin}->{cout} @{hw}: ours {t_ours * 1e6:.1f} us ({flops / t_ours / 1e9:.0f} GFLOP/s), "
                  f"MKL addmm {t_mkl * 1e6:.1f} us ({flops / t_mkl / 1e9:.0f} GFLOP/s), MKL / ours {t_mkl / t_ours:.3f}",
                  flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
