"""The whole flow: a training step, its peak memory, a short training's bits/dim, parameter counts.

TrainStep uses the CPU-scale MEF model (``PRESETS[CPU_MEF].model``, the preset ``cpu-t2-mef``:
3×16×16, levels of 4 and 2 steps, hidden 32, 1 block) with every mixing layer of the zoo beside
the paper's coupling and every coupling beside the paper's 1×1 conv, plus the Glow-like pair,
batch 16 of ``patches16`` images, Adamax at lr 0.01 (the paper's optimiser), one thread, float32.

Peak memory (``peakmem_``) is the process's maximum RSS over the benchmark's setup and one call,
torch and the benchmark modules included: subtract ``Reference.peakmem_torch_only`` (a benchmark
that does nothing) to get what the step adds. Here that is about 220 MB for a model of 0.3M
parameters: mostly torch's own first-use allocations (convolution kernels, the autograd engine),
which a process's peak RSS cannot separate from the model's activations. The benchmark guards
against changes that blow memory up (e.g. forming e^S for every pixel), not against a few MB.
"""

from __future__ import annotations

import dataclasses

import torch

from mefbench.data import dequantize, load_dataset
from mefbench.layers import COUPLING, MIXING, registry_variants
from mefbench.models import MultiScaleFlow, count_parameters
from mefbench.presets import CPU_MEF, GLOW_LIKE, PRESETS, variant_label
from mefbench.report.tables import paper_count_presets
from mefbench.training import evaluate, train_step

from ._common import BATCH, set_up_torch

__all__ = ["ParameterCount", "Reference", "ShortTraining", "TrainStep", "short_training_bpd"]

_MEF = PRESETS[CPU_MEF].model


def _pairs() -> dict[str, dict]:
    """ "conv (variant) + coupling (variant)" -> model changes: every mixing layer with MEF's coupling,
    every coupling with MEF's conv, and the Glow-like pair."""
    pairs = {}
    for mixing, label, options in registry_variants(MIXING):
        pairs[f"{variant_label(mixing, label)} + {_MEF.coupling}"] = {"mixing": mixing, "mixing_options": options}
    for coupling, label, options in registry_variants(COUPLING):
        pairs[f"{_MEF.mixing} + {variant_label(coupling, label)}"] = {"coupling": coupling, "coupling_options": options}
    pairs[f"{GLOW_LIKE['mixing']} + {GLOW_LIKE['coupling']} (Glow-like)"] = dict(GLOW_LIKE)
    return pairs


PAIRS = _pairs()
PAPER_PRESETS = [name for _, name in paper_count_presets()] + ["paper-t2-mef-imagenet64"]


def _batch(size: int, seed: int = 0) -> torch.Tensor:
    """The first ``size`` patches16 test images, dequantised (the test split is the smaller one to
    load, so that loading adds little to peakmem_)."""
    images = load_dataset("patches16", "test")[:size]
    return dequantize(images, generator=torch.Generator().manual_seed(seed))


class TrainStep:
    """One Adamax step (forward, backward, update) of the CPU-scale model, batch 16."""

    params = [list(PAIRS)]
    param_names = ["pair"]
    timeout = 300.0

    def setup(self, pair: str) -> None:
        set_up_torch()
        config = dataclasses.replace(_MEF, **PAIRS[pair])
        self.model = MultiScaleFlow(config)
        self.x = _batch(BATCH)
        self.model.initialize(self.x)
        self.optimizer = torch.optim.Adamax(self.model.parameters(), lr=0.01)

    def time_train_step(self, pair: str) -> None:
        train_step(self.model, self.optimizer, self.x)

    def peakmem_train_step(self, pair: str) -> None:
        train_step(self.model, self.optimizer, self.x)


class Reference:
    """Nothing but the imports (torch, mefbench): the baseline of the peakmem_ benchmarks."""

    def peakmem_torch_only(self) -> None:
        pass


def short_training_bpd(steps: int = 20, seed: int = 0, test_images: int = 128, preset: str = "smoke") -> float:
    """Test bits/dim on the first ``test_images`` patches16 test images after ``steps`` Adamax steps.

    The preset's model and batch size, lr 0.01, data-dependent init on its init batch, fixed seed:
    the number is reproducible on one machine and tracks the quality of the whole pipeline.
    """
    set_up_torch(seed)
    model_config, train_config = PRESETS[preset].configs()
    train_images = load_dataset("patches16", "train")
    test = load_dataset("patches16", "test")[:test_images]
    g = torch.Generator().manual_seed(seed)
    model = MultiScaleFlow(model_config)
    init_idx = torch.randperm(len(train_images), generator=g)[: train_config.init_batch]
    model.initialize(dequantize(train_images[init_idx], generator=g))
    optimizer = torch.optim.Adamax(model.parameters(), lr=0.01)
    for _ in range(steps):
        idx = torch.randint(0, len(train_images), (train_config.batch_size,), generator=g)
        train_step(model, optimizer, dequantize(train_images[idx], generator=g))
    return evaluate(model, test, seed=seed)


class ShortTraining:
    """Quality: test bits/dim of the smoke-sized MEF after 20 steps (seed 0, 128 test images)."""

    timeout = 300.0

    def track_bits_per_dim(self) -> float:
        return short_training_bpd()

    track_bits_per_dim.unit = "bits/dim"  # type: ignore[attr-defined]  # asv reads the unit from the function


class ParameterCount:
    """Parameters of the paper's models (37.7M for MEF on CIFAR-10, paper Table 3)."""

    params = [PAPER_PRESETS]
    param_names = ["preset"]
    timeout = 300.0

    def setup(self, preset: str) -> None:
        set_up_torch()

    def track_parameters(self, preset: str) -> int:
        return count_parameters(MultiScaleFlow(PRESETS[preset].model))

    track_parameters.unit = "parameters"  # type: ignore[attr-defined]  # asv reads the unit from the function
