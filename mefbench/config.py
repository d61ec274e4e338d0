"""The two configurations of a run: the model (:class:`FlowConfig`) and the recipe (:class:`TrainConfig`).

Both are dataclasses that round-trip through plain dicts (and JSON) exactly; ``from_dict`` names
unknown fields instead of ignoring them, and every field is validated on construction with an
error that names it.
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

if TYPE_CHECKING:
    from collections.abc import Callable

    from torch import nn

__all__ = [
    "ACTNORM_CHOICES",
    "AMP_CHOICES",
    "COMPILE_CHOICES",
    "PAPER_STEP",
    "PRIOR_CHOICES",
    "SEED_MAX",
    "STEP_LAYERS",
    "DictConfig",
    "FlowConfig",
    "TrainConfig",
    "migrate_model_dict",
]

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DictConfig")

ACTNORM_CHOICES = ("activation", "channel")
PRIOR_CHOICES = ("standard", "learned")
AMP_CHOICES = ("bf16", "fp16")
SEED_MAX = 2**63 - 1  # torch's generators take a 64-bit seed; a signed one also fits every JSON reader and pandas
# torch.compile backends of the training step: inductor generates kernels; aot_eager captures the
# same graphs without generating code (seconds instead of minutes to compile: tests, debugging)
COMPILE_CHOICES = ("inductor", "aot_eager")


class DictConfig:
    """to_dict / from_dict for a dataclass; from_dict names unknown fields instead of ignoring them."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(cast("DataclassInstance", self))

    @classmethod
    def from_dict(cls: type[T], data: dict) -> T:
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__} must be read from a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cast("type[DataclassInstance]", cls))}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)

    def to_json(self, path: str | Path | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text)
        return text

    @classmethod
    def from_json(cls: type[T], text_or_path: str | Path) -> T:
        text = str(text_or_path)
        if not text.lstrip().startswith("{"):
            text = Path(text_or_path).read_text()
        return cls.from_dict(json.loads(text))


def _json_options(owner: str, options: Any) -> dict:
    if not isinstance(options, dict):
        raise ValueError(f"{owner} must be a dict of option name -> value, got {options!r}")
    try:
        json.dumps(options)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{owner} must be JSON-serialisable (it is recorded with every run): {exc}") from exc
    return dict(options)


STEP_LAYERS = ("actnorm", "mixing", "coupling")
PAPER_STEP: tuple[str, ...] = ("actnorm", "mixing", "coupling")
# what the model gives every layer, never set by coupling_options, mixing_options or a step spec
_MODEL_SET = ("size", "net", "hidden_channels", "num_blocks")


def _step_spec(i: int, spec: Any) -> str | dict:
    """One entry of FlowConfig.step, validated and in its one spelling (options without the
    layer's defaults)."""
    from .layers import REGISTRIES, canonical_options, check_options

    where = f"FlowConfig.step[{i}]"
    usage = (
        "a step spec is 'actnorm', 'mixing' or 'coupling' (the config's own choice of that layer), or "
        "{'mixing': NAME} / {'coupling': NAME} with optional 'options': {...} (a layer of its own)"
    )
    if isinstance(spec, str):
        if spec not in STEP_LAYERS:
            raise ValueError(f"{where}: unknown layer {spec!r}; {usage}")
        return spec
    if not isinstance(spec, dict):
        raise ValueError(f"{where} must be a string or a dict, got {spec!r}; {usage}")
    kinds = [k for k in spec if k in REGISTRIES]
    unknown = sorted(set(spec) - set(REGISTRIES) - {"options"})
    if len(kinds) != 1 or unknown:
        raise ValueError(f"{where}: {spec!r} must name exactly one of 'mixing', 'coupling' (and 'options'); {usage}")
    (kind,) = kinds
    try:
        cls = REGISTRIES[kind].get_class(spec[kind])
    except (TypeError, ValueError) as exc:  # TypeError: an unhashable name
        raise ValueError(f"{where}: {exc}") from None
    options = _json_options(f"{where}.options", spec.get("options", {}))
    _check_layer_options(where, cls, options)
    try:
        check_options(cls, options)
    except ValueError as exc:
        raise ValueError(f"{where}: {exc}") from None
    options = canonical_options(cls, options)
    return {kind: spec[kind], "options": options} if options else {kind: spec[kind]}


def _check_layer_options(where: str, cls: type, options: dict) -> None:
    taken = sorted(set(_MODEL_SET) & set(options))
    if taken:
        raise ValueError(
            f"{where} cannot set {', '.join(taken)} of {cls.__name__}: the model passes the size of each level and "
            "builds every coupling's net from the FlowConfig fields net, net_options, hidden_channels and num_blocks"
        )


@dataclass
class FlowConfig(DictConfig):
    """Everything that defines a model. ``to_json``/``from_json`` round-trip it exactly.

    ``mixing`` and ``coupling`` are names in :data:`mefbench.layers.MIXING` and ``COUPLING``;
    ``mixing_options`` and ``coupling_options`` are passed to those layers (each validates its
    own), e.g. ``mixing_options={"diagonal": "free"}`` for the official PLU form or
    ``coupling_options={"scale": "sigmoid"}`` for Glow's scale map. ``net`` names every coupling's
    conditioner in :data:`mefbench.layers.NETS` (``"resnet"``, the paper's; ``"glow"``), built with
    width ``hidden_channels``, depth ``num_blocks`` and ``net_options``.

    ``step`` is the flow step, repeated ``steps[level]`` times at each level: a list of layer
    specs applied in order. ``"actnorm"``, ``"mixing"`` and ``"coupling"`` are the config's own
    choices (ActNorm per ``actnorm``, the ``mixing`` layer, the ``coupling``); a dict names a layer
    of its own, ``{"mixing": "householder", "options": {"reflections": 2}}`` or
    ``{"coupling": "affine"}``. The default is the paper's ActNorm → mixing → coupling; e.g.
    ``("actnorm", "mixing", {"mixing": "householder"}, "coupling")`` mixes twice and
    ``("coupling", "actnorm", "mixing")`` puts the coupling first.
    """

    image_shape: tuple[int, int, int] = (3, 32, 32)
    steps: tuple[int, ...] = (8, 4, 2)  # flow steps per level; len(steps) = number of levels
    mixing: str = "matexp"
    coupling: str = "matexp"
    net: str = "resnet"
    hidden_channels: int = 128
    num_blocks: int = 8
    actnorm: str = "activation"  # "activation" (paper) or "channel" (Glow)
    squeeze: str = "subpixel"  # "subpixel" (paper) or "channel" (Glow)
    prior: str = "standard"  # "standard" (paper) or "learned" (Glow)
    mixing_options: dict = field(default_factory=dict)
    coupling_options: dict = field(default_factory=dict)
    net_options: dict = field(default_factory=dict)
    step: tuple = PAPER_STEP

    def __post_init__(self) -> None:
        from .layers import COUPLING, MIXING, NETS, SQUEEZE_ORDERS, canonical_options, check_options

        self.mixing_options = _json_options("FlowConfig.mixing_options", self.mixing_options)
        self.coupling_options = _json_options("FlowConfig.coupling_options", self.coupling_options)
        self.net_options = _json_options("FlowConfig.net_options", self.net_options)
        try:
            self.image_shape = cast(
                tuple[int, int, int], tuple(int(v) for v in self.image_shape)
            )  # length checked below
            self.steps = tuple(int(v) for v in self.steps)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"FlowConfig.image_shape and .steps must be sequences of integers: {exc}") from exc
        choices = {
            "mixing": list(MIXING),
            "coupling": list(COUPLING),
            "net": list(NETS),
            "actnorm": list(ACTNORM_CHOICES),
            "squeeze": list(SQUEEZE_ORDERS),
            "prior": list(PRIOR_CHOICES),
        }
        for name, allowed in choices.items():
            if not isinstance(getattr(self, name), str) or getattr(self, name) not in allowed:
                raise ValueError(f"FlowConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        _check_layer_options("FlowConfig.coupling_options", COUPLING[self.coupling], self.coupling_options)
        _check_layer_options("FlowConfig.mixing_options", MIXING[self.mixing], self.mixing_options)
        if {"hidden_channels", "num_blocks"} & set(self.net_options):
            raise ValueError(
                "FlowConfig.net_options cannot set hidden_channels or num_blocks: use the FlowConfig fields "
                "(the model passes them to every net)"
            )
        for owner, cls, options in (
            ("mixing_options", MIXING[self.mixing], self.mixing_options),
            ("coupling_options", COUPLING[self.coupling], self.coupling_options),
            ("net_options", NETS[self.net], self.net_options),
        ):
            try:
                check_options(cls, options)
            except ValueError as exc:
                raise ValueError(f"FlowConfig.{owner}: {exc}") from None
        # one spelling per model: options equal to the layer's defaults are dropped
        self.mixing_options = canonical_options(MIXING[self.mixing], self.mixing_options)
        self.coupling_options = canonical_options(COUPLING[self.coupling], self.coupling_options)
        self.net_options = canonical_options(NETS[self.net], self.net_options)
        if isinstance(self.step, (str, dict)) or not isinstance(self.step, (tuple, list)) or not self.step:
            raise ValueError(
                f"FlowConfig.step must be a non-empty list of layer specs, e.g. {list(PAPER_STEP)}, got {self.step!r}"
            )
        self.step = tuple(_step_spec(i, spec) for i, spec in enumerate(self.step))
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"FlowConfig.image_shape must be (C, H, W) of positive sizes, got {self.image_shape}")
        for name, minimum in (("hidden_channels", 1), ("num_blocks", 0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"FlowConfig.{name} must be an integer >= {minimum}, got {value!r}")
        _, h, w = self.image_shape
        levels = len(self.steps)
        if levels < 1 or min(self.steps) < 1:
            raise ValueError(f"FlowConfig.steps needs at least one level of at least one step, got {self.steps}")
        if h % 2**levels or w % 2**levels:
            raise ValueError(f"{levels} levels need H and W divisible by {2**levels}, got {h}×{w}")

    @property
    def dims(self) -> int:
        c, h, w = self.image_shape
        return c * h * w

    def net_factory(self) -> Callable[[int, int], nn.Module]:
        """The factory of every coupling's net: ``NETS[net]`` with ``hidden_channels``,
        ``num_blocks`` and ``net_options``."""
        from .layers import net_factory as factory

        return factory(self.net, hidden_channels=self.hidden_channels, num_blocks=self.num_blocks, **self.net_options)

    @classmethod
    def from_dict(cls, data: dict) -> FlowConfig:
        if isinstance(data, dict) and _OLD_MODEL_KEYS & set(data):
            data = migrate_model_dict(data)
        return super().from_dict(data)


# keys of model dicts written by older mefbench: flat coupling options (record schema 1) and the
# mixing layer's old name, "conv" (schemas 1 and 2)
_OLD_MODEL_KEYS = {"scale", "coupling_rank", "conv", "conv_options"}


def migrate_model_dict(data: dict) -> dict:
    """A model dict written by an older mefbench, in today's form.

    Record schema 1 kept the coupling's ``scale`` and ``coupling_rank`` flat in the model dict:
    they move into ``coupling_options`` (left out where they equal the coupling's default).
    Schemas 1 and 2 called the mixing layer ``conv`` and its options ``conv_options``: they become
    ``mixing`` and ``mixing_options``. Fields that came later (``net``, ``net_options``, ``step``)
    get the values that built every model before them. The same model is built from either form.
    """
    from .layers import COUPLING, canonical_options, option_names

    data = dict(data)
    scale, rank = data.pop("scale", None), data.pop("coupling_rank", None)
    if scale is not None or rank is not None:
        options = dict(data.get("coupling_options") or {})
        coupling = data.get("coupling")
        known = isinstance(coupling, str) and coupling in COUPLING
        takes = option_names(COUPLING[coupling]) if known else ()
        if scale is not None and "scale" in takes:
            options["scale"] = scale
        if rank is not None and "rank" in takes:
            options["rank"] = rank
        if known:  # one spelling: the coupling's defaults are left out
            options = canonical_options(COUPLING[coupling], options)
        data["coupling_options"] = options
    data.setdefault("coupling_options", {})
    for old, new in (("conv", "mixing"), ("conv_options", "mixing_options")):
        if old in data:
            if new in data:
                raise ValueError(f"a model dict has both {old!r} (the old name) and {new!r}: keep only {new!r}")
            data[new] = data.pop(old)
    data.setdefault("mixing_options", {})
    # fields that came later, at the values that built every model before them
    data.setdefault("net", "resnet")
    data.setdefault("net_options", {})
    data.setdefault("step", list(PAPER_STEP))
    return data


@dataclass
class TrainConfig(DictConfig):
    """The training recipe. Defaults are the paper's CIFAR-10 settings.

    An epoch is ``max_train_batches`` steps when that is set (an evaluation period at CPU
    scale), else one pass over the training images. With ``patience`` the run trains to a
    plateau: it stops after the first epoch that ends ``patience`` epochs in a row without
    lowering the best validation bits/dim by at least ``min_improvement``
    (:mod:`mefbench.plateau`), and ``epochs`` is its cap. Without it the run trains ``epochs``
    epochs, as the paper's runs do.
    """

    dataset: str = "cifar10"
    data_dir: str | None = None
    epochs: int = 50
    batch_size: int = 64
    lr: float = 0.01
    warmup_epochs: float = 1.0
    decay_epochs: tuple[int, ...] = (40,)
    decay_factor: float = 0.5
    ema_decay: float = 0.999
    init_batch: int = 512
    seed: int = 0
    flip: bool | None = None  # None: the dataset's standard (horizontal flips on CIFAR-10 and patches)
    max_train_batches: int | None = None  # cap on optimiser steps per epoch (CPU-scale runs)
    max_test: int | None = None  # evaluate each epoch on a fixed subset of max_test test images
    max_final_test: int | None = None  # the trained model's final evaluation: on this many (None: the whole split)
    validate: bool = False  # evaluate the EMA model on the validation split each epoch (and before training)
    max_validation: int | None = None  # ... on a fixed subset of this many validation images
    patience: int | None = None  # stop once this many epochs in a row brought no improvement (needs validate)
    min_improvement: float = 0.0  # in validation bits/dim: a smaller gain is not an improvement
    eval_batch_size: int = 256
    grad_clip: float | None = None  # the paper uses none
    amp: str | None = None  # None (float32) or "bf16" / "fp16": torch.autocast for the coupling nets
    channels_last: bool = False  # model and batches in torch.channels_last memory format
    compile: str | None = None  # None (eager) or a torch.compile backend for the step's forward and loss

    def __post_init__(self) -> None:
        from .data import DATASETS

        self.decay_epochs = tuple(int(e) for e in self.decay_epochs)
        if self.dataset not in DATASETS:
            raise ValueError(f"unknown dataset {self.dataset!r}; choose one of {sorted(DATASETS)}")
        for name in ("epochs", "batch_size", "init_batch", "eval_batch_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"TrainConfig.{name} must be an integer of at least 1, got {value!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed <= SEED_MAX:
            raise ValueError(f"TrainConfig.seed must be an integer from 0 to {SEED_MAX} (2**63 - 1), got {self.seed!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise ValueError(f"TrainConfig.lr must be a finite number in (0, 1], got {self.lr!r}")
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise ValueError(f"TrainConfig.warmup_epochs must be >= 0, got {self.warmup_epochs!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not 0 < self.decay_factor <= 1:
            raise ValueError(f"TrainConfig.decay_factor must be in (0, 1], got {self.decay_factor!r}")
        for name in ("max_train_batches", "max_test", "max_final_test", "max_validation", "patience"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"TrainConfig.{name} must be None or an integer of at least 1, got {value!r}")
        if not (isinstance(self.min_improvement, (int, float)) and math.isfinite(self.min_improvement)
                and self.min_improvement >= 0):  # fmt: skip
            raise ValueError(f"TrainConfig.min_improvement must be a finite number >= 0, got {self.min_improvement!r}")
        if self.patience is not None and not self.validate:
            raise ValueError(
                "TrainConfig.patience needs validate=True: the plateau rule watches the validation bits/dim"
            )
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be None or positive, got {self.grad_clip!r}")
        if self.amp is not None and self.amp not in AMP_CHOICES:
            raise ValueError(f"TrainConfig.amp must be None or one of {AMP_CHOICES}, got {self.amp!r}")
        if self.compile is not None and self.compile not in COMPILE_CHOICES:
            raise ValueError(f"TrainConfig.compile must be None or one of {COMPILE_CHOICES}, got {self.compile!r}")
