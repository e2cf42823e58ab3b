"""A normal run uses transformers' current API: no deprecation warning (FutureWarning) is raised."""

from __future__ import annotations

import subprocess
import sys
import warnings

import torch

import lowmoe
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.engine.hf import LayerInputs, ModelSkeleton, materialize_layer, run_layer

from .helpers import FAMILIES


def test_layers_masks_and_prune_raise_no_future_warning(synth_dir, calib_txt, tmp_path):
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        for arch in FAMILIES:
            ck = Checkpoint(synth_dir(arch))
            skel = ModelSkeleton(ck.config, ck.adapter)
            h = torch.randn(1, 6, ck.config["hidden_size"])
            inputs = LayerInputs.build(skel, h, skel.rotary("cpu"))
            rt = ck.adapter.to_runtime(1, ck.read_layer(1), 1 in ck.moe_layers())
            run_layer(skel, materialize_layer(skel, 1, rt, "cpu", torch.float32), 1, h, inputs)
        lowmoe.prune(synth_dir("gpt_oss"), tmp_path / "out", keep=4, method="frequency", calib=[str(calib_txt)],
                     n_samples=4, seq_len=32, progress=False)


def test_demo_runs_clean_with_future_warnings_as_errors(tmp_path):
    """The issue's acceptance command, on a smaller evaluation (--n 4)."""
    r = subprocess.run([sys.executable, "-W", "error::FutureWarning", "-m", "lowmoe", "-q", "demo", "--method", "frequency",
                        "--n", "4", "--out", str(tmp_path / "d")], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "FutureWarning" not in r.stderr and "deprecated" not in r.stderr
