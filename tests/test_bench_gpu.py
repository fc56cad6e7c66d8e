"""``peer bench gpu`` runs end to end under the Triton interpreter at tiny shapes, so that on a GPU it
only has to be run (its numbers there are the point; here only its plumbing and its checks)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton", reason="triton is not installed")


def _run(tmp_path, *extra):
    out = tmp_path / "gpu.json"
    env = dict(os.environ, TRITON_INTERPRET="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "peer", "bench", "gpu", "--device", "cpu", "--tiny", "--out", str(out), *extra],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )
    assert proc.returncode == 0, proc.stderr[-3000:] + proc.stdout[-3000:]
    return json.loads(out.read_text()), proc.stdout


def test_gpu_bench_runs_under_the_interpreter(tmp_path):
    res, stdout = _run(tmp_path, "--no-compile")
    # (a) every Triton case checked against the reference, and right
    assert len(res["ops"]) == 8 and all(r["ok"] for r in res["ops"]), res["ops"]
    # (b) PEER (fp32 and bf16 tables) beside dense and PKM, with the rows' bandwidth
    layer = {(r["impl"], r["table_dtype"]) for r in res["layer"] if "error" not in r}
    assert {("peer", "float32"), ("peer", "bfloat16"), ("dense", "float32"), ("pkm", "float32")} <= layer
    peer = [r for r in res["layer"] if r["impl"] == "peer"]
    assert all(r["fwd_s"] > 0 and r["fwd_bwd_s"] > 0 and r["fwd_rows_gbps"] > 0 for r in peer)
    assert {r["vs"] for r in res["layer_ratios"]} >= {"dense", "pkm"}
    # (c) the training step of both models through the loop's own step function
    steps = {r["model"]: r for r in res["step"]}
    assert set(steps) == {"dense", "peer 8^2"} and all("error" not in r for r in steps.values())
    assert steps["peer 8^2"]["step_vs_dense"] > 0
    assert "target: PeerLM step / dense step (eager)" in stdout


def test_gpu_bench_refuses_what_it_cannot_run(capsys):
    from peer.cli import main

    assert main(["bench", "gpu", "--device", "cpu"]) == 2  # the interpreter only at tiny shapes
    assert "only with --tiny" in capsys.readouterr().err
    assert main(["bench", "gpu", "--tiny", "--device", "cpu", "--parts", "ops,nonsense"]) == 2
    assert "--parts" in capsys.readouterr().err
