"""Every merging method end to end: the output loads in transformers and equals a reference merge
computed here, in memory, from the original full model's weights (transformers' runtime layout)."""

from __future__ import annotations

import pytest

from .helpers import check_against_reference

CASES = [
    ("mixtral", "merge-freq", {}),
    ("mixtral", "merge-freq", {"align": "true", "similarity": "weight", "router": "mean"}),
    ("mixtral", "hc-merge", {"align": "true"}),
    ("mixtral", "diverse-group", {"representation": "output"}),
    ("mixtral", "c-prune", {"align": "true"}),
    ("mixtral", "dern", {}),
]


@pytest.mark.parametrize("arch,method,options", CASES, ids=[f"{a}-{m}-{'-'.join(o) or 'default'}" for a, m, o in CASES])
def test_output_loads_and_equals_in_memory_reference(synth_dir, calib_txt, tmp_path, arch, method, options):
    check_against_reference(synth_dir, calib_txt, tmp_path, arch, method, options)


