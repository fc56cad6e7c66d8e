"""Run a planned sweep: train + evaluate each run in its own process, skip what is done, collect results.

Each run lives in ``<root>/<budget>/<variant>/<size>/`` (a normal ``peer train`` run dir) and is
done when ``result.json`` is there. A run that was interrupted resumes from its last checkpoint.
Several runs go in parallel when ``parallel > 1``; each then gets ``cores // parallel`` threads
(``threads`` in the sweep file or ``--threads`` sets it: e.g. one 1-thread run beside other work).
"""

from __future__ import annotations

import csv
import functools
import json
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ...config import config_from_dict, config_to_dict
from ...errors import PeerError
from ...fsutil import FolderLock, atomic_write_text
from ...train.signals import Interrupted, Workers
from .plan import PlannedRun, SweepSpec, plan, run_id

__all__ = ["run_sweep", "collect", "write_tables", "run_one", "RunsFailed"]


class RunsFailed(PeerError):
    """Some runs of a sweep failed; the others finished and the tables were written. ``results``: those."""

    def __init__(self, failed: list[str], results: list[dict]):
        super().__init__(
            f"{len(failed)} run(s) failed: {', '.join(failed[:6])}{' ...' if len(failed) > 6 else ''} "
            "(each run's sweep.log says why)"
        )
        self.failed, self.results = failed, results


def run_one(config: dict, eval_batches: int, record: dict) -> dict:
    """Train (resuming if a checkpoint exists), evaluate, and write ``result.json``; returns the result."""
    from ...eval import evaluate
    from ...train import train_or_resume

    cfg = config_from_dict(config)
    run_dir = Path(cfg.train.out_dir)
    spent = run_dir / TRAIN_SECONDS
    t0 = time.time()
    try:
        train_or_resume(cfg)
    finally:  # also when stopped by a signal or an error: a resumed run counts every attempt's training time
        if run_dir.is_dir():
            atomic_write_text(spent, f"{_spent_seconds(spent) + time.time() - t0:.1f}\n")
    train_s = _spent_seconds(spent)
    ev = evaluate(run_dir, max_batches=eval_batches)
    result = dict(
        record,
        train_seconds=round(train_s, 1),
        hardware=hardware(cfg.train.device),
        eval=ev,
        perplexity={name: s["perplexity"] for name, s in ev["sets"].items()},
        experts=ev.get("experts", {}),
    )
    atomic_write_text(Path(run_dir) / "result.json", json.dumps(result, indent=2))
    return result


TRAIN_SECONDS = "train_seconds.txt"  # in a run dir: training seconds of all its attempts so far (one float)


def _spent_seconds(path: Path) -> float:
    """Seconds recorded in a run's ``train_seconds.txt``; 0 when absent or unreadable (a run from before the file
    existed, or one whose earlier attempt was killed before it could write: its time is then not counted)."""
    try:
        return max(0.0, float(path.read_text(encoding="utf-8").strip()))
    except (OSError, ValueError):
        return 0.0


def hardware(device: str) -> dict:
    """What a run trained on (runs of one study may come from several machines): the device and its
    name (the GPU's, else the CPU model's), torch's version and the torch threads used."""
    import platform

    import torch

    dev = torch.device(device)
    if dev.type == "cuda":
        name = torch.cuda.get_device_name(dev)
    else:
        name = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo", encoding="utf-8") as fh:
                name = next((ln.split(":", 1)[1].strip() for ln in fh if ln.startswith("model name")), name)
        except OSError:
            pass
    return dict(device=dev.type, name=name, torch=torch.__version__, threads=torch.get_num_threads())


def _record(r: PlannedRun) -> dict:
    return dict(
        run_id=r.run_id,
        point_id=r.point_id,
        seed=r.seed,
        budget=r.budget,
        variant=r.variant,
        size=r.size,
        steps=r.steps,
        tokens=r.tokens,
        flops_per_step=r.flops_per_step,
        flops=r.steps * r.flops_per_step,
        params_total=r.params_total,
        params_active=r.params_active,
        d_model=r.config.model.d_model,
        n_layers=r.config.model.n_layers,
    )


# how a run was executed, not what it trained: like the thread count, the device changes float rounding only
_RUN_ONLY = {("train", "threads"), ("train", "progress"), ("train", "device")}


def config_differences(stored: dict, planned: dict, prefix: tuple = ()) -> list[str]:
    """Dotted keys whose values differ between a finished run's config and the planned one. Keys only
    one side has are ignored (a later version may add fields), and so are the execution settings."""
    out = []
    for key in sorted(set(stored) & set(planned)):
        path = (*prefix, key)
        a, b = stored[key], planned[key]
        if path in _RUN_ONLY:
            continue
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_differences(a, b, path)
        elif a != b:
            out.append(".".join(path))
    return out


def exit_reason(code: int) -> str:
    """What a worker's exit code says beyond its number: a run killed by a signal nobody sent it from
    here (SIGKILL is, on Linux, usually the out-of-memory killer) resumes from its last checkpoint."""
    if code >= 0:
        return ""
    try:
        name = signal.Signals(-code).name
    except ValueError:
        name = f"signal {-code}"
    oom = ", on Linux usually the out-of-memory killer: see `dmesg`" if -code == signal.SIGKILL else ""
    return f" (killed by {name}{oom}; the same command resumes it from its last checkpoint)"


def _launch(r: PlannedRun, spec: SweepSpec, threads: int, log, workers: Workers | None = None) -> dict | None:
    out = Path(r.config.train.out_dir)
    done = out / "result.json"
    job = out / "sweep_job.json"
    cfg = config_to_dict(r.config)
    if done.is_file():  # sweeps may share runs: only one trained with this very config counts
        stored = json.loads(job.read_text()).get("config", {}) if job.is_file() else {}
        diff = config_differences(stored, cfg)
        if diff:
            log(
                f"[FAIL] {r.run_id}: {out} holds a run trained with another config ({', '.join(diff[:5])}); "
                "not reused, not overwritten"
            )
            return None
        log(f"[skip] {r.run_id}: done")
        return json.loads(done.read_text())
    workers = workers or Workers()
    if workers.stopped:
        return None  # the sweep was stopped: no new run starts (nor its folder)
    cfg["train"]["threads"] = threads
    cfg["train"]["progress"] = False
    if spec.device:
        cfg["train"]["device"] = spec.device
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(job, json.dumps(dict(config=cfg, eval_batches=spec.eval_batches, record=_record(r))))
    log(f"[run ] {r.run_id}: {r.steps} steps, {r.tokens:,} tokens, {r.params_active:,} active params")
    t0 = time.time()
    with open(out / "sweep.log", "a") as fh:
        code = workers.run([sys.executable, "-m", "peer.experiments.sweep.worker", str(job)], fh)
    if code is None:
        return None
    if code != 0 or not done.is_file():
        stopped = " (stopped by a signal: its checkpoint resumes it)" if workers.stopped else exit_reason(code)
        log(f"[{'stop' if workers.stopped else 'FAIL'}] {r.run_id}: exit {code}{stopped}; see {out / 'sweep.log'}")
        return None
    log(f"[done] {r.run_id} in {time.time() - t0:.0f}s")
    return json.loads(done.read_text())


def run_sweep(spec: SweepSpec, only: list[str] | None = None, dry_run: bool = False, log=None) -> list[dict]:
    """Plan, run what is not done (``parallel`` at a time), then write the results tables. Raises
    :class:`RunsFailed` (after the tables) when some runs failed. ``log`` defaults to a flushing
    print, so a sweep's progress lines reach a pipe (``| tee``, ``| grep``) as each run starts and ends."""
    log = log or functools.partial(print, flush=True)
    runs = plan(spec)
    if only:  # runs start in the order of the selectors they match first (a priority list), else in plan order
        rank = {id(r): min((i for i, sel in enumerate(only) if sel in r.run_id), default=-1) for r in runs}
        runs = sorted((r for r in runs if rank[id(r)] >= 0), key=lambda r: rank[id(r)])
    todo = [r for r in runs if not r.skipped]
    for r in runs:
        if r.skipped:
            log(f"[skip] {r.run_id}: {r.skipped}")
    if dry_run:
        return []
    if spec.device:
        from ...train.loop import check_device

        check_device(spec.device)  # one clear line before any run starts
    with FolderLock(spec.root, "sweep folder"):  # a second `peer sweep` on this root fails at once, naming the pid
        return _run_locked(spec, todo, log)


def _run_locked(spec: SweepSpec, todo: list[PlannedRun], log) -> list[dict]:
    for corpus, vocab in sorted({(r.config.data.corpus, r.config.model.vocab_size) for r in todo}):
        _ensure_corpus(corpus, vocab, log)
    threads = run_threads(spec, os.cpu_count() or 1)
    workers = Workers()
    with workers.forwarding(), ThreadPoolExecutor(max_workers=spec.parallel) as pool:
        outcomes = list(pool.map(lambda r: _launch(r, spec, threads, log, workers), todo))
    results = collect(spec)
    write_tables(spec, results)
    unfinished = [r.run_id for r, o in zip(todo, outcomes, strict=True) if o is None]
    if workers.stopped:
        raise Interrupted(
            f"stopped by {signal.Signals(workers.stopped).name}: {len(unfinished)} run(s) not finished "
            "(those in flight saved a checkpoint); the same command resumes them",
            workers.stopped,
        )
    if unfinished:
        raise RunsFailed(unfinished, results)
    return results


def run_threads(spec: SweepSpec, cores: int) -> int:
    """Torch threads per run: the sweep's ``threads``, else the cores split over the parallel runs."""
    return spec.threads or max(1, cores // spec.parallel)


def _ensure_corpus(corpus: str, vocab_size: int, log) -> None:
    """Build the starter corpus at ``corpus`` with this vocabulary when nothing usable is there: a
    folder that already holds a train split is used as it is (a user's corpus is never rebuilt)."""
    from ...data import corpus_is_complete, list_splits, prepare

    if corpus_is_complete(corpus) or "train" in list_splits(corpus):
        return
    log(f"[data] preparing {corpus} (vocab {vocab_size})")
    prepare(out=corpus, vocab_size=vocab_size)


def collect(spec: SweepSpec) -> list[dict]:
    """Every finished run of this sweep (sweeps may share a root and reuse each other's runs).

    Runs of a seeded sweep live in ``<point>/seed<S>/``; a sweep without ``seeds`` reads the plain
    ``<point>/`` layout. Results written before seeds existed count as seed 0 of their point."""
    wanted = {
        run_id(b, v, s, seed, spec.seeded)
        for b in spec.budgets
        for v in spec.variants
        for s in spec.sizes
        for seed in spec.seeds
    }
    out = []
    for p in sorted([*spec.root.glob("*/*/*/result.json"), *spec.root.glob("*/*/*/seed*/result.json")]):
        r = json.loads(p.read_text())
        if r.get("run_id") in wanted:
            r.setdefault("seed", 0)
            r.setdefault("point_id", r["run_id"].rsplit("/seed", 1)[0] if spec.seeded else r["run_id"])
            out.append(r)
    return out


def write_tables(spec: SweepSpec, results: list[dict]) -> None:
    """``<name>_results.json`` (everything) and ``<name>_results.csv`` (one row per run, one column per eval set)."""
    root = spec.root
    atomic_write_text(root / f"{spec.name}_results.json", json.dumps(results, indent=2))
    sets = sorted({s for r in results for s in r.get("perplexity", {})})
    cols = [
        "run_id",
        "seed",
        "budget",
        "variant",
        "size",
        "d_model",
        "n_layers",
        "params_total",
        "params_active",
        "steps",
        "tokens",
        "flops",
        "train_seconds",
    ]
    tmp = root / f"{spec.name}_results.csv.tmp"
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(cols + [f"ppl_{s}" for s in sets] + ["usage", "unevenness"])
        for r in results:
            ex = next(iter(r.get("experts", {}).values()), {}) if r.get("experts") else {}
            w.writerow(
                [r.get(c, "") for c in cols]
                + [f"{r['perplexity'].get(s, float('nan')):.4f}" for s in sets]
                + [ex.get("usage", ""), ex.get("unevenness", "")]
            )
    os.replace(tmp, root / f"{spec.name}_results.csv")
