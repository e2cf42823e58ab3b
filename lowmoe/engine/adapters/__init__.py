"""Architecture adapters: pick one from ``config.json``'s ``model_type`` / ``architectures``."""

from __future__ import annotations

from ...errors import UnsupportedModelError
from .base import Adapter
from .families import ALL, ALL_EXPERT_COUNT_KEYS

BY_FAMILY = {a.family: a for a in ALL}


def supported_families() -> list[str]:
    return [a.family for a in ALL]


def get_adapter(cfg: dict, source: str = "config.json") -> Adapter:
    """Return the adapter for a parsed config.json; never guesses from the model's name."""
    mt = cfg.get("model_type")
    for a in ALL:
        if mt in a.model_types:
            return a
    archs = cfg.get("architectures")
    for arch in archs if isinstance(archs, list) else []:
        for a in ALL:
            if arch in a.architectures:
                return a
    raise UnsupportedModelError(
        f"{source}: model_type {mt!r} (architectures {cfg.get('architectures')}) is not a supported "
        f"MoE family; supported: {', '.join(supported_families())}"
    )


__all__ = ["Adapter", "ALL_EXPERT_COUNT_KEYS", "BY_FAMILY", "get_adapter", "supported_families"]
