"""Shared by the sweep tests: a tiny seeded sweep (dense and PEER, 2 seeds) over the synthetic corpus of tests/train."""

import importlib.util
from pathlib import Path


def tiny_seeded_sweep(tmp_path: Path, name: str, peer_extra: str = "") -> Path:
    """Write ``s.toml``: budget 3e8, one size (d32), variants dense and peer, seeds 0 and 1, results under ``res``."""
    spec = importlib.util.spec_from_file_location("train_fixtures", Path(__file__).parents[1] / "train" / "conftest.py")
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    vocab, corpus = fixtures.VOCAB, fixtures.make_corpus(tmp_path / "corpus")
    p = tmp_path / "s.toml"
    p.write_text(f"""
[sweep]
name = "{name}"
out_dir = "{tmp_path / "res"}"
budgets = [3e8]
seeds = [0, 1]
min_steps = 2
eval_batches = 2
set = ["data.corpus='{corpus}'", "model.vocab_size={vocab}", "train.batch_size=2", "train.seq_len=16",
       "model.max_seq_len=16", "train.tensorboard=false", "train.progress=false", "optim.warmup_steps=1",
       "train.ckpt_every=1000"]
[[sizes]]
name = "d32"
set = ["model.d_model=32", "model.n_layers=2", "model.n_heads=2"]
[variants.dense]
set = []
[variants.peer]
set = ["model.sparse_layer=peer", "model.peer.num_experts=64", "model.peer.heads=2", "model.peer.topk=4",
       "model.peer.key_dim=8"{peer_extra}]
""")
    return p


def tiny_facts_run(monkeypatch, tmp_path: Path, run: Path, made: list, num_facts: int = 40) -> Path:
    """Build a facts corpus of ``num_facts`` of ``made`` (peer.data.facts.Fact, from a made-up source
    registered as "made") at ``tmp_path / "facts"`` and train a tiny PEER model on it for 2 steps into
    ``run``; returns the corpus folder."""
    from peer.config import load_config
    from peer.data import facts as F
    from peer.train import train

    class Made(F.FactSource):
        name, package, version = "made", "none", "0"
        relations = tuple(sorted({f.relation for f in made}))

        def fetch(self, cache_dir):
            return None

        def facts(self, archive):
            yield from made

    monkeypatch.setitem(F.FACT_SOURCES, "made", Made)
    corpus = tmp_path / "facts"
    F.build_facts_corpus(corpus, tmp_path / "cache", num_facts, sources=["made"], vocab_size=300, log=lambda s: None)
    root = Path(__file__).parents[2]
    cfg = load_config(root / "configs" / "tiny.toml", [f"data.corpus='{corpus}'", f"train.out_dir='{run}'",
                      "model.vocab_size=300", "train.steps=2", "train.progress=false", "train.tensorboard=false",
                      "train.threads=1", "model.sparse_layer=peer"])  # fmt: skip
    train(cfg)
    return corpus
