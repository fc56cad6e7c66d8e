"""The moonshot's choices (studies.moonshot, protocol in docs/knowledge.md) on made-up results: equal rungs
per method, an outward rung from an edge, the reference first, the sparse methods held to the target's
forgetting cap, and the target judged as registered."""

import pytest

import studies.moonshot as M

BASES = {"dense": {"loss": {"val": 5.0}}, "peer": {"loss": {"val": 5.0}}}


def _r(recall, forget, seed=0):
    return {"recall": recall, "bits": 100 * recall, "loss": {"val": 5.0 + forget}, "seed": seed}


def _seed0(**curves):
    """method -> {lr: (recall, forgetting)} -> results."""
    return {m: {lr: _r(*v) for lr, v in curves.get(m, {}).items()} for m in M.METHODS}


def test_every_method_starts_with_the_same_number_of_rungs_inside_its_ladder():
    assert {len(first) for _, _, _, first in M.METHODS.values()} == {4}
    for _, _, ladder, first in M.METHODS.values():
        assert set(first) <= set(ladder) and list(ladder) == sorted(ladder)


def test_nothing_run_asks_for_every_first_rung_but_the_sparse_choice_waits_for_the_reference():
    want = M.needed(_seed0(), BASES)
    assert want == {m: sorted(first) for m, (_, _, _, first) in M.METHODS.items()}
    full = {lr: (0.1 * i, 0.5 * i) for i, lr in enumerate(M.METHODS["dense_full"][3], start=1)}  # best at the top edge
    sparse = {lr: (0.01, 0.01) for lr in M.METHODS["peer_smf"][3]}
    want = M.needed(_seed0(dense_full={lr: v for lr, v in list(full.items())[:3]}, peer_smf=sparse), BASES)
    assert want["dense_full"] == [M.METHODS["dense_full"][3][3]] and "peer_smf" not in want  # waits
    want = M.needed(_seed0(dense_full=full, peer_smf=sparse), BASES)
    assert want["dense_full"] == [1e-2]  # the best recall is the top rung: one rung outward


def test_the_sparse_choice_is_the_best_recall_within_the_forgetting_cap():
    ref = _r(0.5, 2.0)  # the cap is 0.25 * 2.0 = 0.5 nats
    rs = {1.0: _r(0.1, 0.1), 3.0: _r(0.3, 0.4), 10.0: _r(0.6, 0.9), 30.0: _r(0.7, 3.0)}
    assert M.choose_lr("peer_smf", rs, BASES, ref) == 3.0
    over = {lr: _r(r["recall"], 1.0) for lr, r in rs.items()}  # nothing under the cap: the least forgetting
    assert M.choose_lr("peer_smf", over, BASES, ref) == 1.0
    assert M.choose_lr("dense_lora", rs, BASES, None) == 30.0  # the others: the highest recall


def test_the_target_is_judged_on_means_over_the_report_seeds():
    chosen = {m: M.METHODS[m][3][1] for m in M.METHODS}
    runs = {m: [_r(0.5, 2.0, 1), _r(0.5, 2.2, 2)] for m in M.METHODS}
    runs["peer_smf"] = [_r(0.52, 0.4, 1), _r(0.50, 0.6, 2)]  # recall above, forgetting 0.5 / 2.1 = 24 %
    runs["peer_rows"] = [_r(0.40, 0.1, 1), _r(0.42, 0.1, 2)]  # forgets little, learns less: not met
    s = M.summarize(chosen, runs, BASES)
    assert s["target"]["peer_smf"]["met"] and s["target"]["peer_smf"]["forgetting_share"] == pytest.approx(0.5 / 2.1)
    assert not s["target"]["peer_rows"]["met"]
    assert "| peer_smf |" in M.summary_markdown(s)


def test_the_plot_is_written(tmp_path):
    seed0 = _seed0(dense_full={1e-4: (0.1, 0.5), 3e-4: (0.2, 1.5)}, peer_smf={1.0: (0.05, 0.01)})
    M.plot(seed0, BASES, tmp_path / "moon.png")
    assert (tmp_path / "moon.png").stat().st_size > 1000


def _write(root, method, lr, seed, recall, forget):
    d = M.run_dir(method, lr, seed, root)
    d.mkdir(parents=True)
    (d / "moonshot.json").write_text(__import__("json").dumps({"method": method, "lr": lr, **_r(recall, forget, seed)}))


def test_posthoc_waits_for_its_rungs_then_holds_every_method_to_the_registered_cap(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "OUT", tmp_path)
    (tmp_path / "choice.json").write_text('{"dense_full": 0.003}')
    for m, (_, _, _, first) in M.METHODS.items():
        for i, lr in enumerate(first):  # recall and forgetting rise with the rate
            _write(None, m, lr, 0, 0.1 * (i + 1), 1.0 * (i + 1))
    chosen, missing = M.posthoc_choice(BASES)
    assert chosen == {} and missing == {"peer_smf": list(M.POSTHOC_RUNGS["peer_smf"])}
    for lr in M.POSTHOC_RUNGS["peer_smf"]:
        _write(M.posthoc_dir(), "peer_smf", lr, 0, 0.9, 0.5)  # post hoc rungs: the best recall, under the cap
    assert M.results(0)["peer_smf"].keys() == set(M.METHODS["peer_smf"][3])  # the registered view is unchanged
    chosen, missing = M.posthoc_choice(BASES)
    # the reference (0.003: 4th rung) forgot 4.0 nats: cap 1.0, so every method takes its first rung ...
    assert missing == {} and chosen["dense_full"] == M.METHODS["dense_full"][3][0]
    assert chosen["peer_full"] == M.METHODS["peer_full"][3][0]
    assert (
        chosen["peer_smf"] == M.POSTHOC_RUNGS["peer_smf"][0]
    )  # ... but smf's post hoc rungs recall more (tie: smallest)


def test_a_posthoc_run_reuses_the_registered_run_of_the_same_rate_and_seed(tmp_path, monkeypatch):
    monkeypatch.setattr(M, "OUT", tmp_path)
    _write(None, "peer_rows", 0.01, 1, 0.3, 2.0)
    assert M.fine_tune("peer_rows", 0.01, 1, M.posthoc_dir())["recall"] == 0.3  # read, not trained


def test_a_posthoc_summary_judges_no_target():
    runs = {m: [_r(0.5, 2.0, 1), _r(0.5, 2.2, 2)] for m in M.METHODS}
    s = M.summarize({m: 1.0 for m in M.METHODS}, runs, BASES, judge=False)
    assert s["target"] == {} and "Target" not in M.summary_markdown(s, "# t")


def test_overlap_says_how_much_of_the_facts_retrieval_text_shares():
    import torch

    text_w = torch.tensor([5.0, 3.0, 2.0, 0.0, 0.0, 0.0])  # text retrieves experts 0-2
    text_hits = torch.tensor([2.0, 1.0, 1.0, 0.0, 0.0, 0.0])
    facts = [torch.tensor([1.0, 0.0, 0.0, 3.0, 0.0, 0.0]), torch.tensor([1.0, 1.0, 0.0, 0.0, 0.0, 0.0])]
    o = M.overlap_stats(facts, text_w, text_hits, text_batches=2, rows=1)
    assert o["experts"] == 6 and o["facts_experts"] == 3 and o["text_experts"] == 3
    assert o["facts_experts_text_retrieves"] == pytest.approx(2 / 3)  # experts 0, 1 of 0, 1, 3
    assert o["facts_weight_on_text_experts"] == pytest.approx(3 / 6)
    assert o["text_weight_on_facts_experts"] == pytest.approx(8 / 10)
    # batch 1: expert 3 (idf ln 3, weight 3) wins: share 3/4; batch 2: expert 1 (idf ln 1.5 > expert 0's ln 1): 1/2
    assert o["top_rows_share"] == pytest.approx((3 / 4 + 1 / 2) / 2)
