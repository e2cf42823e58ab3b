"""Overlapped I/O: order, bounded look-ahead, error propagation, wait accounting, same results."""

from __future__ import annotations

import os
import threading
import time

import pytest
import torch

import lowmoe
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.pipeline import REPORT
from lowmoe.engine.prefetch import DeviceStager, IOStats, LayerReader, Prefetcher, WriteBehind

from .helpers import dir_digest

OPTS = dict(keep=4, method="frequency", n_samples=8, seq_len=32, batch_size=2, progress=False)


def test_prefetcher_yields_in_order_and_loads_one_ahead():
    live, peak, lock = [0], [0], threading.Lock()

    def load(i):
        with lock:
            live[0] += 1
            peak[0] = max(peak[0], live[0])
        return i * 10

    got = []
    for i, v in Prefetcher(load, range(6), depth=1):
        got.append((i, v))
        time.sleep(0.01)  # let the reader run ahead as far as it may
        with lock:
            live[0] -= 1
    assert got == [(i, i * 10) for i in range(6)]
    assert peak[0] <= 2, "depth 1 means the item in use plus one being read, never more"


def test_prefetch_reads_the_next_item_on_another_thread_while_this_one_computes():
    """Behaviour, not wall-clock ratios (those are measured by scripts/bench_prefetch.py): with depth 1
    every read runs on the reader thread, and item i+1's read starts while the consumer still holds
    item i (the consumer blocks until it has started); with depth 0 reads run on the caller's thread,
    only when asked for, and every read counts as wait."""
    main = threading.get_ident()

    def run(depth):
        started = {i: threading.Event() for i in range(6)}
        where = {}

        def load(i):
            where[i] = threading.get_ident()
            started[i].set()
            return i

        stats, overlapped = IOStats(), []
        for i, _ in Prefetcher(load, range(6), depth=depth, stats=stats, kind="layer"):
            if i + 1 < 6:  # "compute" item i: did the read of i+1 start meanwhile?
                overlapped.append(started[i + 1].wait(timeout=5 if depth else 0.05))
        return where, overlapped, stats

    where, overlapped, s1 = run(1)
    assert sorted(where) == list(range(6)) and all(t != main for t in where.values()), "reads on the reader thread"
    assert len(set(where.values())) == 1 and overlapped == [True] * 5
    assert s1.count["layer"] == 6
    where, overlapped, s0 = run(0)
    assert all(t == main for t in where.values()) and overlapped == [False] * 5
    assert s0.count["layer"] == 6 and s0.wait_s["layer"] >= s0.read_s["layer"]  # no overlap: every read is waited for


def test_prefetch_error_arrives_at_its_item():
    def load(i):
        if i == 3:
            raise OSError("shard truncated")
        return i

    seen = []
    with pytest.raises(OSError, match="truncated"):
        for i, _ in Prefetcher(load, range(6), depth=1):
            seen.append(i)
    assert seen == [0, 1, 2]


def test_write_behind_keeps_order_and_flushes():
    out, stats = [], IOStats()

    def write(i):
        time.sleep(0.01)
        out.append(i)

    w = WriteBehind(True, stats, max_pending=2)
    for i in range(5):
        w.submit(write, i, nbytes=4)
    w.close()
    assert out == list(range(5)) and stats.count["cache_write"] == 5 and stats.bytes["cache_write"] == 20


def test_write_behind_error_is_raised_on_flush():
    def write(i):
        raise ValueError("disk full")

    w = WriteBehind(True)
    w.submit(write, 0)
    with pytest.raises(ValueError, match="disk full"):
        w.close()


def test_layer_reader_matches_checkpoint(synth_dir):
    ck = Checkpoint(synth_dir("qwen3_moe"))
    moe = set(ck.moe_layers())
    stats = IOStats()
    reader = LayerReader(ck, range(ck.num_layers), stats=stats,
                         to_runtime=lambda L, t: ck.adapter.to_runtime(L, t, L in moe))
    seen = []
    for L, data in reader:
        ref = ck.read_layer(L)
        assert list(data.tensors) == list(ref) and all(torch.equal(data.tensors[k], ref[k]) for k in ref)
        rt = ck.adapter.to_runtime(L, ref, L in moe)
        assert set(data.runtime) == set(rt) and all(torch.equal(data.runtime[k], rt[k]) for k in rt)
        seen.append(L)
    assert seen == list(range(ck.num_layers))
    assert stats.bytes["layer"] == sum(ck.layer_bytes(L) for L in seen)


def test_stager_on_cpu_casts():
    st = DeviceStager(torch.device("cpu"))
    t = {"w": torch.arange(6, dtype=torch.bfloat16).reshape(2, 3), "i": torch.arange(3)}
    out = st.stage(t, torch.float32).wait()
    assert out["w"].dtype == torch.float32 and torch.equal(out["w"], t["w"].float()) and out["i"].dtype == torch.long


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_prune_same_bytes_with_and_without_prefetch(synth_dir, calib_txt, tmp_path, arch):
    src = synth_dir(arch)
    r_off = lowmoe.prune(src, tmp_path / "off", calib=[calib_txt], prefetch=False, **OPTS)
    r_on = lowmoe.prune(src, tmp_path / "on", calib=[calib_txt], prefetch=True, **OPTS)
    files = lambda p: {k: v for k, v in dir_digest(p).items() if k != REPORT}  # noqa: E731
    assert files(tmp_path / "on") == files(tmp_path / "off")
    assert r_on["scores"] == r_off["scores"] and r_on["plan"] == r_off["plan"]
    io = r_on["io"]
    # the first run read the 3 layers twice (the super-expert profiling pass, then the scoring pass);
    # the second reuses the cached profile and reads each layer once
    assert r_off["io"]["count"]["layer"] == 6 and not r_off["super_expert_profile"]["hit"]
    assert r_on["super_expert_profile"]["hit"]
    assert io["count"]["layer"] == 3 and io["count"]["cache"] > 0 and io["count"]["cache_write"] > 0
    assert 0 <= io["wait_fraction"] <= 1
    # without prefetch, all read time is waited for
    off = r_off["io"]
    assert off["wait_s"]["layer"] >= off["read_s"]["layer"] - 2e-4


# ---- readahead: the disk reads the first layers while the pass imports and tokenizes ----------------

def _record_advice(monkeypatch):
    calls = []

    def advise(fd, offset, length, advice):
        calls.append((os.path.basename(os.readlink(f"/proc/self/fd/{fd}")), offset, length, advice))

    monkeypatch.setattr(os, "posix_fadvise", advise, raising=False)
    monkeypatch.setattr(os, "POSIX_FADV_WILLNEED", 3, raising=False)
    return calls


def test_readahead_advises_the_shards_in_the_order_a_pass_reads_them(synth_dir, monkeypatch):
    from lowmoe.engine.prefetch import Readahead, shard_read_order

    ck = Checkpoint(synth_dir("mixtral", layers=4, hidden_size=64, intermediate_size=128, shard_size="60KB"))
    order = [p.name for p in shard_read_order(ck)]
    assert len(order) > 3 and sorted(order) == sorted(set(ck.weight_map.values()))
    assert order[0] == ck.weight_map["model.embed_tokens.weight"]
    first_use = [min(i for i, n in enumerate(order) if ck.weight_map[k] == n) for L in range(4) for k in ck.layer_keys(L)]
    assert all(ck.weight_map[k] in order[:1 + max(first_use)] for L in range(4) for k in ck.layer_keys(L))

    calls = _record_advice(monkeypatch)
    ahead = Readahead(ck, limit=10 << 30)
    ahead.join(30)
    sizes = {p.name: p.stat().st_size for p in ck.path.glob("*.safetensors")}
    assert [c[0] for c in calls] == [n for n in order for _ in range(-(-sizes[n] // Readahead.STEP))]
    assert all(c[3] == os.POSIX_FADV_WILLNEED for c in calls)
    assert ahead.bytes == sum(sizes.values())

    calls.clear()
    small = Readahead(ck, limit=sizes[order[0]] + 1000)
    small.join(30)
    assert small.bytes == sizes[order[0]] + 1000 and [c[0] for c in calls] == order[:2]
    assert sum(c[2] for c in calls) == small.bytes


def test_prune_reads_ahead_only_with_prefetch(synth_dir, calib_txt, tmp_path, monkeypatch):
    calls = _record_advice(monkeypatch)
    src = synth_dir("mixtral")
    on = lowmoe.prune(src, tmp_path / "on", calib=[calib_txt], keep=4, n_samples=8, seq_len=16, progress=False)
    # the whole model is far under a quarter of the RAM: all of it is advised (the thread runs beside the
    # pass, so the report may be written a step before it is done)
    assert 0 < on["io"]["readahead_bytes"] <= Checkpoint(src).total_bytes()
    assert calls and calls[0][0] == Checkpoint(src).weight_map["model.embed_tokens.weight"]
    calls.clear()
    off = lowmoe.prune(src, tmp_path / "off", calib=[calib_txt], keep=4, n_samples=8, seq_len=16, progress=False,
                       prefetch=False)
    assert "readahead_bytes" not in off["io"] and not calls
    assert {k: v for k, v in dir_digest(tmp_path / "on").items() if k != REPORT} == \
        {k: v for k, v in dir_digest(tmp_path / "off").items() if k != REPORT}


def test_score_reads_ahead(synth_dir, calib_txt, monkeypatch):
    from lowmoe.score import score

    _record_advice(monkeypatch)
    src = synth_dir("mixtral")
    rep = score(src, calib=[calib_txt], n_samples=8, seq_len=16, progress=False)
    assert 0 < rep["io"]["readahead_bytes"] <= Checkpoint(src).total_bytes()
    rep = score(src, calib=[calib_txt], n_samples=8, seq_len=16, progress=False, prefetch=False)
    assert "readahead_bytes" not in rep["io"]
