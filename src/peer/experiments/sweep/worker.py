"""``python -m peer.experiments.sweep.worker JOB.json``: one sweep run in its own process (train, evaluate, result.json)."""

import json
import sys

from ...train.signals import Interrupted
from .runner import run_one

if __name__ == "__main__":
    job = json.loads(open(sys.argv[1], encoding="utf-8").read())
    try:
        run_one(job["config"], job["eval_batches"], job["record"])
    except Interrupted as e:  # the sweep forwarded SIGINT/SIGTERM: the checkpoint is saved; one line, no traceback
        print(f"peer sweep: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
