"""Merging methods: merge experts instead of dropping them (``--method NAME``).

* ``merge-freq``    M-SMoE: most-used experts lead, others join the most similar leader, frequency-weighted merge
* ``hc-merge``      HC-SMoE: hierarchical clustering on mean expert outputs over all tokens, frequency-weighted merge
* ``diverse-group`` "Diversifying the Expert Knowledge": keep complementary experts by disparity, merge the rest with router rows
* ``c-prune``       C-Prune: per-layer clustering by parameter similarity, global cluster decision (a two-pass runner)
* ``dern``          DERN: drop by router statistics, recombine dropped experts' neuron segments into the kept ones

Every matrix merge accepts ``align=true`` (neuron permutation alignment, ``align.py``). The plan
fields ``align`` / ``neurons`` are applied by ``apply_alignment`` / ``apply_neurons``, which the
registry (``lowmoe.methods``) hands to the engine, so ``--plan`` re-applies merge plans.
"""

from __future__ import annotations

from .align import AlignedLayer, apply_alignment
from .c_prune import run_c_prune
from .dern import Dern, apply_neurons
from .diverse_group import DiverseGroup
from .hc_merge import HcMerge
from .merge_freq import MergeFreq

__all__ = ["AlignedLayer", "DiverseGroup", "Dern", "HcMerge", "MergeFreq", "apply_alignment", "apply_neurons", "run_c_prune"]
