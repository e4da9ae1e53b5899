"""Per-layer times of a frozen bsconv_fast model and of ONNX Runtime on the same model, in one process.

Rounds alternate: ONNX Runtime (its default spinning thread pool, its profiler on) runs a few forwards, then
the frozen model runs a few and one `Frozen.profile` replay; every turn starts after a 100 ms pause (ONNX
Runtime's spinning threads were measured slowing the next contender's first calls for up to ~50 ms).
Prints, in model order, the median time of each of our calls and of each ONNX Runtime node (kernel time from
its profiler), and both sums. ONNX Runtime's profiler adds a little time per node and its graph splits
differently (pointwise and depthwise convolutions as separate nodes; BatchNorm folded), so compare sums and
stages, not rows. Whole-model ratios come from `python -m bsconv_fast bench --suite cpu-models`.

usage: python benchmarks/ort_layers.py THREADS MODEL [ROUNDS]   (an official bsconv model name)
"""
import collections
import json
import os
import statistics
import sys
import tempfile
import time
import warnings

import torch

import bsconv_fast
from bsconv_fast import heap
from bsconv_fast.bench import ort_session, randomize_bn

PAUSE_S = 0.1


def ort_node_times(profile_path, runs_per_round):
    """Median kernel time (us) of each node over the timed run of every round (the last of its turn)."""
    per_node = collections.defaultdict(list)
    with open(profile_path) as f:
        events = json.load(f)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            per_node[event["name"][:-len("_kernel_time")]].append(event["dur"])
    return [(name, statistics.median(d[runs_per_round - 1::runs_per_round])) for name, d in per_node.items()]


def main(argv):
    if len(argv) < 2 or not argv[0].isdigit():
        sys.exit(__doc__.strip())
    import bsconv.pytorch as B
    warnings.simplefilter("ignore")
    heap.tune_malloc()
    threads, name = int(argv[0]), argv[1]
    rounds = int(argv[2]) if len(argv) > 2 else 40
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = B.get_model(name, num_classes=10 if name.startswith("cifar") else 1000).eval()
    randomize_bn(model)
    size = 32 if name.startswith("cifar") else 224
    x = torch.randn(1, 3, size, size)
    session = ort_session(model, x, "1", os.path.join(tempfile.mkdtemp(prefix="bsconv_fast_ort_layers_"), "profile"))
    feed = {session.get_inputs()[0].name: x.numpy()}
    frozen = bsconv_fast.optimize(model, freeze=True)
    xc = x.contiguous(memory_format=torch.channels_last)
    ours, warm = [], 3
    with torch.inference_mode():
        for _ in range(rounds):
            time.sleep(PAUSE_S)
            for _ in range(warm + 1):
                session.run(None, feed)
            time.sleep(PAUSE_S)
            for _ in range(warm):
                frozen(xc)
            ours.append(frozen.profile(xc))
    theirs = ort_node_times(session.end_profiling(), warm + 1)
    print(f"# {name}, batch 1, {threads} threads, {rounds} rounds; median us per call")
    ours_us = [(op, statistics.median(p[i][1] for p in ours) * 1e6) for i, (op, _) in enumerate(ours[0])]
    for i, (op, us) in enumerate(ours_us):
        print(f"bsconv_fast {i:3d} {op:40s} {us:9.1f}")
    for i, (node, us) in enumerate(theirs):
        print(f"onnxruntime {i:3d} {node[-40:]:40s} {us:9.1f}")
    print(f"# sums: bsconv_fast {sum(u for _, u in ours_us):.0f} us ({len(ours_us)} calls), "
          f"onnxruntime {sum(u for _, u in theirs):.0f} us ({len(theirs)} nodes, profiler on)")


if __name__ == "__main__":
    main(sys.argv[1:])
