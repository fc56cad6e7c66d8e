"""The confirmation study's report (studies.confirmation) on made-up losses, and what `peer main` prints
from it: the protocol's statistics (gap, standard error, Welch interval, the 2-standard-error rule)."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats

from peer.experiments.mainjob import confirmation_lines
from studies.confirmation import gap_stats, summarize, summary_markdown, verdict_markdown

PEER = [3.00, 3.02, 3.01, 2.99, 3.03]
DENSE = [3.10, 3.12, 3.08, 3.11, 3.09]  # clearly worse than PEER
MOE = [3.01, 3.04, 2.98, 3.02, 3.00]  # within noise


def test_gap_statistics_follow_welch():
    g = gap_stats(DENSE, PEER)
    va, vb = stats.tvar(DENSE) / 5, stats.tvar(PEER) / 5
    se = math.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / 4 + vb**2 / 4)
    assert g["gap"] == pytest.approx(sum(DENSE) / 5 - sum(PEER) / 5)
    assert g["se"] == pytest.approx(se) and g["dof"] == pytest.approx(dof)
    t = stats.t.ppf(0.975, dof)
    assert g["ci95"] == pytest.approx([g["gap"] - t * se, g["gap"] + t * se])
    assert g["peer_better_by_2se"] is True
    assert gap_stats(MOE, PEER)["peer_better_by_2se"] is False  # PEER lower, but not by 2 se
    one = gap_stats([3.1], PEER)  # one seed: no spread, no verdict
    assert math.isnan(one["se"]) and one["peer_better_by_2se"] is False


def test_summary_and_what_peer_main_prints(tmp_path):
    rows = [
        {"budget": 1.5e13, "method": m, "seed": 100 + i, "loss": {"val": v, "test_sotu": v + 0.1, "eval_x": v + 0.5}}
        for m, vals in (("peer", PEER), ("dense", DENSE), ("moe", MOE))
        for i, v in enumerate(vals)
    ]
    s = summarize(rows)
    at = s["budgets"]["1.5e13"]
    assert list(at) == ["test_sotu", "val", "eval_x"]  # the headline (in-domain) splits first
    assert at["val"]["methods"]["peer"]["n"] == 5 and at["val"]["methods"]["dense"]["seeds"] == [
        100,
        101,
        102,
        103,
        104,
    ]
    assert set(at["val"]["gaps"]) == {"dense", "moe"}
    assert at["val"]["gaps"]["dense"]["peer_better_by_2se"] and not at["val"]["gaps"]["moe"]["peer_better_by_2se"]
    assert "| val | dense |" in summary_markdown(s)
    # peer main: without a summary it says the claim is unconfirmed; with one, it prints each gap
    assert confirmation_lines(tmp_path / "none.json")[0].startswith("Not confirmed yet")
    (tmp_path / "summary.json").write_text(json.dumps(s))
    lines = confirmation_lines(tmp_path / "summary.json")
    val = next(line for line in lines if " val " in line)
    assert "dense +0.090 ± " in val and val.count("*") == 1  # only dense is beaten by more than 2 se
    assert "!" not in val  # no baseline is lower by 2 se
    rows += [{"budget": 1.5e13, "method": "pkm", "seed": 100 + i, "loss": {"val": v - 0.2}} for i, v in enumerate(PEER)]
    (tmp_path / "summary.json").write_text(json.dumps(summarize(rows)))
    val = next(line for line in confirmation_lines(tmp_path / "summary.json") if " val " in line)
    assert val.count("*") == 1 and "pkm -0.200 ± 0.010 !" in val  # a baseline's win is marked as plainly


def test_an_unfinished_budget_is_called_interim_everywhere(tmp_path):
    """A budget with planned runs still missing is marked interim in summary.json, summary.md and what
    `peer main` prints; a budget with every planned run is not."""
    rows = [
        {"budget": 1.5e13, "method": m, "seed": 100 + i, "loss": {"val": v}}
        for m, vals in (("peer", PEER), ("dense", DENSE))
        for i, v in enumerate(vals)
    ] + [{"budget": 3e13, "method": "peer", "seed": 100, "loss": {"val": 2.9}}]
    planned = {b: {"dense": [100, 101, 102, 103, 104], "peer": [100, 101, 102, 103, 104]} for b in ("1.5e13", "3e13")}
    s = summarize(rows, planned)
    assert s["complete"] == {"1.5e13": True, "3e13": False}
    assert s["missing"]["3e13"] == [f"dense seed{i}" for i in range(100, 105)] + [
        f"peer seed{i}" for i in range(101, 105)
    ]
    md = summary_markdown(s)
    assert md.count("**Interim**") == 1 and md.index("**Interim**") > md.index("## 3e13")
    (tmp_path / "summary.json").write_text(json.dumps(s))
    lines = confirmation_lines(tmp_path / "summary.json")
    assert lines[0].startswith("Interim") and "3e13: 9 run(s) to go" in lines[0]
    assert any(line.startswith("  1.5e13 val") for line in lines)  # the complete budget carries no mark
    assert "  3e13 (interim): no gap yet (PEER and a baseline need at least two seeds each)" in lines
    assert (
        "  1.5e13: PEER lower by > 2 se in 1 of 1 (split, baseline) pairs, a baseline lower by > 2 se in 0, the rest ties"
        in lines
    )
    # without a plan nothing is known to be missing
    assert summarize(rows)["complete"] == {"1.5e13": True, "3e13": True}


def test_planned_runs_reads_the_sweep_file():
    from studies.confirmation import planned_runs

    p = planned_runs("configs/confirm_final.toml")
    assert set(p) == {"1.5e13", "3e13"}
    assert p["3e13"] == {m: [100, 101, 102, 103, 104] for m in ("dense", "moe", "pkm", "peer")}


def test_the_verdict_table_applies_the_two_standard_error_rule():
    worse = [v - 0.2 for v in PEER]  # a baseline clearly below PEER
    rows = [
        {"budget": 1.5e13, "method": m, "seed": 100 + i, "loss": {"val": v, "test_sotu": v}}
        for m, vals in (("peer", PEER), ("dense", DENSE), ("moe", MOE), ("pkm", worse))
        for i, v in enumerate(vals)
    ] + [{"budget": 3e13, "method": m, "seed": 100, "loss": {"val": 3.0}} for m in ("peer", "dense")]
    table = verdict_markdown(summarize(rows))
    head, _, test, val = table.splitlines()[:4]
    assert head == "| split | dense @ 1.5e13 | moe @ 1.5e13 | pkm @ 1.5e13 | dense @ 3e13 |"
    cells = [c.strip() for c in val.split("|")[1:-1]]
    assert cells[0] == "val" and cells[1].endswith("(PEER)") and cells[2].endswith("(tie)")
    assert cells[3].startswith("-0.200") and cells[3].endswith("(baseline)")
    assert cells[4] == "+0.000 (too few seeds)"  # one seed each: no verdict
    assert test.split("|")[5].strip() == "—"  # no 3e13 run scored test_sotu
    md = summary_markdown(summarize(rows))
    assert "| val | dense | 3.0000 ± — (1) | +0.0000 (too few seeds) | — | no |" in md and "nan" not in md


def test_no_verdict_table_before_peer_has_a_run():
    rows = [{"budget": 1.5e13, "method": "dense", "seed": 100 + i, "loss": {"val": v}} for i, v in enumerate(DENSE)]
    assert verdict_markdown(summarize(rows)).startswith("(no gap yet")


def test_the_gap_plot_is_written(tmp_path):
    from studies.confirmation import plot

    rows = [
        {"budget": b, "method": m, "seed": 100 + i, "loss": {"val": v, "test_sotu": v + 0.1}}
        for b in (1.5e13, 3e13)
        for m, vals in (("peer", PEER), ("dense", DENSE), ("moe", MOE))
        for i, v in enumerate(vals)
    ]
    out = tmp_path / "img" / "gaps.png"
    plot(summarize(rows), out)
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out.stat().st_size > 10_000


def test_the_tuning_effort_is_counted_from_the_screens_results_and_printed(tmp_path):
    from studies.confirmation import tuning_effort

    for trial, seeds in (("dense_t01", [10]), ("dense_t02", [10, 11, 12]), ("peer_t01", [10]), ("peer_t02", [10])):
        for seed in seeds:
            run = tmp_path / "1.5e13" / trial / "d48_l4" / f"seed{seed}"
            run.mkdir(parents=True)
            (run / "result.json").write_text("{}")
    (tmp_path / "1.5e13" / "peer_t03" / "d48_l4" / "seed10").mkdir(parents=True)  # unfinished: not counted
    effort = tuning_effort(tmp_path)
    assert effort == {"dense": {"configurations": 2, "runs": 4}, "peer": {"configurations": 2, "runs": 2}}
    rows = [
        {"budget": 1.5e13, "method": m, "seed": 100 + i, "loss": {"val": v}}
        for m, vals in (("peer", PEER), ("dense", DENSE))
        for i, v in enumerate(vals)
    ]
    s = summarize(rows) | {"tuning": effort}
    assert "dense 2 (4 runs), peer 2 (2 runs)" in summary_markdown(s)
    (tmp_path / "summary.json").write_text(json.dumps(s))
    assert "  recipes chosen from (configurations tried, runs): dense 2 (4), peer 2 (2)" in confirmation_lines(
        tmp_path / "summary.json"
    )
