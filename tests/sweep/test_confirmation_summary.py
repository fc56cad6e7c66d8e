"""The confirmation study's report (studies.confirmation) on made-up losses, and what `peer main` prints
from it: the protocol's statistics (gap, standard error, Welch interval, the 2-standard-error rule)."""

from __future__ import annotations

import json
import math

import pytest
from scipy import stats

from peer.experiments.mainjob import confirmation_lines
from studies.confirmation import gap_stats, summarize, summary_markdown

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
