"""`python -m studies.report SWEEP --into DOC` (the project's report, outside the package): marked blocks are replaced, everything else is kept, bad markers fail in one line."""

import math

import pytest

from peer.errors import UsageError
from studies.report import SECTIONS, report_markdown, splice, splice_into, wall_markdown

DOC = """# My study

Prose that must survive.

<!-- sweep s:table1 -->
old table
<!-- /sweep s:table1 -->

More prose, and another sweep's block left alone:
<!-- sweep other:table1 -->
theirs
<!-- /sweep other:table1 -->

<!-- sweep s:wall -->
<!-- /sweep s:wall -->
end
"""


def test_splice_replaces_only_its_blocks():
    text, keys = splice(DOC, "s", {"table1": "| new |", "wall": "| w |", "points": "unused"})
    assert keys == ["table1", "wall"]
    assert "old table" not in text and "<!-- sweep s:table1 -->\n| new |\n<!-- /sweep s:table1 -->" in text
    assert "<!-- sweep s:wall -->\n| w |\n<!-- /sweep s:wall -->" in text
    assert "theirs" in text and text.startswith("# My study\n\nProse that must survive.") and text.endswith("end\n")
    again, _ = splice(text, "s", {"table1": "| new |", "wall": "| w |"})
    assert again == text  # idempotent: a second refresh changes nothing


@pytest.mark.parametrize(
    "doc, match",
    [
        ("<!-- sweep s:tabel1 -->\n<!-- /sweep s:tabel1 -->", "unknown section 'tabel1'.*allowed: summary, table1"),
        ("<!-- sweep s:table1 -->\nx\n", "not closed"),
        ("x\n<!-- /sweep s:table1 -->", "line 2: closing marker"),
        ("<!-- sweep s:table1 -->\n<!-- sweep s:wall -->\n<!-- /sweep s:wall -->\n<!-- /sweep s:table1 -->", "inside"),
        ("<!-- sweep s:gaps -->\n<!-- /sweep s:gaps -->", "no 'gaps' section"),
        ("no markers here", "no <!-- sweep s:KEY -->"),
    ],
)
def test_bad_markers_fail_in_one_line(doc, match):
    with pytest.raises(UsageError, match=match) as err:
        splice(doc, "s", {"table1": "t", "wall": "w"})
    assert "\n" not in str(err.value)


def test_splice_into_leaves_the_file_untouched_on_error(tmp_path):
    p = tmp_path / "doc.md"
    p.write_text(DOC.replace("<!-- /sweep s:wall -->", ""))
    with pytest.raises(UsageError, match="not closed"):
        splice_into(p, "s", {"table1": "new", "wall": "w"})
    assert p.read_text() == DOC.replace("<!-- /sweep s:wall -->", "")
    with pytest.raises(UsageError, match="--into"):
        splice_into(tmp_path / "missing.md", "s", {"table1": "new"})


def test_wall_time_sums_per_budget():
    gpu = {"device": "cuda", "name": "NVIDIA H200"}
    runs = [
        {"budget": 1e12, "train_seconds": 1800},
        {"budget": 1e12, "train_seconds": 5400},
        {"budget": 3e12, "train_seconds": 3600},
        {"budget": 3e12},
        {"budget": 3e12, "train_seconds": 720, "hardware": gpu},
        {"budget": 3e12, "train_seconds": 720, "hardware": gpu},
    ]
    rows = wall_markdown(runs, parallel=2).splitlines()
    assert rows[0] == "| budget | hardware | runs | training time (sum) | wall at 2 side by side |"
    assert rows[2:] == [
        "| 1e12 | CPU (not recorded) | 2 | 2.0 h | 1.0 h |",
        "| 3e12 | CPU (not recorded) | 2 | 1.0 h | 0.5 h |",
        "| 3e12 | NVIDIA H200 | 2 | 0.4 h | 0.2 h |",
    ]  # a budget's runs on another machine: a row of their own


def test_report_page_has_every_section_in_order():
    page = report_markdown("s", {k: f"[{k}]" for k in SECTIONS})
    pos = [page.index(f"[{k}]") for k in SECTIONS]
    assert pos == sorted(pos) and page.startswith("# s: ") and "\n\n\n" not in page


def test_sizes_table_shows_each_methods_best_recipe_at_every_size():
    from studies.report import sizes_markdown

    def run(variant, size, ppl, seed=0, active=100):
        return dict(budget=1e12, variant=variant, size=size, seed=seed, perplexity={"val": ppl}, params_active=active)

    runs = [
        run("dense", "d8", 30.0, active=10),
        run("dense", "d16", 20.0, active=20),
        run("dense", "d16", 22.0, seed=1, active=20),
        run("dense", "d32", 25.0, active=40),
        run("dense_lr1e-2", "d16", 40.0, active=20),  # a worse recipe: not shown
        run("peer", "d16", 19.0, active=25),
        run("peer", "d32", 18.0, active=45),
        run("nobn", "d16", 1.0, active=25),
    ]  # an ablation arm is not a method: callers filter it out
    rows = sizes_markdown(runs[:-1]).splitlines()
    assert rows[0] == "| budget | method (recipe) | d8 | d16 | d32 |"  # smallest model first
    assert rows[2] == "| 1e12 | dense (dense) | 30.00 (1) | **21.00 ± 1.41 (2)** | 25.00 (1) |"
    assert rows[3] == "| 1e12 | peer (peer) | - | 19.00 (1) | **18.00 (1)** |"
    assert len(rows) == 4  # one row per method: dense_lr1e-2 is dense's worse recipe


def test_hardware_check_compares_each_cpu_seed_with_its_points_gpu_seeds():
    from studies.report import hardware_markdown

    gpu = {"device": "cuda", "name": "NVIDIA H200"}

    def run(size, ppl, seed, hw=None):
        return dict(budget=3e13, variant="dense", size=size, seed=seed, perplexity={"val": ppl}, hardware=hw)

    e = math.e
    runs = [
        run("d48", 100.0, 0, gpu),
        run("d48", 100.0 * e**0.02, 1),
        run("d48", 100.0 * e**0.04, 2),
        run("d64", 50.0, 0, gpu),
        run("d64", 200.0, 1, gpu),
        run("d64", 100.0 * e**-0.03, 2),  # vs the GPU mean (ln 100)
        run("d32", 90.0, 0),
        run("d32", 91.0, 1),
    ]  # one machine only: not a row
    lines = hardware_markdown(runs).splitlines()
    assert lines[2] == "| 3e13 | dense/d48 | 100.0 (s0) | 102.0 (s1), 104.1 (s2) | +0.020, +0.040 |"
    assert lines[3] == "| 3e13 | dense/d64 | 50.0 (s0), 200.0 (s1) | 97.0 (s2) | -0.030 |"
    assert len(lines) == 6
    # the three gaps 0.02, 0.04, -0.03: mean 0.010, sample std 0.036, se 0.021
    assert lines[5].startswith("All 3 CPU seeds against their point's GPU seeds: +0.010 ± 0.021 nats")
    assert hardware_markdown([r for r in runs if r["size"] == "d32"]) is None  # nothing mixed: no section
