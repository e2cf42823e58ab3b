"""Methods: how experts are chosen, merged or searched. One explicit registry, looked up by name.

* ``scoring/``       -- per-expert scores (frequency, gate-mass, REAP, EASY-EP, TCESS) and super-expert guards
* ``reconstruction`` -- NAEE-style search for the keep-set that best reconstructs the layer's output
* ``merging/``       -- merge instead of drop (merge-freq, hc-merge, diverse-group, DERN; C-Prune's runner)
* ``eep/``           -- the EEP evolutionary search (a runner)
* ``oneshot``        -- the one-shot prune's layer loop and the super-expert guards

Two kinds of method, both by ``--method`` name:

* **layer methods** (``make_layer_method``) decide each MoE layer on its own inside the single
  streamed pass; every scorer is one through ``ScoreThenKeep``;
* **runners** (``RUNNERS``) drive the whole run themselves: ``fn(run, cfg, top_k) -> dict`` of report
  extras, with ``run`` an ``engine.rundir.PruneRun`` and ``cfg`` the pipeline's ``PruneConfig``.

``PLAN_FIELDS`` tells the engine how to apply the per-layer plan fields these methods write beyond
keep/merge/router (``align``, ``neurons``), so ``--plan`` re-applies their plans.
"""

from __future__ import annotations

from ..engine.apply import PlanFields
from ..errors import ConfigError
from .base import LayerMethod, ScoreThenKeep
from .eep import run_eep
from .merging import DiverseGroup, Dern, HcMerge, MergeFreq, apply_alignment, apply_neurons, run_c_prune
from .reconstruction import ReconstructionMethod
from .scoring import SCORERS, make_scorer

# name -> factory(num_experts, top_k, **options) -> LayerMethod (besides the scorers)
LAYER_METHODS = {cls.name: cls for cls in (MergeFreq, HcMerge, DiverseGroup, Dern, ReconstructionMethod)}
# name -> fn(run, cfg, top_k) -> report extras
RUNNERS = {"eep": run_eep, "c-prune": run_c_prune}
# runners that share their work among the processes of a torchrun launch (``engine.dist``)
DISTRIBUTED = ("eep",)
PLAN_FIELDS = PlanFields(pre={"align": apply_alignment}, post={"neurons": apply_neurons})


def make_layer_method(name: str, num_experts: int, top_k: int, **options) -> LayerMethod:
    """A new per-layer method by ``--method`` name (ConfigError for a runner or an unknown name)."""
    if name in LAYER_METHODS:
        return LAYER_METHODS[name](num_experts, top_k, **options)
    if name in SCORERS:
        return ScoreThenKeep(make_scorer(name, num_experts, top_k, **options))
    raise ConfigError(f"--method {name!r} is not a per-layer method")


def method_names() -> list[str]:
    """Every ``--method`` name."""
    return sorted(set(SCORERS) | set(LAYER_METHODS) | set(RUNNERS))


def scoring_methods() -> list[str]:
    """Methods ``lowmoe score`` accepts: every per-layer method (runners such as EEP have no scores)."""
    return sorted(set(SCORERS) | set(LAYER_METHODS))


__all__ = ["LAYER_METHODS", "PLAN_FIELDS", "RUNNERS", "LayerMethod", "ScoreThenKeep", "make_layer_method",
           "method_names", "scoring_methods"]
