"""Benchmark: fused bsconv_fast layers vs PyTorch eager, side by side in one process.

Every contender runs on the same inputs, interleaved (one call of each per round), and the
median of the rounds after warm-up is reported. Two eager peers, both channels_last input:
  eager-cl   the module converted with .to(memory_format=torch.channels_last) (the usual recipe)
  eager-clx  only the input channels_last, weights left as constructed
The speedup is fused vs the faster of the two.
"""
import argparse
import copy
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time
import warnings
from collections import OrderedDict

import torch

import bsconv_fast
from bsconv_fast import heap, hide_avx512
from bsconv_fast.modules import BSConvU

SUITES = {
    "default": "BSConv-U layers of mobilenetv1_w1_bsconvu and resnet18_bsconvu (224), batch as given, "
               "plus the whole cifar_mobilenetv1_w1_bsconvu (optimize(freeze=True))",
    "cpu-layers": "the same layers at batch 1 and 8, with percent of the measured GEMM peak",
    "cpu-models": "whole official models, bsconv_fast.optimize(freeze=True) vs eager and ONNX Runtime (CPU, same threads)",
    "gpu-layers": "layer suite plus MobileNetV2 expand->depthwise blocks vs eager cuDNN, torch.compile max-autotune "
                  "and the dense collapse; CUDA events, L2 flushed, CUDA graphs at batch 1 (use --device cuda)",
}
MODELS = ("cifar_mobilenetv1_w1_bsconvu", "mobilenetv1_w1_bsconvu", "resnet18_bsconvu",
          "mobilenetv3_large_w1_bsconvs_p1d6", "mobilenetv2_w1_bsconvs_p1d6")
LAYER_MODELS = ("mobilenetv1_w1_bsconvu", "resnet18_bsconvu")


def machine_line():
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    hidden = (", AVX-512 hidden by CPUID faulting (--hide-avx512: every contender runs its AVX2 kernels), "
              f"PyTorch CPU capability {torch.backends.cpu.get_cpu_capability()}") if hide_avx512.active() else ""
    return (f"{cpu}, {os.cpu_count()} logical CPUs, torch {torch.__version__}, "
            f"kernel {bsconv_fast._ext.cpu_kernel_isa()}, python {platform.python_version()}, "
            f"OPENBLAS_NUM_THREADS={os.environ.get('OPENBLAS_NUM_THREADS', 'unset')}, "
            f"glibc heap tuned={heap.malloc_tuned()}{hidden}")


def git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=here, capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def official():
    try:
        import bsconv.pytorch
    except ImportError as exc:
        raise SystemExit("the benchmark suites use the official models: pip install bsconv==0.4.0") from exc
    return bsconv.pytorch


def layer_configs(names=LAYER_MODELS):
    """Distinct BSConv-U layer configurations (with their input size) of the official models."""
    B = official()
    seen = {}
    for name in names:
        model = B.get_model(name, num_classes=1000).eval()

        def hook(mod, args, name=name):
            x = args[0]
            dw = mod.dw
            key = (mod.pw.in_channels, mod.pw.out_channels, x.shape[2], x.shape[3], dw.kernel_size,
                   dw.stride, dw.padding, dw.dilation, dw.bias is not None)
            seen.setdefault(key, name)

        handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, B.BSConvU)]
        with torch.no_grad():
            model(torch.randn(1, 3, 224, 224))
        for h in handles:
            h.remove()
    return [(key, src) for key, src in seen.items()]


def build_layer(key):
    cin, cout, _, _, k, s, p, d, bias = key
    torch.manual_seed(0)
    ref = official().BSConvU(cin, cout, k, s, p, d, bias).eval()
    for prm in ref.parameters():  # non-trivial bias values too
        torch.nn.init.uniform_(prm, -0.5, 0.5)
    return ref


def time_interleaved(fns, reps, warmup, block=5, pause=0.0):
    """Median seconds per call of each fn. Contenders take turns in blocks of `block` calls, so
    drift hits all alike while one runtime's idle-spinning thread pool (OpenMP, ONNX Runtime)
    does not land inside another's timed call; the first call of each block is not timed. With
    `pause` (seconds), every turn starts after that long asleep: spinning threads of the previous
    contender (ONNX Runtime's default) have parked by then if the pause is long enough (measured:
    still spinning 20 ms after its turn, parked by 50 ms), and each contender wakes its own pool in
    its untimed first call."""
    for _ in range(warmup):
        for f in fns:
            f()
    times = [[] for _ in fns]
    while len(times[0]) < reps:
        for i, f in enumerate(fns):
            if pause:
                time.sleep(pause)
            f()
            for _ in range(block):
                t0 = time.perf_counter()
                f()
                times[i].append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def eager_peers(ref, x):
    cl = torch.channels_last
    converted = copy.deepcopy(ref).to(memory_format=cl)
    xc = x.contiguous(memory_format=cl)
    return {"eager-cl": lambda: converted(xc), "eager-clx": lambda: ref(xc)}


def ort_session(ref, x, spin, profile_prefix=None):
    """An ONNX Runtime session (CPU provider, this process's thread count, one inter-op thread) on `ref`
    exported to ONNX for input `x`; `spin`: "1" (ONNX Runtime's default) or "0" for intra-op spinning;
    `profile_prefix`: turn its profiler on, writing there."""
    import onnxruntime as ort
    import tempfile
    directory = tempfile.mkdtemp(prefix="bsconv_fast_bench_")
    path = os.path.join(directory, "model.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(ref, (x,), path, dynamo=False, opset_version=17)
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.add_session_config_entry("session.intra_op.allow_spinning", spin)
    if profile_prefix is not None:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    return ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])


def ort_peers(ref, x, spinning):
    """ONNX Runtime on the unpatched model (ort_session): `ort` with intra-op spinning off, and with
    `spinning` also `ort-spin`, ONNX Runtime's default. Its spinning threads keep the cores busy after
    each run and slow down whoever is timed next, so `ort-spin` is only measured when turns start after
    a pause (--pause) or contenders are timed alone (--block >= --reps). Empty without onnxruntime."""
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return {}
    peers = {}
    for name, spin in (("ort", "0"), ("ort-spin", "1"))[:2 if spinning else 1]:
        session = ort_session(ref, x, spin)
        feed = {session.get_inputs()[0].name: x.numpy()}
        peers[name] = lambda session=session, feed=feed: session.run(None, feed)
    return peers


def bench_case(label, ref, fused, x, reps, warmup, prof_input, extra_peers=None, block=5, pause=0.0):
    peers = {**eager_peers(ref, x), **(extra_peers or {})}
    xc = x.contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want = ref(x).double()
        got = fused(xc)
        err = (got.double() - want).abs().max().item()
        rel = ((got.double() - want).norm() / want.norm()).item()
        times = time_interleaved(list(peers.values()) + [lambda: fused(xc)], reps, warmup, block, pause)
    report = bsconv_fast.profile(ref, prof_input)  # paper-convention counts of the model as published
    backends = bsconv_fast.explain(fused, xc).backends()
    backend = ",".join(sorted(set(backends.values()))) or "-"
    if isinstance(fused, bsconv_fast.Frozen):  # which replay timed it: the first line of its program says
        program = fused.programs()[-1]
        backend += " (frozen: runs the model)" if program is None else (
            " (frozen, C++ replay)" if program.startswith("# replayed from C++") else " (frozen, Python replay)")
    row = {"case": label, "backend": backend, "err_max_abs": err, "err_rel": rel, "params": report.total_params,
           "flops": report.total_flops, "macs": report.total_macs, "min_bytes": report.total_min_bytes}
    for (name, _), t in zip(peers.items(), times):
        row[name + "_ms"] = t * 1e3
    row["fused_ms"] = times[-1] * 1e3
    row["speedup"] = min(t for (name, _), t in zip(peers.items(), times) if name.startswith("eager")) / times[-1]
    if "ort" in peers:  # against the faster ONNX Runtime setting
        row["vs_ort"] = min(row["ort_ms"], row.get("ort-spin_ms", float("inf"))) / row["fused_ms"]
    row["fused_gflops"] = 2 * report.total_macs / times[-1] / 1e9
    return row


def add_peak_columns(row, peak_gflops):
    """What the measured GEMM peak says about a row: the fused kernel's percentage of it, and the
    ceilings: the speedup over eager (and ONNX Runtime) that running every multiply-add at the peak
    would give. A target above the ceiling cannot be met on this machine."""
    ideal_ms = 2 * row["macs"] / peak_gflops / 1e6
    row["peak_pct"] = 100 * row["fused_gflops"] / peak_gflops
    row["ceiling_vs_eager"] = min(row[k] for k in ("eager-cl_ms", "eager-clx_ms")) / ideal_ms
    if "vs_ort" in row:
        row["ceiling_vs_ort"] = min(row["ort_ms"], row.get("ort-spin_ms", float("inf"))) / ideal_ms


def run_layers(batches, reps, warmup, peak_gflops, block=5):
    rows = []
    for key, src in layer_configs():
        cin, cout, h, w, k, s = key[:6]
        ref = build_layer(key)
        fused = BSConvU.from_children(OrderedDict(ref._modules))
        for batch in batches:
            x = torch.randn(batch, cin, h, w)
            label = f"{cin}->{cout} @{h} k{k[0]} s{s[0]} b{batch}"
            rows.append(bench_case(label, ref, fused, x, reps, warmup, (batch, cin, h, w), block=block))
            add_peak_columns(rows[-1], peak_gflops)
            print(format_row(rows[-1]), flush=True)
    return rows


def randomize_bn(model):
    """Non-trivial BatchNorm statistics, so that folding them is really exercised."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.1, 0.1)
            m.running_var.uniform_(0.5, 1.5)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.2, 0.2)


def run_models(names, batch, reps, warmup, with_ort, peak_gflops, block=5, pause=0.0):
    B = official()
    rows = []
    for name in names:
        torch.manual_seed(0)
        ref = B.get_model(name, num_classes=1000 if not name.startswith("cifar") else 10).eval()
        randomize_bn(ref)
        size = 32 if name.startswith("cifar") else 224
        fused = bsconv_fast.optimize(ref, tune_malloc=heap.malloc_tuned(), freeze=True)
        x = torch.randn(batch, 3, size, size)
        extra = ort_peers(ref, x, spinning=pause > 0 or block >= reps) if with_ort else {}
        rows.append(bench_case(f"{name} b{batch}", ref, fused, x, reps, warmup, (batch, 3, size, size), extra, block,
                               pause))
        add_peak_columns(rows[-1], peak_gflops)
        print(format_row(rows[-1]), flush=True)
    return rows


def gemm_peak_gflops(reps=20):
    """Measured float32 GEMM rate, the better of MKL sgemm (torch.mm) and oneDNN's 1x1 convolution."""
    a, b = torch.randn(2048, 1024), torch.randn(1024, 1024)
    x, w = torch.randn(1, 1024, 32, 64).contiguous(memory_format=torch.channels_last), torch.randn(1024, 1024, 1, 1)
    with torch.inference_mode():
        t_mm, t_conv = time_interleaved([lambda: a @ b, lambda: torch.nn.functional.conv2d(x, w)], reps, 3)
    flops = 2 * 2048 * 1024 * 1024
    return {"sgemm_gflops": flops / t_mm / 1e9, "onednn_1x1_gflops": flops / t_conv / 1e9,
            "peak_gflops": max(flops / t_mm, flops / t_conv) / 1e9}


COLUMNS = ("case", "backend", "eager-cl_ms", "eager-clx_ms", "ort_ms", "ort-spin_ms", "fused_ms", "speedup", "vs_ort",
           "fused_gflops", "peak_pct", "ceiling_vs_eager", "ceiling_vs_ort", "params", "flops", "err_max_abs",
           "err_rel")


def format_row(row):
    out = []
    for c in COLUMNS:
        v = row.get(c, "-")
        if c.startswith("err_"):
            out.append(f"{v:.1e}")
        elif isinstance(v, float):
            out.append(f"{v:.3f}" if c.endswith("_ms") else f"{v:.2f}")
        elif isinstance(v, int):
            out.append(f"{v:,}")
        else:
            out.append(str(v))
    return " | ".join(out)


def geomean(values):
    values = list(values)
    return float(torch.tensor(values).log().mean().exp()) if values else float("nan")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bsconv_fast bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--suite", choices=sorted(SUITES), default="default",
                        help="; ".join(f"{k}: {v}" for k, v in SUITES.items()))
    parser.add_argument("--batch", type=int, default=1, help="batch size (default suite and models)")
    parser.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32",
                        help="gpu-layers: float32/float16/bfloat16; CPU suites: float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="cuda for the gpu-layers suite")
    parser.add_argument("--no-compile", action="store_true", help="gpu-layers: skip the torch.compile peer")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: all)")
    parser.add_argument("--reps", type=int, default=50, help="timed rounds (median reported)")
    parser.add_argument("--warmup", type=int, default=10, help="untimed rounds first")
    parser.add_argument("--block", type=int, default=5,
                        help="timed calls per turn (default 5); --block equal to --reps times each contender alone, "
                             "with warm caches and thread pools, instead of taking turns")
    parser.add_argument("--pause", type=float, default=0.0,
                        help="milliseconds asleep before every turn (default 0): idle thread pools park, so ONNX "
                             "Runtime with its default spinning (ort-spin) can take turns with the others; use 100 "
                             "(its threads were measured spinning 20 ms after its turn, parked by 50 ms)")
    parser.add_argument("--json", dest="json_path", default=None, help="write rows and machine info here")
    parser.add_argument("--default-malloc", action="store_true",
                        help="CPU suites: leave glibc's heap thresholds alone (default: bsconv_fast.heap.tune_malloc() "
                             "before anything runs, so every contender in the process runs with the same heap)")
    parser.add_argument("--only", nargs="*", default=None, help="models suite: run only these official models")
    parser.add_argument("--hide-avx512", action="store_true",
                        help="CPU suites: rerun this command with AVX-512 hidden from every library in the process "
                             "(ONNX Runtime, oneDNN, ATen, bsconv_fast), as on an AVX2 + FMA CPU; Linux, needs "
                             "CPUID faulting and a C compiler (see bsconv_fast/hide_avx512.py)")
    args = parser.parse_args(argv)
    if args.hide_avx512 and os.environ.get(hide_avx512.MARKER) != "1":
        argv = sys.argv[1:] if argv is None else argv
        hide_avx512.relaunch([sys.executable, "-m", "bsconv_fast", "bench", *argv])

    warnings.simplefilter("ignore", UserWarning)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "cpu" and not args.default_malloc:
        heap.tune_malloc()
    header = {"machine": machine_line(), "avx512_hidden": hide_avx512.active(), "threads": torch.get_num_threads(),
              "commit": git_commit(), "date": datetime.date.today().isoformat(), "suite": args.suite, "reps": args.reps,
              "block": args.block, "pause_ms": args.pause}
    print(f"# {header['machine']}; threads {header['threads']}; commit {header['commit']}; {header['date']}")
    print(f"# median of {args.reps} runs in turns of {args.block} after {args.warmup} warm-up"
          f"{f', {args.pause:g} ms pause before each turn' if args.pause else ''}; "
          "speedup = min(eager) / fused; "
          "vs_ort = min(ort, ort-spin) / fused")
    print(" | ".join(COLUMNS))
    summary = {}
    if args.suite == "gpu-layers":
        return run_gpu(args, header)
    # Also the process warm-up (thread pools, clocks, first-touch pages): without it the first case
    # of a run measures slower than it is.
    summary.update(gemm_peak_gflops())
    peak = summary["peak_gflops"]
    print(f"# measured GEMM peak {peak:.0f} GFLOP/s (MKL sgemm {summary['sgemm_gflops']:.0f}, "
          f"oneDNN 1x1 conv {summary['onednn_1x1_gflops']:.0f})")
    if args.suite == "default":
        rows = run_layers([args.batch], args.reps, args.warmup, peak, args.block)
        rows += run_models(["cifar_mobilenetv1_w1_bsconvu"], args.batch, args.reps, args.warmup, False, peak,
                           args.block)
    elif args.suite == "cpu-layers":
        rows = run_layers([1, 8], args.reps, args.warmup, peak, args.block)
        for batch in (1, 8):
            sel = [r for r in rows if r["case"].endswith(f"b{batch}")]
            summary[f"geomean_speedup_b{batch}"] = geomean(r["speedup"] for r in sel)
            summary[f"geomean_ceiling_b{batch}"] = geomean(r["ceiling_vs_eager"] for r in sel)
            print(f"# batch {batch}: geometric-mean speedup {summary[f'geomean_speedup_b{batch}']:.2f}x "
                  f"(ceiling at the GEMM peak {summary[f'geomean_ceiling_b{batch}']:.2f}x), "
                  f"slowest {min(r['speedup'] for r in sel):.2f}x")
    else:
        rows = run_models(args.only or list(MODELS), args.batch, args.reps, args.warmup, True, peak, args.block,
                          args.pause / 1e3)
    speedups = [r["speedup"] for r in rows]
    summary.update({"geomean_speedup": geomean(speedups), "min_speedup": min(speedups)})
    print(f"# geometric-mean speedup vs eager {summary['geomean_speedup']:.2f}x, "
          f"slowest case {summary['min_speedup']:.2f}x")
    if any("vs_ort" in r for r in rows):
        summary["geomean_vs_ort"] = geomean(r["vs_ort"] for r in rows if "vs_ort" in r)
        print(f"# geometric-mean speedup vs ONNX Runtime {summary['geomean_vs_ort']:.2f}x")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({**header, **summary, "rows": rows}, f, indent=1)
    return 0


def run_gpu(args, header):
    from bsconv_fast import bench_gpu
    dtype = getattr(torch, args.dtype)
    rows, summary = bench_gpu.run_suite(args.device, dtype, args.batch, args.reps, compile_peer=not args.no_compile)
    if args.device == "cuda":
        header["machine"] = f"{torch.cuda.get_device_name()}, {header['machine']}"
    cols = ["case", "backend", "eager_ms", "compile_ms", "dense_ms", "fused_ms", "vs_eager", "vs_compile", "vs_dense",
            "roofline_pct", "err_rel"]
    print(f"# {header['machine']}; {summary}")
    print(" | ".join(cols))
    for r in rows:
        print(" | ".join(f"{r[c]:.3g}" if isinstance(r.get(c), float) else str(r.get(c, "-")) for c in cols))
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump({**header, **summary, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
