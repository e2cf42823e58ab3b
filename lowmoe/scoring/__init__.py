"""Expert-scoring methods, by name (``--method``)."""

from __future__ import annotations

from ..errors import ConfigError
from .base import FrequencyScorer, GateMassScorer, Scorer, choose_keep

SCORERS: dict[str, type[Scorer]] = {
    FrequencyScorer.name: FrequencyScorer,
    GateMassScorer.name: GateMassScorer,
}


def make_scorer(name: str, num_experts: int, top_k: int, **options) -> Scorer:
    cls = SCORERS.get(name)
    if cls is None:
        raise ConfigError(f"--method {name!r} is not a scoring method; choose one of: {', '.join(sorted(SCORERS))}")
    return cls(num_experts, top_k, **options)


__all__ = ["SCORERS", "Scorer", "choose_keep", "make_scorer"]
