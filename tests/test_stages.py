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
from lowmoe.engine import rundir, writer
from lowmoe.engine import stream as stream_mod
from lowmoe.engine.budget import SAFETY, plan_lazy_budget
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.engine.lazy import ShardFiles, StagingPool, read_lazy_layer
from lowmoe.engine.prefetch import STAGES, IOStats
from lowmoe.pipeline import REPORT
from lowmoe.score import score

from .helpers import dir_digest, lazy_chunking_ram

OPTS = dict(keep=4, method="frequency", n_samples=8, seq_len=16, batch_size=2, progress=False, device="cpu")


def model_files(path):
    return {k: v for k, v in dir_digest(path).items() if k != REPORT}


def lazy_plan(src, **kw):
    """The plan of a prune with ``OPTS``' calibration shape (4 chunks of 2 x 16 tokens)."""
    return plan_lazy_budget(Checkpoint(src), device=torch.device("cpu"), dtype=torch.float32, batch_size=2, seq_len=16,
                            num_chunks=4, **kw)


def no_slack_ram(src, ram: int) -> int:
    """A --max-ram that holds what the plan under ``ram`` holds and nothing beside it."""
    return int(lazy_plan(src, max_ram=ram).host_peak_bytes / (1 - SAFETY)) + 1


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
    ram = no_slack_ram(src, lazy_chunking_ram(src, 2, 16))
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

    # a model whose compute is not lost among the fixed costs (tokenize, setup: ~10 ms each)
    src = synth_dir("mixtral", hidden_size=64, intermediate_size=256, shard_size="400KB")
    r = CliRunner().invoke(main, ["prune", str(src), str(tmp_path / "o"), "--calib", str(calib_txt),
                                  "--keep", "4", "--n-samples", "16", "--seq-len", "64", "--device", "cpu"])
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


def wave_ram(src) -> int:
    """The smallest --max-ram (in steps of 64 KB) under which OPTS' 4 activation chunks go through every
    chunked layer in one wave, in groups of at least 2 experts (several groups a layer)."""
    ram = lazy_chunking_ram(src, 2, 16)
    E = Checkpoint(src).num_experts
    for _ in range(200):
        p = lazy_plan(src, max_ram=ram)
        sizes = [pl.group_size for pl in p.layers.values() if pl.group_size is not None]
        if p.wave_chunks == 4 and 2 <= min(sizes) and max(sizes) < E:
            return ram
        ram += 64 << 10
    raise AssertionError("no --max-ram gives one wave of groups of 2+")


def test_chunked_layer_reads_each_group_once(synth_dir, calib_txt, tmp_path, monkeypatch):
    """A layer whose experts visit the device in several groups runs its activation chunks together,
    experts-major: each group is read once per layer, not once per chunk; same bytes, same scores."""
    src = synth_dir("mixtral", hidden_size=64, intermediate_size=256, shard_size="400KB")
    ck = Checkpoint(src)
    # REAP: the scorer that reads every slot's expert output (the experts call patched by MoeProbe)
    kw = dict(OPTS, method="reap", sequential=False, protect_super_experts=False)
    expert_bytes = sum(ck.tensor_bytes(k) for L in ck.moe_layers() for k in ck.layer_keys(L)
                       if ck.adapter.is_expert_key(k[len(ck.adapter.layer_prefix(L)):]))
    one = lowmoe.prune(src, tmp_path / "one", calib=[calib_txt], **kw)
    assert set(one["budget"]["group_sizes"].values()) == {ck.num_experts}
    assert one["io"]["expert_bytes_read"] == expert_bytes
    ram = wave_ram(src)
    waved = lowmoe.prune(src, tmp_path / "waved", calib=[calib_txt], max_ram=ram, **kw)
    groups = waved["budget"]["group_sizes"]
    assert 2 <= min(groups.values()) and max(groups.values()) < ck.num_experts, groups
    assert waved["budget"]["plan"]["wave_chunks"] == 4
    assert waved["io"]["expert_bytes_read"] == expert_bytes, "each expert read once per layer"
    for name in ("compute", "observe"):
        assert waved["stages"][name]["thread"] == "main", "a wave's chunks run in the main thread's place"
    # the same budget, one chunk at a time: the groups are read again for every chunk
    monkeypatch.setattr(stream_mod.Stream, "wave_size", lambda self, adapter, module: 1)
    chunkwise = lowmoe.prune(src, tmp_path / "chunkwise", calib=[calib_txt], max_ram=ram, **kw)
    assert chunkwise["io"]["expert_bytes_read"] > 2 * expert_bytes
    for r in (waved, chunkwise):
        assert r["scores"] == one["scores"] and r["plan"] == one["plan"]
    assert model_files(tmp_path / "waved") == model_files(tmp_path / "one") == model_files(tmp_path / "chunkwise")


def test_waves_hold_the_ram_budget(synth_dir):
    """The chunks of a wave waiting at their experts call are in the plan: every planned peak stays
    under --max-ram, more RAM never means more reads, and one wave needs more than one chunk at a time."""
    src = synth_dir("mixtral", hidden_size=64, intermediate_size=256, shard_size="400KB")
    lo = lazy_plan(src).min_max_ram
    waves: dict[bool, list[int]] = {True: [], False: []}  # by layer prefetching (planned before waves)
    for ram in range(lo, lo + (6 << 20), 128 << 10):
        p = lazy_plan(src, max_ram=ram)
        assert p.host_peak_bytes <= ram * (1 - SAFETY)
        w = p.wave_chunks
        assert p.device_terms.get("wave_chunks_waiting", 0) == (w - 1) * p.wave_chunk_bytes
        if w > 1:
            assert p.host_terms["compute_copy"] >= (w - 1) * p.wave_chunk_bytes  # on the CPU it lives in RAM
        waves[p.prefetch_layers].append(-(-4 // w))
    for ws in waves.values():
        assert ws == sorted(ws, reverse=True), waves
    assert waves[False][0] > 1 and waves[True][-1] == 1
    one_wave = lazy_plan(src, max_ram=wave_ram(src))
    single = plan_lazy_budget(Checkpoint(src), device=torch.device("cpu"), dtype=torch.float32, batch_size=2,
                              seq_len=16, num_chunks=1, max_ram=wave_ram(src))
    assert single.wave_chunks == 1 and single.wave_chunk_bytes == 0
    assert one_wave.device_terms["wave_chunks_waiting"] == 3 * one_wave.wave_chunk_bytes > 0


def test_wave_error_is_raised_on_the_main_thread(synth_dir, calib_txt, tmp_path, monkeypatch):
    """A chunk failing inside a wave stops the pass with its own error; no chunk thread is left behind."""
    src = synth_dir("mixtral", hidden_size=64, intermediate_size=256, shard_size="400KB")
    calls = {"n": 0}
    real = stream_mod.run_layer

    def failing(*a, **k):
        if threading.current_thread().name == "lowmoe-wave-2":
            calls["n"] += 1
            raise RuntimeError("chunk 2 failed")
        return real(*a, **k)

    monkeypatch.setattr(stream_mod, "run_layer", failing)
    with pytest.raises(RuntimeError, match="chunk 2 failed"):
        lowmoe.prune(src, tmp_path / "o", calib=[calib_txt], max_ram=wave_ram(src), **dict(OPTS, protect_super_experts=False))
    assert calls["n"] == 1
    assert not [t for t in threading.enumerate() if t.name.startswith("lowmoe-wave")]


def test_output_is_written_on_the_writer_thread(synth_dir, calib_txt, tmp_path, monkeypatch):
    """A layer's output tensors go into the shards on the output writer thread (while a sequential
    prune runs the pruned layer), the manifest records a layer only once they are written, and a
    write's error stops the run on the main thread with its own message."""
    src = synth_dir("mixtral")
    threads, saved = [], []
    real_add, real_save = writer.ShardWriter.add_all, rundir.PruneRun.save_manifest

    def add_all(self, tensors):
        threads.append(threading.current_thread().name)
        return real_add(self, tensors)

    def save_manifest(self, extra=None):
        real_save(self, extra)
        saved.append((self.next_layer, len(self.writer.state()["buffered_keys"]) + sum(
            len(s["keys"]) for s in self.writer.state()["shards"])))

    monkeypatch.setattr(writer.ShardWriter, "add_all", add_all)
    monkeypatch.setattr(rundir.PruneRun, "save_manifest", save_manifest)
    rep = lowmoe.prune(src, tmp_path / "o", calib=[calib_txt], sequential=True, **OPTS)
    n = Checkpoint(src).num_layers
    assert threads[:n] and all(t.startswith("lowmoe-write") for t in threads[:n]), threads
    assert rep["stages"]["output_write"]["thread"] == "background" and rep["stages"]["output_write"]["count"] == n
    assert rep["stages"]["wait_output"]["thread"] == "main"
    # every manifest that records layer L as done holds more tensors than the one before it
    per_layer = [k for L, k in saved if L >= 1]
    assert per_layer == sorted(per_layer) and len(set(per_layer)) == n
    monkeypatch.setattr(writer.ShardWriter, "add_all", real_add)

    def full(self, key, tensor):
        raise OSError(28, "No space left on device")  # ENOSPC

    monkeypatch.setattr(writer.OpenShard, "add", full)
    with pytest.raises(lowmoe.errors.OutputError, match="disk full while writing"):
        lowmoe.prune(src, tmp_path / "full", calib=[calib_txt], **OPTS)
    assert not [t for t in threading.enumerate() if t.name.startswith("lowmoe-write")]


def test_waves_hold_a_max_vram_rehearsal(synth_dir, calib_txt):
    """On a CPU --max-vram rehearsal the waiting chunks of a wave are booked against the device budget:
    the accounted peak stays under it, each expert is read once, and the scores do not change."""
    src = synth_dir("mixtral", hidden_size=64, intermediate_size=256, shard_size="400KB")
    ck = Checkpoint(src)
    for vram in range(64 << 10, 32 << 20, 32 << 10):  # the smallest that runs one wave in groups
        try:
            p = lazy_plan(src, max_vram=vram)
        except lowmoe.errors.ConfigError:
            continue
        if p.wave_chunks == 4 and max(pl.group_size for pl in p.layers.values() if pl.group_size) < ck.num_experts:
            break
    else:
        raise AssertionError("no --max-vram gives one wave in groups")
    kw = dict(calib=[calib_txt], method="reap", keep=4, n_samples=8, seq_len=16, batch_size=2, progress=False, device="cpu")
    ref = score(src, **kw)
    rep = score(src, max_vram=vram, **kw)
    assert rep["budget"]["plan"]["wave_chunks"] == 4
    assert rep["budget"]["accounted_peak_bytes"] <= vram
    assert rep["io"]["expert_bytes_read"] == ref["io"]["expert_bytes_read"]
    assert all(rep["layers"][k]["scores"] == v["scores"] for k, v in ref["layers"].items())


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
@pytest.mark.parametrize("sequential", [True, False])
def test_next_layers_first_group_is_staged_while_this_one_computes(synth_dir, calib_txt, tmp_path, arch, sequential):
    """With prefetching, every MoE layer after the model's first finds its first (here its only) expert
    group already copied for the device: staged while the layer before ran its last pass (a
    sequential prune's pruned twin, which runs the kept experts of the layer on the device without
    copying them). Nothing changes a byte, and lowmoe's device books stay inside the plan."""
    src = synth_dir(arch)
    kw = dict(OPTS, protect_super_experts=False, sequential=sequential)
    on = lowmoe.prune(src, tmp_path / "on", calib=[calib_txt], prefetch=True, **kw)
    off = lowmoe.prune(src, tmp_path / "off", calib=[calib_txt], prefetch=False, **kw)
    later = [L for L in Checkpoint(src).moe_layers() if L > 0]
    assert on["budget"]["first_groups_staged_ahead"] == len(later) > 0
    assert off["budget"]["first_groups_staged_ahead"] == 0
    assert on["budget"]["accounted_peak_bytes"] <= on["budget"]["plan"]["device_peak_bytes"]
    assert on["io"]["expert_bytes_read"] == off["io"]["expert_bytes_read"], "staged ahead, not read twice"
    assert model_files(tmp_path / "on") == model_files(tmp_path / "off")
    assert on["scores"] == off["scores"]


def test_no_group_is_staged_ahead_when_the_layers_run_in_groups(synth_dir, calib_txt, tmp_path):
    """A layer whose experts visit the device in groups uses both planned group slots itself: the next
    layer's first group waits for it (and the budget is held)."""
    src = synth_dir("mixtral", hidden_size=64, intermediate_size=256, shard_size="400KB")
    ram = lazy_chunking_ram(src, 2, 16)
    rep = lowmoe.prune(src, tmp_path / "o", calib=[calib_txt], max_ram=ram, **dict(OPTS, protect_super_experts=False))
    assert max(rep["budget"]["group_sizes"].values()) < Checkpoint(src).num_experts
    assert rep["budget"]["first_groups_staged_ahead"] == 0
    assert rep["budget"]["accounted_peak_bytes"] <= rep["budget"]["plan"]["device_peak_bytes"]


def test_put_holds_chunks_in_memory_and_spills_the_least_recently_used(tmp_path):
    """``ActivationCache.put``: chunks stay in memory up to the ``hold`` limit; beyond it the least
    recently used go to disk (a read makes a chunk recent), a chunk larger than the limit goes there
    directly, and every chunk reads back as it was put, from either place."""
    from lowmoe.engine.cache import ActivationCache
    from lowmoe.errors import CalibrationError

    c = ActivationCache(tmp_path / "acts")
    t = {i: torch.full((4, 8), float(i)) for i in range(4)}  # 128 bytes each
    c.hold(2 * 128)
    c.put(0, 0, t[0], "a")
    c.put(0, 1, t[1], "a")
    assert c.bytes_written == 0 and c.memory_bytes == 256
    c.read(0, 0, "a")  # chunk 0 is now the most recently used: chunk 1 goes first
    c.put(0, 2, t[2], "b")
    assert not c.in_memory(0, 1, "a") and c.in_memory(0, 0, "a") and c.in_memory(0, 2, "b")
    assert c.spilled_bytes == 128 and c.memory_bytes <= 256
    c.put(0, 3, torch.zeros(100, 8), "c")  # larger than the limit: straight to disk
    assert not c.in_memory(0, 3, "c") and c.has(0, 4, "c") is False and c.has(0, 1, "a")
    for (b, k, s), want in {(0, 0, "a"): t[0], (0, 1, "a"): t[1], (0, 2, "b"): t[2]}.items():
        assert torch.equal(c.read(b, k, s), want)
    c.forget(lambda key: key[0] == "a")
    assert c.memory_bytes == 128 and not c.in_memory(0, 0, "a")
    with pytest.raises(CalibrationError, match="NaN/Inf"):
        c.put(1, 0, torch.tensor([[float("nan")]]), "a")


@pytest.fixture
def opened_streams(monkeypatch):
    """Every Stream built while the test runs, and whether it was closed."""
    made, closed = [], set()
    real_init, real_close = stream_mod.Stream.__init__, stream_mod.Stream.close

    def init(self, *a, **k):
        made.append(self)
        real_init(self, *a, **k)

    def close(self):
        closed.add(id(self))
        real_close(self)

    monkeypatch.setattr(stream_mod.Stream, "__init__", init)
    monkeypatch.setattr(stream_mod.Stream, "close", close)
    return lambda: [id(s) in closed for s in made]


def test_a_c_prune_reports_its_scoring_pass_stages_and_closes_its_stream(synth_dir, calib_txt, tmp_path, opened_streams):
    rep = lowmoe.prune(synth_dir("mixtral"), tmp_path / "out", keep=4, method="c-prune", calib=[calib_txt],
                       n_samples=8, seq_len=16, batch_size=2, progress=False, device="cpu")
    assert opened_streams() == [True]  # its loader thread, workspaces and page-locked buffers given back
    stages = rep["stages"]
    for name in ("tokenize", "setup", "profile", "read", "materialize", "compute", "observe", "decide"):
        assert name in stages and stages[name]["s"] >= 0, name
    assert list(stages) == sorted(stages, key=list(STAGES).index)
    assert stages["compute"]["count"] >= len(rep["plan"]["layers"])
    assert rep["io"]["readahead_bytes"] >= 0 and rep["experts_impl"] == "eager" and "group_sizes" in rep["budget"]
    assert rep["c_prune"]["scoring_s"] > 0


def test_an_eep_seed_and_a_profile_close_their_streams(synth_dir, calib_txt, tmp_path, opened_streams):
    from types import SimpleNamespace

    from lowmoe.methods.eep.runner import _seed_candidate
    from lowmoe.methods.eep.space import SearchSpace
    from lowmoe.pipeline import PruneConfig, profile_model

    model = synth_dir("mixtral")
    ck = Checkpoint(model)
    space = SearchSpace.build(ck.moe_layers(), ck.num_experts, 4, "layer")
    cfg = PruneConfig(model=model, out=tmp_path / "out", keep=4, method="eep", calib=[calib_txt], seq_len=16,
                      n_samples=4, batch_size=2)
    _seed_candidate(SimpleNamespace(ck=ck, budget=None), cfg, space, "frequency", tmp_path / "seed")
    profile_model(model, [calib_txt], seq_len=16, n_samples=4, progress=False)
    assert len(opened_streams()) == 2 and all(opened_streams())
