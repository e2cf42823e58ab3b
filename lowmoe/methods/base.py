"""What a per-layer method is: observe one MoE layer's forward calls, then decide its plan.

**Layer methods** decide each MoE layer on its own, inside the single streamed pass
(``methods.oneshot.decide_layers``): they ``observe`` every MoE forward call of the layer on the
calibration tokens, then ``decide`` that layer's ``LayerPlan`` (keep-set, and for merging methods
the merge / router matrices). Every scorer in ``lowmoe.methods.scoring`` is a layer method through
``ScoreThenKeep``. The registry (``lowmoe.methods``) maps ``--method`` names to them.
"""

from __future__ import annotations

import torch

from ..engine.budget import MergeHold
from ..engine.hf import MoeCall
from ..engine.plan import LayerPlan
from .scoring import choose_keep


class LayerMethod:
    """Per-layer decision: observe the layer's MoE calls, then decide its LayerPlan."""

    name = "base"
    needs_expert_outputs = False
    OPTIONS: dict = {}  # --method-option name -> (default, kind) (``options.parse_options``)

    def __init__(self, num_experts: int, top_k: int, **options):
        self.num_experts, self.top_k, self.options = num_experts, top_k, options
        # float32 bytes the budget lets the method hold in blocks (``BudgetPlan.merge_scratch_bytes``,
        # for a method whose ``merge_hold`` has ``blocks``); None: its own default
        self.scratch_bytes: int | None = None

    @classmethod
    def option_spec(cls) -> dict:
        """Every ``--method-option`` this method takes: ``{name: (default, kind)}``."""
        return dict(cls.OPTIONS)

    @classmethod
    def merge_hold(cls, num_experts: int, keep_n: int, options: dict | None = None) -> MergeHold | None:
        """What the method's plans hold on the host beyond a selection's, for the budget
        (``budget.MergeHold``; ``options``: its ``--method-option`` values); None: its plans only
        select experts (kept ones are copied as bytes)."""
        return None

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
        return LayerPlan(choose_keep(self.scorer.scores(), keep_n, protected, groups))

    def scores(self):
        return self.scorer.scores()

    def state(self) -> dict:
        return self.scorer.state()
