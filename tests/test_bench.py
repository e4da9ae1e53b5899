"""The benchmark CLI: options listed, and its measuring code path on tiny inputs."""
import json
import subprocess
import sys

import pytest
import torch

import bsconv_fast
from bsconv_fast import bench


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
    assert {"machine", "commit", "date", "threads"} <= data.keys()
