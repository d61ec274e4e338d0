"""The performance targets as tracked values: the rows of ``mefbench bench --quick``, 2 threads.

One point per row, named by its bench part and its place in that part (the order ``mefbench bench``
prints). The value is the row's measured figure, in the row's own unit: a speed-up (×), an
overhead (%), a time ratio (×) or a relative error. ``asv publish`` then shows each target's margin
from commit to commit beside the raw timings of the other modules.
"""

from __future__ import annotations

import torch

from mefbench.bench import DEFAULT_PARTS, row_count, run_bench

__all__ = ["ROWS_PER_PART", "Targets"]

# Rows that --quick prints per part (read from the bench's grids: the layers and couplings parts
# have one row per registry entry and variant); the scaling part has its own module (scaling.py)
ROWS_PER_PART = {part: row_count(part, quick=True) for part in DEFAULT_PARTS}
_MEASURED: dict[str, list] = {}


class Targets:
    params = [list(DEFAULT_PARTS), list(range(max(ROWS_PER_PART.values())))]
    param_names = ["part", "row"]
    timeout = 900

    def setup(self, part: str, row: int) -> None:
        if row >= ROWS_PER_PART[part]:
            raise NotImplementedError(f"bench part {part!r} has {ROWS_PER_PART[part]} rows")
        torch.set_default_dtype(torch.float32)
        if part not in _MEASURED:  # asv forks a process per point; pytest runs them in one
            _MEASURED[part] = run_bench(quick=True, threads=2, only=(part,))
        rows = _MEASURED[part]
        if len(rows) != ROWS_PER_PART[part]:
            raise RuntimeError(
                f"bench part {part!r} printed {len(rows)} rows; ROWS_PER_PART says {ROWS_PER_PART[part]}"
            )
        self.row = rows[row]

    def track_measured(self, part: str, row: int) -> float:
        return float(self.row.measured)

    track_measured.unit = "row's unit (×, %, ms or relative error)"  # type: ignore[attr-defined]  # asv reads the unit from the function
