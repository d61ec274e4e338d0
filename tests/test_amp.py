"""Mixed precision: the coupling nets under torch.autocast (bf16 / fp16), everything else float32.

Runs on the CPU (autocast works there), in float32 (the conftest default is float64, which
autocast leaves alone). Tolerances, with what was measured on 2 CPU cores, torch 2.13:

* bits/dim of a random 2-level model with and without bf16 nets: |Δ| < 1e-4
  (measured ≤ 1.2e-5 over 6 seeds, e.g. 8.172115 vs 8.172116);
* one coupling's round trip under bf16: within 4× its float32 round trip (or 1e-6), i.e. as exact
  as float32: h = net(x1) sees the same x1 in forward and inverse, so the same bf16 h undoes
  itself (measured 1.2e-7 … 5.8e-6, the spline's float32 error being 1.5e-6 … 5e-6);
* the whole model's round trip under bf16: < 1/256, half an 8-bit bin in [−1, 1) (measured
  1.2e-3 … 2.0e-3; float32 alone 4e-6 … 6e-6). Between layers x1 picks up float32 rounding, and
  a bf16 net amplifies that difference to a bf16 rounding step (2⁻⁸ relative) of h, which
  the next layers carry on. A trained model's nets can amplify more: the run record's
  ``final.roundtrip_error`` measures it for every run.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from mefbench.checkpoint import load_checkpoint, load_model
from mefbench.cli import main
from mefbench.config import FlowConfig
from mefbench.layers import COUPLING, net_factory, set_amp
from mefbench.models import MultiScaleFlow
from mefbench.presets import PRESETS
from mefbench.record import read_record
from mefbench.training import train


@pytest.fixture(autouse=True)
def _float32():
    torch.set_default_dtype(torch.float32)  # the conftest fixture restores float64 afterwards


def _perturbed(module: torch.nn.Module, scale: float) -> None:
    """Move every parameter off its init (zero-init output convs make every coupling the identity)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * scale)


def _random_model(seed: int) -> tuple[MultiScaleFlow, torch.Tensor]:
    torch.manual_seed(seed)
    model = MultiScaleFlow(FlowConfig(image_shape=(3, 16, 16), steps=(2, 2), hidden_channels=16, num_blocks=1))
    x = torch.rand(16, 3, 16, 16) * 2 - 1
    model.initialize(x)
    _perturbed(model, 0.02)
    return model.eval(), x


@pytest.mark.parametrize("seed", [0, 1])
@torch.no_grad()
def test_bits_per_dim_agree_with_and_without_bf16(seed):
    model, x = _random_model(seed)
    full = model.bits_per_dim(x)
    model.set_amp("bf16")
    mixed = model.bits_per_dim(x)
    assert full.dtype == mixed.dtype == torch.float32  # the loss stays float32
    assert abs(float(mixed.mean()) - float(full.mean())) < 1e-4
    zs, _, _ = model(x)
    assert (model.inverse(zs) - x).abs().max() < 1 / 256  # half an 8-bit bin
    model.set_amp(None)
    zs, _, _ = model(x)
    assert (model.inverse(zs) - x).abs().max() < 2e-5


@pytest.mark.parametrize("name", list(COUPLING))
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
@torch.no_grad()
def test_every_coupling_round_trip_stays_exact_under_autocast(name, amp):
    torch.manual_seed(0)
    layer = COUPLING.build(name, 12, size=(8, 8), net=net_factory(hidden_channels=16, num_blocks=1))
    x = torch.randn(8, 12, 8, 8)
    layer(x)  # data-dependent init
    _perturbed(layer, 0.05)
    layer.eval()
    errors = {}
    for setting in (None, amp):
        set_amp(layer, setting)
        y, logdet = layer(x)
        x_back, inv_logdet = layer.inverse(y)
        assert y.dtype == logdet.dtype == x_back.dtype == torch.float32, setting
        errors[setting] = float((x_back - x).abs().max())
        assert torch.allclose(logdet, -inv_logdet, atol=1e-4 * max(1.0, float(logdet.abs().max())))
    assert errors[amp] <= max(4 * errors[None], 1e-6), errors


@pytest.mark.slow
def test_training_with_bf16_records_amp_and_loads_with_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", "--preset", "smoke", "--amp", "bf16", "--out", str(run), "--no-progress"]) == 0
    record = read_record(run)
    assert record.status == "finished" and record.train["amp"] == "bf16"
    assert record.tables == []  # another precision does not fill the preset's cells
    assert record.final.test_bpd < 8 and record.final.roundtrip_error < 1 / 256
    model = load_model(run)  # in the run's precision
    assert {m.amp_dtype for m in model.modules() if hasattr(m, "amp_dtype")} == {torch.bfloat16}
    assert "run: finished" in capsys.readouterr().out


@pytest.mark.slow
def test_fp16_uses_a_grad_scaler_and_resumes_it(tmp_path):
    model_cfg, cfg = PRESETS["smoke"].configs()
    cfg = dataclasses.replace(cfg, amp="fp16", epochs=2, max_train_batches=2, max_test=32)
    part = train(model_cfg, cfg, tmp_path / "run", progress=False, stop_after_epochs=1)
    assert part.status == "interrupted"
    scaler = load_checkpoint(tmp_path / "run" / "checkpoint.pt")["scaler"]
    assert scaler is not None and scaler["scale"] > 0
    assert train(model_cfg, cfg, tmp_path / "run", resume=True, progress=False).status == "finished"


@pytest.mark.slow
def test_channels_last_trains_to_the_same_numbers(tmp_path):
    model_cfg, cfg = PRESETS["smoke"].configs()
    a = train(model_cfg, cfg, tmp_path / "a", progress=False)
    b = train(model_cfg, dataclasses.replace(cfg, channels_last=True), tmp_path / "b", progress=False)
    assert json.loads(b.to_json())["train"]["channels_last"] is True
    # another memory layout sums in another order: equal up to float32 rounding, not bit for bit
    assert b.final.test_bpd == pytest.approx(a.final.test_bpd, abs=1e-3)
