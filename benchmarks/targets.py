"""The performance targets as tracked values: the rows of ``mefbench bench --quick``, 2 threads.

One point per row, named by its bench part and its place in that part (the order ``mefbench bench``
prints). The value is the row's measured figure, in the row's own unit: a speed-up (×), an
overhead (%), a time ratio (×) or a relative error. ``asv publish`` then shows each target's margin
from commit to commit beside the raw timings of the other modules.
"""

from __future__ import annotations

import torch

from mefbench.bench import PARTS, run_bench

__all__ = ["ROWS_PER_PART", "Targets"]

# Rows that --quick prints per part (accuracy: expm, expm_action; action: n = 6, 12, 24;
# coupling: the three levels at hidden 32; model: three step ratios)
ROWS_PER_PART = {"accuracy": 2, "action": 3, "coupling": 3, "model": 3}


class Targets:
    params = [list(PARTS), [0, 1, 2]]
    param_names = ["part", "row"]
    timeout = 900

    def setup(self, part: str, row: int) -> None:
        if row >= ROWS_PER_PART[part]:
            raise NotImplementedError(f"bench part {part!r} has {ROWS_PER_PART[part]} rows")
        torch.set_default_dtype(torch.float32)
        rows = run_bench(quick=True, threads=2, only=(part,))
        if len(rows) != ROWS_PER_PART[part]:
            raise RuntimeError(f"bench part {part!r} printed {len(rows)} rows; ROWS_PER_PART says {ROWS_PER_PART[part]}")
        self.row = rows[row]

    def track_measured(self, part: str, row: int) -> float:
        return float(self.row.measured)

    track_measured.unit = "row's unit (×, %, or relative error)"
