"""``python -m peer.experiments.sweep.worker JOB.json``: one sweep run in its own process (train, evaluate, result.json)."""

import json
import sys

from .runner import run_one

if __name__ == "__main__":
    job = json.loads(open(sys.argv[1], encoding="utf-8").read())
    run_one(job["config"], job["eval_batches"], job["record"])
