"""Expert-scoring methods, by name (``--method``).

Every scorer here is also a per-layer prune method (``methods.ScoreThenKeep``): keep the
highest-scoring experts of each layer. ``reconstruction`` (NAEE search) lives in
``lowmoe.methods.reconstruction``; super-expert protection in ``scoring.super_experts``.
"""

from __future__ import annotations

from ...errors import ConfigError
from ..options import parse_options
from .base import FrequencyScorer, GateMassScorer, Scorer, choose_keep, router_probs
from .easy_ep import EasyEpScorer
from .reap import ReapScorer
from .tcess import TcessScorer

SCORERS: dict[str, type[Scorer]] = {
    cls.name: cls for cls in (FrequencyScorer, GateMassScorer, ReapScorer, EasyEpScorer, TcessScorer)
}


def make_scorer(name: str, num_experts: int, top_k: int, **options) -> Scorer:
    cls = SCORERS.get(name)
    if cls is None:
        raise ConfigError(f"--method {name!r} is not a scoring method; choose one of: {', '.join(sorted(SCORERS))}")
    return cls(num_experts, top_k, **parse_options(name, options, cls.OPTIONS))  # checked and converted


__all__ = ["SCORERS", "Scorer", "choose_keep", "make_scorer", "router_probs"]
