"""The two configurations of a run: the model (:class:`FlowConfig`) and the recipe (:class:`TrainConfig`).

Both are dataclasses that round-trip through plain dicts (and JSON) exactly; ``from_dict`` names
unknown fields instead of ignoring them, and every field is validated on construction with an
error that names it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import warnings
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Any, TypeVar

__all__ = [
    "ACTNORM_CHOICES",
    "AMP_CHOICES",
    "COMPILE_CHOICES",
    "PRIOR_CHOICES",
    "DictConfig",
    "FlowConfig",
    "TrainConfig",
]

T = TypeVar("T", bound="DictConfig")

ACTNORM_CHOICES = ("activation", "channel")
PRIOR_CHOICES = ("standard", "learned")
AMP_CHOICES = ("bf16", "fp16")
# torch.compile backends of the training step: inductor generates kernels; aot_eager captures the
# same graphs without generating code (seconds instead of minutes to compile: tests, debugging)
COMPILE_CHOICES = ("inductor", "aot_eager")


class DictConfig:
    """to_dict / from_dict for a dataclass; from_dict names unknown fields instead of ignoring them."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], data: dict) -> T:
        if not isinstance(data, dict):
            raise ValueError(f"{cls.__name__} must be read from a JSON object, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
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
        raise ValueError(f"FlowConfig.{owner} must be a dict of option name -> value, got {options!r}")
    try:
        json.dumps(options)
    except (TypeError, ValueError) as exc:
        raise ValueError(
            f"FlowConfig.{owner} must be JSON-serialisable (it is recorded with every run): {exc}"
        ) from exc
    return dict(options)


@dataclass
class FlowConfig(DictConfig):
    """Everything that defines a model. ``to_json``/``from_json`` round-trip it exactly.

    ``conv`` and ``coupling`` are names in :data:`mefbench.layers.MIXING` and ``COUPLING``;
    ``conv_options`` and ``coupling_options`` are passed to those layers (each validates its own),
    e.g. ``conv_options={"diagonal": "free"}`` for the official PLU form or
    ``coupling_options={"scale": "sigmoid"}`` for Glow's scale map. ``hidden_channels`` and
    ``num_blocks`` configure every coupling's net.
    """

    image_shape: tuple[int, int, int] = (3, 32, 32)
    steps: tuple[int, ...] = (8, 4, 2)  # flow steps per level; len(steps) = number of levels
    conv: str = "matexp"
    coupling: str = "matexp"
    hidden_channels: int = 128
    num_blocks: int = 8
    actnorm: str = "activation"  # "activation" (paper) or "channel" (Glow)
    squeeze: str = "subpixel"  # "subpixel" (paper) or "channel" (Glow)
    prior: str = "standard"  # "standard" (paper) or "learned" (Glow)
    conv_options: dict = field(default_factory=dict)
    coupling_options: dict = field(default_factory=dict)
    # deprecated flat options (before conv_options / coupling_options): moved into coupling_options
    scale: InitVar[str | None] = None
    coupling_rank: InitVar[int | None] = None

    def __post_init__(self, scale: str | None, coupling_rank: int | None) -> None:
        from .layers import COUPLING, MIXING, SQUEEZE_ORDERS, canonical_options, check_options

        self.conv_options = _json_options("conv_options", self.conv_options)
        self.coupling_options = _json_options("coupling_options", self.coupling_options)
        for old, new, value in (("scale", "scale", scale), ("coupling_rank", "rank", coupling_rank)):
            if value is not None:
                warnings.warn(
                    f"FlowConfig({old}=...) is deprecated: use coupling_options={{{new!r}: ...}}",
                    DeprecationWarning,
                    stacklevel=3,
                )
                self.coupling_options.setdefault(new, value)
        try:
            self.image_shape = tuple(int(v) for v in self.image_shape)
            self.steps = tuple(int(v) for v in self.steps)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"FlowConfig.image_shape and .steps must be sequences of integers: {exc}") from exc
        choices = {
            "conv": list(MIXING),
            "coupling": list(COUPLING),
            "actnorm": list(ACTNORM_CHOICES),
            "squeeze": list(SQUEEZE_ORDERS),
            "prior": list(PRIOR_CHOICES),
        }
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"FlowConfig.{name} must be one of {allowed}, got {getattr(self, name)!r}")
        check_options(MIXING[self.conv], self.conv_options)
        check_options(COUPLING[self.coupling], self.coupling_options)
        # one spelling per model: options equal to the layer's defaults are dropped
        self.conv_options = canonical_options(MIXING[self.conv], self.conv_options)
        self.coupling_options = canonical_options(COUPLING[self.coupling], self.coupling_options)
        if {"hidden_channels", "num_blocks", "size", "net"} & set(self.coupling_options):
            raise ValueError(
                "FlowConfig.coupling_options cannot set hidden_channels, num_blocks, size or net: "
                "use the FlowConfig fields (the model passes them to every coupling)"
            )
        if len(self.image_shape) != 3 or min(self.image_shape) < 1:
            raise ValueError(f"FlowConfig.image_shape must be (C, H, W) of positive sizes, got {self.image_shape}")
        if self.hidden_channels < 1 or self.num_blocks < 0:
            raise ValueError(
                f"FlowConfig needs hidden_channels >= 1 and num_blocks >= 0, got {self.hidden_channels}, {self.num_blocks}"
            )
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

    @classmethod
    def from_dict(cls, data: dict) -> FlowConfig:
        if isinstance(data, dict) and ("scale" in data or "coupling_rank" in data):
            data = migrate_model_dict(data)
        return super().from_dict(data)


def migrate_model_dict(data: dict) -> dict:
    """A model dict of the first record schema (flat ``scale`` and ``coupling_rank``) in today's
    form: the two move into ``coupling_options``, left out where they equal the coupling's default."""
    from .layers import COUPLING, canonical_options, option_names

    data = dict(data)
    scale, rank = data.pop("scale", None), data.pop("coupling_rank", None)
    options = dict(data.get("coupling_options") or {})
    takes = option_names(COUPLING[data["coupling"]]) if data.get("coupling") in COUPLING else ()
    if scale is not None and "scale" in takes:
        options["scale"] = scale
    if rank is not None and "rank" in takes:
        options["rank"] = rank
    if data.get("coupling") in COUPLING:  # one spelling: the coupling's defaults are left out
        options = canonical_options(COUPLING[data["coupling"]], options)
    data["coupling_options"] = options
    data.setdefault("conv_options", {})
    return data


@dataclass
class TrainConfig(DictConfig):
    """The training recipe. Defaults are the paper's CIFAR-10 settings."""

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
    max_test: int | None = None  # evaluate on the first max_test test images
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
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or self.seed < 0:
            raise ValueError(f"TrainConfig.seed must be a non-negative integer, got {self.seed!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and 0 < self.lr <= 1):
            raise ValueError(f"TrainConfig.lr must be a finite number in (0, 1], got {self.lr!r}")
        if not (math.isfinite(self.warmup_epochs) and self.warmup_epochs >= 0):
            raise ValueError(f"TrainConfig.warmup_epochs must be >= 0, got {self.warmup_epochs!r}")
        if not 0 <= self.ema_decay < 1:
            raise ValueError(f"TrainConfig.ema_decay must be in [0, 1), got {self.ema_decay!r}")
        if not 0 < self.decay_factor <= 1:
            raise ValueError(f"TrainConfig.decay_factor must be in (0, 1], got {self.decay_factor!r}")
        for name in ("max_train_batches", "max_test"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"TrainConfig.{name} must be None or at least 1, got {value!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"TrainConfig.grad_clip must be None or positive, got {self.grad_clip!r}")
        if self.amp is not None and self.amp not in AMP_CHOICES:
            raise ValueError(f"TrainConfig.amp must be None or one of {AMP_CHOICES}, got {self.amp!r}")
        if self.compile is not None and self.compile not in COMPILE_CHOICES:
            raise ValueError(f"TrainConfig.compile must be None or one of {COMPILE_CHOICES}, got {self.compile!r}")
