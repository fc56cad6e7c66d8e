"""The confirmation study's screen (docs/confirmation.md): equal trials per method, incumbents first,
the committed sweep file exactly what the generator writes (no hand edits after the fact)."""

import importlib.util
from collections import Counter
from pathlib import Path

from peer.experiments.sweep import load_sweep
from peer.experiments.sweep.plan import plan

ROOT = Path(__file__).parents[2]


def _tool():
    spec = importlib.util.spec_from_file_location("confirm_screen", ROOT / "tools" / "confirm_screen.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


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
    assert all(r.config.model.sparse_layer == ("none" if r.variant.startswith("dense") else r.variant.split("_t")[0])
               for r in runs)
    # one backbone for all: the main job's
    assert {(r.config.model.d_model, r.config.model.n_layers, r.config.model.n_heads) for r in runs} == {(48, 4, 2)}
