"""Merging methods: merge experts instead of dropping them (``--method NAME``).

* ``merge-freq``    M-SMoE: most-used experts lead, others join the most similar leader, frequency-weighted merge
* ``hc-merge``      HC-SMoE: hierarchical clustering on mean expert outputs over all tokens, frequency-weighted merge
* ``diverse-group`` "Diversifying the Expert Knowledge": keep complementary experts by disparity, merge the rest with router rows
* ``c-prune``       C-Prune: per-layer clustering by parameter similarity, global cluster decision (a two-pass runner)
* ``dern``          DERN: drop by router statistics, recombine dropped experts' neuron segments into the kept ones

Every matrix merge accepts ``align=true`` (neuron permutation alignment, ``align.py``). Importing this
package registers the methods in ``lowmoe.methods`` and the plan fields ``align`` / ``neurons`` in
``lowmoe.apply`` (``lowmoe.methods`` imports it, so ``--plan`` re-applies merge plans).
"""

from __future__ import annotations

from .. import apply, methods
from .align import apply_alignment
from .c_prune import run_c_prune
from .dern import Dern, apply_neurons
from .diverse_group import DiverseGroup
from .hc_merge import HcMerge
from .merge_freq import MergeFreq

LAYER_METHODS = {cls.name: cls for cls in (MergeFreq, HcMerge, DiverseGroup, Dern)}
RUNNERS = {"c-prune": run_c_prune}

methods.LAYER_METHODS.update(LAYER_METHODS)
methods.EXTRA_METHODS.update(RUNNERS)
apply.LAYER_PRE_EXTENSIONS["align"] = apply_alignment
apply.LAYER_EXTENSIONS["neurons"] = apply_neurons

__all__ = ["LAYER_METHODS", "RUNNERS", "MergeFreq", "HcMerge", "DiverseGroup", "Dern", "run_c_prune"]
