"""Named experiments: the paper's exact settings, CPU-scale versions of them and the zoo tables.

Every preset holds the model config (``.model``) and the training settings (``.train``) that
``mefbench train --preset NAME`` runs, the report tables it feeds (``.tables``, table ids as in
:data:`mefbench.report.tables.TABLES`), the cell it fills there (``.cell``) and its scale.

Scales:
  paper: the paper's protocol (docs/design.md §3, §4) on CIFAR-10 / ImageNet; needs a GPU and the data.
  cpu:   the same experiments on 16×16 ``patches16`` with a small net; minutes each on 2 cores.
  smoke: the same experiments on ``patches16`` with a tiny net; seconds each.

The grids are defined once here (:data:`TABLE4_COUPLINGS`, :data:`TABLE4_LRS`,
:data:`TABLE5_MIXING`, :data:`STABILITY_LRS`); the zoo tables ("mixing", "stability") list every
entry of the layer registries and each class's variants (:func:`mefbench.layers.layer_variants`),
read when the presets are looked up, so a layer registered at run time gets its presets too.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from .config import FlowConfig, TrainConfig

__all__ = [
    "CPU_MEF",
    "GLOW_LIKE",
    "LEVELS",
    "PAPER_MEF",
    "PAPER_MIXING_OPTIONS",
    "PRESETS",
    "REFERENCE_MIXING",
    "SCALES",
    "STABILITY_LRS",
    "TABLE4_COUPLINGS",
    "TABLE4_LRS",
    "TABLE5_MIXING",
    "Preset",
    "get_preset",
    "variant_label",
]

SCALES = ("smoke", "cpu", "paper")

# The paper's grids, typed once.
TABLE4_COUPLINGS = ("affine", "matexp")  # Table 4 rows; matrix-exp 1×1 conv in all
TABLE4_LRS = (0.001, 0.01)  # lr 1e-3 trains 4× longer (200 vs 50 epochs)
TABLE5_MIXING = ("standard", "plu", "matexp")  # Table 5 rows (1×1 convs); matrix-exp coupling, lr 0.01
# The baselines the benchmarks measure against: Glow's 1×1 conv, and a Glow-like step.
REFERENCE_MIXING = "standard"
GLOW_LIKE: dict[str, Any] = {"mixing": "standard", "coupling": "affine"}
# The official code's forms of the paper's layers (the defaults are Glow's where they differ).
PAPER_MIXING_OPTIONS: dict[str, dict] = {"plu": {"diagonal": "free"}}
# The stability benchmark (Table 4 generalised): every coupling and variant × these rates.
STABILITY_LRS = (0.001, 0.003, 0.01, 0.03, 0.1)
# The MEF presets that other modules build on: the paper's CIFAR-10 model (Tables 2, 3 and 6, the
# GPU device check) and its CPU-scale version (the bench, the asv suite, the report).
PAPER_MEF = "paper-t2-mef-cifar10"
CPU_MEF = "cpu-t2-mef"
# The paper's three levels of a CIFAR-10 model: (channels, H, W) after each squeeze; layer
# benchmarks run at these shapes.
LEVELS = ((12, 16, 16), (24, 8, 8), (48, 4, 4))


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: FlowConfig
    train: TrainConfig
    tables: tuple[str, ...]
    scale: str
    cell: dict = dataclasses.field(default_factory=dict)  # the table cell it fills, e.g. {"coupling": "affine"}

    def configs(self) -> tuple[FlowConfig, TrainConfig]:
        """Fresh copies of the model and training configs (safe to modify)."""
        model = dataclasses.replace(
            self.model,
            mixing_options=dict(self.model.mixing_options),
            coupling_options=dict(self.model.coupling_options),
            net_options=dict(self.model.net_options),
        )
        return model, dataclasses.replace(self.train)


def variant_label(name: str, label: str) -> str:
    """How tables, benchmarks and bench rows name a layer's variant: "name", or "name (label)"."""
    return name if label == "default" else f"{name} ({label})"


def _slug(name: str, label: str) -> str:
    return name if label == "default" else f"{name}-{label}"


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
_SMALL: dict[str, dict[str, dict[str, Any]]] = {
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

# The stability grid's own CPU scale: small enough that every coupling × variant × 5 rates × 5
# seeds fits in about an hour on 2 cores; no warm-up, so that the rate itself is what is tested.
_STABILITY: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": dict(
        model=dict(image_shape=(3, 16, 16), steps=(2, 1), hidden_channels=16, num_blocks=1),
        train=dict(
            dataset="patches16", epochs=2, batch_size=32, warmup_epochs=0.0, decay_epochs=(),
            ema_decay=0.9, init_batch=128, max_train_batches=50, max_test=256,
        ),
    ),
    "smoke": dict(
        model=dict(image_shape=(3, 16, 16), steps=(1, 1), hidden_channels=8, num_blocks=1),
        train=dict(
            dataset="patches16", epochs=1, batch_size=16, warmup_epochs=0.0, decay_epochs=(),
            ema_decay=0.8, init_batch=32, max_train_batches=4, max_test=32,
        ),
    ),
}  # fmt: skip


def _small(scale: str, model: dict, train: dict, base: dict = _SMALL) -> tuple[FlowConfig, TrainConfig]:
    spec = base[scale]
    return FlowConfig(**{**spec["model"], **model}), TrainConfig(**{**spec["train"], **train})


def _paper_tables(add) -> None:
    # Table 2 (density) and Table 6 (series length): MEF at the paper's settings.
    for dataset in ("cifar10", "imagenet32", "imagenet64"):
        add(f"paper-t2-mef-{dataset}", f"MEF on {dataset}, the paper's Table 2 settings",
            _paper_model(dataset), _paper_train(dataset), ("2", "6"), "paper", {"dataset": dataset})  # fmt: skip
    for scale in ("cpu", "smoke"):
        model, train = _small(scale, {}, {})
        add(f"{scale}-t2-mef", f"MEF on patches16 ({scale} scale of Table 2)", model, train, ("2", "6"), scale,
            {"dataset": "patches16"})  # fmt: skip

    # Table 4: coupling × learning rate, matrix-exp 1×1 conv in all. lr 1e-3 trains 4× longer; the
    # official settings decay at epoch 40 of 50, and never in the 200 epochs at lr 1e-3
    # (step_size 300), which the cpu scales mirror.
    for coupling in TABLE4_COUPLINGS:
        for lr in TABLE4_LRS:
            cell = {"coupling": coupling, "lr": lr}
            long = lr == min(TABLE4_LRS)
            hidden = 132 if coupling == "affine" else 128  # the paper matches MEF's 37.7M parameters
            epochs = 200 if long else 50
            add(f"paper-t4-{coupling}-lr{lr}", f"Table 4: {coupling} coupling, lr {lr}, {epochs} epochs on CIFAR-10",
                _paper_model("cifar10", coupling=coupling, hidden_channels=hidden),
                _paper_train("cifar10", lr=lr, epochs=epochs, decay_epochs=() if long else (40,)),
                ("4",), "paper", cell)  # fmt: skip
            for scale in ("cpu", "smoke"):
                base_epochs = _SMALL[scale]["train"]["epochs"]
                epochs = base_epochs * 4 if long else base_epochs
                decay = _SMALL[scale]["train"]["decay_epochs"] if not long else ()
                model, train = _small(
                    scale, {"coupling": coupling}, {"lr": lr, "epochs": epochs, "decay_epochs": decay}
                )
                add(f"{scale}-t4-{coupling}-lr{lr}", f"Table 4 at {scale} scale: {coupling} coupling, lr {lr}",
                    model, train, ("4",), scale, cell)  # fmt: skip

    # Table 5: the paper's three 1×1 convolutions, matrix-exp coupling, lr 0.01.
    for mixing in TABLE5_MIXING:
        options = PAPER_MIXING_OPTIONS.get(mixing, {})
        add(f"paper-t5-{mixing}", f"Table 5: {mixing} 1×1 conv with matrix-exp coupling on CIFAR-10",
            _paper_model("cifar10", mixing=mixing, mixing_options=options), _paper_train("cifar10"), ("5",), "paper",
            {"mixing": mixing})  # fmt: skip
        for scale in ("cpu", "smoke"):
            model, train = _small(scale, {"mixing": mixing, "mixing_options": options}, {})
            add(f"{scale}-t5-{mixing}", f"Table 5 at {scale} scale: {mixing} 1×1 conv", model, train, ("5",), scale,
                {"mixing": mixing})  # fmt: skip


def _zoo_tables(add) -> None:
    from .layers import COUPLING, MIXING, registry_variants

    # "mixing": every mixing layer and variant in Table 5's setting (matrix-exp coupling, lr 0.01).
    # The paper's three 1×1 convs in their official form share their runs with Table 5.
    for mixing, label, options in registry_variants(MIXING):
        cell: dict[str, object] = {"mixing": mixing, "variant": label}
        name = _slug(mixing, label)
        add(f"paper-mix-{name}", f"every mixing layer: {name} with matrix-exp coupling on CIFAR-10",
            _paper_model("cifar10", mixing=mixing, mixing_options=options), _paper_train("cifar10"), ("mixing",),
            "paper", cell)  # fmt: skip
        for scale in ("cpu", "smoke"):
            model, train = _small(scale, {"mixing": mixing, "mixing_options": options}, {})
            add(f"{scale}-mix-{name}", f"every mixing layer at {scale} scale: {name}", model, train, ("mixing",),
                scale, cell)  # fmt: skip

    # "stability": every coupling and variant × STABILITY_LRS, matrix-exp 1×1 conv. At paper scale
    # the recipe is Table 4's at 50 epochs, so its lr 0.01 cells are Table 4's runs.
    for coupling, label, options in registry_variants(COUPLING):
        name = _slug(coupling, label)
        for lr in STABILITY_LRS:
            cell = {"coupling": coupling, "variant": label, "lr": lr}
            smoke = lr in (min(STABILITY_LRS), max(STABILITY_LRS))  # smoke scale: the grid's two ends
            hidden = 132 if coupling == "affine" else 128
            add(f"paper-stab-{name}-lr{lr}", f"stability: {name} coupling at lr {lr} on CIFAR-10",
                _paper_model("cifar10", coupling=coupling, coupling_options=options, hidden_channels=hidden),
                _paper_train("cifar10", lr=lr), ("stability",), "paper", cell)  # fmt: skip
            for scale in ("cpu", "smoke") if smoke else ("cpu",):
                model, train = _small(
                    scale, {"coupling": coupling, "coupling_options": options}, {"lr": lr}, _STABILITY
                )
                add(f"{scale}-stab-{name}-lr{lr}", f"stability at {scale} scale: {name} coupling at lr {lr}",
                    model, train, ("stability",), scale, cell)  # fmt: skip


def _build() -> dict[str, Preset]:
    presets: dict[str, Preset] = {}

    def add(name, description, model, train, tables, scale, cell=None) -> None:
        if name in presets:
            raise ValueError(f"two presets are named {name!r}: layer or variant names must make preset names unique")
        presets[name] = Preset(name, description, model, train, tuple(tables), scale, dict(cell or {}))

    _paper_tables(add)
    _zoo_tables(add)
    # The quickest run of all, for a first try and for CI.
    model, train = _small("smoke", {}, {"epochs": 1, "max_train_batches": 4, "max_test": 64})
    add("smoke", "a few seconds: tiny MEF on patches16, one short epoch", model, train, (), "smoke")
    return presets


class _Presets(Mapping):
    """Name -> :class:`Preset`, rebuilt whenever the layer registries change (a layer registered
    at run time gets its zoo presets), otherwise built once."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._presets: dict[str, Preset] = {}

    def _current(self) -> dict[str, Preset]:
        from .layers import COUPLING, MIXING

        key = (tuple(MIXING.items()), tuple(COUPLING.items()))
        if key != self._key:
            self._presets, self._key = _build(), key
        return self._presets

    def __getitem__(self, name: str) -> Preset:
        return self._current()[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._current())

    def __len__(self) -> int:
        return len(self._current())


PRESETS: Mapping[str, Preset] = _Presets()


def get_preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; `mefbench presets` lists them: {', '.join(sorted(PRESETS))}")
    return PRESETS[name]
