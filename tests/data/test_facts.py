"""The facts corpus (peer.data.facts) and the knowledge metric (peer.knowledge): offline, with a source of
made-up facts injected in place of the real ones (the real sources are read by `peer data facts`)."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from data_fakes import build_deb

from peer.data import facts as F
from peer.data.facts import TEMPLATES, Fact, build_facts_corpus, choose_facts, fact_splits, render
from peer.knowledge import knowledge_report, load_probes, score_facts


class _Made(F.FactSource):
    name, package, version = "made", "none", "0"

    def fetch(self, cache_dir):
        return None

    def facts(self, archive):
        for i in range(300):
            yield Fact(f"Town{i:03d}", "city_country", f"Land{i % 7}")
            yield Fact(f"Lang{i:03d}", "language_code", f"x{i:03d}")


@pytest.fixture
def made(monkeypatch):
    monkeypatch.setitem(F.FACT_SOURCES, "made", _Made)


def test_every_template_names_the_subject_and_ends_with_the_value():
    for relation, ts in TEMPLATES.items():
        assert len(ts) >= 3, relation  # several phrasings: recall is not a match on one string
        for t in ts:
            assert "{s}" in t and t.endswith("{v}.") and t.count("{v}") == 1, (relation, t)
            prefix, value = render(Fact("S", relation, "V"), ts.index(t))
            assert prefix + value + "." == t.format(s="S", v="V")


def test_facts_are_chosen_by_the_seed():
    pool = list(_Made().facts(None))
    a, b, c = choose_facts(pool, 50, 0), choose_facts(pool, 50, 0), choose_facts(pool, 50, 1)
    assert a == b and a != c and len({f.id for f in a}) == 50
    with pytest.raises(F.DataError, match="only 600 facts"):
        choose_facts(pool, 601, 0)


def test_splits_hold_every_fact_and_the_probes_read_training_statements():
    facts = choose_facts(list(_Made().facts(None)), 120, seed=3)
    splits, probes = fact_splits(facts, seed=3, repeats=3, page_facts=16, val_facts=40)
    train = " ".join(d.text for d in splits["train"])
    assert sum(train.count(f"{p['prefix']}{p['value']}.") >= 1 for p in probes) == len(probes) == 120
    assert train.count(". ") + 1 == 3 * 120  # repeats statements per fact
    countries = {p["value"] for p in probes if p["relation"] == "city_country"}
    assert all(p["candidates"] == len(countries) for p in probes if p["relation"] == "city_country")
    assert {d.id for d in splits["train"]}.isdisjoint(d.id for d in splits["val"])
    assert len(" ".join(d.text for d in splits["val"]).split(". ")) == 40


def test_shuffled_values_keep_each_relations_values_and_counts_but_not_their_subjects():
    facts = choose_facts(list(_Made().facts(None)), 200, seed=0)
    shuffled = F.shuffle_values(facts, seed=0)
    assert [(f.subject, f.relation) for f in shuffled] == [(f.subject, f.relation) for f in facts]
    for relation in ("city_country", "language_code"):
        assert sorted(f.value for f in facts if f.relation == relation) == sorted(
            f.value for f in shuffled if f.relation == relation
        )  # the same values, as often: the frequency prior is unchanged
    # Town<i> is in Land<i mod 7>: a rule the real values follow and the shuffled ones do not
    towns = [f for f in shuffled if f.relation == "city_country"]
    assert sum(f.value == f"Land{int(f.subject[4:]) % 7}" for f in towns) < len(towns) / 3
    assert sum(a.value != b.value for a, b in zip(facts, shuffled, strict=True)) > len(facts) / 2
    assert F.shuffle_values(facts, seed=0) == shuffled != F.shuffle_values(facts, seed=1)


def test_a_shuffled_corpus_trains_on_the_values_its_probes_ask_for(made, tmp_path):
    from peer.data import load_manifest

    build_facts_corpus(tmp_path / "facts", tmp_path / "cache", 100, sources=["made"], vocab_size=300,
                       log=lambda s: None, shuffled_values=True)  # fmt: skip
    assert load_manifest(tmp_path / "facts")["facts"]["shuffled_values"] is True
    probes = load_probes(tmp_path / "facts")
    wrong = [
        p for p in probes if p["relation"] == "city_country" and not p["value"].endswith(str(int(p["id"][-3:]) % 7))
    ]
    assert len(wrong) > len(probes) / 4  # the probes ask for the shuffled value, the one train states
    from peer.data.tokenizer import load_tokenizer

    train = " ".join(d.text for d in F.text_documents(tmp_path / "facts", "train", load_tokenizer(tmp_path / "facts")))
    assert all(f"{p['prefix']}{p['value']}." in train for p in probes)
    assert all(p["candidates"] == 7 for p in probes if p["relation"] == "city_country")


def test_the_corpus_builds_and_trains(made, tmp_path):
    from peer.data import list_splits, load_manifest

    build_facts_corpus(
        tmp_path / "facts", tmp_path / "cache", 200, seed=0, sources=["made"], vocab_size=300, log=lambda s: None
    )
    assert list_splits(tmp_path / "facts")[:2] == ["train", "val"]
    assert load_manifest(tmp_path / "facts")["facts"]["num_facts"] == 200
    assert len(load_probes(tmp_path / "facts")) == 200 and len(load_probes(tmp_path / "facts", max_facts=5)) == 5
    with pytest.raises(Exception, match="--sources"):
        build_facts_corpus(tmp_path / "x", tmp_path / "cache", 10, sources=["nope"], log=lambda s: None)


def test_a_mix_carries_the_text_corpus_and_its_tokenizer(made, tmp_path):
    from peer.data import list_splits, load_manifest
    from peer.data.tokenizer import load_tokenizer
    from peer.data.tokens import open_tokens
    from peer.data.userdata import build_corpus

    src = tmp_path / "text.jsonl"
    src.write_text(
        "".join(json.dumps({"text": f"Document {i}: plain text, words and more words."}) + "\n" for i in range(60))
    )
    build_corpus([str(src)], tmp_path / "text", None, 300, "text", False, 0.2, 0, 16, None, log=lambda s: None)
    build_facts_corpus(
        tmp_path / "mix",
        tmp_path / "cache",
        100,
        sources=["made"],
        repeats=2,
        log=lambda s: None,
        mix_text=tmp_path / "text",
    )
    m, text = load_manifest(tmp_path / "mix"), load_manifest(tmp_path / "text")
    assert m["tokenizer"]["sha256"] == text["tokenizer"]["sha256"] and m["facts"]["mix_text"].endswith("text")
    assert "eval_text" in list_splits(tmp_path / "mix")
    parts = m["splits"]["train"]["source_tokens"]
    assert set(parts) == {"facts", "text"} and parts["text"] == text["splits"]["train"]["tokens"]
    tok = load_tokenizer(tmp_path / "mix")  # the text is the same text: decoded, then encoded again
    assert tok.decode(open_tokens(tmp_path / "mix", "eval_text")) == tok.decode(open_tokens(tmp_path / "text", "val"))
    with pytest.raises(F.DataError, match="--mix-text .*not a tokenized corpus"):
        build_facts_corpus(tmp_path / "mix3", tmp_path / "cache", 100, sources=["made"], mix_text=tmp_path / "nope")
    with pytest.raises(F.DataError, match="not the tokenizer of --mix-text"):
        build_facts_corpus(
            tmp_path / "mix2",
            tmp_path / "cache",
            100,
            sources=["made"],
            tokenizer=str(tmp_path / "facts_tok"),
            log=lambda s: None,
            mix_text=tmp_path / "text",
        )


class _Oracle(torch.nn.Module):
    """Puts all its probability on the true next token of the sequences it was given (ties: none)."""

    def __init__(self, seqs: list[list[int]], vocab: int, confident: bool = True):
        super().__init__()
        self.seqs, self.vocab, self.confident = seqs, vocab, confident
        self.config = type("C", (), {"max_seq_len": 64})()

    def forward(self, x):
        logits = torch.zeros(*x.shape, self.vocab)
        for i, row in enumerate(x.tolist()):
            seq = next(s for s in self.seqs if row[: len(s) - 1] == s[:-1])
            for j in range(len(seq) - 1):
                logits[i, j, seq[j + 1]] = 50.0 if self.confident else 0.0
        return type("O", (), {"logits": logits})()


def _tok():
    from peer.data.tokenizer import train_tokenizer

    return train_tokenizer(["Town001 is a city in Land1. The code of Lang002 is x002."] * 20, vocab_size=300)


def test_a_model_that_knows_every_value_stores_all_the_bits():
    from peer.knowledge import _encode

    tok = _tok()
    probes = [
        {"prefix": "Town001 is a city in ", "value": "Land1", "candidates": 7, "relation": "city_country"},
        {"prefix": "The code of Lang002 is ", "value": "x002", "candidates": 300, "relation": "language_code"},
    ]
    seqs = [[tok.eos_id, *_encode(tok, p["prefix"], p["value"])[0]] for p in probes]
    scores = score_facts(_Oracle(seqs, tok.vocab_size), tok, probes, batch_size=2)
    assert all(s["recalled"] for s in scores)
    assert [s["bits"] for s in scores] == pytest.approx([math.log2(7), math.log2(300)], abs=1e-6)
    rep = knowledge_report(scores, probes, params=1000, train_flops=1e9)
    assert rep["recall"] == 1.0 and rep["bits"] == pytest.approx(math.log2(7 * 300), abs=1e-6)
    assert rep["bits_per_param"] == pytest.approx(rep["bits"] / 1000) and set(rep["relations"]) == {
        "city_country",
        "language_code",
    }
    # a model that knows nothing (uniform) recalls nothing and stores nothing (floored at 0 bits)
    blank = score_facts(_Oracle(seqs, tok.vocab_size, confident=False), tok, probes)
    assert [s["bits"] for s in blank] == [0.0, 0.0]
    assert blank[0]["value_nats"] == pytest.approx(blank[0]["value_tokens"] * math.log(tok.vocab_size), rel=1e-5)


def test_bits_over_prior_give_nothing_for_knowing_only_how_common_each_value_is():
    # 8 cities, 6 in LandA and 2 in LandB; 2 candidate values in the relation
    probes = [{"prefix": f"Town{i} is in ", "value": "LandA" if i < 6 else "LandB", "candidates": 2,
               "relation": "city_country"} for i in range(8)]  # fmt: skip
    q = {"LandA": 6 / 8, "LandB": 2 / 8}
    prior_only = [{"value_nats": -math.log(q[p["value"]]), "value_tokens": 1, "recalled": p["value"] == "LandA",
                   "bits": max(0.0, 1 + math.log2(q[p["value"]]))} for p in probes]  # fmt: skip
    rep = knowledge_report(prior_only, probes, params=10, train_flops=None)
    assert rep["bits"] == pytest.approx(6 * (1 + math.log2(0.75)))  # "stored" by the candidates definition
    assert rep["bits_over_prior"] == pytest.approx(0.0, abs=1e-9)  # ... but nothing beyond the frequencies
    entropy = -(6 * math.log2(0.75) + 2 * math.log2(0.25))
    assert rep["bits_over_prior_available"] == pytest.approx(entropy)
    knows = [{**s, "value_nats": 0.0, "recalled": True} for s in prior_only]  # certain of every value
    assert knowledge_report(knows, probes, 10, None)["bits_over_prior"] == pytest.approx(entropy)


def test_scores_of_a_real_model_match_a_manual_forward_and_do_not_depend_on_batching():
    from peer.config import ModelConfig
    from peer.knowledge import _encode
    from peer.model import PeerLM

    tok = _tok()
    torch.manual_seed(0)
    model = PeerLM(ModelConfig(vocab_size=tok.vocab_size, d_model=32, n_layers=2, n_heads=2, max_seq_len=64))
    probes = [{"prefix": f"Town00{i} is a city in ", "value": f"Land{i}", "candidates": 7} for i in range(5)] + [
        {"prefix": "The code of Lang002 is ", "value": "x002", "candidates": 300}
    ]
    one, four = score_facts(model, tok, probes, batch_size=1), score_facts(model, tok, probes, batch_size=4)
    for a, b in zip(one, four, strict=True):
        assert a["value_nats"] == pytest.approx(b["value_nats"], rel=1e-5, abs=1e-5)
        assert a["recalled"] == b["recalled"]
    ids, start = _encode(tok, probes[-1]["prefix"], probes[-1]["value"])
    seq = torch.tensor([[tok.eos_id, *ids]])
    with torch.no_grad():
        logp = model(seq[:, :-1]).logits.float().log_softmax(-1)[0]
    manual = -sum(float(logp[j - 1, seq[0, j]]) for j in range(start + 1, seq.shape[1]))
    assert one[-1]["value_nats"] == pytest.approx(manual, rel=1e-5)
    assert one[-1]["value_tokens"] == seq.shape[1] - (start + 1)


def test_bad_probe_files_are_one_line(tmp_path):
    from peer.errors import UsageError

    with pytest.raises(UsageError, match="no facts.jsonl"):
        load_probes(tmp_path)
    (tmp_path / "facts.jsonl").write_text(json.dumps({"prefix": "a"}) + "\n")
    with pytest.raises(UsageError, match="line 1 is not a probe"):
        load_probes(tmp_path)


# --- the sources' own parsers, on made-up records in their real formats -------------------------------
_WNDB_NOUN = """\
  1 This software and database is being provided to you, the LICENSEE, by
00000001 03 n 01 entity 0 000 | that which exists
00000002 05 n 01 dog 0 001 @ 00000001 n 0000 | a domestic animal
00000003 05 n 02 bank 0 riverbank 0 001 @ 00000001 n 0000 | sloping land
00000004 05 n 01 bank 0 001 @ 00000002 n 0000 | a second sense of bank
00000005 05 n 01 mule 0 002 @ 00000001 n 0000 @ 00000002 n 0000 | two hypernyms: ambiguous
00000006 15 n 01 Paris 0 001 @i 00000001 n 0000 | the capital of France
"""
_WNDB_ADJ = """\
00000010 00 a 02 hot 0 warm(a) 0 002 ! 00000011 a 0101 & 00000012 s 0000 | of high temperature
00000011 00 a 01 cold 0 001 ! 00000010 a 0101 | of low temperature
00000012 00 s 01 scorching 0 001 & 00000010 a 0000 | very hot
"""


def test_wordnet_reads_one_sense_words_and_exactly_one_value_per_relation():
    got = {(f.subject, f.relation, f.value) for f in F.wordnet_facts({"n": _WNDB_NOUN, "a": _WNDB_ADJ})}
    assert got == {
        ("dog", "word_hypernym", "entity"),
        ("riverbank", "word_hypernym", "entity"),  # "bank" has two senses: left out; its synonym is not
        ("Paris", "word_instance", "entity"),
        ("hot", "word_antonym", "cold"),  # a lexical pointer: word 1 -> word 1, so "warm" gets no antonym
        ("cold", "word_antonym", "hot"),
        ("hot", "word_similar", "scorching"),  # a semantic pointer: every word of the synset, "(a)" dropped
        ("warm", "word_similar", "scorching"),
        ("scorching", "word_similar", "hot"),  # the satellite's ("s") file is the adjectives'
    }  # and "mule" (two hypernyms) has none


def test_places_round_to_whole_degrees_and_one_significant_digit():
    assert [F._degrees(x, "north", "south") for x in (42.53, -33.9, 0.4, 1.2, -0.6)] == [
        "43 degrees north", "34 degrees south", "0 degrees", "1 degree north", "1 degree south"
    ]  # fmt: skip
    assert [F._about(n) for n in (1418, 602, 96_000, 5, 149_999)] == ["1,000", "600", "100,000", "5", "100,000"]
    countries = {"AD": {"name": "Andorra"}}
    cities = {
        "1": {"geonameid": 2, "name": "Vila", "countrycode": "AD"},
        "2": {"geonameid": 1, "name": "Soldeu", "countrycode": "AD"},
        "3": {"geonameid": 3, "name": "Vila", "countrycode": "AD"},  # a name two cities share: neither
        "4": {"geonameid": 4, "name": "Nowhere", "countrycode": "ZZ"},  # no known country
    }
    assert [(c["name"], n) for c, n in F.unique_cities(countries, cities)] == [("Soldeu", "Andorra")]


def test_every_relation_has_one_source_and_the_default_pool_keeps_its_relations():
    owner = [r for s in F.FACT_SOURCES.values() for r in s.relations]
    assert sorted(owner) == sorted(TEMPLATES) and len(owner) == len(set(owner))
    # the knowledge study's corpora (docs/knowledge.md) were built from these: their manifests list exactly these
    assert [r for r in TEMPLATES if any(r in F.FACT_SOURCES[s].relations for s in F.DEFAULT_FACT_SOURCES)] == [
        "unicode_name", "unicode_code", "city_country", "city_timezone", "country_capital", "country_continent",
        "country_currency", "language_code", "currency_code", "country_code", "subdivision_country",
    ]  # fmt: skip


def test_a_manifest_lists_the_relations_of_its_sources_only(made, tmp_path):
    from peer.data import load_manifest

    build_facts_corpus(tmp_path / "f", tmp_path / "c", 50, sources=["made"], vocab_size=300, log=lambda s: None)
    assert list(load_manifest(tmp_path / "f")["facts"]["relations"]) == ["city_country", "language_code"]


@pytest.mark.skipif(shutil.which("dpkg-deb") is None, reason="needs dpkg-deb")
def test_wordnet_reads_its_debian_package(tmp_path):
    d = "usr/share/wordnet"
    deb = build_deb(tmp_path, "wordnet-base", "1:3.0-37", {f"{d}/data.noun": _WNDB_NOUN, f"{d}/data.adj": _WNDB_ADJ,
                                                          f"{d}/index.noun": "not read"})  # fmt: skip
    src = F.WordNet()
    assert ("dog", "word_hypernym", "entity") in {(f.subject, f.relation, f.value) for f in src.facts(deb)}
    assert src.archive_version(deb.with_name("wordnet-base_1%3a3.0-37_all.deb")) == "1:3.0-37"


def test_training_notes_a_facts_stream_read_many_times_in_one_order(made, tmp_path, capsys):
    from pathlib import Path

    from peer.cli import main
    from peer.config import load_config
    from peer.train.cli import _facts_stream_note

    root = Path(__file__).resolve().parents[2]
    few, many = tmp_path / "few", tmp_path / "many"
    build_facts_corpus(few, tmp_path / "c", 60, vocab_size=300, sources=["made"], log=lambda s: None)
    build_facts_corpus(many, tmp_path / "c", 60, vocab_size=300, sources=["made"], repeats=300, log=lambda s: None)
    tokens = json.loads((few / "manifest.json").read_text())["splits"]["train"]["tokens"]
    cfg = load_config(root / "configs" / "tiny.toml", [f"data.corpus='{few}'", "model.vocab_size=300"])
    steps = 4 * tokens // cfg.train.tokens_per_step + 1  # a little over 4 passes
    note = _facts_stream_note(cfg, steps)
    assert note is not None and "4.0 times" in note and "--repeats 13 (now 3)" in note
    assert _facts_stream_note(load_config(root / "configs" / "tiny.toml", [f"data.corpus='{many}'"]), steps) is None
    assert _facts_stream_note(load_config(root / "configs" / "tiny.toml", [f"data.corpus='{tmp_path}'"]), 9) is None
    base = [str(root / "configs" / "tiny.toml"), "--set", "model.vocab_size=300", "train.progress=false"]
    assert main(["train", *base, f"data.corpus={few}", f"train.steps={steps}", "--out", str(tmp_path / "r")]) == 0
    assert "always in the same order" in capsys.readouterr().err
