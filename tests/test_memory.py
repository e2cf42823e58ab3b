"""Peak memory is flat in the number of layers (each prune runs in its own process)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from lowmoe.toy.synth import synth_model

from .helpers import write_calib


def _peak(model, out, calib) -> int:
    # two malloc arenas: with one per thread (the prefetch thread allocates what the main thread
    # frees), peak RSS of the same run varied by 25-50 MB from run to run
    env = {**os.environ, "MALLOC_ARENA_MAX": "2"}
    subprocess.run([sys.executable, "-m", "lowmoe", "-q", "prune", str(model), str(out), "--keep", "4",
                    "--calib", str(calib), "--n-samples", "4", "--seq-len", "32", "--max-shard-size", "20MB"],
                   check=True, capture_output=True, env=env)
    return json.loads((out / "lowmoe_report.json").read_text())["memory"]["peak_rss_bytes"]


def test_peak_rss_flat_in_layers(tmp_path):
    calib = write_calib(tmp_path / "c.txt")
    kw = dict(hidden_size=256, intermediate_size=512, experts=8, top_k=2, shard_size="20MB")
    # 4 layers, not 2: the steady state (one layer computing, the next one prefetched) must be reached
    small = synth_model(tmp_path / "l4", "mixtral", layers=4, **kw)
    big = synth_model(tmp_path / "l12", "mixtral", layers=12, **kw)
    layer_bytes = 8 * 3 * 256 * 512 * 4  # ~12.6 MB of experts per layer in fp32
    p_small, p_big = _peak(small, tmp_path / "o4", calib), _peak(big, tmp_path / "o12", calib)
    # 8 more layers are 100 MB more model; a streamed run may grow by a fraction of that (measured:
    # 22-30 MB with two arenas), not in proportion to the layers.
    assert p_big - p_small < 2.5 * layer_bytes, (p_small, p_big)


def test_onednn_primitive_cache_is_off_unless_the_user_set_it(tmp_path):
    """lowmoe turns oneDNN's primitive cache off (it grows with every new expert row count under bf16)
    before torch first computes a layer (``ModelSkeleton``), and keeps a value the user chose;
    importing lowmoe alone changes nothing."""
    code = ("import os, lowmoe; assert os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY') in (None, '64'); "
            f"lowmoe.synth_model({str(tmp_path / 'm')!r}, 'mixtral', layers=1, overwrite=True); "
            "print(os.environ['ONEDNN_PRIMITIVE_CACHE_CAPACITY'])")
    env = {k: v for k, v in os.environ.items() if k != "ONEDNN_PRIMITIVE_CACHE_CAPACITY"}
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "0"
    env["ONEDNN_PRIMITIVE_CACHE_CAPACITY"] = "64"
    assert subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip() == "64"
