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
from ..engine.budget import MergeHold
from ..errors import ConfigError
from .base import LayerMethod, ScoreThenKeep
from .eep import run_eep
from .eep.runner import OPTION_NAMES as EEP_OPTION_NAMES, parse_options as parse_eep_options
from .merging import AlignedLayer, DiverseGroup, Dern, HcMerge, MergeFreq, apply_alignment, apply_neurons, run_c_prune
from .merging.c_prune import OPTIONS as C_PRUNE_OPTIONS
from .options import parse_options
from .reconstruction import ReconstructionMethod
from .scoring import SCORERS, make_scorer

# name -> factory(num_experts, top_k, **options) -> LayerMethod (besides the scorers)
LAYER_METHODS = {cls.name: cls for cls in (MergeFreq, HcMerge, DiverseGroup, Dern, ReconstructionMethod)}
# name -> fn(run, cfg, top_k) -> report extras
RUNNERS = {"eep": run_eep, "c-prune": run_c_prune}
# runners whose streamed passes read a MoE layer's routed experts in groups, as the one-shot prune does
# (``Stream.layers(lazy=True)``, planned by ``budget.plan_lazy_budget``): C-Prune's scoring pass, EEP's
# seed passes (its population pass has a plan of its own, ``budget.plan_population``)
LAZY_RUNNERS = ("c-prune", "eep")
# runners that share their work among the processes of a torchrun launch (``engine.dist``)
DISTRIBUTED = ("eep",)
PLAN_FIELDS = PlanFields(pre={"align": apply_alignment}, post={"neurons": apply_neurons}, view={"align": AlignedLayer})


def option_spec(name: str) -> dict:
    """Every ``--method-option`` of method ``name``: ``{option: (default, kind)}``."""
    if name in LAYER_METHODS:
        return LAYER_METHODS[name].option_spec()
    if name in SCORERS:
        return dict(SCORERS[name].OPTIONS)
    if name == "c-prune":
        return dict(C_PRUNE_OPTIONS)
    if name == "eep":
        return {k: (None, str) for k in EEP_OPTION_NAMES}
    raise ConfigError(f"--method {name!r}: unknown; choose one of: {', '.join(method_names())}")


def check_options(name: str, num_experts: int, top_k: int, seed: int, options: dict) -> None:
    """Refuse a bad ``--method-option`` (unknown name, value of the wrong kind) for method ``name`` with
    the method's own one-line ConfigError, before any work (the output folder is not made yet)."""
    if name == "eep":
        parse_eep_options(dict(options), seed)
    elif name == "c-prune":
        parse_options(name, dict(options), C_PRUNE_OPTIONS)
    else:
        make_layer_method(name, num_experts, top_k, seed=seed, **options)


def options_per_method(names: list[str], options: dict) -> dict[str, dict]:
    """``lowmoe score``'s options for several methods: per method (``{"reap": {...}}``) as given, or
    flat (``{"renormalize": "false"}``), each method taking the options it has. A flat option no
    method has is a ConfigError naming it."""
    if options and set(options) <= set(names):
        return {m: dict(options.get(m) or {}) for m in names}
    specs = {m: option_spec(m) for m in names}
    for key in options:
        if key != "seed" and not any(key in s for s in specs.values()):
            valid = sorted(set().union(*specs.values()))
            raise ConfigError(f"--method-option {key}: not an option of --method {','.join(names)}; "
                              f"valid: {', '.join(valid) or 'none'}")
    return {m: {k: v for k, v in options.items() if k in specs[m]} for m in names}


def merge_hold(name: str, num_experts: int, keep_n: int, options: dict | None = None) -> MergeHold | None:
    """What ``--method name``'s plans hold on the host beyond a selection's, for the budget
    (``budget.MergeHold``, ``plan_lazy_budget``; ``options``: its ``--method-option`` values, e.g.
    ``align``); None: a method that only selects experts."""
    if name in LAYER_METHODS:
        return LAYER_METHODS[name].merge_hold(num_experts, keep_n, options)
    if name == "c-prune":  # k clusters merged, as the merging layer methods
        align = parse_options("c-prune", dict(options or {}), C_PRUNE_OPTIONS)["align"]
        return MergeHold(max(0, min(keep_n, num_experts - keep_n)), keep_n, align=bool(align))
    return None


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


__all__ = ["LAYER_METHODS", "LAZY_RUNNERS", "PLAN_FIELDS", "RUNNERS", "LayerMethod", "ScoreThenKeep", "check_options",
           "make_layer_method", "merge_hold", "method_names", "option_spec", "options_per_method", "scoring_methods"]
