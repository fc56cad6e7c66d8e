"""The main job: equal FLOP budgets, the comparison table, skip/resume, and an end-to-end --quick run."""

import json
import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from peer.config import ConfigError
from peer.experiments.mainjob import DEFAULT_BUDGET, format_markdown, format_table, main_job, plan

WORDS = "the a of and to in is was for on that with people nation law war peace states congress union".split()


def make_corpus(path: Path) -> Path:
    """A tiny prepared corpus (train / val / eval_verse + tokenizer.json) of random sentences."""
    from peer.data.corpus import write_corpus
    from peer.data.sources import Document
    from peer.data.tokenizer import train_tokenizer

    rng = np.random.default_rng(0)

    def text():
        return " ".join(
            " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))).capitalize() + "." for _ in range(25)
        )

    splits = {
        n: [Document(f"{n}/{i}", text()) for i in range(k)] for n, k in (("train", 20), ("val", 4), ("eval_verse", 3))
    }
    write_corpus(path, splits, train_tokenizer([d.text for d in splits["train"]], 300, 1), {}, log=lambda m: None)
    return path


def test_plan_gives_both_models_the_same_budget(tmp_path):
    from peer.flops import train_flops_per_step
    from peer.train import resolve_steps

    cfgs = plan(tmp_path / "out", tmp_path / "corpus", vocab_size=300)
    assert list(cfgs) == ["dense", "peer"]
    assert {c.train.flops for c in cfgs.values()} == {DEFAULT_BUDGET}
    assert cfgs["dense"].model.sparse_layer == "none" and cfgs["peer"].model.sparse_layer == "peer"
    assert cfgs["peer"].model.sparse_block_ids() == [cfgs["peer"].model.n_layers // 2]  # the middle block
    for name, c in cfgs.items():
        assert c.train.out_dir == str(tmp_path / "out" / name)
        assert c.data.corpus == str(tmp_path / "corpus") and c.model.vocab_size == 300
        assert resolve_steps(c) == math.floor(DEFAULT_BUDGET / train_flops_per_step(c))
    quick = plan(tmp_path, tmp_path, 300, quick=True)
    assert quick["dense"].train.flops == quick["peer"].train.flops
    assert resolve_steps(quick["dense"]) == 6
    with pytest.raises(ConfigError, match="--budget"):
        plan(tmp_path, tmp_path, 300, budget=-1.0)


def _comparison():
    run = lambda ppl, experts: {  # noqa: E731
        "params": {"total": 1000, "active": 500},
        "train_flops": 1e9,
        "steps": 10,
        "tokens": 1280,
        "train_s": 3.2,
        "perplexity": ppl,
        "experts": experts,
        "sample": " and so on",
    }
    return {
        "budget_flops": 1e9,
        "corpus": "c",
        "eval_batches": 8,
        "prompt": "The",
        "timing": {"total_s": 9.0},
        "plots": ["p.png"],
        "runs": {
            "dense": run({"val": 12.345, "eval_x": 20.0}, {}),
            "peer": run({"val": 11.0, "eval_x": 19.5}, {"blocks.1.ffn": {"usage": 0.999, "unevenness": 0.4567}}),
        },
    }


def test_table_and_markdown_hold_every_number():
    table = format_table(_comparison())
    lines = {line.split("  ")[0].strip(): line.split() for line in table.splitlines()[3:]}
    assert lines["perplexity val"][-2:] == ["12.35", "11.00"]
    assert lines["perplexity eval_x"][-2:] == ["20.00", "19.50"]
    assert lines["expert usage, blocks.1.ffn"][-2:] == ["-", "99.9%"]
    assert lines["unevenness (KL), blocks.1.ffn"][-2:] == ["-", "0.457"]
    md = format_markdown(_comparison())
    assert "| perplexity val | 12.35 | 11.00 |" in md
    assert "**peer**: The and so on" in md


@pytest.mark.slow
def test_main_quick_end_to_end_skip_and_resume(tmp_path, capsys):
    from peer.cli import main
    from peer.eval import evaluate
    from peer.flops import train_flops_per_step
    from peer.train import resolve_steps, train

    corpus = make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    args = ["main", "--quick", "--corpus", str(corpus), "--out", str(out), "--no-progress", "--threads", "1"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    comp = json.loads((out / "comparison.json").read_text())
    assert set(comp["runs"]) == {"dense", "peer"}
    cfgs = plan(out, corpus, 300, quick=True, threads=1, progress=False)
    for name, r in comp["runs"].items():
        per_step = train_flops_per_step(cfgs[name])
        assert r["steps"] == resolve_steps(cfgs[name]) == int(comp["budget_flops"] // per_step)
        assert r["train_flops"] == pytest.approx(r["steps"] * per_step) and r["train_flops"] <= comp["budget_flops"]
        assert r["status"] == "trained"
        assert (out / name / "tokenizer.json").read_bytes() == (corpus / "tokenizer.json").read_bytes()
        # the table's perplexities are those of `peer eval` on the same run
        rep = evaluate(out / name, max_batches=40)
        assert r["perplexity"] == {s: v["perplexity"] for s, v in rep["sets"].items()}
        assert list(r["perplexity"]) == ["val", "eval_verse"]
        assert "perplexity val" in printed and f"{r['perplexity']['val']:.2f}" in printed
        assert r["sample"] and r["sample"] in printed
    assert comp["runs"]["dense"]["experts"] == {}
    usage = comp["runs"]["peer"]["experts"]["blocks.1.ffn"]
    assert 0 < usage["usage"] <= 1 and 0 <= usage["unevenness"] <= math.log(256)
    for png in ("loss_vs_tokens.png", "loss_vs_flops.png", "expert_usage.png"):
        assert (out / "plots" / png).stat().st_size > 1000
    assert (out / "comparison.md").read_text().count("| perplexity") == 2

    # trained side by side (the default): one process per run, each with its log
    assert "side by side" in printed and "recipe: d_model 64" in printed
    assert all((out / n / "train.log").is_file() for n in ("dense", "peer"))

    # re-running retrains nothing (one after the other this time: the same runs)
    before = {n: (out / n / "metrics.jsonl").read_bytes() for n in ("dense", "peer")}
    assert main(args + ["--parallel", "1"]) == 0
    again = json.loads((out / "comparison.json").read_text())
    assert {r["status"] for r in again["runs"].values()} == {"complete"}
    assert {n: (out / n / "metrics.jsonl").read_bytes() for n in ("dense", "peer")} == before
    assert again["runs"]["peer"]["perplexity"] == comp["runs"]["peer"]["perplexity"]

    # an interrupted run is resumed, and ends where the uninterrupted one did
    out2 = tmp_path / "out2"
    cfg = plan(out2, corpus, 300, quick=True, threads=1, progress=False)["dense"]
    train(replace(cfg, train=replace(cfg.train, ckpt_every=1)), stop_after=3)  # killed after step 3
    comp2 = main_job(out2, quick=True, corpus=corpus, threads=1, progress=False)
    assert comp2["runs"]["dense"]["status"] == "resumed" and comp2["runs"]["peer"]["status"] == "trained"
    assert comp2["runs"]["dense"]["perplexity"] == comp["runs"]["dense"]["perplexity"]

    # another budget on the same out dir is refused, naming the run
    assert main(args + ["--budget", str(comp["budget_flops"] * 3)]) == 2
    assert "planned for" in capsys.readouterr().err


def test_missing_corpus_is_a_clear_error(tmp_path, capsys):
    from peer.cli import main

    assert main(["main", "--quick", "--corpus", str(tmp_path / "nope"), "--out", str(tmp_path / "o")]) == 2
    assert "--corpus" in capsys.readouterr().err


def test_recipe_line_names_every_lever_of_the_peer_preset():
    """The printed table says which recipe each side uses, including the levers that decide it."""
    from peer.config import load_config
    from peer.experiments.mainjob import describe_recipe

    line = describe_recipe(load_config(Path(__file__).parents[1] / "configs" / "peer.toml"))
    for part in (
        "d_model 48",
        "lr 0.0085",
        "warmup 100",
        "h=4",
        "k=8",
        "key_dim=16",
        "v init x0.1",
        "expert lr x1,",  # the frozen recipe's multiplier 1: its cosine schedule moves nothing, so is not named
        "table weight decay 0",
    ):
        assert part in line, (part, line)
    ramped = describe_recipe(
        load_config(Path(__file__).parents[1] / "configs" / "peer.toml", ["optim.expert_lr_mult=3"])
    )
    assert "expert lr x3 -> x1 (cosine)" in ramped
    lazy = describe_recipe(
        load_config(Path(__file__).parents[1] / "configs" / "peer.toml", ["optim.sparse_experts=true"])
    )
    assert "lazy row AdamW" in lazy


def test_a_signal_stops_the_side_by_side_runs_in_one_line_and_the_same_command_resumes(tmp_path, capsys, monkeypatch):
    """Ctrl-C during side-by-side training: each child saves a checkpoint (the signal is forwarded, see
    peer.train.signals.Workers); `peer main` then ends with one line naming the signal, no traceback, no table."""
    import signal

    from peer.cli import main
    from peer.train import signals

    corpus = make_corpus(tmp_path / "corpus")
    out = tmp_path / "out"
    args = ["main", "--quick", "--corpus", str(corpus), "--out", str(out), "--no-progress", "--threads", "2"]
    started = []

    def stopped_child(self, argv, log):  # the user's Ctrl-C arrives while the children train
        started.append(argv)
        self.stop(signal.SIGINT)
        return 128 + signal.SIGINT

    monkeypatch.setattr(signals.Workers, "run", stopped_child)
    before = signal.getsignal(signal.SIGINT)  # default_int_handler; SIG_IGN where pytest runs as a background job
    assert main(args) == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()
    assert len(err) == 1 and "stopped by SIGINT" in err[0] and "the same command resumes" in err[0]
    assert "Traceback" not in captured.out + captured.err and not (out / "comparison.json").exists()
    assert 1 <= len(started) <= 2 and all(a[1:3] == ["-m", "peer.train.worker"] for a in started)
    assert signal.getsignal(signal.SIGINT) is before  # the parent's handler is put back

    monkeypatch.undo()  # the same command trains and finishes
    assert main(args) == 0 and (out / "comparison.json").is_file()
