"""isoFLOP sweeps and ablations (the paper's Fig. 1, Table 1, Fig. 3, Table 2) at any scale."""

from .analysis import compute_optimal, method_ordering, table1_markdown
from .plan import PlannedRun, SweepSpec, load_sweep, plan

__all__ = ["SweepSpec", "PlannedRun", "load_sweep", "plan", "compute_optimal", "method_ordering", "table1_markdown"]
