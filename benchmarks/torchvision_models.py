"""Whole torchvision models through bsconv_fast.optimize(freeze=True), against PyTorch eager and ONNX Runtime,
side by side in one process (the cpu-models suite's method: bsconv_fast.bench.bench_case, turns after a pause).

The models as users build them: torchvision's MobileNetV2/V3 (plain Conv2d -> BatchNorm2d -> activation
stacks, fused by optimize's stack pass), and torchvision's ResNets with bsconv's own recipe applied,
bsconv.pytorch.BSConvU_Replacer (every 3x3 conv a BSConv-U; --replacer none: the plain ResNet, whose dense 3x3
convs stay with PyTorch). Batch 1, 224 x 224, random BatchNorm statistics.

--from-wheel WHEEL loads the model modules from a torchvision wheel file without importing the package: for a
machine whose torchvision build does not load against the installed PyTorch (PyPI's CUDA wheel on a CPU-only
PyTorch: "operator torchvision::nms does not exist"). The model code is the wheel's own; only the package's
__init__ files, its image transforms and its utils module (two helpers) are left out.

usage: python benchmarks/torchvision_models.py [--threads N] [--reps R] [--only NAME ...] [--replacer KIND]
                                               [--from-wheel WHEEL] [--json FILE] [--hide-avx512]
"""
import argparse
import collections.abc
import datetime
import importlib
import itertools
import json
import os
import sys
import tempfile
import types
import warnings
import zipfile

import torch

import bsconv_fast
from bsconv_fast import bench, heap, hide_avx512

MODELS = ("mobilenet_v2", "mobilenet_v3_large", "resnet18", "resnet50")
# the torchvision.models module that defines each model build() takes (tests/test_torchvision.py builds mobilenet_v3_small too)
MODULES = {"mobilenet_v2": "mobilenetv2", "mobilenet_v3_large": "mobilenetv3", "mobilenet_v3_small": "mobilenetv3",
           "resnet18": "resnet", "resnet50": "resnet"}


def _package(name, path=None):
    module = types.ModuleType(name)
    if path is not None:
        module.__path__ = [path]
    sys.modules[name] = module
    return module


def load_from_wheel(wheel):
    """torchvision.models' modules importable from the wheel file `wheel` without the package's __init__ files
    (which load its C++ ops): the packages are empty modules over the unpacked sources, torchvision.utils holds
    the two helpers the model code uses, the image transforms a placeholder."""
    root = tempfile.mkdtemp(prefix="bsconv_fast_torchvision_")
    with zipfile.ZipFile(wheel) as z:
        z.extractall(root, [n for n in z.namelist() if n.startswith("torchvision/") and n.endswith(".py")])
    for name in ("torchvision", "torchvision.models", "torchvision.ops", "torchvision.transforms"):
        _package(name, os.path.join(root, *name.split(".")))
    utils = _package("torchvision.utils")
    utils._log_api_usage_once = lambda obj: None
    utils._make_ntuple = lambda x, n: tuple(x) if isinstance(x, collections.abc.Iterable) else tuple(
        itertools.repeat(x, n))
    _package("torchvision.transforms._presets").ImageClassification = object


def build(name, replacer):
    module = importlib.import_module(f"torchvision.models.{MODULES[name]}")
    model = getattr(module, name)(weights=None)
    if replacer != "none":
        import bsconv.pytorch as B
        model = {"bsconvu": B.BSConvU_Replacer, "bsconvs": B.BSConvS_Replacer}[replacer]().apply(model)
    return model.eval()


def main(argv):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (default: all)")
    parser.add_argument("--reps", type=int, default=100)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--block", type=int, default=5, help="timed calls per turn")
    parser.add_argument("--pause", type=float, default=100, help="ms asleep before each turn")
    parser.add_argument("--only", nargs="+", choices=sorted(MODELS), default=list(MODELS))
    parser.add_argument("--replacer", choices=["bsconvu", "bsconvs", "none"], default="bsconvu",
                        help="bsconv's replacer applied to the ResNets (MobileNets: their own depthwise blocks)")
    parser.add_argument("--from-wheel", help="load torchvision's model code from this wheel file (see above)")
    parser.add_argument("--json", dest="json_path")
    parser.add_argument("--hide-avx512", action="store_true", help="as python -m bsconv_fast bench --hide-avx512")
    args = parser.parse_args(argv)
    if args.hide_avx512 and os.environ.get(hide_avx512.MARKER) != "1":
        hide_avx512.relaunch([sys.executable, os.path.abspath(__file__), *argv])
    if args.from_wheel:
        load_from_wheel(args.from_wheel)
    warnings.simplefilter("ignore", UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    heap.tune_malloc()
    header = {"machine": bench.machine_line(), "avx512_hidden": hide_avx512.active(),
              "threads": torch.get_num_threads(), "commit": bench.git_commit(),
              "date": datetime.date.today().isoformat(), "suite": "torchvision-models", "replacer": args.replacer,
              "from_wheel": os.path.basename(args.from_wheel) if args.from_wheel else None, "reps": args.reps,
              "block": args.block, "pause_ms": args.pause}
    print(f"# {header['machine']}; threads {header['threads']}; commit {header['commit']}; {header['date']}")
    print(f"# torchvision models (ResNets with replacer {args.replacer}), batch 1, 224 x 224; median of {args.reps} "
          f"runs in turns of {args.block} after a {args.pause:g} ms pause; speedup = min(eager) / fused; vs_ort = "
          "min(ort, ort-spin) / fused")
    print(" | ".join(bench.COLUMNS))
    rows = []
    for name in args.only:
        torch.manual_seed(0)
        ref = build(name, args.replacer if name.startswith("resnet") else "none")
        bench.randomize_bn(ref)
        fused = bsconv_fast.optimize(ref, freeze=True)
        x = torch.randn(1, 3, 224, 224)
        peers = bench.ort_peers(ref, x, spinning=True)
        rows.append(bench.bench_case(name, ref, fused, x, args.reps, args.warmup, tuple(x.shape), peers, args.block,
                                     args.pause / 1e3))
        print(bench.format_row(rows[-1]), flush=True)
    summary = {"geomean_speedup": bench.geomean(r["speedup"] for r in rows)}
    if all("vs_ort" in r for r in rows):
        summary["geomean_vs_ort"] = bench.geomean(r["vs_ort"] for r in rows)
    print("# geometric mean: " + ", ".join(f"{k} {v:.2f}x" for k, v in summary.items()))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({**header, **summary, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
