"""EEP-style evolutionary expert pruning and merging, streamed one layer at a time.

``--method eep`` (``runner.run_eep``): an evolutionary search over per-layer-group router-mapping
(W_RM) and expert-merging (W_EM) matrices (Liu et al., arXiv 2407.00945), whose fitness is
teacher-forced task accuracy, evaluated for a whole population per streamed pass over the layers.

* ``space``      -- candidates (W_EM, W_RM per layer group), pruning/merging phases, -> Plan
* ``evolve``     -- EEP's archive-based evolution, seeded, checkpointed, resumable
* ``fitness``    -- teacher-forced exact-match / multiple-choice fitness from one forward pass
* ``population`` -- population-parallel streaming with prefix sharing; whole-model reference
* ``runner``     -- the ``eep`` runner: search, dev pick, write from the originals
"""

from .runner import run_eep

__all__ = ["run_eep"]
