"""Dict round-trips shared by the configuration dataclasses."""

from __future__ import annotations

import dataclasses
from typing import TypeVar

__all__ = ["DictConfig"]

T = TypeVar("T", bound="DictConfig")


class DictConfig:
    """to_dict / from_dict for a dataclass; from_dict names unknown fields instead of ignoring them."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls: type[T], data: dict) -> T:
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - known
        if unknown:
            raise ValueError(f"unknown {cls.__name__} fields {sorted(unknown)}; known: {sorted(known)}")
        return cls(**data)
