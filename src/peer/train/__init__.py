"""Training: the loop (``train``), loading trained runs (``load_run``), optimizer groups, schedule, checkpoints."""

from .checkpoint import CheckpointError
from .loop import TrainingDiverged, load_run, resolve_steps, train, train_or_resume

__all__ = ["train", "train_or_resume", "load_run", "resolve_steps", "TrainingDiverged", "CheckpointError"]
