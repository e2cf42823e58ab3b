"""Where a streamed pass's time goes (report "stages"), activations held in memory when they fit, and
the next layer's first expert group read by the layer reader: what each one does, and that none of
them changes a number."""

from __future__ import annotations

import json
import re
import threading

import pytest
import torch

import lowmoe
from lowmoe.engine import stream as stream_mod
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.engine.lazy import ShardFiles, StagingPool, read_lazy_layer
from lowmoe.engine.prefetch import STAGES, IOStats
from lowmoe.pipeline import REPORT
from lowmoe.score import score

from .helpers import dir_digest, lazy_chunking_ram

OPTS = dict(keep=4, method="frequency", n_samples=8, seq_len=16, batch_size=2, progress=False, device="cpu")


def model_files(path):
    return {k: v for k, v in dir_digest(path).items() if k != REPORT}


def on_disk(monkeypatch):
    """Make every Stream keep its activation cache on disk (as when it does not fit in memory)."""
    real = stream_mod.activation_memory
    monkeypatch.setattr(stream_mod, "activation_memory",
                        lambda *a, **k: {**real(*a, **k), "held_bytes": 0, "where": "disk"})


def test_stage_timer_records_seconds_counts_and_threads():
    io = IOStats()
    with io.stage("compute"):
        pass
    with io.stage("compute"):
        pass
    t = threading.Thread(target=lambda: io.add_stage("read", 0.5))
    t.start()
    t.join()
    io.add_wait("layer", 0.25)  # waits are stages too
    before = io.stage_snapshot()
    io.add_stage("read", 1.0)
    st = io.stages_json(wall_s=2.0)
    assert list(st) == ["read", "wait_layer", "compute"], "stages come in STAGES order"
    assert st["compute"]["count"] == 2 and st["compute"]["thread"] == "main"
    assert st["read"] == {"s": 1.5, "count": 2, "thread": "background", "share": 0.75}
    assert st["wait_layer"]["s"] == 0.25
    assert io.stages_json(since=before) == {"read": {"s": 1.0, "count": 1, "thread": "background"}}


def test_prune_report_has_the_stage_table(synth_dir, calib_txt, tmp_path):
    rep = lowmoe.prune(synth_dir("mixtral"), tmp_path / "o", calib=[calib_txt], **OPTS)
    st = rep["stages"]
    for name in ("read", "materialize", "expert_read", "compute", "observe", "decide", "apply"):
        assert name in st and st[name]["count"] > 0, name
        assert name in STAGES
    assert st["read"]["thread"] == "background" and st["compute"]["thread"] == "main"
    assert st["expert_read"]["thread"] == "background", "expert groups are read off the main thread"
    assert st["observe"]["s"] <= st["compute"]["s"], "observe is part of compute"
    # the main thread's stages (observe is inside compute) cannot add up to more than the pass
    main = sum(v["share"] for k, v in st.items() if v.get("thread") == "main" and k != "observe")
    assert 0 < main <= 1.05
    out = score(synth_dir("mixtral"), calib=[calib_txt], method="frequency", n_samples=8, seq_len=16, batch_size=2,
                progress=False, device="cpu")
    assert out["stages"]["compute"]["count"] > 0 and out["stages"]["expert_read"]["count"] > 0


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_activations_in_memory_change_no_byte(synth_dir, calib_txt, tmp_path, monkeypatch, arch):
    src = synth_dir(arch)
    mem = lowmoe.prune(src, tmp_path / "mem", calib=[calib_txt], **OPTS)
    assert mem["activations"]["where"] == "cpu"
    held = mem["activations"]["held_bytes"]
    assert held == 2 * mem["activations"]["boundary_bytes"] and 0 < mem["activations"]["peak_in_memory_bytes"] <= held
    # a prune can be resumed: its chunks still reach the disk (behind), but are never read back from it
    assert mem["activations"]["disk_bytes_written"] > 0
    on_disk(monkeypatch)
    disk = lowmoe.prune(src, tmp_path / "disk", calib=[calib_txt], **OPTS)
    assert disk["activations"]["where"] == "disk" and disk["activations"]["peak_in_memory_bytes"] == 0
    assert model_files(tmp_path / "mem") == model_files(tmp_path / "disk")
    assert mem["scores"] == disk["scores"]


def test_score_keeps_activations_off_the_disk(synth_dir, calib_txt, monkeypatch):
    kw = dict(calib=[calib_txt], method=["frequency", "reap"], n_samples=8, seq_len=16, batch_size=2, progress=False,
              device="cpu")
    mem = score(synth_dir("mixtral"), **kw)
    assert mem["activations"]["where"] == "cpu" and mem["activations"]["disk_bytes_written"] == 0
    on_disk(monkeypatch)
    disk = score(synth_dir("mixtral"), **kw)
    assert disk["activations"]["disk_bytes_written"] > 0
    for L, e in disk["layers"].items():
        assert mem["layers"][L]["scores"] == e["scores"], L


def test_activations_go_to_disk_when_they_do_not_fit(synth_dir, calib_txt, tmp_path):
    """Under a --max-ram with no room beside the planned peak, the cache stays on disk."""
    src = synth_dir("mixtral", hidden_size=64, intermediate_size=256, shard_size="400KB")
    ram = lazy_chunking_ram(src, 2, 16)
    rep = lowmoe.prune(src, tmp_path / "o", calib=[calib_txt], max_ram=ram, **OPTS)
    assert rep["activations"]["where"] == "disk"
    roomy = lowmoe.prune(src, tmp_path / "r", calib=[calib_txt], max_ram=ram + 4 * rep["activations"]["boundary_bytes"],
                         **OPTS)
    assert roomy["activations"]["where"] == "cpu"
    assert model_files(tmp_path / "o") == model_files(tmp_path / "r")


def test_pool_keeps_two_buffers_for_the_computing_layer():
    pool = StagingPool(3, 1024)
    shapes = {"w": ((16,), torch.float32)}
    pre = pool.try_acquire(shapes)
    assert pre is not None
    assert pool.try_acquire(shapes) is None, "preloads hold at most count - 2 buffers"
    a, _ = pool.acquire(shapes)
    b, _ = pool.acquire(shapes)
    assert len({pre[0], a, b}) == 3
    pool.adopt(pre[0])  # the preloaded group is computing now: an ordinary buffer
    pool.release(a)
    assert pool.try_acquire(shapes) is not None, "a freed buffer can take the next preload"
    # a later, larger group grows the free buffers at once and the busy ones when next taken
    pool.release(b)
    big = {"w": ((1024,), torch.float32)}
    i, v = pool.acquire(big)
    assert v["w"].numel() == 1024 and pool.nbytes >= 4096


def test_first_group_is_read_by_the_layer_reader(synth_dir):
    """``ExpertSource.preload`` reads a group into the pool; the group that asks for it gets it unread."""
    ck = Checkpoint(synth_dir("mixtral"))
    files = ShardFiles(ck.path)
    src = read_lazy_layer(ck, files, 1).experts
    pool = StagingPool(3)
    pool.ensure(1 << 20)
    assert src.preload(0, 4, pool)
    read = files.bytes_read
    i, tensors = src.take_preloaded(0, 4)
    assert files.bytes_read == read, "taken without another read"
    ref = src.load(0, 4)
    assert all(torch.equal(tensors[k], ref[k]) for k in ref)
    assert src.take_preloaded(0, 4) is None, "taken once"
    pool.release(i)
    assert src.preload(4, 8, pool)
    src.drop_preloaded()  # never asked for: its buffer goes back
    assert pool.in_use == 0


def test_prefetch_reads_each_expert_once(synth_dir, calib_txt, tmp_path):
    """With the layer reader preloading first groups, each layer's experts are still read exactly once
    by the scoring forward (plus the kept ones for the sequential pass), as without prefetching."""
    src = synth_dir("mixtral")
    kw = dict(OPTS, protect_super_experts=False)  # no profile pass: only the prune's own reads
    on = lowmoe.prune(src, tmp_path / "on", calib=[calib_txt], prefetch=True, **kw)
    off = lowmoe.prune(src, tmp_path / "off", calib=[calib_txt], prefetch=False, **kw)
    assert on["io"]["expert_bytes_read"] == off["io"]["expert_bytes_read"]
    assert model_files(tmp_path / "on") == model_files(tmp_path / "off")


def test_sequential_prune_reads_each_expert_once(synth_dir, calib_txt, tmp_path):
    """The pruned twin of a layer (what the next layer sees in a sequential pass) is built from the
    experts already on the device when the whole layer is there: no expert is read twice, and the
    output is the same as when the kept experts are read again (a budget that chunks the layer)."""
    src = synth_dir("mixtral", hidden_size=64, intermediate_size=256, shard_size="400KB")
    kw = dict(OPTS, protect_super_experts=False)
    seq = lowmoe.prune(src, tmp_path / "seq", calib=[calib_txt], sequential=True, **kw)
    one = lowmoe.prune(src, tmp_path / "one", calib=[calib_txt], sequential=False, **kw)
    assert seq["io"]["expert_bytes_read"] == one["io"]["expert_bytes_read"]
    chunked = lowmoe.prune(src, tmp_path / "chunked", calib=[calib_txt], sequential=True,
                           max_ram=lazy_chunking_ram(src, 2, 16), **kw)
    assert max(chunked["budget"]["group_sizes"].values()) < Checkpoint(src).num_experts
    assert chunked["io"]["expert_bytes_read"] > seq["io"]["expert_bytes_read"], "chunked: groups are read again for every chunk"
    assert model_files(tmp_path / "seq") == model_files(tmp_path / "chunked")
    assert seq["scores"] == chunked["scores"]


def test_cli_summary_names_where_the_time_went(synth_dir, calib_txt, tmp_path):
    from click.testing import CliRunner

    from lowmoe.cli import main

    r = CliRunner().invoke(main, ["prune", str(synth_dir("mixtral")), str(tmp_path / "o"), "--calib", str(calib_txt),
                                  "--keep", "4", "--n-samples", "8", "--seq-len", "16", "--device", "cpu"])
    assert r.exit_code == 0, r.output
    line = next(x for x in r.output.splitlines() if "time on the main thread:" in x)
    stages = json.loads((tmp_path / "o" / REPORT).read_text())["stages"]
    named = re.findall(r"(\w+) [0-9.]+s", line.split(":", 1)[1])
    # the largest main-thread stages, largest first; observe is part of compute and never named
    assert named and "observe" not in named, line
    assert all(stages[k].get("thread") == "main" for k in named), (named, stages)
    by_time = sorted((k for k, v in stages.items() if v.get("thread") == "main" and k != "observe"),
                     key=lambda k: -stages[k]["s"])
    assert named == by_time[:len(named)] and len(named) == min(4, len(by_time)), (named, by_time)
    assert "compute" in by_time
