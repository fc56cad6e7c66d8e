"""tools/gpu_sweep.sh and tools/gpu_check.py, the scripts behind the study's runs on a CUDA machine, run
here on the CPU (DEVICE=cpu; gpu_check falls back to the CPU without a GPU)."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from sweep_fixtures import tiny_seeded_sweep

ROOT = Path(__file__).parents[2]


@pytest.fixture
def sweep_file(tmp_path):
    return tiny_seeded_sweep(tmp_path, "tools")


def _env():
    return dict(
        os.environ,
        PYTHONPATH=str(ROOT / "src"),
        OMP_NUM_THREADS="1",
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
    )


def test_gpu_sweep_runs_the_list_in_order_and_snapshots_finished_runs(sweep_file, tmp_path):
    snap = tmp_path / "snap"
    proc = subprocess.run(
        [
            "bash",
            str(ROOT / "tools" / "gpu_sweep.sh"),
            str(sweep_file),
            str(snap),
            "120",
            "1",
            "3e8/peer/d32/seed1",
            "3e8/dense/d32/seed0",
        ],
        env=dict(_env(), DEVICE="cpu"),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr
    log = (snap / "sweep.log").read_text()
    runs = [line.split()[2].rstrip(":") for line in log.splitlines() if line.startswith("[run ]")]
    assert runs == ["3e8/peer/d32/seed1", "3e8/dense/d32/seed0"]  # the given order, nothing else
    with tarfile.open(snap / "results.tgz") as tar:
        names = sorted(tar.getnames())
        result = json.load(tar.extractfile("./3e8/peer/d32/seed1/result.json"))
    assert names == sorted(
        f"./{r}/{f}" for r in runs for f in ("result.json", "config.toml", "metrics.jsonl", "sweep_job.json")
    )
    assert result["hardware"]["device"] == "cpu" and result["seed"] == 1


def test_gpu_check_compares_the_engines(sweep_file):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "gpu_check.py"), str(sweep_file), "3e8/peer/d32/seed0", "4"],
        env=_env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = proc.stdout.splitlines()
    assert [ln.split()[0] for ln in lines[1:4]] == ["cuda", "cuda", "cpu"]
    assert lines[-1] == "engines agree on the first steps"
