"""lowmoe: prune and merge the experts of Mixture-of-Experts LLMs, one decoder layer at a time.

Python API (the CLI is a shell over these)::

    import lowmoe
    lowmoe.synth_model("mix", "mixtral", layers=4)                  # a synthetic checkpoint
    lowmoe.inspect_model("mix")                                      # sizes and memory estimate
    report = lowmoe.prune("mix", "mix-4", keep=4, method="frequency", calib=["demos.jsonl"])
    lowmoe.prune("mix", "mix-4b", plan=report["plan"])               # re-apply a plan
"""

__version__ = "0.1.0"

from .errors import LowmoeError  # noqa: E402
from .inspect import inspect_model  # noqa: E402
from .pipeline import PruneConfig, available_methods, prune  # noqa: E402
from .plan import LayerPlan, Plan  # noqa: E402
from .synth import synth_model  # noqa: E402

__all__ = ["LowmoeError", "LayerPlan", "Plan", "PruneConfig", "available_methods", "inspect_model", "prune", "synth_model"]
