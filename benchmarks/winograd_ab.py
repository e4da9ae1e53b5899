"""The ResNet stem by Winograd's F(4x4, 4x4) against the direct kernel, in one process.

Times bsconv_fast::conv_pool_packed on ResNet-18's stem (224 x 224 RGB image, 7x7 3 -> 64, stride 2, its input
BatchNorm as an affine, ReLU, 3x3 max pooling) with the direct kernel (pack_pw, winograd=False) and with Winograd
(pack_winograd, winograd=True), then the whole official model through optimize(freeze=True, winograd=True / False):
contenders take turns of 5 timed calls (after one untimed), medians; prints both and the ratio Winograd / direct, and the stem's
relative error against float64 for each.

usage: python benchmarks/winograd_ab.py THREADS [MODEL] [TURNS]   (MODEL default resnet18_bsconvu, TURNS 60)
"""
import sys

import torch
import torch.nn.functional as F

import bsconv_fast
from bsconv_fast.bench import time_interleaved


def turns(fns, count, block=5):
    """{name: median seconds per call} over `count` turns of the benchmark's interleaved timing."""
    return dict(zip(fns, time_interleaved(list(fns.values()), count * block, 0, block)))


def stem(count):
    torch.manual_seed(0)
    x, w, b = torch.randn(1, 3, 224, 224), torch.randn(64, 3, 7, 7) / 147 ** 0.5, torch.randn(64)
    scale, shift = torch.rand(3) + 0.5, torch.randn(3)
    direct = torch.ops.bsconv_fast.pack_pw(w.permute(0, 2, 3, 1).reshape(64, -1, 1, 1), b)
    winograd = torch.ops.bsconv_fast.pack_winograd(w, b)
    run = {name: (lambda packed=packed, on=on: torch.ops.bsconv_fast.conv_pool_packed(
        x, packed, 64, [7, 7], [2, 2], [3, 3], 1, [3, 3], [2, 2], [1, 1], scale, shift, on))
           for name, packed, on in (("winograd", winograd, True), ("direct", direct, False))}
    xa = x.double() * scale.double().view(1, -1, 1, 1) + shift.double().view(1, -1, 1, 1)
    want = F.max_pool2d(F.relu(F.conv2d(xa, w.double(), b.double(), 2, 3)), 3, 2, 1)
    for name, fn in run.items():
        print(f"stem {name}: relative error {((fn().double() - want).norm() / want.norm()).item():.2e}")
    return turns(run, count)


def model(name, count):
    import bsconv.pytorch
    torch.manual_seed(0)
    net = bsconv.pytorch.get_model(name, num_classes=1000).eval()
    x = torch.randn(1, 3, 224, 224)
    fast = {f"winograd={on}": bsconv_fast.optimize(net, freeze=True, winograd=on) for on in (True, False)}
    return turns({k: (lambda m=m: m(x)) for k, m in fast.items()}, count)


def main():
    threads = int(sys.argv[1])
    name = sys.argv[2] if len(sys.argv) > 2 else "resnet18_bsconvu"
    count = int(sys.argv[3]) if len(sys.argv) > 3 else 60
    torch.set_num_threads(threads)
    print(f"# {threads} thread(s), kernel {bsconv_fast._ext.cpu_kernel_isa()}, torch {torch.__version__}")
    with torch.inference_mode():
        for what, med in (("stem", stem(count)), (name, model(name, count))):
            (a, ta), (b, tb) = med.items()
            print(f"{what}: {a} {ta * 1e6:.1f} us, {b} {tb * 1e6:.1f} us, Winograd / direct {ta / tb:.3f}")


if __name__ == "__main__":
    main()
