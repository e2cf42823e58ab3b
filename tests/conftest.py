"""Shared fixtures: tiny synthetic checkpoints (built once per session) and calibration text."""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch

from lowmoe.toy.synth import synth_model

from .helpers import write_calib

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _profile_cache(tmp_path_factory):
    """Cached super-expert profiles go to a directory of each test's own (not the user's cache): a
    test's prunes profile as if no earlier test had run."""
    old = os.environ.get("LOWMOE_CACHE_DIR")
    os.environ["LOWMOE_CACHE_DIR"] = str(tmp_path_factory.mktemp("lowmoe-cache"))
    yield
    if old is None:
        os.environ.pop("LOWMOE_CACHE_DIR", None)
    else:
        os.environ["LOWMOE_CACHE_DIR"] = old


@pytest.fixture(scope="session")
def synth_dir(tmp_path_factory):
    """synth_dir(arch, **kw) -> path of a cached tiny synthetic model (do not modify it)."""
    root = tmp_path_factory.mktemp("synth")
    made: dict[str, Path] = {}

    def make(arch: str = "mixtral", **kw) -> Path:
        opts = dict(layers=3, hidden_size=32, intermediate_size=32, experts=8, top_k=2, shard_size="40KB")
        opts.update(kw)
        key = arch + "-" + hashlib.md5(repr(sorted(opts.items())).encode()).hexdigest()[:8]
        if key not in made:
            made[key] = synth_model(root / key, arch, **opts)
        return made[key]

    return make


@pytest.fixture(scope="session")
def calib_txt(tmp_path_factory) -> Path:
    return write_calib(tmp_path_factory.mktemp("calib") / "calib.txt")
