"""The streaming shard writer produces valid safetensors files that any reader accepts."""

from __future__ import annotations

import json

import torch
from safetensors import safe_open
from safetensors.torch import load_file

from lowmoe.engine.writer import ShardWriter, parse_size


def test_streamed_shards_round_trip(tmp_path):
    g = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(3 + i, 5, generator=g).to(dt)
               for i, dt in enumerate([torch.float32, torch.bfloat16, torch.float16, torch.float32] * 5)}
    tensors["scalar"] = torch.tensor(3.5)
    tensors["ints"] = torch.arange(7)
    w = ShardWriter(tmp_path, max_shard_bytes=200)
    w.add_all(tensors)
    weight_map = w.finalize()
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert index["weight_map"] == weight_map and index["metadata"]["total_size"] == w.total_bytes
    assert len(set(weight_map.values())) > 3
    for k, t in tensors.items():
        with safe_open(str(tmp_path / weight_map[k]), "pt") as f:
            assert f.metadata() == {"format": "pt"}
            got = f.get_tensor(k)
        assert got.dtype == t.dtype and torch.equal(got, t), k
    assert not list(tmp_path.glob(".tmp-*"))


def test_header_larger_than_reservation(tmp_path):
    w = ShardWriter(tmp_path, max_shard_bytes=10**9)
    w.header_reserve = 64  # force the grow-and-move path
    tensors = {f"layer.{i}.weight": torch.full((2,), float(i)) for i in range(50)}
    w.add_all(tensors)
    wm = w.finalize()
    loaded = load_file(str(tmp_path / next(iter(wm.values()))))
    assert all(torch.equal(loaded[k], v) for k, v in tensors.items())


def test_parse_size():
    assert parse_size("5GB") == 5 * 10**9 and parse_size("500MiB") == 500 * 2**20 and parse_size("2e3") == 2000
