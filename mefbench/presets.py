"""Named experiments: the paper's exact settings, CPU-scale versions of them and the zoo tables.

Every preset holds the model config (``.model``) and the training settings (``.train``) that
``mefbench train --preset NAME`` runs, the report tables it feeds (``.tables``, table ids as in
:data:`mefbench.report.tables.TABLES`), the cell it fills there (``.cell``) and its scale.

Scales:
  paper: the paper's protocol on CIFAR-10 / ImageNet (L = 3 levels of [8, 4, 2] steps, hidden
         128, 8 blocks, Adamax lr 0.01, batch 64, 50 epochs); needs a GPU and the data.
  cpu:   the same experiments on 16×16 ``patches16`` with small nets, each run of the paper's
         tables trained to a plateau of its validation bits/dim (:mod:`mefbench.plateau`)
         within a step cap; the whole cpu reproduction (340 runs, at most 208,500 steps) is
         sized to run in about 2.5 hours on 2 cores (``mefbench sweep --dry-run`` estimates it).
  smoke: the same experiments on ``patches16`` with tiny nets; seconds each.

Every comparison of couplings is parameter-matched (:mod:`mefbench.matching`): at cpu and smoke
scale the rows' ``hidden_channels`` are chosen so that each model's count is within
:data:`MATCH_TOLERANCE` of the matrix-exp reference's (the reference's own width moves from its
nominal one when that is needed); the paper presets keep the paper's widths (hidden 132 for the
affine model, which the matcher reproduces). A preset's model is built, and so matched, when it
is first read: listing the presets costs nothing.

The grids are defined once here (:data:`TABLE4_COUPLINGS`, :data:`TABLE4_LRS`,
:data:`TABLE5_MIXING`, :data:`STABILITY_COUPLINGS`, :data:`STABILITY_LRS`); the zoo tables
("mixing", "stress") list every entry of the layer registries and each class's ``variants``,
read when the presets are looked up, so a layer registered at run time gets its presets too.
"""

from __future__ import annotations

import dataclasses
import functools
import json
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import FlowConfig, TrainConfig

__all__ = [
    "GLOW_LIKE",
    "LEVELS",
    "MATCH_TOLERANCE",
    "PAPER_MEF",
    "PAPER_MIXING_OPTIONS",
    "PRESETS",
    "REFERENCE_MIXING",
    "SCALES",
    "STABILITY_COUPLINGS",
    "STABILITY_LRS",
    "TABLE4_COUPLINGS",
    "TABLE4_LRS",
    "TABLE5_MIXING",
    "Preset",
    "get_preset",
    "matched_models",
    "variant_label",
]

SCALES = ("smoke", "cpu", "paper")

# The paper's grids, typed once.
TABLE4_COUPLINGS = ("affine", "matexp")  # Table 4 rows; matrix-exp 1×1 conv in all
TABLE4_LRS = (0.001, 0.01)  # lr 1e-3 trains longer (the paper: 200 vs 50 epochs)
TABLE5_MIXING = ("standard", "plu", "matexp")  # Table 5 rows (1×1 convs); matrix-exp coupling, lr 0.01
# The baselines the benchmarks measure against: Glow's 1×1 conv, and a Glow-like step.
REFERENCE_MIXING = "standard"
GLOW_LIKE: dict[str, Any] = {"mixing": "standard", "coupling": "affine"}
# The official code's forms of the paper's layers (the defaults are Glow's where they differ).
PAPER_MIXING_OPTIONS: dict[str, dict] = {"plu": {"diagonal": "free"}}
# The stability benchmark (the paper's Section 6.2 claim): these couplings (name, variant) with
# the paper's recipe at a proxy scale, × these rates × 5 seeds. The "stress" grid runs every
# coupling and variant, short and without warm-up.
STABILITY_COUPLINGS = (("affine", "tanh"), ("affine", "exp"), ("additive", "default"), ("matexp", "default"),
                       ("spline", "default"))  # fmt: skip
STABILITY_LRS = (0.001, 0.003, 0.01, 0.03, 0.1)
# Parameter matching of coupling comparisons: each row's count within this of the reference's.
MATCH_TOLERANCE = {"cpu": 0.01, "smoke": 0.05}
# The MEF presets that other modules build on: the paper's CIFAR-10 model (Tables 2, 3 and 6, the
# GPU device check) and its CPU-scale version (the bench, the asv suite, the report).
PAPER_MEF = "paper-t2-mef-cifar10"
CPU_MEF = "cpu-t2-mef"
# The paper's three levels of a CIFAR-10 model: (channels, H, W) after each squeeze; layer
# benchmarks run at these shapes.
LEVELS = ((12, 16, 16), (24, 8, 8), (48, 4, 4))


@dataclass(frozen=True)
class Preset:
    """One named experiment. ``model`` is built (and parameter-matched) on first access."""

    name: str
    description: str
    make_model: Callable[[], FlowConfig] = dataclasses.field(repr=False, compare=False)
    train: TrainConfig
    tables: tuple[str, ...]
    scale: str
    cell: dict = dataclasses.field(default_factory=dict)  # the table cell it fills, e.g. {"coupling": "affine"}

    @functools.cached_property
    def model(self) -> FlowConfig:
        return self.make_model()

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


# The paper's tables at cpu and smoke scale. The model keeps the paper's structure (3 levels
# would leave 2×2 at 16×16, so 2 levels); its width is the nominal one, moved if Table 4's two
# couplings need it to match (matched_models). An "epoch" is an evaluation period of
# max_train_batches steps; at cpu scale a run trains until `patience` periods in a row bring
# no gain of `min_improvement` bits/dim on the validation photographs, or until `epochs`
# periods (the cap; twice as many at lr 1e-3, as the paper trains that rate longer).
_SMALL: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": dict(
        model=dict(image_shape=(3, 16, 16), steps=(4, 2), hidden_channels=16, num_blocks=1),
        train=dict(
            dataset="patches16", epochs=10, batch_size=64, warmup_epochs=0.5, decay_epochs=(),
            ema_decay=0.95, init_batch=256, max_train_batches=50, max_test=512,
            validate=True, max_validation=512, patience=4, min_improvement=0.01,
        ),
    ),
    "smoke": dict(
        model=dict(image_shape=(3, 16, 16), steps=(2, 1), hidden_channels=8, num_blocks=1),
        train=dict(
            dataset="patches16", epochs=3, batch_size=32, warmup_epochs=0.5, decay_epochs=(),
            ema_decay=0.8, init_batch=64, max_train_batches=6, max_test=128, max_final_test=256,
            validate=True, max_validation=64, patience=2, min_improvement=0.0,
        ),
    ),
}  # fmt: skip

# The stability benchmark's proxy of the paper's recipe: Adamax, a linear warm-up, lr × 0.5 late
# in the run and Polyak (EMA) weights, with the schedule scaled to the run's length as the paper's
# is to its ~39,000 steps (warm-up over the first 2%, the decay at 80%, an EMA horizon of 1/39 of
# the run), parameter-matched couplings, a fixed length (no early stopping: what happens late
# counts), and the validation bits/dim before training and after every period. The model is the
# cpu tables' multi-scale structure at 2 + 1 steps, so that 125 runs of 1,000 steps fit the
# budget; width 32 is the nominal width nearest 16 at which all five couplings match within 1%
# (the spline's head-heavy net leaves few such widths).
_STABILITY: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": dict(
        model=dict(image_shape=(3, 16, 16), steps=(2, 1), hidden_channels=32, num_blocks=1),
        train=dict(
            dataset="patches16", epochs=20, batch_size=32, warmup_epochs=0.4, decay_epochs=(16,),
            ema_decay=0.96, init_batch=256, max_train_batches=50, max_test=256,
            validate=True, max_validation=256,
        ),
    ),
    "smoke": dict(
        model=dict(image_shape=(3, 16, 16), steps=(1, 1), hidden_channels=8, num_blocks=1),
        train=dict(
            dataset="patches16", epochs=2, batch_size=16, warmup_epochs=0.25, decay_epochs=(1,),
            ema_decay=0.8, init_batch=32, max_train_batches=4, max_test=32, max_final_test=256,
            validate=True, max_validation=32,
        ),
    ),
}  # fmt: skip

# The stress grid: every coupling and variant, 100 steps without warm-up at the grid's rates (the
# earlier stability grid, kept as a second, harsher test).
_STRESS: dict[str, dict[str, dict[str, Any]]] = {
    "cpu": dict(
        model=dict(image_shape=(3, 16, 16), steps=(2, 1), hidden_channels=16, num_blocks=1),
        train=dict(
            dataset="patches16", epochs=2, batch_size=32, warmup_epochs=0.0, decay_epochs=(),
            ema_decay=0.9, init_batch=128, max_train_batches=50, max_test=256,
            validate=True, max_validation=256,
        ),
    ),
    "smoke": dict(
        model=dict(image_shape=(3, 16, 16), steps=(1, 1), hidden_channels=8, num_blocks=1),
        train=dict(
            dataset="patches16", epochs=1, batch_size=16, warmup_epochs=0.0, decay_epochs=(),
            ema_decay=0.8, init_batch=32, max_train_batches=4, max_test=32, max_final_test=256,
            validate=True, max_validation=32,
        ),
    ),
}  # fmt: skip


def _small(scale: str, model: dict, train: dict, base: dict = _SMALL) -> tuple[FlowConfig, TrainConfig]:
    spec = base[scale]
    return FlowConfig(**{**spec["model"], **model}), TrainConfig(**{**spec["train"], **train})


@functools.lru_cache(maxsize=64)
def _matched(reference_json: str, rows_json: str, tolerance: float, search: float) -> str:
    from .matching import match_widths

    reference = FlowConfig.from_json(reference_json)
    rows = {name: FlowConfig.from_dict(cfg) for name, cfg in json.loads(rows_json).items()}
    match = match_widths(reference, rows, tolerance=tolerance, search=search)
    out = {name: dataclasses.replace(rows[name], hidden_channels=h).to_dict() for name, h in match.hidden.items()}
    out[""] = dataclasses.replace(reference, hidden_channels=match.reference_hidden).to_dict()
    return json.dumps(out)


def matched_models(
    reference: FlowConfig, rows: dict[str, FlowConfig], tolerance: float, search: float = 0.25
) -> tuple[FlowConfig, dict[str, FlowConfig]]:
    """(the reference, the rows) with the widths :func:`mefbench.matching.match_widths` chooses
    (cached per process)."""
    text = _matched(reference.to_json(), json.dumps({k: v.to_dict() for k, v in rows.items()}), tolerance, search)
    out = {name: FlowConfig.from_dict(cfg) for name, cfg in json.loads(text).items()}
    return out.pop(""), out


def _coupling_model(base: FlowConfig, coupling: str, options: dict) -> FlowConfig:
    return dataclasses.replace(base, coupling=coupling, coupling_options=dict(options))


def _table_base(scale: str) -> FlowConfig:
    """The cpu/smoke model of the paper's tables (MEF), at the width at which Table 4's couplings match."""
    base, _ = _small(scale, {}, {})
    rows = {c: _coupling_model(base, c, {}) for c in TABLE4_COUPLINGS if c != base.coupling}
    reference, _ = matched_models(base, rows, MATCH_TOLERANCE[scale])
    return reference


def _table4_model(scale: str, coupling: str) -> FlowConfig:
    base, _ = _small(scale, {}, {})
    rows = {c: _coupling_model(base, c, {}) for c in TABLE4_COUPLINGS if c != base.coupling}
    reference, matched = matched_models(base, rows, MATCH_TOLERANCE[scale])
    return reference if coupling == base.coupling else matched[coupling]


def _grid_model(spec: dict, scale: str, rows: Sequence[tuple[str, str, dict]], coupling: str, label: str,
                search: float) -> FlowConfig:  # fmt: skip
    """A coupling of a stability or stress grid, matched to the grid's matrix-exp reference."""
    base, _ = _small(scale, {}, {}, spec)
    others = {f"{c}/{lab}": _coupling_model(base, c, o) for c, lab, o in rows if c != base.coupling}
    reference, matched = matched_models(base, others, MATCH_TOLERANCE[scale], search)
    return reference if coupling == base.coupling else matched[f"{coupling}/{label}"]


def _paper_tables(add) -> None:
    # Table 2 (density) and Table 6 (series length): MEF at the paper's settings.
    for dataset in ("cifar10", "imagenet32", "imagenet64"):
        add(f"paper-t2-mef-{dataset}", f"MEF on {dataset}, the paper's Table 2 settings",
            _paper_model(dataset), _paper_train(dataset), ("2", "6"), "paper", {"dataset": dataset})  # fmt: skip
    for scale in ("cpu", "smoke"):
        _, train = _small(scale, {}, {})
        add(f"{scale}-t2-mef", f"MEF on patches16 ({scale} scale of Table 2)", functools.partial(_table_base, scale),
            train, ("2", "6"), scale, {"dataset": "patches16"})  # fmt: skip

    # Table 4: coupling × learning rate, matrix-exp 1×1 conv in all. The paper trains lr 1e-3
    # 4× longer; the official settings decay at epoch 40 of 50, and never in the 200 epochs at
    # lr 1e-3 (step_size 300). The cpu scales give lr 1e-3 twice the cap and no decay.
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
                _, train = _small(scale, {}, {"lr": lr, "epochs": base_epochs * 2 if long else base_epochs})
                add(f"{scale}-t4-{coupling}-lr{lr}", f"Table 4 at {scale} scale: {coupling} coupling, lr {lr}",
                    functools.partial(_table4_model, scale, coupling), train, ("4",), scale, cell)  # fmt: skip

    # Table 5: the paper's three 1×1 convolutions, matrix-exp coupling, lr 0.01.
    for mixing in TABLE5_MIXING:
        options = PAPER_MIXING_OPTIONS.get(mixing, {})
        add(f"paper-t5-{mixing}", f"Table 5: {mixing} 1×1 conv with matrix-exp coupling on CIFAR-10",
            _paper_model("cifar10", mixing=mixing, mixing_options=options), _paper_train("cifar10"), ("5",), "paper",
            {"mixing": mixing})  # fmt: skip
        for scale in ("cpu", "smoke"):
            _, train = _small(scale, {}, {})
            add(f"{scale}-t5-{mixing}", f"Table 5 at {scale} scale: {mixing} 1×1 conv",
                _with_mixing(scale, mixing, options), train, ("5",), scale, {"mixing": mixing})  # fmt: skip


def _with_mixing(scale: str, mixing: str, options: dict) -> Callable[[], FlowConfig]:
    return lambda: dataclasses.replace(_table_base(scale), mixing=mixing, mixing_options=dict(options))


def _zoo_tables(add) -> None:
    from .layers import COUPLING, MIXING, registry_variants

    # "mixing": every mixing layer and variant in Table 5's setting (matrix-exp coupling, lr 0.01).
    # The paper's three 1×1 convs in their official form share their runs with Table 5.
    for mixing, label, options in registry_variants(MIXING):
        cell: dict[str, object] = {"mixing": mixing, "variant": label}
        name = _slug(mixing, label)
        add(f"paper-mix-{name}", f"every mixing layer: {name} with matrix-exp coupling on CIFAR-10",
            _paper_model("cifar10", mixing=mixing, mixing_options=options), _paper_train("cifar10"), ("mixing",), "paper",
            cell)  # fmt: skip
        for scale in ("cpu", "smoke"):
            _, train = _small(scale, {}, {})
            add(f"{scale}-mix-{name}", f"every mixing layer at {scale} scale: {name}", _with_mixing(scale, mixing, options),
                train, ("mixing",), scale, cell)  # fmt: skip

    # "stability": the couplings of STABILITY_COUPLINGS × STABILITY_LRS, matrix-exp 1×1 conv, the
    # paper's recipe at a proxy scale, parameter-matched. At paper scale the recipe is Table 4's at
    # 50 epochs, so its lr 0.01 cells are Table 4's runs.
    variants = {(c, lab): o for c, lab, o in registry_variants(COUPLING)}
    chosen = [(c, lab, variants[(c, lab)]) for c, lab in STABILITY_COUPLINGS if (c, lab) in variants]
    everything = registry_variants(COUPLING)
    for table, spec, rows, search in (("stability", _STABILITY, chosen, 0.25), ("stress", _STRESS, everything, 0.0)):
        for coupling, label, options in rows:
            name = _slug(coupling, label)
            for lr in STABILITY_LRS:
                cell = {"coupling": coupling, "variant": label, "lr": lr}
                if table == "stability":
                    hidden = 132 if coupling == "affine" else 128
                    add(f"paper-stab-{name}-lr{lr}", f"stability: {name} coupling at lr {lr} on CIFAR-10",
                        _paper_model("cifar10", coupling=coupling, coupling_options=options, hidden_channels=hidden),
                        _paper_train("cifar10", lr=lr), ("stability",), "paper", cell)  # fmt: skip
                smoke = lr in (min(STABILITY_LRS), max(STABILITY_LRS))  # smoke scale: the grid's two ends
                for scale in ("cpu", "smoke") if smoke else ("cpu",):
                    _, train = _small(scale, {}, {"lr": lr}, spec)
                    make = functools.partial(_grid_model, spec, scale, tuple(rows), coupling, label, search)
                    what = (
                        "stability (the paper's recipe)" if table == "stability" else "stress (no warm-up, 100 steps)"
                    )
                    add(f"{scale}-{'stab' if table == 'stability' else 'stress'}-{name}-lr{lr}",
                        f"{what} at {scale} scale: {name} coupling at lr {lr}", make, train, (table,), scale,
                        cell)  # fmt: skip


def _build() -> dict[str, Preset]:
    presets: dict[str, Preset] = {}

    def add(name, description, model, train, tables, scale, cell=None) -> None:
        if name in presets:
            raise ValueError(f"two presets are named {name!r}: layer or variant names must make preset names unique")
        make = model if callable(model) else (lambda model=model: model)
        presets[name] = Preset(name, description, make, train, tuple(tables), scale, dict(cell or {}))

    _paper_tables(add)
    _zoo_tables(add)
    # The quickest run of all, for a first try and for CI.
    model, train = _small("smoke", {}, {"epochs": 1, "max_train_batches": 4, "max_test": 64, "validate": False,
                                        "max_validation": None, "patience": None})  # fmt: skip
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
