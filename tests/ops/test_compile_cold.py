"""torch.compile(fullgraph=True) of a PeerLM in a fresh process, before any eager call.

The engine choice (which kernels compute) depends on the C++ library being built and loaded; that
must not happen inside the traced forward (file I/O and ctypes break the graph). Each case runs in
a new interpreter where nothing ran eagerly first, so nothing is warm that a user's first call
would not find warm too.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from peer.ops import cpu

HAS_CPP = cpu.available()

SCRIPT = textwrap.dedent("""
    import json, sys, torch
    torch.set_num_threads(1)
    from peer.config import ModelConfig
    from peer.model import PeerLM

    layer, compiler = sys.argv[1], sys.argv[2]
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=2, d_ff=64, max_seq_len=16, sparse_layer=layer)
    cfg.peer.num_experts, cfg.peer.heads, cfg.peer.topk, cfg.peer.key_dim = 64, 2, 4, 8
    cfg.pkm.num_memories, cfg.pkm.heads, cfg.pkm.topk, cfg.pkm.key_dim = 64, 2, 4, 8
    cfg.moe.num_experts = 4
    torch.manual_seed(0)
    model = PeerLM(cfg)
    tokens = torch.randint(0, 64, (2, 17), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:]
    compiled = torch.compile(model, fullgraph=True, backend=compiler)
    out = compiled(x, y)  # the first call of the process: traced before anything ran eagerly
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    eager = model(x, y)
    eager.loss.backward()
    worst = max((grads[n] - p.grad).abs().max().item() for n, p in model.named_parameters() if p.grad is not None)
    print(json.dumps({"compiled": out.loss.item(), "eager": eager.loss.item(), "grad_diff": worst,
                      "grads": len(grads)}))
""")


def _run(layer: str, compiler: str) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, layer, compiler], capture_output=True, text=True, env=env, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


CASES = [
    pytest.param("peer", "aot_eager", marks=pytest.mark.skipif(not HAS_CPP, reason="no C++ compiler")),
    ("pkm", "aot_eager"),
    ("moe", "aot_eager"),
    pytest.param("peer", "inductor", marks=[pytest.mark.slow, pytest.mark.skipif(not HAS_CPP, reason="no C++")]),
    pytest.param("pkm", "inductor", marks=pytest.mark.slow),
    pytest.param("moe", "inductor", marks=pytest.mark.slow),
]


@pytest.mark.parametrize("layer,compiler", CASES)
def test_fullgraph_compile_from_a_cold_start_equals_eager(layer, compiler):
    r = _run(layer, compiler)
    assert r["grads"] > 0
    assert r["compiled"] == pytest.approx(r["eager"], rel=1e-5, abs=1e-6)
    assert r["grad_diff"] < 1e-4
