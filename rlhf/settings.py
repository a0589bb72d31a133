"""The toolkit the config schema is written with: fields with help and bounds, and plain-dict conversions.

A field declares its default, its help text and its bounds once (:func:`setting`); :mod:`rlhf.validate` checks
the bounds, and :mod:`flows.schema` turns the help into ``--help``.
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from typing import Any

from omegaconf import OmegaConf


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and how to fix it."""


def setting(default: Any, help: str, **bounds: Any) -> Any:
    """A field with a help text and optional bounds: gt, ge, lt, le, choices."""
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda d=default: type(d)(d), metadata={"help": help, **bounds})
    return field(default=default, metadata={"help": help, **bounds})


def require_multiple(cfg: Any, key: str, name: str, of: str, why: str = "") -> None:
    """Refuse ``cfg.<name>`` unless it is a multiple of ``cfg.<of>`` (``why``: what ``of`` counts, if it helps),
    naming both keys and the fix."""
    value, unit = getattr(cfg, name), getattr(cfg, of)
    if value % unit:
        raise ConfigError(
            f"{key}.{name}={value} is not a multiple of {key}.{of}={unit}{why}. "
            f"Fix: make {key}.{name} a multiple of {unit}, or choose {key}.{of} dividing {value}."
        )


def default(cls: type, name: str, value: Any) -> Any:
    """Field ``name`` of the dataclass ``cls`` with another default, keeping its help text and bounds
    (a stage's schema that differs from the shared one only in its defaults)."""
    return setting(value, **cls.__dataclass_fields__[name].metadata)


def to_dict(cfg: Any) -> dict:
    """A dataclass config (or a part of it) as a plain, JSON-serialisable dict."""
    return dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(cfg)


def from_dict(cls: type, data: dict) -> Any:
    """Rebuild a typed section from a plain dict (tasks receive plain dicts)."""
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(cls), data))


def flatten(d: dict, prefix: str = "") -> dict:
    """{'a': {'b': 1}} -> {'a.b': 1}: for MLflow params."""
    out: dict = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
