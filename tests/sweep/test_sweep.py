"""The isoFLOP planner (budget -> sizes -> steps) and compute-optimal selection on synthetic results."""

import json
import math
from pathlib import Path

import pytest
from sweep_fixtures import tiny_seeded_sweep

from peer.config import ConfigError
from peer.experiments.sweep import compute_optimal, load_sweep, method_ordering, plan, table1_markdown
from peer.experiments.sweep.analysis import aggregate
from peer.experiments.sweep.runner import collect, run_threads
from peer.flops import train_flops_per_step

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


def test_progress_lines_are_flushed(spec, monkeypatch):
    # a sweep piped into `| grep` or `| tee` must show each line as it happens, not at exit
    calls = []
    monkeypatch.setattr("builtins.print", lambda *a, **kw: calls.append((a, kw)))
    spec.min_steps = 10**6
    from peer.experiments.sweep.runner import run_sweep

    assert run_sweep(spec, dry_run=True) == []
    assert calls and all(kw.get("flush") for _, kw in calls)
    assert all(a[0].startswith("[skip] ") for a, _ in calls)


def test_bad_sweep_files(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_text("[sweep]\nbudgets = []\n")
    with pytest.raises(ConfigError, match="sweep.budgets"):
        load_sweep(p)
    p.write_text(
        '[sweep]\nbudgets = [1e12]\n[[sizes]]\nname = "a"\nset = ["model.nope=1"]\n[variants.dense]\nset = []\n'
    )
    with pytest.raises(ConfigError, match="model.nope"):
        plan(load_sweep(p))


def test_threads_per_run(spec, tmp_path):
    assert run_threads(spec, 2) == 2  # one run at a time takes every core
    spec.parallel = 2
    assert run_threads(spec, 2) == 1 and run_threads(spec, 3) == 1
    spec.threads = 1
    spec.parallel = 1
    assert run_threads(spec, 16) == 1  # set explicitly: one 1-thread run beside other work
    p = tmp_path / "t.toml"
    p.write_text(SWEEP.format(out=tmp_path / "res").replace('name = "t"', 'name = "t"\nthreads = 3'))
    assert load_sweep(p).threads == 3
    p.write_text(SWEEP.format(out=tmp_path / "res").replace('name = "t"', 'name = "t"\nthreads = -1'))
    with pytest.raises(ConfigError, match="sweep.threads"):
        load_sweep(p)


def _res(budget, variant, size, ppl, ood=None):
    p = {"val": ppl}
    if ood is not None:
        p["eval_ood"] = ood
    return dict(budget=budget, variant=variant, size=size, perplexity=p, params_active=100, params_total=100)


def test_compute_optimal_selection():
    results = [
        _res(1e12, "dense", "s", 30.0, 40),
        _res(1e12, "dense", "m", 25.0, 41),
        _res(1e12, "dense", "l", 27.0, 39),
        _res(1e12, "peer", "s", 24.0, 35),
        _res(1e12, "peer", "m", 26.0, 33),
        _res(1e12, "peer", "l", float("nan")),
        _res(1e13, "dense", "s", 20.0),
        _res(1e13, "peer", "s", 21.0),
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


def test_plan_totals_add_up_the_runs_to_train(spec):
    from peer.experiments.sweep.plan import STATE_BYTES_PER_PARAM, plan_totals

    runs = plan(spec)
    runs[0].skipped = "too small"
    text = plan_totals(runs, parallel=2)
    todo = runs[1:]
    assert text.startswith(
        f"{len(todo)} runs to train (1 skipped): {sum(r.steps * r.flops_per_step for r in todo):.3g}"
    )
    assert f"{sum(r.tokens for r in todo):,} tokens" in text
    big = sorted((r.params_total * STATE_BYTES_PER_PARAM for r in todo), reverse=True)
    assert f"largest run {big[0] / 2**30:.2f} GiB" in text and f"at most {(big[0] + big[1]) / 2**30:.2f} GiB" in text


def test_seeds_plan_one_run_per_seed(tmp_path):
    p = tmp_path / "s.toml"
    p.write_text(SWEEP.format(out=tmp_path / "res").replace("min_steps = 10", "min_steps = 10\nseeds = [0, 3]"))
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
        p.write_text(SWEEP.format(out=tmp_path / "res").replace("min_steps = 10", f"min_steps = 10\nseeds = {bad}"))
        with pytest.raises(ConfigError, match="sweep.seeds"):
            load_sweep(p)


def test_collect_reads_seed_dirs(tmp_path):
    import json

    p = tmp_path / "s.toml"
    p.write_text(SWEEP.format(out=tmp_path / "res").replace("min_steps = 10", "min_steps = 10\nseeds = [0, 1]"))
    spec = load_sweep(p)
    for seed, ppl in ((0, 30.0), (1, 34.0), (2, 1.0)):  # seed 2 is not in this sweep
        d = tmp_path / "res" / "1e11" / "dense" / "small" / f"seed{seed}"
        d.mkdir(parents=True)
        (d / "result.json").write_text(
            json.dumps(dict(_res(1e11, "dense", "small", ppl), seed=seed, run_id=f"1e11/dense/small/seed{seed}"))
        )
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


def test_every_point_table_marks_the_seed_mean_optimum():
    """One row per point, in size order, with its seed mean; only the optimum on the mean is bold."""
    from peer.experiments.sweep.analysis import points_markdown

    runs = [
        dict(_res(1e12, "peer", "a", p), seed=i, params_active=50, steps=10) for i, p in enumerate([20.0, 40.0, 42.0])
    ]
    runs += [
        dict(_res(1e12, "peer", "b", p), seed=i, params_active=80, steps=7) for i, p in enumerate([30.0, 31.0, 32.0])
    ]
    runs += [dict(_res(1e12, "dense", "a", 50.0), params_active=40, steps=12)]
    md = points_markdown(runs)
    rows = [line for line in md.splitlines() if line.startswith("| 1e12")]
    assert [r.split(" | ")[1:3] for r in rows] == [["dense", "a (40)"], ["peer", "a (50)"], ["peer", "b (80)"]]
    assert "**50.00 (1)**" in rows[0] and "| 10 | 34.00 ± 12.17 (3) |" in rows[1] and "**31.00 ± 1.00 (3)**" in rows[2]


def test_seeded_sweep_end_to_end(tmp_path):
    """A 2-variant x 2-seed sweep trains every run (train.seed differs, so do the losses), writes
    result.json per seed dir, a CSV with a seed column, tables with mean ± std (2), and is a no-op on re-run."""
    from peer.experiments.sweep.cli import report
    from peer.experiments.sweep.runner import run_sweep

    sweep_file = tiny_seeded_sweep(tmp_path, "e2e", ', "model.peer.value_init_scale=0.5"')
    spec = load_sweep(sweep_file)
    logs = []
    results = run_sweep(spec, log=logs.append)
    assert sorted(r["run_id"] for r in results) == [
        "3e8/dense/d32/seed0",
        "3e8/dense/d32/seed1",
        "3e8/peer/d32/seed0",
        "3e8/peer/d32/seed1",
    ]
    by = {r["run_id"]: r for r in results}
    assert by["3e8/peer/d32/seed0"]["perplexity"]["val"] != by["3e8/peer/d32/seed1"]["perplexity"]["val"]
    for r in results:
        d = tmp_path / "res" / r["run_id"]
        assert (d / "result.json").is_file() and (d / "config.toml").is_file()
        assert f"seed = {r['seed']}" in (d / "config.toml").read_text()
    assert "seed" in (tmp_path / "res" / "e2e_results.csv").read_text().splitlines()[0].split(",")
    doc = tmp_path / "doc.md"
    doc.write_text("intro\n<!-- sweep e2e:table1 -->\n<!-- /sweep e2e:table1 -->\noutro\n")
    assert report(spec) == 0  # the library's tables
    md = (tmp_path / "res" / "e2e_tables.md").read_text()
    assert "± " in md and "(2)" in md
    table1 = next(b for b in md.split("\n\n") if b.startswith("| budget | method |")).strip()  # Table 1's block
    from studies.report import main as study_report  # the project's report splices the same block into a doc

    assert study_report([str(sweep_file), "--into", str(doc)]) == 0
    assert doc.read_text() == f"intro\n<!-- sweep e2e:table1 -->\n{table1}\n<!-- /sweep e2e:table1 -->\noutro\n"
    again = []
    run_sweep(spec, log=again.append)
    assert sum("[skip]" in line for line in again) == 4 and not any("[run ]" in line for line in again)
    # a run dir trained with another config is not reused: the sweep fails naming it (after the tables)
    import json

    from peer.experiments.sweep.runner import RunsFailed

    job = tmp_path / "res" / "3e8/peer/d32/seed1" / "sweep_job.json"
    stored = json.loads(job.read_text())
    stored["config"]["optim"]["lr"] *= 2
    job.write_text(json.dumps(stored))
    with pytest.raises(RunsFailed, match="3e8/peer/d32/seed1") as err:
        run_sweep(spec, log=again.append)
    assert len(err.value.results) == 4 and any("optim.lr" in line for line in again if "[FAIL]" in line)


def test_base_resolves_against_the_sweep_file(tmp_path, monkeypatch):
    (tmp_path / "cfg").mkdir()
    (tmp_path / "cfg" / "mybase.toml").write_text("[optim]\nlr = 0.0123\n")
    p = tmp_path / "cfg" / "s.toml"
    p.write_text(SWEEP.format(out=tmp_path / "res").replace("min_steps = 10", 'min_steps = 10\nbase = "mybase.toml"'))
    monkeypatch.chdir(tmp_path)  # not the sweep file's folder
    runs = plan(load_sweep(p))
    assert all(r.config.optim.lr == 0.0123 for r in runs)
    p.write_text(SWEEP.format(out=tmp_path / "res").replace("min_steps = 10", 'min_steps = 10\nbase = "nope.toml"'))
    with pytest.raises(ConfigError, match="sweep.base"):
        load_sweep(p)


def test_compare_two_points_in_nats(tmp_path, capsys):
    import json

    from peer.cli import main as cli_main

    for side, ppls in (("a", [100.0, 110.0, 105.0]), ("b", [120.0, 121.0, 119.0])):
        for seed, p in enumerate(ppls):
            d = tmp_path / side / f"seed{seed}"
            d.mkdir(parents=True)
            (d / "result.json").write_text(json.dumps({"perplexity": {"val": p, "ood": p * 2}}))
    assert cli_main(["sweep", "compare", str(tmp_path / "a"), str(tmp_path / "b"), "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    la, lb = [math.log(p) for p in (100, 110, 105)], [math.log(p) for p in (120, 121, 119)]
    import statistics as st

    sp = math.sqrt((2 * st.stdev(la) ** 2 + 2 * st.stdev(lb) ** 2) / 4)
    assert math.isclose(res["val"]["gap"], st.fmean(la) - st.fmean(lb))
    assert math.isclose(res["val"]["pooled_std"], sp) and res["val"]["gap_in_std"] < -2
    assert math.isclose(res["ood"]["gap"], res["val"]["gap"])  # a constant factor is a constant shift in nats
    assert cli_main(["sweep", "compare", str(tmp_path / "a"), str(tmp_path / "nope")]) == 2


def test_compare_one_seed_each_has_no_pooled_std(tmp_path, capsys):
    """With n = 1 on both sides the pooled std is undefined: the table says "-", not nan."""
    import json

    from peer.cli import main as cli_main

    for side, p in (("a", 100.0), ("b", 120.0)):
        d = tmp_path / side / "seed0"
        d.mkdir(parents=True)
        (d / "result.json").write_text(json.dumps({"perplexity": {"val": p}}))
    assert cli_main(["sweep", "compare", str(tmp_path / "a"), str(tmp_path / "b")]) == 0
    row = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| val")][0]
    assert "nan" not in row and row.endswith("| - | - |")


def test_a_shared_run_dir_trained_with_another_config_is_not_reused(spec):
    import json

    from peer.config import config_to_dict
    from peer.experiments.sweep.runner import _launch, config_differences

    assert (
        config_differences(
            {"optim": {"lr": 1e-3}, "train": {"threads": 1, "old": 1}},
            {"optim": {"lr": 1e-3}, "train": {"threads": 2}, "new": {}},
        )
        == []
    )
    assert config_differences({"optim": {"lr": 1e-3, "b": 1}}, {"optim": {"lr": 3e-3, "b": 1}}) == ["optim.lr"]
    r = plan(spec)[0]
    out = Path(r.config.train.out_dir)
    out.mkdir(parents=True)
    cfg = config_to_dict(r.config)
    result = {"run_id": r.run_id, "perplexity": {"val": 10.0}}
    (out / "result.json").write_text(json.dumps(result))
    (out / "sweep_job.json").write_text(json.dumps({"config": cfg}))
    logs = []
    assert _launch(r, spec, 1, logs.append) == result and logs[-1].startswith("[skip]")  # the same config: reused
    cfg["optim"]["lr"] = cfg["optim"]["lr"] * 2
    (out / "sweep_job.json").write_text(json.dumps({"config": cfg}))
    assert _launch(r, spec, 1, logs.append) is None
    assert logs[-1].startswith("[FAIL]") and "optim.lr" in logs[-1]
    assert json.loads((out / "result.json").read_text()) == result  # nothing overwritten


def test_device_is_an_execution_setting(spec, tmp_path, monkeypatch):
    """`--device` / sweep.device sets train.device of the runs it launches; a finished run is reused
    whatever device it ran on (like threads, the device changes rounding, not what is trained);
    a device this torch cannot use is one clear error before any run starts."""
    import json

    from peer.config import config_to_dict
    from peer.experiments.sweep.runner import _launch, config_differences, run_sweep

    assert config_differences({"train": {"device": "cuda"}}, {"train": {"device": "cpu"}}) == []
    p = tmp_path / "d.toml"
    p.write_text(SWEEP.format(out=tmp_path / "res").replace('name = "t"', 'name = "t"\ndevice = "cpu"'))
    assert load_sweep(p).device == "cpu"
    r = plan(spec)[0]
    launched = []
    monkeypatch.setattr(
        "peer.experiments.sweep.runner.Workers.run",
        lambda self, argv, out: launched.append(json.loads(Path(argv[-1]).read_text())) or 1,
    )
    spec.device = "cpu"
    assert _launch(r, spec, 1, lambda line: None) is None  # the stand-in worker wrote no result
    assert launched[-1]["config"]["train"]["device"] == "cpu"
    out = Path(r.config.train.out_dir)
    cfg = config_to_dict(r.config)
    cfg["train"]["device"] = "cuda:0"  # trained elsewhere
    (out / "sweep_job.json").write_text(json.dumps({"config": cfg}))
    (out / "result.json").write_text(json.dumps({"run_id": r.run_id}))
    logs = []
    assert _launch(r, spec, 1, logs.append) == {"run_id": r.run_id} and logs[-1].startswith("[skip]")
    spec.device = "tpu"
    with pytest.raises(ConfigError, match="train.device"):
        run_sweep(spec, log=logs.append)


def test_only_selectors_set_the_order_runs_start_in(spec, monkeypatch):
    from peer.experiments.sweep import runner

    started = []
    monkeypatch.setattr(runner, "_run_locked", lambda spec, todo, log: started.extend(r.run_id for r in todo) or [])
    runner.run_sweep(spec, only=["4e11/peer", "1e11/dense/big", "small"], log=lambda line: None)
    assert started == [
        "4e11/peer/small",
        "4e11/peer/big",
        "1e11/dense/big",
        "1e11/dense/small",
        "1e11/peer/small",
        "4e11/dense/small",
    ]


def test_result_records_the_hardware():
    from peer.experiments.sweep.runner import hardware

    hw = hardware("cpu")
    assert hw["device"] == "cpu" and hw["name"] and hw["threads"] >= 1
    import torch

    assert hw["torch"] == torch.__version__


def test_a_stopped_sweep_forwards_the_signal_once_and_starts_no_run(tmp_path):
    """SIGINT/SIGTERM to `peer sweep`: each running worker gets the signal once (it checkpoints and exits),
    no queued run starts afterwards, and the sweep ends with one Interrupted line (resumable)."""
    import signal
    import subprocess
    import sys
    import threading
    import time

    from peer.experiments.sweep.runner import Workers

    child = (
        "import signal, sys, time\n"
        "n = []\n"
        "signal.signal(signal.SIGINT, lambda *a: n.append(1))\n"
        "print('ready', flush=True)\n"
        "t = time.time()\n"
        "while not n and time.time() - t < 30: time.sleep(0.01)\n"
        "time.sleep(0.3)\n"
        "sys.exit(10 + len(n))\n"
    )
    workers, codes = Workers(), []
    log = tmp_path / "w.log"
    with open(log, "w") as fh:
        th = threading.Thread(target=lambda: codes.append(workers.run([sys.executable, "-c", child], fh)))
        th.start()
        t0 = time.time()
        while "ready" not in log.read_text() and time.time() - t0 < 20:
            time.sleep(0.05)
        workers.stop(signal.SIGINT)
        th.join(30)
        assert codes == [11]  # the child saw exactly one SIGINT
        assert workers.run([sys.executable, "-c", "pass"], fh) is None  # nothing starts after a stop
    assert subprocess.run([sys.executable, "-c", "pass"]).returncode == 0


def test_run_sweep_stopped_raises_interrupted(spec, monkeypatch):
    import signal

    from peer.experiments.sweep import runner
    from peer.train.signals import Interrupted

    spec.parallel = 1
    started = []

    def fake_run(self, argv, out):
        if self.stopped:
            return None
        started.append(argv[-1])
        self.stop(signal.SIGTERM)  # the signal arrives during the first run
        return 143

    monkeypatch.setattr(runner.Workers, "run", fake_run)
    monkeypatch.setattr(runner, "_ensure_corpus", lambda *a: None)  # no corpus is needed: no run trains
    with pytest.raises(Interrupted, match="SIGTERM: 8 run"):
        runner.run_sweep(spec, log=lambda line: None)
    assert len(started) == 1
    assert len(list(spec.root.glob("*/*/*/sweep_job.json"))) == 1  # no folder for the runs that never started


def test_a_resumed_run_counts_the_training_time_of_every_attempt(tmp_path, monkeypatch):
    """A run stopped by a signal and resumed later: result.json's train_seconds is the sum of both attempts,
    not the last one's (the wall-time table sums it)."""
    import signal

    import peer.eval
    import peer.train
    from peer.config import Config, config_to_dict
    from peer.experiments.sweep import runner
    from peer.train.signals import Interrupted

    run_dir = tmp_path / "run"
    cfg = Config()
    cfg.train.out_dir = str(run_dir)
    config = config_to_dict(cfg)
    clock = [1000.0]
    monkeypatch.setattr(runner.time, "time", lambda: clock[0])
    attempts = iter([(5.0, True), (3.0, False)])

    def fake_train(cfg):
        secs, stop = next(attempts)
        run_dir.mkdir(exist_ok=True)
        clock[0] += secs
        if stop:
            raise Interrupted("stopped by SIGINT", signal.SIGINT)

    monkeypatch.setattr(peer.train, "train_or_resume", fake_train)
    monkeypatch.setattr(peer.eval, "evaluate", lambda run, max_batches: {"sets": {"val": {"perplexity": 9.0}}})
    with pytest.raises(Interrupted):
        runner.run_one(config, 1, {"run_id": "r"})
    assert not (run_dir / "result.json").exists()
    result = runner.run_one(config, 1, {"run_id": "r"})
    assert result["train_seconds"] == pytest.approx(8.0)
    assert json.loads((run_dir / "result.json").read_text())["train_seconds"] == pytest.approx(8.0)


def test_next_lists_a_fixed_size_sweeps_missing_seeds_as_the_plan_spells_its_run_ids(tmp_path, capsys):
    from peer.cli import main as cli_main

    p = tiny_seeded_sweep(tmp_path, "arms")  # one size: every variant is an arm at a fixed size
    assert cli_main(["sweep", "next", str(p)]) == 0
    out = capsys.readouterr().out.split()
    assert out == ["3e8/dense/d32/seed0", "3e8/dense/d32/seed1", "3e8/peer/d32/seed0", "3e8/peer/d32/seed1"]
    assert set(out) == {r.run_id for r in plan(load_sweep(p))}  # each line is an --only selector of one planned run
    p.write_text(p.read_text().replace("seeds = [0, 1]\n", ""))  # unseeded: run ids carry no /seed<S>
    assert cli_main(["sweep", "next", str(p)]) == 0
    assert capsys.readouterr().out.split() == ["3e8/dense/d32", "3e8/peer/d32"]


def test_a_killed_worker_is_named_with_its_signal_and_how_to_go_on():
    from peer.experiments.sweep.runner import exit_reason

    assert exit_reason(0) == exit_reason(1) == ""  # a plain failure: its log says why
    killed = exit_reason(-9)
    assert "SIGKILL" in killed and "out-of-memory killer" in killed and "resumes it" in killed
    assert "SIGSEGV" in exit_reason(-11) and "out-of-memory" not in exit_reason(-11)
