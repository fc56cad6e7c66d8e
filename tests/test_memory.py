"""peer.memory: freed memory stays mapped, so a step's large buffers do not fault their pages in again.

Each case runs in a fresh process: the allocator settings are process-wide and cannot be undone.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest

glibc = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the settings are glibc's")

FAULTS = textwrap.dedent("""
    import json, os, resource, sys
    import torch
    torch.set_num_threads(1)
    applied = None
    if sys.argv[1] == "cli":  # the way every `peer` command starts
        import contextlib, io
        from peer import memory
        from peer.cli import main
        with contextlib.redirect_stdout(io.StringIO()):
            try:
                main(["plot", "--help"])
            except SystemExit:
                pass
        applied = memory._applied  # None had the command line not applied it
    elif sys.argv[1] == "eval":  # a program that only evaluates (e.g. python -m studies.confirmation)
        from peer import memory
        from peer.model import summed_nll
        summed_nll(torch.nn.Identity(), [])
        applied = memory._applied
    def faults():
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(3):  # first touches: these faults are unavoidable
        a = torch.empty(2048, 8192); a.fill_(1.0); del a
    per_buffer = []
    for _ in range(10):  # a training step's pattern: a 64 MiB buffer made, written and freed again
        f0 = faults()
        a = torch.empty(2048, 8192); a.fill_(1.0); del a
        per_buffer.append(faults() - f0)
    # the median buffer: the heap may still grow once while it settles (seen: one buffer's pages in ten)
    print(json.dumps({"applied": applied, "faults_per_buffer": sorted(per_buffer)[len(per_buffer) // 2],
                      "kernel_cache": os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY")}))
""")


def _faults(mode: str, env_value: str | None = None, kernel_cache: str | None = None) -> dict:
    env = dict(os.environ)
    env.pop("PEER_RETAIN_FREED_MEMORY", None)
    env.pop("ONEDNN_PRIMITIVE_CACHE_CAPACITY", None)
    if kernel_cache is not None:
        env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = kernel_cache
    if env_value is not None:
        env["PEER_RETAIN_FREED_MEMORY"] = env_value
    proc = subprocess.run([sys.executable, "-c", FAULTS, mode], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@glibc
def test_a_reused_buffer_faults_no_pages_in_again():
    pages = 2048 * 8192 * 4 // 4096
    before = _faults("plain")
    after = _faults("cli")
    assert before["faults_per_buffer"] > 0.9 * pages  # glibc's default: fresh pages for every buffer
    assert after["applied"] is True
    assert after["faults_per_buffer"] < 0.02 * pages
    evaluated = _faults("eval")  # evaluation applies it without the command line
    assert evaluated["applied"] is True and evaluated["faults_per_buffer"] < 0.02 * pages
    assert before["kernel_cache"] is None  # torch alone leaves oneDNN's cache at its default (1024)


def test_the_kernel_cache_is_bounded_unless_the_environment_says_otherwise():
    """oneDNN's per-shape primitive cache is capped (a dropless MoE grew to 12 GB with the default);
    a capacity the user set is kept."""
    from peer.memory import KERNEL_CACHE_CAPACITY

    assert _faults("cli")["kernel_cache"] == _faults("eval")["kernel_cache"] == str(KERNEL_CACHE_CAPACITY)
    assert _faults("eval", kernel_cache="512")["kernel_cache"] == "512"


@glibc
def test_the_setting_can_be_turned_off():
    r = _faults("cli", "0")
    assert r["applied"] is False
    assert r["faults_per_buffer"] > 0.9 * 2048 * 8192 * 4 // 4096


TRAIN = textwrap.dedent("""
    import hashlib, sys
    from pathlib import Path
    from peer.config import load_config
    from peer.train import train
    cfg = load_config(sys.argv[1], sys.argv[2:])
    run = train(cfg)
    print(hashlib.sha256((run / "checkpoints" / "step_0000006" / "model.safetensors").read_bytes()).hexdigest())
""")


@glibc
def test_training_is_bit_identical_with_and_without_it(tmp_path):
    """Where tensors live changes, what is computed does not: the same weights after 6 PEER steps."""
    from tests.train.conftest import ROOT, VOCAB, make_corpus

    corpus = make_corpus(tmp_path / "corpus")
    digests = []
    for value in ("0", "1"):
        env = dict(os.environ, PEER_RETAIN_FREED_MEMORY=value)
        args = [
            str(ROOT / "configs" / "tiny.toml"),
            f"data.corpus='{corpus}'",
            f"train.out_dir='{tmp_path / value}'",
            f"model.vocab_size={VOCAB}",
            "model.sparse_layer=peer",
            "train.steps=6",
            "train.progress=false",
            "train.tensorboard=false",
            "train.threads=1",
        ]
        proc = subprocess.run(
            [sys.executable, "-c", TRAIN, *args], capture_output=True, text=True, env=env, timeout=600
        )
        assert proc.returncode == 0, proc.stderr[-2000:]
        digests.append(proc.stdout.strip().splitlines()[-1])
    assert digests[0] == digests[1]
