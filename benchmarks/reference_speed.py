"""Each layer against its reference code, side by side, over a grid of batch 16, C ∈ {12, 48}, 16×16 and 32×32.

Not an asv benchmark module for the ports (run it as a script); its one asv benchmark,
``SplineVsNflows``, times the spline coupling's transform against nflows' when nflows is installed
(``pip install nflows``) and is skipped otherwise.

    python -m benchmarks.reference_speed                   # batch 16, C ∈ {12, 48}, 16×16 and 32×32
    python -m benchmarks.reference_speed --quick --only convexp,emerging --json out.json

For every layer with a port of its reference code (``mefbench.references.PORTS``) and every shape,
the reference's time over the layer's in forward, forward+backward and inverse (float32, training
mode, the median over repeats of each repeat's ratio, the two timed interleaved, as
``mefbench bench``): above 1 the layer is faster. Ratios, never absolute seconds.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from mefbench.bench import MODES, Setting, reference_ratios
from mefbench.references import PORTS

from ._common import BATCH, set_up_torch

__all__ = ["SHAPES", "SplineVsNflows", "main", "run"]

SHAPES = [(c, hw) for c in (12, 48) for hw in (16, 32)]


def run(names: list[str], quick: bool, threads: int) -> list[dict]:
    """One record per layer and shape: the three ratios."""
    torch.set_num_threads(threads)
    setting = Setting(torch.device("cpu"), quick)
    batch, repeats = (4, 3) if quick else (BATCH, 7)
    shapes = [(12, 8)] if quick else SHAPES
    records = []
    for name in names:
        for c, hw in shapes:
            ratios = reference_ratios(name, c, hw, batch, repeats, setting)
            records.append({"layer": name, "channels": c, "size": hw, "batch": batch, **ratios})
            print(
                f"{name:10} C={c:<3} {hw:>2}×{hw:<2} " + "  ".join(f"{m} {ratios[m]:5.2f}×" for m in MODES), flush=True
            )
    return records


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="one small shape, few repeats (a smoke check)")
    parser.add_argument("--only", help=f"comma-separated layers among {', '.join(PORTS)}")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: stable on a busy machine)")
    parser.add_argument("--json", help="write the records here")
    args = parser.parse_args(argv)
    names = args.only.split(",") if args.only else list(PORTS)
    unknown = sorted(set(names) - set(PORTS))
    if unknown:
        parser.error(f"no reference port for {', '.join(unknown)}; choose among {', '.join(PORTS)}")
    set_up_torch()
    records = run(names, args.quick, args.threads)
    if args.json:
        Path(args.json).write_text(
            json.dumps({"quick": args.quick, "threads": args.threads, "records": records}, indent=2)
        )
    return 0


class SplineVsNflows:
    """The rational-quadratic spline transform, ours against nflows' ``unconstrained_rational_
    quadratic_spline`` on the same unnormalised widths, heights and derivatives: forward+backward
    and inverse at the paper's first level (C=12 at 16×16, so c = 6 transformed channels), K = 8
    bins on [−3, 3], batch 16. Skipped when nflows is not installed."""

    params = [["mefbench", "nflows"]]
    param_names = ["implementation"]

    def setup(self, implementation: str) -> None:
        try:
            from nflows.transforms.splines import rational_quadratic as nflows_rq
        except ImportError:
            raise NotImplementedError("nflows is not installed (pip install nflows)") from None
        from mefbench.layers.spline import rq_spline

        set_up_torch()
        bins, bound = 8, 3.0
        shape = (BATCH, 6, 16, 16)
        self.x = torch.randn(shape).clamp(-2.9, 2.9)
        self.widths = torch.randn(BATCH, bins, *shape[1:], requires_grad=True)
        self.heights = torch.randn(BATCH, bins, *shape[1:], requires_grad=True)
        self.derivatives = torch.randn(BATCH, bins - 1, *shape[1:], requires_grad=True)
        # nflows' inner derivatives are 1e-3 + softplus(raw); ours shift raw by this offset first
        offset = math.log(math.expm1(1 - 1e-3))

        if implementation == "nflows":

            def transform(x: torch.Tensor, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
                d = (self.derivatives + offset).movedim(1, -1)  # nflows sets the two ends itself
                return nflows_rq.unconstrained_rational_quadratic_spline(
                    x,
                    self.widths.movedim(1, -1),
                    self.heights.movedim(1, -1),
                    d,
                    inverse=inverse,
                    tails="linear",
                    tail_bound=bound,
                )

        else:

            def transform(x: torch.Tensor, inverse: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
                return rq_spline(x, self.widths, self.heights, self.derivatives, bound=bound, inverse=inverse)

        self.transform = transform

    def time_forward_backward(self, implementation: str) -> None:
        y, logdet = self.transform(self.x)
        (y.sum() + logdet.sum()).backward()

    def time_inverse(self, implementation: str) -> None:
        with torch.no_grad():
            self.transform(self.x, inverse=True)


if __name__ == "__main__":
    raise SystemExit(main())
