"""GPU benchmark suite: fused bsconv_fast layers against three peers, side by side in one process.

Peers: (a) eager: the standard modules (cuDNN), channels_last; (b) torch.compile(mode="max-autotune")
of the same modules; (c) dense: BSConv-U collapsed exactly into one kxk convolution with weight
W[co, ci] = w_pw[co, ci] * w_dw[co] (run by cuDNN; only for layers without anything between the
stages). Timing: CUDA-event medians with the L2 cache flushed before every timed call (so the
unfused peers are not flattered by an L2-resident intermediate); at batch 1 all contenders run as
CUDA graphs. Roofline: bound = max(bytes / bandwidth, flops / matmul rate), bytes = input + output
+ weights once, with bandwidth and matmul rate measured on the same GPU in the same run.
On a CPU the same code runs with perf_counter timing (for tests, on tiny shapes).
"""
import copy
import statistics
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import bsconv_fast
from bsconv_fast.modules import BSConvU
from bsconv_fast.optimize import fuse_inverted_residual

L2_FLUSH_BYTES = 256 << 20


class Timer:
    """Median milliseconds per call; CUDA events and L2 flush on a GPU, perf_counter on a CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.flush = torch.empty(L2_FLUSH_BYTES // 4, dtype=torch.float32, device=device) if self.cuda else None

    def __call__(self, fn, reps, warmup=5):
        for _ in range(warmup):
            fn()
        times = []
        for _ in range(reps):
            if self.cuda:
                self.flush.zero_()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                times.append(start.elapsed_time(end))
            else:
                t0 = time.perf_counter()
                fn()
                times.append((time.perf_counter() - t0) * 1e3)
        return statistics.median(times)


def as_graph(fn, device):
    """A CUDA graph replay of fn (batch-1 latency without launch overhead); fn itself on a CPU."""
    if torch.device(device).type != "cuda":
        return fn
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return graph.replay


def machine_peaks(device, dtype, timer, size=8192, copy_bytes=1 << 30):
    """(bytes/s, flop/s) measured with a device copy and a square matmul in `dtype`."""
    n = copy_bytes // 4
    src, dst = torch.empty(n, device=device), torch.empty(n, device=device)
    t_copy = timer(lambda: dst.copy_(src), reps=10)
    a = torch.randn(size, size, device=device, dtype=dtype)
    t_mm = timer(lambda: a @ a, reps=10)
    return 2 * n * 4 / (t_copy * 1e-3), 2 * size ** 3 / (t_mm * 1e-3)


def dense_collapse(pw_weight, dw_weight):
    """The exact dense kxk weight of BSConv-U: W[co, ci] = w_pw[co, ci] * w_dw[co]."""
    return pw_weight[:, :, 0, 0][:, :, None, None] * dw_weight


def bsconv_u_cases(batch, names=("mobilenetv1_w1_bsconvu", "resnet18_bsconvu")):
    """(label, eager module, fused module, dense fn or None, input shape) of the official layers."""
    from bsconv_fast.bench import build_layer, layer_configs
    cases = []
    for key, _ in layer_configs(names):
        cin, cout, h, w, k, s, p, d, _ = key
        ref = build_layer(key)
        fused = BSConvU.from_children(copy.deepcopy(ref)._modules)

        def dense(x, ref=ref, s=s, p=p, d=d):
            return F.conv2d(x, dense_collapse(ref.pw.weight, ref.dw.weight), ref.dw.bias, s, p, d)

        cases.append((f"{cin}->{cout} @{h} k{k[0]} s{s[0]}", ref, fused, dense, (batch, cin, h, w)))
    return cases


def inverted_residual_cases(batch, name="mobilenetv2_w1"):
    """MobileNetV2 expand (1x1+BN+ReLU6) -> depthwise (+BN+ReLU6) blocks, distinct shapes."""
    from bsconv_fast.bench import official, randomize_bn
    model = official().get_model(name, num_classes=1000).eval()
    randomize_bn(model)
    seen, cases = set(), []

    def hook(mod, args):
        x = args[0]
        key = (x.shape[1], mod.conv1.conv.out_channels, x.shape[2], mod.conv2.conv.stride)
        if key not in seen:
            seen.add(key)
            ref = nn.Sequential(copy.deepcopy(mod.conv1), copy.deepcopy(mod.conv2)).eval()
            fused = fuse_inverted_residual(mod.conv1, mod.conv2)
            label = f"IR {key[0]}->{key[1]} @{key[2]} s{key[3][0]}"
            cases.append((label, ref, fused, None, (batch, x.shape[1], x.shape[2], x.shape[3])))

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if type(m).__name__ == "LinearBottleneck"]
    with torch.no_grad():
        model(torch.randn(1, 3, 224, 224))
    for h in handles:
        h.remove()
    return cases


def run_case(case, device, dtype, timer, reps, graphs, compile_peer, peaks):
    label, ref, fused, dense, shape = case
    cl = torch.channels_last
    ref = ref.to(device=device, dtype=dtype, memory_format=cl)
    fused = fused.to(device=device, dtype=dtype)
    x = torch.randn(shape, device=device, dtype=dtype).contiguous(memory_format=cl)
    contenders = {"fused": lambda: fused(x), "eager": lambda: ref(x)}
    if dense is not None:
        contenders["dense"] = lambda: dense(x)
    if compile_peer:
        compiled = torch.compile(ref, mode="max-autotune")
        contenders["compile"] = lambda: compiled(x)
    row = {"case": f"{label} b{shape[0]}", "dtype": str(dtype).replace("torch.", "")}
    with torch.inference_mode():
        want = ref(x).double()
        got = fused(x)
        row["err_rel"] = ((got.double() - want).norm() / want.norm()).item()
        row["backend"] = ",".join(sorted(set(bsconv_fast.explain(fused, x).backends().values())))
        for name, fn in contenders.items():
            row[name + "_ms"] = timer(as_graph(fn, device) if graphs else fn, reps)
    peers = [row[k] for k in ("eager_ms", "dense_ms", "compile_ms") if k in row]
    row["vs_best_peer"] = min(peers) / row["fused_ms"]
    for name in ("eager", "dense", "compile"):
        if name + "_ms" in row:
            row["vs_" + name] = row[name + "_ms"] / row["fused_ms"]
    if peaks is not None:
        report = bsconv_fast.profile(fused, shape, dtype=dtype, device=device)
        bound = max(report.total_min_bytes / peaks[0], 2 * report.total_macs / peaks[1])
        row["roofline_pct"] = 100 * bound * 1e3 / row["fused_ms"]
    return row


def run_suite(device, dtype, batch, reps, compile_peer=True, graphs=None, cases=None, measure_peaks=True):
    """Rows for the layer suite (or `cases`) on `device`."""
    timer = Timer(device)
    graphs = (batch == 1 and torch.device(device).type == "cuda") if graphs is None else graphs
    small = torch.device(device).type != "cuda"  # CPU runs are tests: keep the peak probes small
    peaks = machine_peaks(device, dtype, timer, *((512, 16 << 20) if small else ())) if measure_peaks else None
    if cases is None:
        cases = bsconv_u_cases(batch) + inverted_residual_cases(batch)
    rows = [run_case(c, device, dtype, timer, reps, graphs, compile_peer, peaks) for c in cases]
    summary = {"batch": batch, "cuda_graphs": graphs}
    if peaks is not None:
        summary.update(bandwidth_gbs=peaks[0] / 1e9, matmul_tflops=peaks[1] / 1e12)
    for peer in ("eager", "dense", "compile"):
        vals = [r["vs_" + peer] for r in rows if "vs_" + peer in r]
        if vals:
            summary["geomean_vs_" + peer] = float(torch.tensor(vals).log().mean().exp())
    return rows, summary
