"""The benchmark CLI: options listed, and its measuring code path on tiny inputs."""
import copy
import json
import os
import subprocess
import sys

import pytest
import torch

import bsconv_fast
from bsconv_fast import bench, hide_avx512


def test_help_lists_options():
    out = subprocess.run([sys.executable, "-m", "bsconv_fast", "bench", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for opt in ("--suite", "--batch", "--dtype", "--device", "--threads", "--json"):
        assert opt in out.stdout


def test_unknown_command_fails():
    out = subprocess.run([sys.executable, "-m", "bsconv_fast", "nope"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown command" in out.stderr


def test_bench_case_row_on_tiny_layer():
    B = pytest.importorskip("bsconv.pytorch")
    ref = B.BSConvU(5, 7, 3, padding=1).eval()
    fused = bsconv_fast.patch(B.BSConvU(5, 7, 3, padding=1).eval())
    fused.load_state_dict(ref.state_dict())
    row = bench.bench_case("tiny", ref, fused, torch.randn(1, 5, 9, 9), reps=3, warmup=1, prof_input=(1, 5, 9, 9))
    assert row["backend"].startswith("cpu-fused")
    assert row["err_max_abs"] < 1e-5
    assert row["flops"] == 9 * 9 * (5 * 7 + 7 * 9) + 7 * 9 * 9
    assert row["fused_ms"] > 0 and row["speedup"] > 0
    assert bench.format_row(row).startswith("tiny | cpu-fused")


def test_turns_start_after_the_pause(monkeypatch):
    events = []
    monkeypatch.setattr(bench.time, "sleep", lambda s: events.append(("sleep", s)))
    fns = [lambda: events.append("a"), lambda: events.append("b")]
    times = bench.time_interleaved(fns, reps=4, warmup=1, block=2, pause=0.02)
    assert len(times) == 2 and all(t >= 0 for t in times)
    # warm-up once each, then per round and contender: the pause, one untimed call, `block` timed calls
    turn = [("sleep", 0.02), "a", "a", "a", ("sleep", 0.02), "b", "b", "b"]
    assert events == ["a", "b"] + turn * 2


def test_layer_configs_come_from_official_models():
    pytest.importorskip("bsconv.pytorch")
    keys = [k for k, _ in bench.layer_configs()]
    assert (32, 64, 112, 112, (3, 3), (1, 1), (1, 1), (1, 1), False) in keys
    assert (512, 512, 7, 7, (3, 3), (1, 1), (1, 1), (1, 1), False) in keys
    assert len(keys) == len(set(keys)) == 16


def test_json_output(tmp_path):
    pytest.importorskip("bsconv.pytorch")
    path = tmp_path / "r.json"
    rc = bench.main(["--suite", "cpu-models", "--reps", "2", "--warmup", "1", "--json", str(path), "--only",
                     "cifar_mobilenetv1_w1d4_bsconvu"])
    assert rc == 0
    data = json.loads(path.read_text())
    assert data["rows"][0]["case"].startswith("cifar_mobilenetv1_w1d4_bsconvu")
    assert data["rows"][0]["backend"].endswith("(frozen, C++ replay)")  # not the Python replay
    assert {"machine", "commit", "date", "threads", "peak_gflops"} <= data.keys()
    row = data["rows"][0]
    assert row["ceiling_vs_eager"] > 0 and 0 < row["peak_pct"]


def test_peak_columns_are_the_speedups_at_the_gemm_peak():
    # 1e9 multiply-adds are 20 ms at 100 GFLOP/s; eager took 40 ms, ONNX Runtime 30 ms, fused 25 ms
    row = {"macs": 10**9, "fused_gflops": 80.0, "eager-cl_ms": 40.0, "eager-clx_ms": 50.0, "ort_ms": 30.0,
           "vs_ort": 1.2}
    bench.add_peak_columns(row, 100.0)
    assert row["peak_pct"] == pytest.approx(80.0)
    assert row["ceiling_vs_eager"] == pytest.approx(2.0) and row["ceiling_vs_ort"] == pytest.approx(1.5)


def test_gpu_suite_code_path_on_cpu_tiny_shapes():
    """The GPU suite's measuring code (timer, peers, dense collapse, roofline) on CPU tensors."""
    B = pytest.importorskip("bsconv.pytorch")
    from bsconv_fast import bench_gpu
    from bsconv_fast.optimize import fuse_inverted_residual
    common = pytest.importorskip("bsconv.pytorch.common")
    ref = B.BSConvU(6, 10, 3, padding=1).eval()
    fused = bsconv_fast.BSConvU.from_children(copy.deepcopy(ref)._modules)

    def dense(x):
        return torch.nn.functional.conv2d(x, bench_gpu.dense_collapse(ref.pw.weight, ref.dw.weight), ref.dw.bias, 1, 1)

    expand = common.ConvBlock(6, 12, 1, 1, 0, activation="relu6").eval()
    dw = common.ConvBlock(12, 12, 3, 2, 1, groups=12, activation="relu6").eval()
    cases = [("u", ref, fused, dense, (1, 6, 9, 9)),
             ("ir", torch.nn.Sequential(expand, dw).eval(), fuse_inverted_residual(expand, dw), None, (1, 6, 9, 9))]
    rows, summary = bench_gpu.run_suite("cpu", torch.float32, 1, reps=2, compile_peer=False, cases=cases)
    assert [r["case"] for r in rows] == ["u b1", "ir b1"]
    for r in rows:
        assert r["backend"].startswith("cpu-fused") and r["err_rel"] < 1e-5
        assert r["fused_ms"] > 0 and r["roofline_pct"] > 0
    assert "vs_dense" in rows[0] and "vs_dense" not in rows[1]
    assert summary["bandwidth_gbs"] > 0 and summary["matmul_tflops"] > 0


def test_dense_collapse_is_exact():
    from bsconv_fast import bench_gpu
    x = torch.randn(2, 5, 9, 8, dtype=torch.float64)
    pw, dw = torch.randn(7, 5, 1, 1, dtype=torch.float64), torch.randn(7, 1, 3, 3, dtype=torch.float64)
    want = bsconv_fast.reference.bsconv_u(x, pw, dw, None, 2, 1)
    got = torch.nn.functional.conv2d(x, bench_gpu.dense_collapse(pw, dw), None, 2, 1)
    assert torch.allclose(got, want, atol=1e-12)


def test_gpu_check_script_is_valid_bash():
    import os
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "gpu_check.sh")
    assert subprocess.run(["bash", "-n", script]).returncode == 0


def run_benchmark_script(name, argv):
    """benchmarks/NAME.py's main(argv), loaded from its file; the thread count it sets is put back after."""
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    threads = torch.get_num_threads()
    try:
        script.main(argv)
    finally:
        torch.set_num_threads(threads)  # the scripts set it; later tests need the default back


def test_ort_layers_script_prints_both_runtimes_layers(capsys):
    """benchmarks/ort_layers.py: every call of the frozen model and every ONNX Runtime node gets a row."""
    pytest.importorskip("bsconv.pytorch")
    pytest.importorskip("onnxruntime")
    run_benchmark_script("ort_layers", ["1", "cifar_mobilenetv1_w1d4_bsconvu", "1"])
    lines = capsys.readouterr().out.splitlines()
    ours = [ln for ln in lines if ln.startswith("bsconv_fast ")]
    theirs = [ln for ln in lines if ln.startswith("onnxruntime ")]
    assert any("pw_dw_packed" in ln for ln in ours) and len(theirs) > len(ours)  # ORT splits pw and dw
    assert all(float(ln.split()[-1]) > 0 for ln in ours + theirs)
    assert lines[-1].startswith("# sums: bsconv_fast") and f"({len(ours)} calls)" in lines[-1]


def test_gemm_vs_mkl_script_times_the_same_product(capsys):
    """benchmarks/gemm_vs_mkl.py: both contenders compute the same product (the script checks it) and
    each shape gets a line with both times and their ratio."""
    run_benchmark_script("gemm_vs_mkl", ["1", "19,37,5", "40,16,3"])  # odd sizes: a channel tail, one micro-tile
    lines = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("1x1 ")]
    assert [ln.split(":")[0] for ln in lines] == ["1x1 19->37 @5", "1x1 40->16 @3"]
    for ln in lines:
        ours, mkl, ratio = float(ln.split("ours ")[1].split()[0]), float(ln.split("addmm ")[1].split()[0]), float(ln.split()[-1])
        assert ours > 0.05 and mkl > 0.05
        assert (mkl - 0.05) / (ours + 0.05) - 1e-3 <= ratio <= (mkl + 0.05) / (ours - 0.05) + 1e-3  # times print to 0.1 us


_DETECTED = """
import json, torch, bsconv_fast
from bsconv_fast import hide_avx512, bench
print(json.dumps([hide_avx512.active(), torch.backends.cpu.get_cpu_capability(), bsconv_fast._ext.cpu_kernel_isa(),
                  "AVX-512 hidden" in bench.machine_line()]))
"""


def _detected(env):
    proc = subprocess.run([sys.executable, "-c", _DETECTED], env=env, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_hide_avx512_makes_every_detector_find_avx2():
    """--hide-avx512: PyTorch's own CPUID-based detection and bsconv_fast's (GCC's cpu model) both find an
    AVX2 CPU on a CPU with AVX-512, and the benchmark's machine line says so; without it they find AVX-512."""
    reason = hide_avx512.unsupported_reason()
    if reason is not None:
        pytest.skip(reason)
    env = {k: v for k, v in os.environ.items() if k not in ("BSCONV_FAST_ISA", "ATEN_CPU_CAPABILITY")}
    plain = _detected(env)
    assert plain[0] is False and plain[1].startswith("AVX512") and plain[3] is False
    assert _detected(hide_avx512.environment(env)) == [True, "AVX2", "avx2-fma", True]


def test_hide_avx512_refuses_a_relaunch_that_did_not_take(monkeypatch):
    monkeypatch.setenv(hide_avx512.MARKER, "1")  # as if relaunched, but in this process nothing is hidden
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX512")
    with pytest.raises(RuntimeError, match="PyTorch detected AVX512"):
        hide_avx512.active()
