"""lowmoe: prune and merge the experts of Mixture-of-Experts LLMs, one decoder layer at a time.

Python API (the CLI is a shell over these)::

    import lowmoe
    lowmoe.synth_model("mix", "mixtral", layers=4)                  # a synthetic checkpoint
    lowmoe.inspect_model("mix")                                      # sizes and memory estimate
    report = lowmoe.prune("mix", "mix-4", keep=4, method="frequency", calib=["demos.jsonl"])
    lowmoe.prune("mix", "mix-4b", plan=report["plan"])               # re-apply a plan
"""

__version__ = "0.1.0"

import os

# oneDNN (bf16 matmuls on CPU) caches a primitive, with its reordered weights, per distinct shape;
# a MoE layer's experts see a new row count on nearly every call, so the cache only grows: in the
# bf16 EEP benchmark it took peak RSS from 1.37 to 1.65-1.79 GB, and turning it off cost no time
# (docs/eep.md). Read when oneDNN first runs; a value the user set is kept.
os.environ.setdefault("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "0")

from .errors import LowmoeError  # noqa: E402
from .inspect import inspect_model  # noqa: E402
from .pipeline import PruneConfig, available_methods, prune  # noqa: E402
from .plan import LayerPlan, Plan  # noqa: E402
from .synth import synth_model  # noqa: E402

__all__ = ["LowmoeError", "LayerPlan", "Plan", "PruneConfig", "available_methods", "inspect_model", "prune", "synth_model"]
