"""Named experiments: the paper's exact settings and CPU-scale versions of the same experiments.

Every preset holds the model config (``.model``) and the training settings (``.train``) that
``mefbench train --preset NAME`` runs, the paper tables it feeds (``.tables``) and its scale.

Scales:
  paper: the paper's protocol (DESIGN.md §3, §4) on CIFAR-10 / ImageNet; needs a GPU and the data.
  cpu:   the same experiments on 16×16 ``patches16`` with a small net; minutes each on 2 cores.
  smoke: the same experiments on ``patches16`` with a tiny net; seconds each.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .models import FlowConfig
from .training import TrainConfig

__all__ = ["PRESETS", "SCALES", "Preset", "get_preset"]

SCALES = ("smoke", "cpu", "paper")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: FlowConfig
    train: TrainConfig
    tables: tuple[int, ...]
    scale: str
    cell: dict = dataclasses.field(default_factory=dict)  # the table cell it fills, e.g. {"coupling": "affine"}

    def configs(self) -> tuple[FlowConfig, TrainConfig]:
        """Fresh copies of the model and training configs (safe to modify)."""
        return dataclasses.replace(self.model), dataclasses.replace(self.train)


def _paper_train(dataset: str, **changes) -> TrainConfig:
    imagenet = dataset.startswith("imagenet")
    base = TrainConfig(
        dataset=dataset,
        epochs=50,
        batch_size=64,
        lr=0.01,
        warmup_epochs=1.0,
        decay_epochs=(20, 40) if imagenet else (40,),
        decay_factor=0.5,
        ema_decay=0.9999 if imagenet else 0.999,
        init_batch=512,
    )
    return dataclasses.replace(base, **changes)


def _paper_model(dataset: str, **changes) -> FlowConfig:
    size = 64 if dataset == "imagenet64" else 32
    base = FlowConfig(
        image_shape=(3, size, size),
        steps=(8, 4, 2),
        hidden_channels=128,
        num_blocks=10 if dataset == "imagenet64" else 8,
    )
    return dataclasses.replace(base, **changes)


# CPU-scale models keep the paper's structure (3 levels would leave 2×2 at 16×16, so 2 levels).
_SMALL = {
    "cpu": dict(
        model=dict(image_shape=(3, 16, 16), steps=(4, 2), hidden_channels=32, num_blocks=1),
        train=dict(
            dataset="patches16", epochs=4, batch_size=64, warmup_epochs=0.5, decay_epochs=(3,),
            ema_decay=0.95, init_batch=256, max_train_batches=30, max_test=512,
        ),
    ),
    "smoke": dict(
        model=dict(image_shape=(3, 16, 16), steps=(2, 1), hidden_channels=8, num_blocks=1),
        train=dict(
            dataset="patches16", epochs=2, batch_size=32, warmup_epochs=0.5, decay_epochs=(),
            ema_decay=0.8, init_batch=64, max_train_batches=6, max_test=128,
        ),
    ),
}  # fmt: skip


def _small(scale: str, model: dict, train: dict) -> tuple[FlowConfig, TrainConfig]:
    spec = _SMALL[scale]
    return FlowConfig(**{**spec["model"], **model}), TrainConfig(**{**spec["train"], **train})


def _build() -> dict[str, Preset]:
    presets: list[Preset] = []

    # Table 2 (density) and Table 6 (series length): MEF at the paper's settings.
    for dataset in ("cifar10", "imagenet32", "imagenet64"):
        presets.append(Preset(
            f"paper-t2-mef-{dataset}", f"MEF on {dataset}, the paper's Table 2 settings",
            _paper_model(dataset), _paper_train(dataset), (2, 6), "paper", {"dataset": dataset},
        ))  # fmt: skip
    for scale in ("cpu", "smoke"):
        model, train = _small(scale, {}, {})
        presets.append(Preset(
            f"{scale}-t2-mef", f"MEF on patches16 ({scale} scale of Table 2)", model, train, (2, 6), scale,
            {"dataset": "patches16"},
        ))  # fmt: skip

    # Table 4: coupling × learning rate, matrix-exp 1×1 conv in all. lr 1e-3 trains 4× longer.
    for coupling in ("affine", "matexp"):
        for lr in (0.001, 0.01):
            cell = {"coupling": coupling, "lr": lr}
            hidden = 132 if coupling == "affine" else 128
            epochs = 200 if lr == 0.001 else 50
            presets.append(Preset(
                f"paper-t4-{coupling}-lr{lr}", f"Table 4: {coupling} coupling, lr {lr}, {epochs} epochs on CIFAR-10",
                _paper_model("cifar10", coupling=coupling, hidden_channels=hidden),
                _paper_train("cifar10", lr=lr, epochs=epochs, decay_epochs=(epochs * 4 // 5,)),
                (4,), "paper", cell,
            ))  # fmt: skip
            for scale in ("cpu", "smoke"):
                base_epochs = _SMALL[scale]["train"]["epochs"]
                epochs = base_epochs * 4 if lr == 0.001 else base_epochs
                decay = (epochs * 3 // 4,) if scale == "cpu" else ()
                model, train = _small(scale, {"coupling": coupling}, {"lr": lr, "epochs": epochs, "decay_epochs": decay})
                presets.append(Preset(
                    f"{scale}-t4-{coupling}-lr{lr}", f"Table 4 at {scale} scale: {coupling} coupling, lr {lr}",
                    model, train, (4,), scale, cell,
                ))  # fmt: skip

    # Table 5: the three 1×1 convolutions, matrix-exp coupling, lr 0.01.
    for conv in ("standard", "plu", "matexp"):
        presets.append(Preset(
            f"paper-t5-{conv}", f"Table 5: {conv} 1×1 conv with matrix-exp coupling on CIFAR-10",
            _paper_model("cifar10", conv=conv), _paper_train("cifar10"), (5,), "paper", {"conv": conv},
        ))  # fmt: skip
        for scale in ("cpu", "smoke"):
            model, train = _small(scale, {"conv": conv}, {})
            presets.append(Preset(
                f"{scale}-t5-{conv}", f"Table 5 at {scale} scale: {conv} 1×1 conv", model, train, (5,), scale,
                {"conv": conv},
            ))  # fmt: skip

    # The quickest run of all, for a first try and for CI.
    model, train = _small("smoke", {}, {"epochs": 1, "max_train_batches": 4, "max_test": 64})
    presets.append(Preset("smoke", "a few seconds: tiny MEF on patches16, one short epoch", model, train, (), "smoke"))
    return {p.name: p for p in presets}


PRESETS: dict[str, Preset] = _build()


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; `mefbench presets` lists them: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
