"""Method configuration, the torch-free half of the method contract (methods/base.py):
how a config field is declared (:func:`train_field`, :func:`infer_field`), the fields every
method has (:class:`MethodConfig`, :class:`MultiClassConfig`), and the fingerprint of the
fields that determine trained weights. No torch here, so that the command line can list
and check keys before torch is imported."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import typing
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

TRAIN = "affects_training"


def train_field(default: Any, doc: str) -> Any:
    """A config field whose change needs a newly trained model (architecture, recipe)."""
    return field(default=default, metadata={TRAIN: True, "doc": doc})


def infer_field(default: Any, doc: str) -> Any:
    """A config field that only changes inference: a stored model can be reused."""
    return field(default=default, metadata={TRAIN: False, "doc": doc})


def check(ok: bool, message: str) -> None:
    """The one validation idiom of method configs: a ValueError with a one-line message
    naming the field, the valid range and the value (the orchestrator shows it as is)."""
    if not ok:
        raise ValueError(message)


def coerce_enum(kind: type[Enum], name: str, value: Any) -> Enum:
    """``value`` (an enum member or its string value) as a member of ``kind``."""
    try:
        return kind(value)
    except ValueError:
        raise ValueError(f"{name} must be one of {', '.join(str(k.value) for k in kind)}, got {value!r}") from None


@dataclass(frozen=True)
class MethodConfig:
    """The fields every method has, and the only ones the orchestrator reads.

    ``__post_init__`` coerces enum fields from their string values and lists to tuples
    (OmegaConf hands both over in their plain form), then calls :meth:`validate`, which
    subclasses extend (calling ``super().validate()`` first).
    """

    image_size: int = train_field(256, "resize side in pixels")
    crop_size: int | None = train_field(None, "centre-crop side after resizing; None = no crop")
    epochs: int = train_field(1, "training epochs (0 = nothing to train)")
    batch_size: int = train_field(8, "global batch size (over all DDP workers)")
    learning_rate: float = train_field(1e-4, "learning rate of the main optimiser")

    def __post_init__(self) -> None:
        hints = typing.get_type_hints(type(self))
        for f in dataclasses.fields(self):
            value, kind = getattr(self, f.name), hints[f.name]
            if isinstance(kind, type) and issubclass(kind, Enum):
                object.__setattr__(self, f.name, coerce_enum(kind, f.name, value))
            elif isinstance(value, list):
                object.__setattr__(self, f.name, tuple(value))
        self.validate()

    def validate(self) -> None:
        check(self.image_size >= 1, f"image_size must be >= 1, got {self.image_size}")
        check(self.crop_size is None or 1 <= self.crop_size <= self.image_size,
              f"crop_size must be None or in [1, image_size={self.image_size}], got {self.crop_size}")
        check(self.epochs >= 0, f"epochs must be >= 0, got {self.epochs}")
        check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        check(self.learning_rate > 0, f"learning_rate must be > 0, got {self.learning_rate}")

    @property
    def input_size(self) -> int:
        """Side of the images the network sees (after the optional centre crop)."""
        return self.crop_size if self.crop_size is not None else self.image_size


@dataclass(frozen=True)
class MultiClassConfig(MethodConfig):
    """Config of a method that trains one model over several categories at once."""

    num_categories: int = train_field(1, "categories trained together (set by the orchestrator from the category list)")

    def validate(self) -> None:
        super().validate()
        check(self.num_categories >= 1, f"num_categories must be >= 1, got {self.num_categories}")


def field_docs(config_class: type) -> dict[str, tuple[bool, str]]:
    """name -> (affects_training, doc) for every field of a method config."""
    return {f.name: (bool(f.metadata.get(TRAIN, True)), f.metadata.get("doc", "")) for f in dataclasses.fields(config_class)}


def training_fields(config: MethodConfig) -> dict[str, Any]:
    """The sub-config that determines the trained weights (JSON-able values)."""
    return {f.name: _plain(getattr(config, f.name)) for f in dataclasses.fields(config) if f.metadata.get(TRAIN, True)}


def config_fingerprint(values: dict[str, Any]) -> str:
    """Stable sha256 of a JSON-able mapping (sorted keys)."""
    text = json.dumps({k: _plain(v) for k, v in values.items()}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def _plain(value: Any) -> Any:
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value
