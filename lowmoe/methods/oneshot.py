"""The one-shot prune: score each MoE layer, decide its keep-set, propagate, in one streamed pass.

``decide_layers`` is what ``lowmoe prune --method NAME`` writes (``pipeline``) and what the EEP
search's ``--init NAME`` seed keeps, so the seed is exactly the plan a one-shot prune writes. It runs
the engine's layer loop (``Stream.walk``) with a fresh layer method per MoE layer and the super-
expert guards as observers; ``guards`` builds those guards.
"""

from __future__ import annotations

from typing import Callable

from ..engine import faults
from ..engine.apply import keep_groups
from ..engine.plan import LayerPlan
from ..engine.stream import LayerStep, Stream, walk
from .base import LayerMethod
from .scoring.super_experts import cached_profile


def guards(stream: Stream, *, enabled: bool = True, progress: bool = True, n_seqs: int = 4) -> list:
    """Observers whose ``protected(layer_idx)`` names experts that must never be dropped.

    Super-expert protection (``scoring.super_experts``): its thresholds are model-wide, so the first
    ``n_seqs`` calibration sequences are profiled through the original model before the first layer
    is decided (one extra read of the checkpoint plus a forward of those sequences), once per model and
    calibration: the profile is cached (``scoring.super_experts.cached_profile``) and reused."""
    if not enabled:
        return []
    guard = cached_profile(stream, n_seqs=n_seqs, progress=progress)
    faults.point("super-experts")
    return [guard]


def decide_layers(stream: Stream, layers, *, make_method: Callable[[], LayerMethod], keep_n: int, top_k: int,
                  guards: list, apply: Callable[[int, dict, LayerPlan | None], dict | None], sequential: bool = True):
    """For each ``(idx, LayerData)`` of ``layers`` (a ``Stream.layers`` reader): run the layer on its
    cached inputs with ``make_method()`` (a new ``LayerMethod`` per MoE layer) and the ``guards``
    observing its MoE block, decide its keep-set, and propagate through ``apply(idx, tensors, plan)``
    (``Stream.walk``): with ``sequential`` the next layer reads this one's outputs *with the plan
    applied*, else the original layer's. Yields a ``LayerStep`` per layer; its ``observers[0]`` is
    the layer's method (scores, state) and ``protected`` the experts the guards kept."""
    ck = stream.ck
    groups = keep_groups(ck, keep_n)

    def decide(idx: int, tensors: dict, observers: list) -> LayerPlan:
        protected = protected_experts(guards, idx)
        return observers[0].decide(idx, keep_n, protected=protected, groups=groups, tensors=tensors, adapter=ck.adapter)

    yield from walk(stream, layers, observers_for=lambda idx: [make_method()] + guards, decide=decide, apply=apply,
                    sequential=sequential, num_experts=keep_n, top_k=top_k)


def protected_experts(guards: list, layer_idx: int) -> set[int]:
    """The experts of ``layer_idx`` that any guard protects."""
    return set().union(*(g.protected(layer_idx) for g in guards))


__all__ = ["LayerStep", "decide_layers", "guards", "protected_experts"]
