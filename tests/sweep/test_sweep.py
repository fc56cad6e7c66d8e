"""The isoFLOP planner (budget -> sizes -> steps) and compute-optimal selection on synthetic results."""

import math

import pytest

from peer.config import ConfigError
from peer.flops import train_flops_per_step
from peer.sweep import compute_optimal, load_sweep, method_ordering, plan, table1_markdown
from peer.sweep.analysis import aggregate
from peer.sweep.runner import collect

SWEEP = """
[sweep]
name = "t"
budgets = [1e11, 4e11]
min_steps = 10
set = ["train.batch_size=4", "train.seq_len=32", "model.max_seq_len=32", "model.vocab_size=256"]
out_dir = "{out}"

[[sizes]]
name = "small"
set = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2"]
[[sizes]]
name = "big"
set = ["model.d_model=128", "model.n_layers=4", "model.n_heads=4"]

[variants.dense]
set = []
[variants.peer]
set = ["model.sparse_layer=peer", "model.peer.num_experts=1024", "model.peer.topk=4", "model.peer.heads=2", "model.peer.key_dim=16"]
"""


@pytest.fixture
def spec(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(SWEEP.format(out=tmp_path / "res"))
    return load_sweep(p)


def test_plan_steps_follow_the_budget(spec):
    runs = plan(spec)
    assert len(runs) == 2 * 2 * 2
    for r in runs:
        per_step = train_flops_per_step(r.config)
        assert r.flops_per_step == per_step
        assert r.steps == math.floor(r.budget / per_step)  # isoFLOP: steps = budget / FLOPs per step
        assert r.steps * per_step <= r.budget < (r.steps + 1) * per_step
        assert r.config.train.steps == max(r.steps, 1) and r.config.train.flops == 0
        assert r.tokens == r.steps * 4 * 32
        assert r.config.train.out_dir.endswith(r.run_id)
    by = {r.run_id: r for r in runs}
    # 4x the budget gives ~4x the steps; a bigger model gets fewer steps
    assert abs(by["4e11/dense/small"].steps / by["1e11/dense/small"].steps - 4) < 0.1
    assert by["1e11/dense/big"].steps < by["1e11/dense/small"].steps
    # the PEER variant's step cost differs from the dense one (its middle FFW is replaced)
    assert by["1e11/peer/small"].flops_per_step != by["1e11/dense/small"].flops_per_step
    assert by["1e11/peer/small"].config.model.sparse_layer == "peer"


def test_too_big_models_are_skipped(spec):
    spec.min_steps = 10**6
    assert all(r.skipped for r in plan(spec))


def test_bad_sweep_files(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[sweep]\nbudgets = []\n")
    with pytest.raises(ConfigError, match="sweep.budgets"):
        load_sweep(p)
    p.write_text('[sweep]\nbudgets = [1e12]\n[[sizes]]\nname = "a"\nset = ["model.nope=1"]\n[variants.dense]\nset = []\n')
    with pytest.raises(ConfigError, match="model.nope"):
        plan(load_sweep(p))


def _res(budget, variant, size, ppl, ood=None):
    p = {"val": ppl}
    if ood is not None:
        p["eval_ood"] = ood
    return dict(budget=budget, variant=variant, size=size, perplexity=p, params_active=100, params_total=100)


def test_compute_optimal_selection():
    results = [
        _res(1e12, "dense", "s", 30.0, 40), _res(1e12, "dense", "m", 25.0, 41), _res(1e12, "dense", "l", 27.0, 39),
        _res(1e12, "peer", "s", 24.0, 35), _res(1e12, "peer", "m", 26.0, 33), _res(1e12, "peer", "l", float("nan")),
        _res(1e13, "dense", "s", 20.0), _res(1e13, "peer", "s", 21.0),
    ]
    best = compute_optimal(results)
    assert best[(1e12, "dense")]["size"] == "m"  # chosen on val, not on the OOD set
    assert best[(1e12, "peer")]["size"] == "s"  # the NaN run is ignored
    assert best[(1e13, "dense")]["size"] == "s"
    order = method_ordering(results)
    assert order[1e12]["val"] == ["peer", "dense"]
    assert order[1e12]["eval_ood"] == ["peer", "dense"]  # 35 (peer's optimal) < 41 (dense's optimal)
    assert order[1e13]["val"] == ["dense", "peer"]
    md = table1_markdown(results)
    assert "**24.00 (1)**" in md and "25.00 (1)" in md and "**20.00 (1)**" in md


def test_seeds_plan_one_run_per_seed(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(SWEEP.format(out=tmp_path / "res").replace('min_steps = 10', 'min_steps = 10\nseeds = [0, 3]'))
    spec = load_sweep(p)
    runs = [r for r in plan(spec) if not r.skipped]
    ids = {r.run_id for r in runs}
    assert "1e11/dense/small/seed0" in ids and "1e11/dense/small/seed3" in ids
    for r in runs:
        assert r.config.train.seed == r.seed and r.config.train.out_dir.endswith(f"/seed{r.seed}")
        assert r.run_id == f"{r.point_id}/seed{r.seed}"
    # the seeds of one point train the same model for the same steps
    a, b = (next(r for r in runs if r.run_id == f"1e11/dense/small/seed{s}") for s in (0, 3))
    assert a.steps == b.steps and a.config.model == b.config.model
    # a sweep without seeds keeps the plain layout (no /seed<S>)
    q = tmp_path / "plain.toml"
    q.write_text(SWEEP.format(out=tmp_path / "res"))
    assert all(r.run_id == r.point_id and r.seed == 0 for r in plan(load_sweep(q)))


def test_bad_seeds(tmp_path):
    for bad in ("[]", "[1, 1]", "[-1]", '["a"]', "3"):
        p = tmp_path / "s.toml"
        p.write_text(SWEEP.format(out=tmp_path / "res").replace('min_steps = 10', f'min_steps = 10\nseeds = {bad}'))
        with pytest.raises(ConfigError, match="sweep.seeds"):
            load_sweep(p)


def test_collect_reads_seed_dirs(tmp_path):
    import json
    p = tmp_path / "s.toml"
    p.write_text(SWEEP.format(out=tmp_path / "res").replace('min_steps = 10', 'min_steps = 10\nseeds = [0, 1]'))
    spec = load_sweep(p)
    for seed, ppl in ((0, 30.0), (1, 34.0), (2, 1.0)):  # seed 2 is not in this sweep
        d = tmp_path / "res" / "1e11" / "dense" / "small" / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps(dict(_res(1e11, "dense", "small", ppl), seed=seed,
                                                        run_id=f"1e11/dense/small/seed{seed}")))
    got = collect(spec)
    assert sorted(r["seed"] for r in got) == [0, 1]
    (point,) = aggregate(got)
    assert point["perplexity"]["val"] == 32.0 and point["n"]["val"] == 2
    assert math.isclose(point["perplexity_std"]["val"], math.sqrt(8.0))


def test_compute_optimal_uses_the_seed_mean():
    """A size with one lucky seed but a worse mean must lose to the size with the better mean."""
    runs = [dict(_res(1e12, "peer", "a", p), seed=i) for i, p in enumerate([20.0, 40.0, 42.0])]  # mean 34
    runs += [dict(_res(1e12, "peer", "b", p), seed=i) for i, p in enumerate([30.0, 31.0, 32.0])]  # mean 31
    best = compute_optimal(runs)
    assert best[(1e12, "peer")]["size"] == "b"
    assert best[(1e12, "peer")]["perplexity"]["val"] == 31.0
    assert best[(1e12, "peer")]["seeds"] == [0, 1, 2]
    md = table1_markdown(runs)
    assert "31.00 ± 1.00 (3)" in md
    order = method_ordering(runs)
    assert order[1e12]["val"] == ["peer"]
