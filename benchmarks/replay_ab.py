"""A/B of a frozen model's two replays in one process: the C++ Program against the torch.fx (Python) replay
of the same recorded calls. Alternating rounds of 10 timed calls each, the order flipped every round; prints
the medians and the median (and quartiles) of the per-round Python/C++ ratios.

usage: python benchmarks/replay_ab.py THREADS MODEL [MODEL ...]   (official bsconv model names)
"""
import statistics
import sys
import time
import warnings

import torch

import bsconv_fast
from bsconv_fast import heap


def main(argv):
    if len(argv) < 2 or not argv[0].isdigit():
        sys.exit(__doc__.strip())
    import bsconv.pytorch as B
    warnings.simplefilter("ignore")
    heap.tune_malloc()
    torch.set_num_threads(int(argv[0]))
    for name in argv[1:]:
        model = B.get_model(name, num_classes=10 if name.startswith("cifar") else 1000).eval()
        frozen = bsconv_fast.optimize(model, freeze=True)
        size = 32 if name.startswith("cifar") else 224
        x = torch.randn(1, 3, size, size)
        with torch.inference_mode():
            frozen(x)
            (replay,) = frozen.__dict__["_programs"].values()
            runs = {"python": lambda: replay.graph_module(x), "c++": lambda: replay.native([x])}
            times, ratios = {k: [] for k in runs}, []
            for r in range(40):
                block = {}
                for k in (list(runs) if r % 2 == 0 else list(runs)[::-1]):
                    time.sleep(0.005)
                    runs[k]()
                    t = []
                    for _ in range(10):
                        t0 = time.perf_counter()
                        runs[k]()
                        t.append(time.perf_counter() - t0)
                    times[k] += t
                    block[k] = statistics.median(t)
                ratios.append(block["python"] / block["c++"])
        q = statistics.quantiles(ratios, n=4)
        print(f"{name}: python {statistics.median(times['python']) * 1e3:.3f} ms, c++ {statistics.median(times['c++']) * 1e3:.3f} ms,"
              f" python/c++ per round {statistics.median(ratios):.3f} (IQR {q[0]:.3f}-{q[2]:.3f})")


if __name__ == "__main__":
    main(sys.argv[1:])
