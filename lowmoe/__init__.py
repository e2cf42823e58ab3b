"""lowmoe: prune and merge the experts of Mixture-of-Experts LLMs, one decoder layer at a time.

Python API (the CLI is a shell over these)::

    import lowmoe
    lowmoe.synth_model("mix", "mixtral", layers=4)                  # a synthetic checkpoint
    lowmoe.inspect_model("mix")                                      # sizes and memory estimate
    report = lowmoe.prune("mix", "mix-4", keep=4, method="frequency", calib=["demos.jsonl"])
    lowmoe.prune("mix", "mix-4b", plan=report["plan"])               # re-apply a plan
"""

from .engine.plan import LayerPlan, Plan
from .errors import LowmoeError
from .inspect import inspect_model
from .pipeline import PruneConfig, available_methods, prune
from .toy.synth import synth_model
from .version import __version__

__all__ = ["LowmoeError", "LayerPlan", "Plan", "PruneConfig", "__version__", "available_methods", "inspect_model", "prune",
           "synth_model"]
