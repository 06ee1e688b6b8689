"""`bash .ci/gpu`, the one command that verifies everything on a CUDA GPU machine, checked here without one:
the script's syntax (and shellcheck where installed), its at-once exit without a GPU, its Python driver
(.ci/gpu_check.py) on the CPU as a dry run, and its stage plumbing end to end with a pretend GPU (torch made
to claim one, so every stage that touches the GPU fails, as it must, and the report says so)."""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
import time

import pytest
import torch

from conftest import REPO

SCRIPT = REPO / ".ci" / "gpu"
DRIVER = REPO / ".ci" / "gpu_check.py"


def _env(**extra):
    env = {k: v for k, v in os.environ.items() if k not in ("OUT", "GPU_CHECK_STAGES", "GPU_CHECK_TESTS")}
    env.update(extra)
    return env


def _driver():
    spec = importlib.util.spec_from_file_location("gpu_check", DRIVER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_script_is_valid_bash():
    subprocess.run(["bash", "-n", str(SCRIPT)], check=True, timeout=60)
    if shutil.which("shellcheck"):
        res = subprocess.run(["shellcheck", str(SCRIPT)], capture_output=True, text=True, timeout=120)
        assert res.returncode == 0, res.stdout


def test_without_a_gpu_it_stops_at_once():
    start = time.monotonic()
    res = subprocess.run(["bash", str(SCRIPT)], env=_env(PYTHON=sys.executable, CUDA_VISIBLE_DEVICES=""),
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 2
    assert res.stdout == ""
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "needs a CUDA GPU" in lines[0], res.stderr
    assert time.monotonic() - start < 60


def test_ops_dry_run_on_the_cpu(tmp_path):
    out = tmp_path / "ops.json"
    res = subprocess.run([sys.executable, str(DRIVER), "ops", "--device", "cpu", "--json", str(out)],
                         capture_output=True, text=True, timeout=600, env=_env())
    assert res.returncode == 0, res.stdout + res.stderr
    rows = json.loads(out.read_text())
    ops = {r["op"].split("[")[0].split(" ")[0] for r in rows}
    assert ops == {"knn_sigma", "density_maps", "scale_regions", "unscale_regions", "hierarchical_gating",
                   "local_counts"}
    assert all(r["ok"] for r in rows)


def test_ops_comparison_catches_a_wrong_result():
    gpu_check = _driver()
    rows = []
    want = torch.rand(3, 4, dtype=torch.float64)
    gpu_check._compare("same", want.clone(), want, 1e-9, rows)
    gpu_check._compare("off", want + 1e-6, want, 1e-9, rows)
    gpu_check._compare("nan", torch.full_like(want, float("nan")), want, 1e-9, rows)
    gpu_check._compare("shape", want[:2], want, 1e-9, rows)
    assert [r["ok"] for r in rows] == [True, False, False, False]


def test_training_dry_run_on_the_cpu(tmp_path):
    out = tmp_path / "train.json"
    res = subprocess.run([sys.executable, str(DRIVER), "train", "--device", "cpu", "--steps", "2",
                          "--models", "CSRNet,HMoDE paper K3", "--json", str(out)],
                         capture_output=True, text=True, timeout=600, env=_env())
    assert res.returncode == 0, res.stdout + res.stderr
    rows = json.loads(out.read_text())
    assert [r["model"] for r in rows] == ["CSRNet", "HMoDE paper K3 N2"]
    assert all(r["ok"] and r["parameters_moved"] and len(r["losses"]) == 2 for r in rows)
    # every model the driver knows is one the package exports
    names = [name for name, _ in _driver().models("cpu")]
    assert len(names) == 6


def test_benchmark_summary_ratios_and_targets(tmp_path):
    bench = {"benchmarks": [
        {"group": "g", "name": "test_x[eager-512]", "stats": {"median": 0.010}, "extra_info": {}},
        {"group": "g", "name": "test_x[fused-512]", "stats": {"median": 0.002}, "extra_info": {"peak_MiB": 3}},
        {"group": "d", "name": "test_gpu_182_images", "stats": {"median": 0.25}, "extra_info": {"target_s": 0.2}},
    ]}
    path = tmp_path / "bench.json"
    path.write_text(json.dumps(bench))
    rows = {r["name"]: r for r in _driver().bench_summary(str(path))}
    assert rows["test_x[fused-512]"]["speedup"] == 5.0 and rows["test_x[fused-512]"]["peak_MiB"] == 3
    assert "speedup" not in rows["test_x[eager-512]"]
    assert rows["test_gpu_182_images"]["met"] is False


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a GPU machine .ci/gpu runs for real (and this run would "
                    "share its work folder)")
def test_stage_plumbing_with_a_pretend_gpu(tmp_path):
    """The whole script with torch claiming a GPU: it passes the GPU check, runs the selected stages (a
    small test file passes; the sanitizer stage cannot pass without a GPU), prints the table last, writes
    the JSON report under $OUT and exits 1."""
    fake = tmp_path / "fake"
    fake.mkdir()
    (fake / "sitecustomize.py").write_text("import torch\ntorch.cuda.is_available = lambda: True\n")
    out = tmp_path / "out"
    env = _env(PYTHON=sys.executable, PYTHONPATH=str(fake), OUT=str(out), GPU_CHECK_STAGES="tests memcheck",
               GPU_CHECK_TESTS="python_tests/test_local_device.py")
    res = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 1, res.stdout + res.stderr
    assert res.stdout.rstrip().splitlines()[-1].endswith("; FAILED: memcheck")  # the table comes last
    report = json.loads((out / "gpu_report.json").read_text())
    status = {s["stage"]: s["status"] for s in report["stages"]}
    assert status == {"build": "not run", "backends": "not run", "tests": "pass", "memcheck": "fail",
                      "racecheck": "not run", "bench": "not run", "train": "not run"}
    assert "passed" in next(s["detail"] for s in report["stages"] if s["stage"] == "tests")
    assert (out / "gpu_logs.txt").exists()
