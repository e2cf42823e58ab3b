"""Merging stays streamed: peak memory is flat in the number of layers (each prune in its own process)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from lowmoe.synth import synth_model

from .conftest import write_calib


def _peak(model, out, calib, method, *opts) -> int:
    extra = [a for o in opts for a in ("-O", o)]
    subprocess.run([sys.executable, "-m", "lowmoe.cli", "-q", "prune", str(model), str(out), "--keep", "4", "--method", method,
                    "--calib", str(calib), "--n-samples", "4", "--seq-len", "32", "--max-shard-size", "20MB", *extra],
                   check=True, capture_output=True)
    return json.loads((out / "lowmoe_report.json").read_text())["memory"]["peak_rss_bytes"]


@pytest.mark.slow
@pytest.mark.parametrize("method,opts", [("merge-freq", ("align=true",)), ("hc-merge", ()), ("c-prune", ()), ("dern", ())])
def test_merging_peak_rss_flat_in_layers(tmp_path, method, opts):
    calib = write_calib(tmp_path / "c.txt")
    kw = dict(hidden_size=256, intermediate_size=512, experts=8, top_k=2, shard_size="20MB")
    small = synth_model(tmp_path / "l2", "mixtral", layers=2, **kw)
    big = synth_model(tmp_path / "l12", "mixtral", layers=12, **kw)
    layer_bytes = 8 * 3 * 256 * 512 * 4  # ~12.6 MB of experts per layer in fp32
    p_small = _peak(small, tmp_path / "o2", calib, method, *opts)
    p_big = _peak(big, tmp_path / "o12", calib, method, *opts)
    # 10 more layers are 126 MB more model; a streamed run may grow by a fraction of one layer at most.
    assert p_big - p_small < 2 * layer_bytes, (p_small, p_big)
