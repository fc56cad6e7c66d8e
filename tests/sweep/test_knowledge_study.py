"""The knowledge study's mechanics (studies.knowledge, protocol in docs/knowledge.md) on made-up results:
equal tuning per method, the bracket's outward step, freezing only on complete tuning, the committed
sweep files exactly the generator's, and the targets judged as pre-registered."""

import json
import math

import pytest
from sweep_fixtures import tiny_facts_run

import studies.knowledge as K
from peer.experiments.sweep import load_sweep
from peer.experiments.sweep.plan import budget_label, plan


def _with_abs_base(path, text):
    path.write_text(
        text.replace(
            'base = "recipe/base_knowledge.toml"', f'base = "{K.ROOT / "configs" / "recipe" / "base_knowledge.toml"}"'
        )
    )
    return path


def _finish(root, budget, variant, seed, val_loss, extra=None):
    run = root / K.CURRENT.tune_dir / budget_label(budget) / variant / "d16_l2" / f"seed{seed}"
    run.mkdir(parents=True, exist_ok=True)
    (run / "result.json").write_text(json.dumps({"perplexity": {"val": math.exp(val_loss), **(extra or {})}}))
    return run


@pytest.mark.parametrize("design", K.DESIGNS.values(), ids=lambda d: d.name)
def test_the_committed_tuning_file_is_the_generators_output_and_equal_per_method(design):
    assert design.tune_file.read_text() == K.tune_file(design=design)
    runs = plan(load_sweep(design.tune_file))
    lrs: dict[str, set[str]] = {}
    for r in runs:
        m, lr = r.variant.rsplit("_lr", 1)
        lrs.setdefault(m, set()).add(lr)
    # every method gets the same first bracket; a further rung only where the committed runs asked for it
    assert set(lrs) == set(K.METHODS)
    assert all({K.lr_name(x) for x in K.FIRST_BRACKET} <= got for got in lrs.values())
    losses = K.tune_losses(design=design)
    assert lrs == {m: {K.lr_name(x) for x in K.next_lrs(losses[m])} for m in K.METHODS}
    assert {r.seed for r in runs} == {K.TUNE_SEED} and {r.budget for r in runs} == {K.TUNE_BUDGET}


def test_the_bracket_steps_outward_only_from_a_finished_edge():
    a, b, c = K.FIRST_BRACKET
    assert K.next_lrs({a: 1.0, b: None, c: 2.0}) == [a, b, c]  # not finished: nothing decided
    assert K.next_lrs({a: 1.0, b: 2.0, c: 3.0}) == [3e-4, a, b, c]  # best at the low edge
    assert K.next_lrs({a: 3.0, b: 2.0, c: 1.0}) == [a, b, c, 3e-2]  # best at the high edge
    assert K.tuned_lr({a: 2.0, b: 1.0, c: 3.0}) == b
    assert K.tuned_lr({a: 1.0, b: 2.0, c: 3.0}) is None  # must step outward first
    assert K.tuned_lr({3e-4: 1.5, a: 1.0, b: 2.0, c: 3.0}) == a
    assert K.tuned_lr({1e-4: 0.5, 3e-4: 1.5, a: 1.0, b: 2.0, c: 3.0}) == 1e-4  # the ladder's end
    assert K.tuned_lr({a: 3.0, b: 1.0, c: 1.0}) == b  # a tie goes to the smaller learning rate


def test_freeze_refuses_until_tuning_is_complete_then_writes_each_methods_lr(tmp_path):
    for m in K.METHODS:
        for lr in K.FIRST_BRACKET:
            _finish(tmp_path, K.TUNE_BUDGET, f"{m}_lr{K.lr_name(lr)}", K.TUNE_SEED, abs(math.log10(lr / 3e-3)))
    _finish(tmp_path, K.TUNE_BUDGET, f"dense_lr{K.lr_name(1e-3)}", K.TUNE_SEED, -1.0)  # dense: best at the edge
    with pytest.raises(SystemExit, match="dense"):
        K.main_file("3e12", tmp_path)
    assert "dense_lr3e-4" in K.tune_file(tmp_path)  # the next tuning file asks for the outward step
    _finish(tmp_path, K.TUNE_BUDGET, "dense_lr3e-4", K.TUNE_SEED, 0.5)
    assert {K.CURRENT.main_file_path(k).name for k in K.MAIN_FILES} == {
        "knowledge_v2_3e12.toml",
        "knowledge_v2_1e13.toml",
        "knowledge_v2_seed3.toml",
    }
    seed3 = plan(load_sweep(_with_abs_base(tmp_path / "s3.toml", K.main_file("seed3", tmp_path))))
    assert {r.seed for r in seed3} == {3} and {r.budget for r in seed3} == {3e12, 1e13}
    assert {r.variant for r in seed3} == {f"{m}_f32k" for m in K.PEER_SIDES} | {
        f"{m}_{c}" for m in (*K.DENSE, "peer1024") for c in K.DECISIVE
    }
    text = K.main_file("1e13", tmp_path)
    runs = plan(load_sweep(_with_abs_base(tmp_path / "k.toml", text)))
    lrs = {r.variant: r.config.optim.lr for r in runs}
    assert lrs["dense_f32k"] == 1e-3 and lrs["peer1024_mix"] == 3e-3 and lrs["moe_f32k"] == 3e-3
    assert {r.variant: r.config.data.corpus for r in runs}["peer1024_mix"] == K.CURRENT.corpora["mix"][0]
    assert {r.variant.rpartition("_")[2] for r in runs} == set(K.DECISIVE) and {r.seed for r in runs} == set(K.SEEDS)


def _rows(peer_bits, dense_bits, budget=3e12, corpus="f32k"):
    rows = []
    for seed, noise in ((1, -1.0), (2, 1.0)):
        for m, bits in {**peer_bits, **dense_bits}.items():
            rows.append(
                {
                    "budget": budget,
                    "method": m,
                    "corpus": corpus,
                    "seed": seed,
                    "loss": {"val": 3.0 - bits / 1e5, "eval_text": 4.0},
                    "bits": bits + noise,
                    "recall": bits / 1e5,
                    "bits_available": 1e5,
                    "bits_over_prior": bits / 2 + noise,
                    "bits_over_prior_available": 8e4,
                    "params_total": 1,
                }
            )
    return rows


def test_the_targets_are_judged_as_registered():
    rising = {"peer128": 10_000, "peer256": 12_000, "peer512": 15_000, "peer1024": 30_000}
    dense = {"dense": 14_000, "dense_d24": 9_000, "dense_d32": 8_000}
    t = K.summarize(_rows(rising, dense))["targets"]["3e12"]
    assert t["bits_rise_with_N"]["met"]
    assert t["peer1024_2x_dense_bits"]["best_dense"] == "dense"  # lowest val loss of the three sizes
    assert t["peer1024_2x_dense_bits"]["ratio"] == pytest.approx(30_000 / 14_000) and t["peer1024_2x_dense_bits"]["met"]
    t = K.summarize(_rows({**rising, "peer512": 11_000}, {**dense, "dense": 16_000}))["targets"]["3e12"]
    assert not t["bits_rise_with_N"]["met"] and not t["peer1024_2x_dense_bits"]["met"]
    mix = K.summarize(_rows(rising, dense, corpus="mix"))["targets"]["3e12"]["mix_recall_and_text"]
    assert mix["met"] and mix["text_loss_gap"]["gap"] == 0  # equal text loss counts as no worse
    # a grid still running: with a dense size missing, neither dense comparison is judged (its best dense
    # model would not be the registered one), nor is the rise with N while a pool is missing
    partial = _rows({"peer1024": 30_000}, {"dense": 1_000})
    partial += [{**r, "corpus": "mix"} for r in _rows({"peer1024": 30_000}, {"dense": 1_000, "dense_d24": 2_000})]
    assert K.summarize(partial)["targets"]["3e12"] == {}
    md = K.summary_markdown(K.summarize(_rows(rising, dense)))
    assert md.count("| peer1024 |") == 1
    assert "| 30000.0000 |" in md  # bits per parameter: the mean bits over the model's parameters (here 1)
    assert md.index("| peer128 |") < md.index("| peer256 |") < md.index("| peer1024 |") < md.index("| dense |") or (
        md.index("| dense |") < md.index("| peer128 |") < md.index("| peer256 |") < md.index("| peer1024 |")
    )  # the protocol's order, not the alphabet's (which puts 1024² before 256²)


def test_the_bits_are_broken_down_per_relation_on_the_decisive_corpora():
    rows = _rows({"peer1024": 3_000}, {"dense": 6_000})
    for r in rows:  # two relations; seed 2 stores 10 more bits over prior on each
        extra = 10 * (r["seed"] - 1)
        r["relations"] = {
            "city_country": {"facts": 900, "recall": 0.25, "bits_over_prior": r["bits"] / 3 + extra,
                             "bits_over_prior_available": 5000.0},
            "unicode_name": {"facts": 100, "recall": 0.0, "bits_over_prior": extra, "bits_over_prior_available": 700.0},
        }  # fmt: skip
    rows += [{**r, "corpus": "f2k"} for r in rows]  # not a decisive corpus: no breakdown
    s = K.summarize(rows)
    rel = s["points"]["3e12"]["f32k"]["dense"]["relations"]
    assert list(rel) == ["city_country", "unicode_name"] and rel["unicode_name"]["facts"] == 100
    assert rel["city_country"]["bits_over_prior"]["mean"] == pytest.approx(6_000 / 3 + 5)
    assert rel["unicode_name"]["bits_over_prior"]["values"] == [0, 10]
    md = K.summary_markdown(s)
    assert md.count("bits over prior per relation") == 1 and "3e12 FLOPs, f32k: bits over prior per relation" in md
    assert "| relation | facts | bits over prior available | dense | peer1024 |" in md  # the protocol's order
    assert "| city_country | 900 | 5,000 | 2,005 (25.0) | 1,005 (25.0) |" in md
    assert "| unicode_name | 100 | 700 | 5 (0.0) | 5 (0.0) |" in md
    assert md.index("per relation") < md.index("## Targets")
    assert K.relations_markdown(K.summarize(_rows({"peer1024": 3_000}, {}))) == []  # scored before the breakdown


def test_retrievals_per_expert_is_t_h_k_over_n():
    assert K.retrievals_per_expert("peer1024", 2**20) == 32 and K.retrievals_per_expert("dense", 10) is None
    assert K.retrievals_per_expert("peer128", 16384) == 32


def test_variants_name_a_method_and_a_corpus():
    assert K.parse_variant("peer1024_mix") == ("peer1024", "mix") and K.parse_variant("dense_d24_f32k") == (
        "dense_d24",
        "f32k",
    )
    with pytest.raises(ValueError):
        K.parse_variant("peer2048_f32k")


def test_the_plot_is_written(tmp_path):
    rising = {"peer128": 10_000, "peer256": 12_000, "peer512": 15_000, "peer1024": 30_000}
    K.plot(K.summarize(_rows(rising, {"dense": 14_000})), tmp_path / "bits.png")
    assert (tmp_path / "bits.png").stat().st_size > 1000
    rows = [r for tag in K.FACTS_CORPORA for r in _rows(rising, {"dense": 14_000}, corpus=tag)]
    K.plot_capacity(K.summarize(rows), tmp_path / "capacity.png")
    assert (tmp_path / "capacity.png").stat().st_size > 1000
    assert K.V2.capacity_plot == "knowledge_capacity.png" and K.V1.capacity_plot == "knowledge_capacity_v1.png"


def test_the_mix_plot_draws_each_method_at_each_budget_in_order(tmp_path):
    rows = _rows({"peer1024": 5_000}, {"dense": 7_000}, budget=1e13, corpus="mix")
    rows += _rows({"peer1024": 4_000}, {"dense": 6_000}, corpus="mix")
    rows += _rows({"peer1024": 9_000}, {}, corpus="f32k")  # not the mix: not drawn
    pts = K.mix_points(K.summarize(rows))
    assert set(pts) == {"peer1024", "dense"}
    assert [b for b, _ in pts["dense"]] == ["3e12", "1e13"]  # budgets ascending, whatever the rows' order
    assert pts["dense"][1][1]["recall"]["mean"] == pytest.approx(0.07)
    K.plot_mix(K.summarize(rows), tmp_path / "mix.png")
    assert (tmp_path / "mix.png").stat().st_size > 1000
    assert K.V2.mix_plot == "knowledge_mix.png" and K.V1.mix_plot == "knowledge_mix_v1.png"


def test_a_finished_run_is_scored_and_collected(tmp_path, monkeypatch):
    from peer.data.facts import Fact

    run = tmp_path / "main" / "3e12" / "peer128_f32k" / "d16_l2" / "seed1"
    tiny_facts_run(
        monkeypatch, tmp_path, run, [Fact(f"Town{i:02d}", "city_country", f"Land{i % 5}") for i in range(60)]
    )
    (run / "result.json").write_text(json.dumps({"budget": 3e12, "variant": "peer128_f32k", "seed": 1, "tokens": 4096,
                                                 "params_total": 10, "perplexity": {"val": 50.0}}))  # fmt: skip
    k = K.score_run(run)
    assert k["facts"] == 40 and 0 <= k["recall"] <= 1 and k["bits"] >= 0
    assert json.loads((run / "knowledge.json").read_text()) == json.loads(json.dumps(k))
    assert 0 <= k["bits_over_prior"] <= k["bits_over_prior_available"]
    stale = {key: v for key, v in k.items() if not key.startswith("bits_over_prior")}  # scored before the addendum
    (run / "knowledge.json").write_text(json.dumps(stale))
    assert K.score_run(run)["bits_over_prior"] == pytest.approx(k["bits_over_prior"])  # scored again
    (row,) = K.collect(tmp_path / "main")
    assert (row["method"], row["corpus"], row["seed"]) == ("peer128", "f32k", 1)
    assert row["relations"]["city_country"] == {key: k["relations"]["city_country"][key] for key in K.RELATION_FIELDS}
    assert row["retrievals_per_expert"] == 4096 * 32 / 128**2 and row["loss"]["val"] == pytest.approx(math.log(50.0))


def test_the_designs_differ_only_in_how_often_a_facts_stream_repeats():
    def args(cmd):
        words = cmd.split()
        return {w: words[i + 1] for i, w in enumerate(words) if w.startswith("--") and i + 1 < len(words)}

    # addenda 3 and 4: facts below and near the d16 dense model's capacity, drawn as the others (seed 0)
    assert K.CURRENT is K.V2 and set(K.V2.corpora) - set(K.V1.corpora) == {"f100", "f300"}
    assert K.V2.grid_corpora == ("f100", "f300", *K.V1.grid_corpora)
    for tag, n in (("f100", "100"), ("f300", "300")):
        assert args(K.V2.corpora[tag][1])["--num-facts"] == n and args(K.V2.corpora[tag][1])["--seed"] == "0"
    for tag in K.V1.corpora:
        a, b = args(K.V1.corpora[tag][1]), args(K.V2.corpora[tag][1])
        if tag in ("text", "mix"):
            assert K.V1.corpora[tag] == K.V2.corpora[tag]
            continue
        # the same facts, probes and val (num-facts, seed, tokenizer); only train's statements per fact differ
        assert {k: v for k, v in a.items() if k not in ("--out", "--repeats")} == {
            k: v for k, v in b.items() if k not in ("--out", "--repeats")
        }
        assert "--repeats" not in a and int(b["--repeats"]) > 3 and a["--out"] != b["--out"]
    # enough statements that the longest run (dense, 1e13 FLOPs: 38.7 M tokens) reads none twice, at the ~22
    # tokens per statement the v1 corpora measured (their train splits: 133,023 / 526,919 / 2,111,675 tokens)
    for tag, v1_tokens in (
        ("f2k", 133_023),
        ("f8k", 526_919),
        ("f32k", 2_111_675),
        ("f100", 133_023 / 20),
        ("f300", 133_023 * 3 / 20),
    ):
        assert v1_tokens / 3 * int(args(K.V2.corpora[tag][1])["--repeats"]) > 38.7e6
