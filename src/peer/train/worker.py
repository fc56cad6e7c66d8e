"""``python -m peer.train.worker JOB.json``: :func:`train_or_resume` of one config in its own process.

``JOB.json`` holds ``{"config": <config dict>}``; the status ("trained", "resumed", "complete")
is written back to it as ``"status"``. ``peer main`` uses this to train its runs side by side.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from ..config import config_from_dict
from ..fsutil import atomic_write_text
from .loop import train_or_resume


def run_job(path: str | Path) -> str:
    path = Path(path)
    job = json.loads(path.read_text(encoding="utf-8"))
    status = train_or_resume(config_from_dict(job["config"]))
    atomic_write_text(path, json.dumps(dict(job, status=status), indent=1))
    return status


if __name__ == "__main__":
    from .signals import Interrupted

    try:
        run_job(sys.argv[1])
    except Interrupted as e:  # the parent forwarded SIGINT/SIGTERM: the checkpoint is saved; one line, no traceback
        print(f"peer train: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
