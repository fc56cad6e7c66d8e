"""Evaluation: metrics against hand-computed values, perplexity against a manual forward, usage, plots."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from peer.config import ModelConfig, PEERConfig
from peer.eval import evaluate_tokens
from peer.metrics import expert_usage, perplexity, sorted_usage, unevenness, usage_stats
from peer.model import PeerLM
from peer.plots import curve_data, plot_curves, plot_usage


# ------------------------------------------------------------------ metrics (paper Table 2)
def test_usage_and_unevenness_hand_computed():
    w = [1.0, 1.0, 2.0, 0.0]
    assert expert_usage(w) == 0.75
    # z = [1/4, 1/4, 1/2, 0]: log 4 + 2 * (1/4) log(1/4) + (1/2) log(1/2) + 0 = 2 log 2 - log 2 - log 2 / 2
    assert unevenness(w) == pytest.approx(0.5 * math.log(2), abs=1e-12)
    assert unevenness(w) == pytest.approx(0.34657359027997264, abs=1e-12)


def test_unevenness_extremes_and_invariances():
    assert unevenness(np.ones(16)) == pytest.approx(0.0, abs=1e-12)
    assert unevenness([0, 0, 5.0, 0]) == pytest.approx(math.log(4))
    w = np.array([3.0, 1.0, 0.5, 0.0, 2.0, 7.0])
    assert unevenness(w) == pytest.approx(unevenness(10 * w))  # normalised: scale does not matter
    assert unevenness(w) == pytest.approx(unevenness(w[::-1]))
    z = w / w.sum()
    brute = sum(zi * math.log(zi / (1 / 6)) for zi in z if zi > 0)  # KL(z || uniform) from its definition
    assert unevenness(w) == pytest.approx(brute)
    assert expert_usage(torch.tensor([0.0, 1e-30, 0.0, 3.0], dtype=torch.float64)) == 0.5


def test_usage_stats_and_sorted():
    s = usage_stats([1.0, 1.0, 2.0, 0.0])
    assert s == {
        "experts": 4,
        "used": 3,
        "usage": 0.75,
        "unevenness": pytest.approx(0.5 * math.log(2)),
        "total_weight": 4.0,
    }
    assert sorted_usage([1.0, 3.0, 0.0, 2.0]).tolist() == [3.0, 2.0, 1.0, 0.0]


def test_bad_weights_are_rejected():
    with pytest.raises(ValueError, match="non-negative"):
        unevenness([1.0, -1.0])
    with pytest.raises(ValueError, match="sum to zero"):
        unevenness([0.0, 0.0])
    with pytest.raises(ValueError, match="1-D"):
        expert_usage(np.ones((2, 2)))


def test_perplexity():
    assert perplexity(10 * math.log(7.0), 10) == pytest.approx(7.0)
    assert perplexity(0.0, 5) == 1.0
    with pytest.raises(ValueError, match="tokens"):
        perplexity(1.0, 0)


# ------------------------------------------------------------------ windows and NLL
def tiny_model():
    torch.manual_seed(0)
    cfg = ModelConfig(
        vocab_size=97,
        d_model=32,
        n_layers=2,
        n_heads=2,
        max_seq_len=16,
        sparse_layer="peer",
        sparse_blocks=[1],
        peer=PEERConfig(num_experts=64, heads=2, topk=4, key_dim=8),
    )
    return PeerLM(cfg).eval()


def test_evaluate_tokens_equals_manual_forward():
    model = tiny_model()
    rng = np.random.default_rng(0)
    toks = rng.integers(0, 97, size=61).astype(np.uint16)  # 3 full windows of 16 targets, 12 left over
    res = evaluate_tokens(model, toks, seq_len=16, batch_size=2)
    # manual: each full window separately, full softmax in float64, -log p(target)
    nll = 0.0
    with torch.no_grad():
        for s in range(0, 48, 16):
            x = torch.tensor(toks[s : s + 16].astype(np.int64))[None]
            y = torch.tensor(toks[s + 1 : s + 17].astype(np.int64))
            logp = torch.log_softmax(model(x).logits[0].double(), -1)
            nll -= float(logp[torch.arange(16), y].sum())
    assert res["tokens"] == 48 and res["windows"] == 3
    assert res["nll"] == pytest.approx(nll, rel=1e-5)
    assert res["perplexity"] == pytest.approx(math.exp(nll / 48), rel=1e-5)
    capped = evaluate_tokens(model, toks, seq_len=16, batch_size=2, max_batches=1)
    assert capped["tokens"] == 32 and capped["windows"] == 2
    # a text shorter than one window is one shorter window
    short = evaluate_tokens(model, toks[:9], seq_len=16, batch_size=2)
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor(toks[:8].astype(np.int64))[None]).logits[0].double(), -1)
    assert short["tokens"] == 8
    assert short["nll"] == pytest.approx(
        -float(logp[torch.arange(8), torch.tensor(toks[1:9].astype(np.int64))].sum()), rel=1e-5
    )


def test_evaluate_tokens_progress_bar_counts_the_batches(capsys):
    """With a label, a progress bar on stderr counts the batches (3 windows in batches of 2: 2)."""
    model = tiny_model()
    toks = np.random.default_rng(0).integers(0, 97, size=61).astype(np.uint16)
    res = evaluate_tokens(model, toks, seq_len=16, batch_size=2, progress="val")
    err = capsys.readouterr().err
    assert "val:" in err and "/2 [" in err  # the bar knows the total
    assert res == evaluate_tokens(model, toks, seq_len=16, batch_size=2)  # the numbers do not change


# ------------------------------------------------------------------ plots return what they drew
def _write_metrics(run: Path, rows):
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_plot_curves_draws_the_metrics(tmp_path):
    rows_a = [{"step": s, "tokens": 100 * s, "flops": 1e6 * s, "loss": 5.0 - 0.1 * s} for s in range(1, 11)]
    rows_a[4]["val_loss"] = 4.7
    rows_b = [{"step": s, "tokens": 50 * s, "flops": 2e6 * s, "loss": 6.0 - 0.2 * s} for s in range(1, 6)]
    _write_metrics(tmp_path / "a", rows_a)
    _write_metrics(tmp_path / "b", rows_b)
    data = plot_curves([tmp_path / "a", tmp_path / "b"], tmp_path / "plots")
    assert (tmp_path / "plots" / "loss_vs_tokens.png").stat().st_size > 1000
    assert (tmp_path / "plots" / "loss_vs_flops.png").stat().st_size > 1000
    assert data["a"]["tokens"].tolist() == [r["tokens"] for r in rows_a]
    assert data["a"]["loss"].tolist() == [r["loss"] for r in rows_a]
    assert data["b"]["flops"].tolist() == [r["flops"] for r in rows_b]
    assert data["a"]["val_loss"].tolist() == [4.7] and data["a"]["val_tokens"].tolist() == [500]
    assert len(data["b"]["val_loss"]) == 0


def test_curve_data_errors_name_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="metrics.jsonl"):
        curve_data(tmp_path)
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2"):
        curve_data(tmp_path)


def test_plot_usage_draws_normalised_sorted_weights(tmp_path):
    usage = {
        "blocks.1.ffn": np.array([1.0, 1.0, 2.0, 0.0]),
        "blocks.2.ffn": np.array([3.0, 1.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0]),
    }
    drawn = plot_usage(usage, tmp_path / "u.png")
    assert (tmp_path / "u.png").stat().st_size > 1000
    assert drawn["blocks.1.ffn"].tolist() == [0.5, 0.25, 0.25, 0.0]
    assert drawn["blocks.2.ffn"].tolist() == [0.75, 0.25] + [0.0] * 7


# ------------------------------------------------------------------ a tiny trained run on real-ish text
WORDS = (
    "the a of and to in is was for on that with as by at from people nation law war peace states "
    "congress president government year new great public power right duty free land trade union"
).split()


def make_text_corpus(path: Path, seed: int = 0) -> Path:
    """A corpus dir (tokenizer.json, train / val / eval_verse splits) of random sentences, BPE vocab ~400."""
    from peer.data.corpus import write_corpus
    from peer.data.sources import Document
    from peer.data.tokenizer import train_tokenizer

    rng = np.random.default_rng(seed)

    def text(n_sent):
        return " ".join(
            " ".join(rng.choice(WORDS, size=int(rng.integers(4, 12)))).capitalize() + "." for _ in range(n_sent)
        )

    splits = {
        name: [Document(f"{name}/{i}", text(25)) for i in range(n)]
        for name, n in (("train", 24), ("val", 4), ("eval_verse", 3))
    }
    tok = train_tokenizer([d.text for d in splits["train"]], vocab_size=400, min_frequency=1)
    write_corpus(path, splits, tok, {}, log=lambda m: None)
    return path


def train_tiny(corpus: Path, out: Path, *overrides: str) -> Path:
    from peer.config import load_config
    from peer.data import load_tokenizer
    from peer.train import train

    vocab = load_tokenizer(corpus).vocab_size
    cfg = load_config(
        Path(__file__).resolve().parents[1] / "configs" / "tiny.toml",
        [
            f"data.corpus='{corpus}'",
            f"train.out_dir='{out}'",
            f"model.vocab_size={vocab}",
            "model.sparse_layer='peer'",
            "train.steps=5",
            "train.eval_batches=2",
            "train.progress=false",
            "train.tensorboard=false",
            "train.threads=1",
            *overrides,
        ],
    )
    return train(cfg)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("evalrun")
    corpus = make_text_corpus(root / "corpus")
    return train_tiny(corpus, root / "run"), corpus


def _manual_nll(model, tokens, T):
    """Sum of -log p over the full windows of T targets, one window at a time, float64 softmax."""
    nll, n = 0.0, 0
    with torch.no_grad():
        for s in range(0, (len(tokens) - 1) // T * T, T):
            x = torch.tensor(np.asarray(tokens[s : s + T], dtype=np.int64))[None]
            y = torch.tensor(np.asarray(tokens[s + 1 : s + T + 1], dtype=np.int64))
            logp = torch.log_softmax(model(x).logits[0].double(), -1)
            nll -= float(logp[torch.arange(T), y].sum())
            n += T
    return nll, n


def test_evaluate_run_perplexity_and_usage_by_brute_force(trained, tmp_path):
    from peer.data import encode_texts, load_tokenizer, open_tokens
    from peer.eval import evaluate
    from peer.train import load_run

    run, corpus = trained
    note = tmp_path / "notes.txt"
    note.write_text("The people of the nation and the law of the land. " * 12, encoding="utf-8")
    report = evaluate(run, texts=[note], plot_dir=tmp_path / "plots")
    assert list(report["sets"]) == ["val", "eval_verse", "notes.txt"]
    assert report["sets"]["notes.txt"]["kind"] == "text"

    model, cfg, _ = load_run(run)
    T = cfg.train.seq_len
    sources = {
        "val": open_tokens(corpus, "val"),
        "eval_verse": open_tokens(corpus, "eval_verse"),
        "notes.txt": encode_texts([note], load_tokenizer(corpus)),
    }
    for name, toks in sources.items():
        nll, n = _manual_nll(model, toks, T)
        got = report["sets"][name]
        assert got["tokens"] == n
        assert got["perplexity"] == pytest.approx(math.exp(nll / n), rel=1e-5)

    # usage: accumulate the layer's router weights from its retrieve() on the inputs it sees over val
    layer = model.sparse_layers()["blocks.1.ffn"]
    acc = np.zeros(layer.num_experts)

    def hook(mod, args):
        g, idx = mod.retrieve(args[0])
        np.add.at(acc, idx.flatten().numpy(), g.flatten().double().numpy())

    handle = layer.register_forward_pre_hook(hook)
    _manual_nll(model, sources["val"], T)
    handle.remove()
    e = report["experts"]["blocks.1.ffn"]
    assert e["set"] == "val" and e["experts"] == 256
    assert e["usage"] == pytest.approx(np.count_nonzero(acc) / 256)
    z = acc[acc > 0] / acc.sum()
    assert e["unevenness"] == pytest.approx(math.log(256) + float(np.sum(z * np.log(z))), rel=1e-6)
    assert set(e["by_set"]) == {"val", "eval_verse", "notes.txt"}
    assert e["by_set"]["val"]["usage"] == e["usage"]
    assert (tmp_path / "plots" / "expert_usage.png").stat().st_size > 1000


def test_eval_on_val_matches_training_val_loss(trained):
    from peer.eval import evaluate

    run, _ = trained
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()][-1]
    report = evaluate(run, max_batches=2)  # the training loop scores train.eval_batches=2 batches
    assert report["sets"]["val"]["loss"] == pytest.approx(last["val_loss"], rel=1e-6)


def test_eval_cli_json_and_table(trained, tmp_path, capsys):
    from peer.cli import main

    run, _ = trained
    note = tmp_path / "short.txt"
    note.write_text("Peace and trade.", encoding="utf-8")
    assert main(["eval", str(run), "--json", "--text", str(note), "--batches", "1", "--plot-dir", str(tmp_path)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out["sets"]) == {"val", "eval_verse", "short.txt"}
    assert out["sets"]["val"]["tokens"] == 4 * 32  # one batch of 4 windows of 32
    assert out["params"]["total"] > out["params"]["active"] > 0
    assert main(["eval", str(run), "--batches", "1", "--plot-dir", str(tmp_path)]) == 0
    table = capsys.readouterr().out
    assert "eval_verse" in table and "unevenness" in table
    assert main(["eval", str(run), "--text", str(tmp_path / "missing.txt")]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_eval_batches_0_means_every_batch(trained, tmp_path, capsys):
    from peer.cli import main

    run, _ = trained
    assert main(["eval", str(run), "--json", "--batches", "0", "--plot-dir", str(tmp_path)]) == 0
    every = json.loads(capsys.readouterr().out)["sets"]["val"]["tokens"]
    assert main(["eval", str(run), "--json", "--plot-dir", str(tmp_path)]) == 0
    assert every == json.loads(capsys.readouterr().out)["sets"]["val"]["tokens"] > 4 * 32
    assert main(["eval", str(run), "--batches", "-1"]) == 2
    assert "--batches: must be positive" in capsys.readouterr().err


def test_generate_cli_greedy_matches_sample(trained, capsys):
    from peer.cli import main
    from peer.data import load_tokenizer
    from peer.generate import sample
    from peer.train import load_run

    run, corpus = trained
    model, _, _ = load_run(run)
    expected = sample(model, load_tokenizer(corpus), "The nation", max_new_tokens=12, temperature=0.0)
    assert main(["generate", str(run), "--prompt", "The nation", "--max-new-tokens", "12", "--temperature", "0"]) == 0
    assert capsys.readouterr().out == "The nation" + expected + "\n"
    assert (
        main(
            [
                "generate",
                str(run),
                "--prompt",
                "The nation",
                "--max-new-tokens",
                "12",
                "--temperature",
                "0",
                "--no-stream",
                "--no-cache",
            ]
        )
        == 0
    )
    assert capsys.readouterr().out == "The nation" + expected + "\n"


def test_plot_cli_on_trained_run(trained, tmp_path):
    from peer.cli import main

    run, _ = trained
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    data = plot_curves([run], tmp_path)
    d = data[run.name]
    assert d["loss"].tolist() == [r["loss"] for r in rows if "loss" in r]
    assert d["flops"].tolist() == [r["flops"] for r in rows if "loss" in r]
    assert d["val_loss"].tolist() == [r["val_loss"] for r in rows if "val_loss" in r]
    assert main(["plot", str(run), "--out", str(tmp_path / "cli")]) == 0
    assert (tmp_path / "cli" / "loss_vs_flops.png").stat().st_size > 1000


def test_eval_refuses_a_corpus_rebuilt_since_training(trained, tmp_path):
    import shutil

    from peer.eval import evaluate

    run, corpus = trained
    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    shutil.copyfile(corpus / "tokenizer.json", copy / "tokenizer.json")  # the tokenizer it was trained with
    assert evaluate(copy, max_batches=1)["sets"]["val"]["tokens"] == 128
    (copy / "tokenizer.json").write_text((corpus / "tokenizer.json").read_text().replace("nation", "nat1on"))
    with pytest.raises(ValueError, match="rebuilt since training"):
        evaluate(copy, max_batches=1)


def test_eval_reports_the_knowledge_of_a_facts_file(trained, tmp_path, capsys):
    from peer.cli import main

    run, _ = trained
    probes = [
        {"id": "a", "relation": "r1", "prefix": "The capital of France is ", "value": "Paris", "candidates": 200},
        {"id": "b", "relation": "r2", "prefix": "Peace and ", "value": "trade", "candidates": 50},
    ]
    (tmp_path / "facts.jsonl").write_text("".join(json.dumps(p) + "\n" for p in probes))
    args = ["eval", str(run), "--json", "--batches", "1", "--facts", str(tmp_path), "--plot-dir", str(tmp_path)]
    assert main(args) == 0
    k = json.loads(capsys.readouterr().out)["knowledge"]
    assert k["facts"] == 2 and set(k["relations"]) == {"r1", "r2"} and 0 <= k["recall"] <= 1
    assert 0 <= k["bits"] <= k["bits_available"] == pytest.approx(math.log2(200) + math.log2(50))
    assert k["value_nats_per_token"] > 0 and k["bits_per_param"] == pytest.approx(k["bits"] / _params(run))
    assert main(["eval", str(run), "--facts", str(tmp_path / "nope")]) == 2
    assert "no facts.jsonl" in capsys.readouterr().err


def _params(run):
    from peer.flops import count_params
    from peer.train import load_run

    return count_params(load_run(run)[1].model).total
