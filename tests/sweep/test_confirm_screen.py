"""The confirmation study's screen (docs/confirmation.md): equal trials per method, incumbents first,
the committed sweep file exactly what the generator writes (no hand edits after the fact)."""

import importlib.util
from collections import Counter
from pathlib import Path

from peer.experiments.sweep import load_sweep
from peer.experiments.sweep.plan import plan

ROOT = Path(__file__).parents[2]


def _load(name: str):
    """A script of tools/ as a module."""
    spec = importlib.util.spec_from_file_location(name, ROOT / "tools" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _tool():
    return _load("confirm_screen")


def test_the_committed_screen_is_the_generators_output():
    tool = _tool()
    assert (ROOT / "configs" / "confirm_screen.toml").read_text() == tool.sweep_text()


def test_every_method_gets_the_same_number_of_distinct_trials_incumbent_first():
    tool = _tool()
    for method, (_, space, incumbent) in tool.SPACES.items():
        trials = tool.trials(method)
        assert len(trials) == tool.TRIALS and trials[0] == incumbent
        assert len({tuple(sorted(map(str, t.items()))) for t in trials}) == tool.TRIALS  # all distinct
        assert all(set(t) == set(space) and all(t[k] in space[k] for k in t) for t in trials)
    runs = plan(load_sweep(ROOT / "configs" / "confirm_screen.toml"))
    assert Counter(r.variant.split("_t")[0] for r in runs) == {m: tool.TRIALS for m in tool.SPACES}
    assert {r.seed for r in runs} == {tool.SCREEN_SEED}
    # the MoE is the causal one, and the sparse layer is the one the variant names
    assert all(r.config.model.moe.routing == "dropless" for r in runs if r.variant.startswith("moe"))
    assert all(
        r.config.model.sparse_layer == ("none" if r.variant.startswith("dense") else r.variant.split("_t")[0])
        for r in runs
    )
    # one backbone for all: the main job's
    assert {(r.config.model.d_model, r.config.model.n_layers, r.config.model.n_heads) for r in runs} == {(48, 4, 2)}


def _next_tool():
    return _load("confirm_next")


def _fake_result(results, variant, seed, loss):
    import json
    import math

    d = results / variant / "d48_l4" / f"seed{seed}"
    d.mkdir(parents=True, exist_ok=True)
    (d / "result.json").write_text(json.dumps({"perplexity": {"val": math.exp(loss)}}))


def test_later_stages_follow_the_protocol_and_refuse_partial_results(tmp_path):
    import shutil

    import pytest

    nxt, tool = _next_tool(), _tool()
    results = tmp_path / "results"
    names = {m: [f"{m}_t{t + 1:02d}" for t in range(tool.TRIALS)] for m in tool.SPACES}
    for ns in names.values():  # trial t's loss: 5 + |t - 7| / 100, so t08, t07/t09 are the best three
        for t, n in enumerate(ns):
            if n != "pkm_t16":
                _fake_result(results, n, 10, 5 + abs(t - 7) / 100)
    with pytest.raises(SystemExit, match="screen is not complete"):
        nxt.stage2(results)
    _fake_result(results, "pkm_t16", 10, 5.5)
    text = nxt.stage2(results)
    sweep = tmp_path / "stage2.toml"
    sweep.write_text(text)
    shutil.copytree(ROOT / "configs" / "recipe", tmp_path / "recipe")
    runs = plan(load_sweep(sweep))
    assert sorted({r.variant for r in runs}) == sorted(f"{m}_t{t:02d}" for m in tool.SPACES for t in (7, 8, 9))
    assert {r.seed for r in runs} == {10, 11, 12}
    with pytest.raises(SystemExit, match="stage 2 is not complete"):
        nxt.freeze(results)
    for m in tool.SPACES:  # means over seeds 10-12: t07 5.0167, t08 5.0, t09 4.999 (best, but t08 is within TIE)
        for t, extra in ((7, 0.010), (8, 0.0), (9, -0.0165)):
            for s in (11, 12):
                _fake_result(results, f"{m}_t{t:02d}", s, 5 + abs(t - 1 - 7) / 100 + extra)
    files = nxt.freeze(results)
    assert set(files) == {f"configs/confirm/{m}.toml" for m in tool.SPACES} | {"configs/confirm_final.toml"}
    final = tmp_path / "final.toml"
    final.write_text(files["configs/confirm_final.toml"])
    runs = plan(load_sweep(final))
    assert {r.seed for r in runs} == {100, 101, 102, 103, 104} and {r.budget for r in runs} == {1.5e13, 3e13}
    assert all(f"# = {m}_t08" in files["configs/confirm_final.toml"] for m in tool.SPACES)  # the tie: the earlier
    assert nxt.recipe(results, ["peer_t07", "peer_t08", "peer_t09"]) == "peer_t08"
    _fake_result(results, "peer_t09", 11, 4.98)  # now t09 leads by more than TIE: it wins
    assert nxt.recipe(results, ["peer_t07", "peer_t08", "peer_t09"]) == "peer_t09"
