"""studies.memorization: held-out probes name no trained subject, and the measures add up."""

import json
import math

import pytest
from sweep_fixtures import tiny_facts_run

import studies.memorization as M
from peer.data.facts import TEMPLATES


def test_bits_over_prior_use_the_corpus_frequencies_and_floor_at_zero():
    prior = [{"relation": "r", "value": v} for v in "AABC"]  # surprise: A 1 bit, B and C 2 bits
    probes = [{"relation": "r", "value": "A"}, {"relation": "r", "value": "B"}, {"relation": "q", "value": "A"}]
    scores = [
        {"value_nats": 0.0, "recalled": True},  # all of A's 1 bit
        {"value_nats": 3 * math.log(2), "recalled": False},  # 3 bits of loss > B's 2: floored at 0
        {"value_nats": 0.0, "recalled": True},
    ]
    with pytest.raises(ZeroDivisionError):  # a relation the prior does not hold has no frequencies
        M.measure(scores, probes, prior)
    out = M.measure(scores[:2], probes[:2], prior)["r"]
    assert out["facts"] == 2 and out["recall"] == 0.5 and out["bits_over_prior"] == pytest.approx(1.0)
    assert out["bits_over_prior_per_fact"] == pytest.approx(0.5) and out["value_nats"] == pytest.approx(
        1.5 * math.log(2)
    )
    assert out["recall_se"] == pytest.approx(math.sqrt(0.25 / 2))  # binomial
    assert out["bits_over_prior_per_fact_se"] == pytest.approx(0.5)  # bits 1 and 0: sample std 0.707, over sqrt(2)


def test_the_standard_error_of_two_relations_weighs_each_by_its_share_of_the_probes():
    a = {"facts": 300, "recall": 0.5, "recall_se": 0.03}
    b = {"facts": 100, "recall": 0.1, "recall_se": 0.04}
    mean, se = M._combine([a, b], "recall")
    assert mean == pytest.approx(0.4) and se == pytest.approx(math.hypot(0.75 * 0.03, 0.25 * 0.04))


@pytest.fixture
def trained_run(tmp_path, monkeypatch):
    from peer.data.facts import Fact

    facts = [Fact(f"Town{i:02d}", "city_country", f"Land{i % 5}") for i in range(90)]
    facts.append(Fact("Nowhere", "city_country", "Atlantis"))  # a value no trained fact has: never probed
    run = tmp_path / "main" / "1e13" / "peer128_f32k" / "d16_l2" / "seed3"
    corpus = tiny_facts_run(monkeypatch, tmp_path, run, facts)
    (run / "result.json").write_text("{}")
    return corpus, run


def test_held_out_probes_name_no_trained_subject_and_only_trained_values(trained_run, tmp_path):
    corpus, _ = trained_run
    sets = M.probe_sets(corpus, tmp_path / "cache", ("city_country",), per_relation=20)
    trained = [json.loads(line) for line in (corpus / "facts.jsonl").read_text().splitlines()]
    names = {p["id"] for p in trained}
    assert len(sets["seen"]) == 20 and {p["id"] for p in sets["seen"]} <= names
    assert len(sets["held_out"]) == 20 and not {p["id"] for p in sets["held_out"]} & names
    assert {p["value"] for p in sets["held_out"]} <= {p["value"] for p in trained}  # no "Atlantis"
    assert {p["candidates"] for p in sets["held_out"]} == {trained[0]["candidates"]} == {5}
    for p in sets["held_out"]:  # rendered with one of the relation's templates, ending where the value goes
        assert any(p["prefix"] == t.split("{v}")[0].format(s=p["id"].split("/")[1]) for t in TEMPLATES["city_country"])
    assert sets == M.probe_sets(corpus, tmp_path / "cache", ("city_country",), per_relation=20)  # deterministic


def test_a_run_is_scored_summarized_and_reported(trained_run, tmp_path):
    _, run = trained_run
    assert M.runs(tmp_path / "main") == [run]  # finished, with its checkpoint
    rep = M.score_run(run, tmp_path / "cache", ("city_country",), per_relation=10)
    assert json.loads((run / M.OUT).read_text()) == json.loads(json.dumps(rep))
    assert rep["seen"]["city_country"]["facts"] == rep["held_out"]["city_country"]["facts"] == 10
    s = M.summarize(tmp_path / "main")
    e = s["1e13"]["peer128"]
    assert e["seeds"] == ["3"] and e["relations"] == ["city_country"]
    held, seen = rep["held_out"]["city_country"], rep["seen"]["city_country"]
    assert e["both"]["held_out"]["recall"]["mean"] == pytest.approx(held["recall"])  # one relation: both = it
    stored = e["city_country"]["stored"]["bits_over_prior_per_fact"]
    assert stored["mean"] == pytest.approx(seen["bits_over_prior_per_fact"] - held["bits_over_prior_per_fact"])
    assert stored["se"] == pytest.approx(
        math.hypot(seen["bits_over_prior_per_fact_se"], held["bits_over_prior_per_fact_se"])
    )
    assert M.is_scored(run)
    md = M.report_markdown(s)
    assert "## 1e13 FLOPs, 32,000 facts" in md and md.count("| peer128 | 3 |") == 2  # the relation, then both


def test_the_pilot_runs_every_method_on_shuffled_facts_at_the_frozen_learning_rate():
    import tomllib

    import studies.knowledge as K

    text = M.pilot_file()
    assert (K.ROOT / "configs" / f"{M.PILOT_NAME}.toml").read_text() == text  # the committed file is its output
    pilot, grid = tomllib.loads(text), tomllib.loads(K.main_file("3e12"))
    assert pilot["sweep"]["budgets"] == [M.PILOT_BUDGET] and pilot["sweep"]["seeds"] == [M.PILOT_SEED]
    assert pilot["sweep"]["set"] == grid["sweep"]["set"]  # the study's backbone
    assert set(pilot["variants"]) == {f"{m}_s32k" for m in K.METHODS}
    for m in K.METHODS:  # the same settings as the real-facts run, but for the corpus
        real = [s for s in grid["variants"][f"{m}_f32k"]["set"] if not s.startswith("data.corpus=")]
        assert pilot["variants"][f"{m}_s32k"]["set"] == [*real[:-1], f"data.corpus={M.SHUFFLED[0]}", real[-1]]
    assert (
        M.SHUFFLED[1] == K.V2.corpora["f32k"][1].replace("facts32k_r60", "facts32k_r60_shuffled") + " --shuffle-values"
    )


def test_the_pilot_report_sets_each_method_beside_its_real_facts_run():
    import studies.knowledge as K

    def rows(corpus, bits):
        return [
            {"budget": 3e12, "method": m, "corpus": corpus, "seed": 1, "loss": {"val": 2.0}, "bits": b,
             "recall": b / 1e4, "bits_available": 9e4, "bits_over_prior": b, "bits_over_prior_available": 7e4,
             "params_total": 10}
            for m, b in bits.items()
        ]  # fmt: skip

    real = K.summarize(rows("f32k", {"dense": 900.0, "peer1024": 300.0}))
    shuffled = K.summarize(rows("s32k", {"peer1024": 50.0}))
    md = M.pilot_markdown(real, shuffled)
    assert "| peer1024 | 10 | 300 | 50 | 3.0 | 0.5 | 2.0000 |" in md
    assert "| dense |" not in md  # only the methods the pilot ran
    assert "real (of 70,000)" in md and "shuffled (of 70,000)" in md
