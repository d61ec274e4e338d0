"""Adding a layer is one class and one registry line: a throwaway mixing layer and a throwaway
coupling, registered at run time, reach the CLI, the presets and sweeps, the report, the bench and
the asv grids without any other file being edited."""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor, nn

import mefbench.layers as L
from mefbench.cli import main

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


class DiagonalConv(L.Conv1x1):
    """y_c = e^{s_c} x_c per pixel; log|det| = H·W·Σ s (a throwaway layer for this test)."""

    info = L.LayerInfo(family="per-pixel", reference="this test", cost=L.Cost("O(C·n)", "O(C)", "O(C·n)"))

    def __init__(self, channels: int, *, size: tuple[int, int] | None = None, init: float = 0.0) -> None:
        super().__init__(channels, size=size)
        self.s = nn.Parameter(torch.full((channels,), float(init)))

    def weight(self) -> Tensor:
        return torch.diag(self.s.exp())

    def inverse_weight(self) -> Tensor:
        return torch.diag((-self.s).exp())

    def pixel_logdet(self) -> Tensor:
        return self.s.sum()


class TanhAffineCoupling(L.Coupling):
    """y2 = e^{tanh(o)} ⊙ x2 + t; log|det| = Σ tanh(o) (a throwaway coupling for this test)."""

    info = L.LayerInfo(family="coupling", reference="this test", cost=L.Cost("net + O(c·n)", "O(c·n)", "net + O(c·n)"))

    def num_params(self, c: int) -> int:
        return 2 * c

    def transform(self, x2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        t, o = h.chunk(2, dim=1)
        s = torch.tanh(o)
        return x2 * s.exp() + t, s.sum(dim=(1, 2, 3))

    def inverse_transform(self, y2: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        t, o = h.chunk(2, dim=1)
        s = torch.tanh(o)
        return (y2 - t) * (-s).exp(), -s.sum(dim=(1, 2, 3))


@pytest.fixture
def registered():
    """The two layers in the registries for one test, removed afterwards."""
    L.MIXING["tmpdiag"] = DiagonalConv
    L.COUPLING["tmptanh"] = TanhAffineCoupling
    try:
        yield
    finally:
        del L.MIXING["tmpdiag"], L.COUPLING["tmptanh"]


def test_a_registered_layer_reaches_everything(registered, tmp_path, capsys, monkeypatch):
    from mefbench.bench import Setting, run_bench
    from mefbench.presets import PRESETS
    from mefbench.report import write_report
    from mefbench.sweep import plan

    # the layer zoo listing and the 1×1 view
    assert main(["layers"]) == 0
    listing = capsys.readouterr().out
    assert "tmpdiag" in listing and "tmptanh" in listing and "options: init" in listing
    assert "tmpdiag" in L.CONV1X1

    # the CLI trains with either (and with a layer option)
    runs = tmp_path / "runs"
    assert main(["train", "--preset", "smoke", "--mixing", "tmpdiag", "--mixing-option", "init=0.1",
                 "--out", str(runs / "mixing"), "--no-progress"]) == 0  # fmt: skip
    assert (
        main(["train", "--preset", "smoke", "--coupling", "tmptanh", "--out", str(runs / "coupling"), "--no-progress"])
        == 0
    )
    record = json.loads((runs / "mixing" / "record.json").read_text())
    assert record["model"]["mixing"] == "tmpdiag" and record["model"]["mixing_options"] == {"init": 0.1}

    # the zoo tables' presets and sweeps plan runs for them
    assert "smoke-mix-tmpdiag" in PRESETS and "cpu-stress-tmptanh-lr0.01" in PRESETS
    planned = {s.name for s in plan(("mixing", "stress"), "cpu", seeds=1)}
    assert "cpu-mix-tmpdiag-seed0" in planned and "cpu-stress-tmptanh-lr0.1-seed0" in planned
    # its stress row is parameter-matched to the grid's matrix-exp model, like every other coupling's
    assert (
        PRESETS["cpu-stress-tmptanh-lr0.01"].model.hidden_channels
        != PRESETS["cpu-stress-matexp-lr0.01"].model.hidden_channels
    )

    # a run of its preset gets its row in the report
    assert main(["train", "--preset", "smoke-mix-tmpdiag", "--out", str(runs / "mix"), "--no-progress"]) == 0
    text = write_report(runs, tmp_path / "report", samples=False).read_text()
    mixing = text[text.index("## Every mixing layer") :]
    assert "| tmpdiag | default | per-pixel | " in mixing and "| 1 | 1 | 0 | 0 | 1/1 |" in mixing

    # the bench has a row for each (its timings are tested in test_bench.py), the asv grids include them
    monkeypatch.setattr(Setting, "times", lambda self, fns, repeats: {k: [1e-3] * repeats for k in fns})
    rows = run_bench(quick=True, threads=1, only=("layers", "couplings"))
    assert any("tmpdiag" in r.what for r in rows) and any("tmptanh" in r.what for r in rows)
    mixing_asv = importlib.reload(importlib.import_module("benchmarks.mixing"))
    coupling_asv = importlib.reload(importlib.import_module("benchmarks.coupling"))
    model_asv = importlib.reload(importlib.import_module("benchmarks.model"))
    assert "tmpdiag" in mixing_asv.MixingLayer.params[0] and "tmptanh" in coupling_asv.CouplingLayer.params[0]
    assert any("tmpdiag" in p for p in model_asv.TrainStep.params[0])


def test_the_contract_tests_pick_a_registered_layer_up(registered):
    """What test_contract.py runs for every entry, here for the throwaway ones."""
    contract = importlib.import_module("test_contract")
    cases = [c for c in contract._cases() if c[1] in ("tmpdiag", "tmptanh")]
    assert {c[1] for c in cases} == {"tmpdiag", "tmptanh"}
    for case in cases:
        contract.test_metadata(case)
        contract.test_options_are_typed(case)
        contract.test_round_trip_float64(case)
        contract.test_logdet_matches_autograd_jacobian(case)
        contract.test_empty_batch(case)
        contract.test_bad_input_is_a_clear_error(case)
        if case[0] == "coupling":
            contract.test_coupling_starts_as_the_identity(case)


def teardown_module() -> None:
    for name in ("benchmarks.mixing", "benchmarks.coupling", "benchmarks.model"):
        if name in sys.modules:  # back to the registries without the throwaway layers
            importlib.reload(sys.modules[name])
