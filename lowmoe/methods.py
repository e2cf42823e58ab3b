"""Expert-selection methods, by ``--method`` name.

Two kinds:

* **Layer methods** decide each MoE layer on its own, inside the single streamed pass
  (``pipeline.score_and_write``): they ``observe`` every MoE forward call of the layer on the
  calibration tokens, then ``decide`` that layer's ``LayerPlan`` (keep-set, and for merging
  methods the merge / router matrices). Every scorer in ``lowmoe.scoring`` is a layer method
  through ``ScoreThenKeep``; merging methods register their own.
* **Runners** (``EXTRA_METHODS``) drive the whole streamed run themselves: methods that need a
  global decision across layers (C-Prune's global budget) or many passes (EEP search).
  Signature: ``fn(run: PruneRun, cfg: PruneConfig, top_k: int) -> dict`` (report extras).

``protection_observers`` returns the observers that mark experts which must never be dropped.
"""

from __future__ import annotations

from typing import Callable

import torch

from .layer import MoeCall
from .plan import LayerPlan

EXTRA_METHODS: dict[str, Callable] = {}


class LayerMethod:
    """Per-layer decision: observe the layer's MoE calls, then decide its LayerPlan."""

    name = "base"
    needs_expert_outputs = False

    def __init__(self, num_experts: int, top_k: int, **options):
        self.num_experts, self.top_k, self.options = num_experts, top_k, options

    def observe(self, call: MoeCall) -> None:
        raise NotImplementedError

    def decide(self, layer_idx: int, keep_n: int, *, protected: set[int], groups: int,
               tensors: dict[str, torch.Tensor], adapter) -> LayerPlan:
        """``tensors``: the layer's on-disk tensors (for weight-space methods)."""
        raise NotImplementedError

    def scores(self) -> torch.Tensor | None:
        """Per-expert scores for the report (None if the method has none)."""
        return None

    def state(self) -> dict:
        return {}


class ScoreThenKeep(LayerMethod):
    """Keep the ``keep_n`` highest-scoring experts of a ``Scorer`` (protected experts first)."""

    def __init__(self, scorer):
        super().__init__(scorer.num_experts, scorer.top_k)
        self.scorer = scorer
        self.name = scorer.name
        self.needs_expert_outputs = scorer.needs_expert_outputs

    def observe(self, call: MoeCall) -> None:
        self.scorer.observe(call)

    def decide(self, layer_idx, keep_n, *, protected, groups, tensors, adapter) -> LayerPlan:
        from .scoring import choose_keep

        return LayerPlan(choose_keep(self.scorer.scores(), keep_n, protected, groups))

    def scores(self):
        return self.scorer.scores()

    def state(self) -> dict:
        return self.scorer.state()


# name -> factory(num_experts, top_k, **options) -> LayerMethod
LAYER_METHODS: dict[str, Callable[..., LayerMethod]] = {}


def make_layer_method(name: str, num_experts: int, top_k: int, **options) -> LayerMethod:
    from .errors import ConfigError
    from .scoring import SCORERS, make_scorer

    if name in LAYER_METHODS:
        return LAYER_METHODS[name](num_experts, top_k, **options)
    if name in SCORERS:
        return ScoreThenKeep(make_scorer(name, num_experts, top_k, **options))
    raise ConfigError(f"--method {name!r} is not a per-layer method")


def method_names() -> list[str]:
    from .scoring import SCORERS

    return sorted(set(SCORERS) | set(LAYER_METHODS) | set(EXTRA_METHODS))


def protection_observers(ck, stream=None, progress: bool = True, n_seqs: int = 4) -> list:
    """Observers whose ``protected(layer_idx)`` names experts that must never be dropped.

    Super-expert protection (``scoring.super_experts``): its thresholds are model-wide, so with a
    ``stream`` (the prune pipeline) the first ``n_seqs`` calibration sequences are profiled through
    the original model before the first layer is decided (one extra read of the checkpoint plus a
    forward of those sequences). Without one, a running observer applies the thresholds to the
    layers seen so far (an approximation; it needs each slot's expert output)."""
    from .scoring.super_experts import MaximaObserver, profile

    if stream is None:
        return [MaximaObserver(ck.num_experts)]
    return [profile(stream, n_seqs=n_seqs, progress=progress)]


# Registers the EEP search runner (lowmoe/eep).
from . import eep as _eep  # noqa: E402,F401


# Registers the merging methods (lowmoe/merging) and their plan fields in lowmoe.apply.
from . import merging as _merging  # noqa: E402,F401
