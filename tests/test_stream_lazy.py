"""Expert-granular streaming: experts read from the shards in groups, kept experts copied as bytes,
host memory planned from the non-expert weights + two groups (``lowmoe.engine.lazy``)."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors import safe_open

import lowmoe
from lowmoe.engine.budget import build_layer, plan_lazy_budget
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.engine.experts import LazyExperts
from lowmoe.engine.hf import LayerInputs, ModelSkeleton, moe_modules, run_layer, split_experts
from lowmoe.engine.lazy import ShardFiles, StagingPool, read_lazy_layer
from lowmoe.engine.writer import ShardWriter
from lowmoe.errors import ConfigError
from lowmoe.inspect import inspect_model

from .helpers import FAMILIES, dir_digest

CPU = torch.device("cpu")
OPTS = dict(keep=4, n_samples=8, seq_len=16, batch_size=2, progress=False, device="cpu")
BIG = dict(layers=2, hidden_size=64, intermediate_size=256, experts=8, top_k=2, shard_size="400KB")


def model_files(path):
    return {k: v for k, v in dir_digest(path).items() if k != "lowmoe_report.json"}


@pytest.mark.parametrize("arch", FAMILIES)
def test_expert_source_reads_the_runtime_layout(synth_dir, arch):
    ck = Checkpoint(synth_dir(arch))
    files = ShardFiles(ck.path)
    L = ck.moe_layers()[-1]
    lazy = read_lazy_layer(ck, files, L)
    full = ck.read_layer(L)
    assert list(lazy) == list(full)
    for k in full:  # every tensor, expert or not, decodes to the same values and dtype
        assert torch.equal(lazy[k], full[k]) and lazy[k].dtype == full[k].dtype, k
    experts, _ = split_experts(ck.adapter, ck.adapter.to_runtime(L, full, True))
    src = lazy.experts
    assert src is not None and src.num_experts == ck.num_experts and set(src.names) == set(experts)
    for a, z in ((0, 3), (3, 8), (5, 6)):
        got = src.load(a, z)
        for n in experts:
            assert torch.equal(got[n], experts[n][a:z]), (n, a, z)
    sub = src.subset([1, 4, 6])
    got = sub.load(0, 3)
    for n in experts:
        assert torch.equal(got[n], experts[n][[1, 4, 6]])
    # the non-expert tensors were read with the layer; the experts were not
    assert files.bytes_read > 0 and all(not ck.adapter.is_expert_key(k[len(ck.adapter.layer_prefix(L)):])
                                       for k in lazy.resident)


@pytest.mark.parametrize("arch,group", [("mixtral", 3), ("qwen2_moe", 1), ("deepseek_v3", 8), ("gpt_oss", 2)])
def test_lazy_layer_is_bit_identical(synth_dir, arch, group):
    ck = Checkpoint(synth_dir(arch))
    skel = ModelSkeleton(ck.config, ck.adapter)
    L = ck.moe_layers()[-1]
    lazy = read_lazy_layer(ck, ShardFiles(ck.path), L)
    whole = build_layer(skel, L, ck.adapter.to_runtime(L, ck.read_layer(L), True), CPU, torch.float32)
    pool = StagingPool(2)
    built = build_layer(skel, L, ck.adapter.to_runtime(L, lazy.resident, True), CPU, torch.float32, group_size=group,
                        source=lazy.experts, pool=pool)
    experts = moe_modules(ck.adapter, built)[2]
    assert isinstance(experts, LazyExperts)
    h = torch.randn(2, 12, ck.config["hidden_size"], generator=torch.Generator().manual_seed(0))
    inputs = LayerInputs.build(skel, h, skel.rotary(CPU))
    with torch.no_grad():
        ref = run_layer(skel, whole, L, h, inputs)
        for _ in range(2):  # the resident group is reused by the next call
            assert torch.equal(run_layer(skel, built, L, h, inputs), ref)
    assert experts.group_loads > 0
    assert pool.allocations == 1, "the staging buffers are allocated once and reused"


def test_staging_pool_is_bounded():
    pool = StagingPool(2, 1024)
    shapes = {"a": ((2, 8), torch.float32), "b": ((3,), torch.bfloat16)}
    i, v = pool.acquire(shapes)
    j, _ = pool.acquire(shapes)
    assert v["a"].shape == (2, 8) and v["b"].dtype == torch.bfloat16 and i != j
    with pytest.raises(RuntimeError, match="in use"):
        pool.acquire(shapes)  # a third group at once is a bug: the bound is two buffers
    pool.release(i)
    k, _ = pool.acquire(shapes)
    assert k == i and pool.held_bytes == 2 * 1024 and pool.allocations == 1
    with pytest.raises(RuntimeError, match="released twice"):
        pool.release(i) or pool.release(i)


def test_lazy_experts_hold_two_groups_of_the_pool(synth_dir):
    ck = Checkpoint(synth_dir("mixtral", **BIG))
    skel = ModelSkeleton(ck.config, ck.adapter)
    lazy = read_lazy_layer(ck, ShardFiles(ck.path), 0)
    pool = StagingPool(2)
    built = build_layer(skel, 0, ck.adapter.to_runtime(0, lazy.resident, True), CPU, torch.bfloat16, group_size=2,
                        source=lazy.experts, pool=pool)
    h = torch.randn(2, 16, 64, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        run_layer(skel, built, 0, h, LayerInputs.build(skel, h, skel.rotary(CPU)))
    per_group = 2 * lazy.experts.expert_stored_bytes()  # fp32 on disk, 2 experts
    assert pool.held_bytes <= 2 * (per_group + 3 * 64)  # two buffers of one group (+ alignment)
    assert moe_modules(ck.adapter, built)[2].group_loads >= 4


def test_writer_copies_stored_bytes_unchanged(synth_dir, tmp_path):
    ck = Checkpoint(synth_dir("mixtral"))
    files = ShardFiles(ck.path)
    lazy = read_lazy_layer(ck, files, 1)
    keys = [k for k in lazy if lazy.stored(k) is not None]
    a, b = ShardWriter(tmp_path / "a", 1 << 30), ShardWriter(tmp_path / "b", 1 << 30)
    (tmp_path / "a").mkdir(), (tmp_path / "b").mkdir()
    for k in keys:
        a.add(k, lazy[k])  # decoded
        b.add(k, lazy.stored(k))  # bytes copied
    a.finalize(), b.finalize()
    assert dir_digest(tmp_path / "a") == dir_digest(tmp_path / "b")
    assert files.bytes_copied == sum(lazy.stored(k).nbytes for k in keys)
    with safe_open(str(next((tmp_path / "b").glob("model-*.safetensors"))), "pt") as f:
        assert torch.equal(f.get_tensor(keys[0]), ck.read([keys[0]])[keys[0]])


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_prune_same_bytes_under_max_ram(synth_dir, calib_txt, tmp_path, arch):
    src = synth_dir(arch, **BIG)
    ck = Checkpoint(src)
    free = plan_lazy_budget(ck, device=CPU, dtype=torch.float32, batch_size=2, seq_len=16)
    assert free.layers[ck.moe_layers()[0]].group_size == ck.num_experts  # small experts: one group
    tight = free.min_max_ram + 2 * ck.layer_bytes(ck.moe_layers()[0]) // ck.num_experts
    ref = lowmoe.prune(src, tmp_path / "ref", calib=[calib_txt], prefetch=False, **OPTS)
    bud = lowmoe.prune(src, tmp_path / "bud", calib=[calib_txt], max_ram=tight, **OPTS)
    groups = set(bud["budget"]["group_sizes"].values())
    assert groups and max(groups) < ck.num_experts, "a tight --max-ram must read experts in smaller groups"
    assert bud["budget"]["plan"]["host_peak_bytes"] <= tight
    assert bud["plan"] == ref["plan"] and bud["scores"] == ref["scores"]
    assert model_files(tmp_path / "bud") == model_files(tmp_path / "ref")
    assert bud["io"]["bytes_copied"] > 0, "kept experts are copied as stored bytes"
    # unbudgeted (one group a layer): each expert byte read once by the super-expert profile and once by
    # the layer's pass; the pruned layer's pass (sequential) copies its kept half from the device
    expert_bytes = sum(ck.tensor_bytes(k) for L in ck.moe_layers() for k in ck.layer_keys(L)
                       if ck.adapter.is_expert_key(k[len(ck.adapter.layer_prefix(L)):]))
    assert ref["io"]["expert_bytes_read"] == expert_bytes * 2
    # smaller groups than the layer: the 4 activation chunks go through a layer in waves (experts-major),
    # each group read once per wave; on top of that at most one more read of every expert (the
    # super-expert profile, the kept half read again for the sequential pass)
    waves = -(-4 // bud["budget"]["plan"]["wave_chunks"])
    assert bud["io"]["expert_bytes_read"] <= expert_bytes * (waves + 1)


def test_max_ram_floor(synth_dir, calib_txt, tmp_path):
    ck = Checkpoint(synth_dir("mixtral", **BIG))
    p = plan_lazy_budget(ck, device=CPU, dtype=torch.float32, batch_size=2, seq_len=16)
    assert p.min_max_ram is not None
    ok = plan_lazy_budget(ck, device=CPU, dtype=torch.float32, batch_size=2, seq_len=16, max_ram=p.min_max_ram)
    assert all(pl.group_size == 1 for L, pl in ok.layers.items() if L in ck.moe_layers())
    assert ok.host_peak_bytes <= p.min_max_ram
    with pytest.raises(ConfigError, match=r"--max-ram .* too small: .*non-expert weights"):
        plan_lazy_budget(ck, device=CPU, dtype=torch.float32, batch_size=2, seq_len=16, max_ram=p.min_max_ram * 9 // 10)
    # more room -> larger groups, never a larger planned peak than the budget
    prev = 0
    for extra in (0, 1, 2, 4, 8):
        budget = p.min_max_ram + extra * 2 * 197_000 * 2
        q = plan_lazy_budget(ck, device=CPU, dtype=torch.float32, batch_size=2, seq_len=16, max_ram=budget)
        g = q.layers[0].group_size
        assert g >= prev and q.host_peak_bytes <= budget
        prev = g
    assert prev > 1
    with pytest.raises(ConfigError, match="--max-ram .* too small"):
        lowmoe.prune(ck.path, tmp_path / "o", calib=[calib_txt], max_ram=p.min_max_ram // 2, **OPTS)
    assert not (tmp_path / "o").exists()


def test_device_terms_and_vram_floor(synth_dir):
    ck = Checkpoint(synth_dir("mixtral", **BIG))
    cuda = torch.device("cuda")  # planning only: nothing is allocated
    p = plan_lazy_budget(ck, device=cuda, dtype=torch.bfloat16, batch_size=2, seq_len=16)
    t = p.device_terms
    for term in ("resident_weights", "expert_groups", "attention_scores", "expert_intermediates", "routing",
                 "allocator_rounding"):
        assert t[term] > 0, term
    assert sum(t.values()) == p.device_peak_bytes
    q = plan_lazy_budget(ck, device=cuda, dtype=torch.bfloat16, batch_size=2, seq_len=16, max_vram=p.min_max_vram)
    assert q.device_peak_bytes <= p.min_max_vram and q.layers[0].group_size == 1
    with pytest.raises(ConfigError, match="--max-vram .*layer 0 cannot run even one expert"):
        plan_lazy_budget(ck, device=cuda, dtype=torch.bfloat16, batch_size=2, seq_len=16,
                         max_vram=p.min_max_vram - 100_000)


def test_inspect_prints_the_smallest_budgets(synth_dir):
    from click.testing import CliRunner

    from lowmoe.cli.commands import main

    src = synth_dir("mixtral", **BIG)
    info = inspect_model(src)
    floor = info["budget"]["min_max_ram_bytes"]
    under = inspect_model(src, max_ram=floor)
    assert under["budget"]["group_size"] == 1 and under["budget"]["host_peak_bytes"] <= floor
    r = CliRunner().invoke(main, ["inspect", str(src), "--max-ram", str(floor)])
    assert r.exit_code == 0, r.output
    assert "smallest     --max-ram" in r.output and "groups of 1 (of 8)" in r.output
    r = CliRunner().invoke(main, ["inspect", str(src), "--max-ram", str(floor // 2)])
    assert r.exit_code == 2 and "--max-ram" in r.output
    r = CliRunner().invoke(main, ["inspect", str(src), "--json", "--device", "cuda", "--max-vram", "1GiB"])
    assert r.exit_code == 0 and json.loads(r.output)["budget"]["min_max_vram_bytes"] > 0


def test_super_expert_profile_is_cached(synth_dir, calib_txt, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from lowmoe.cli.commands import main

    monkeypatch.setenv("LOWMOE_CACHE_DIR", str(tmp_path / "cache"))
    src = synth_dir("qwen2_moe", **BIG)
    first = lowmoe.prune(src, tmp_path / "a", calib=[calib_txt], **OPTS)
    second = lowmoe.prune(src, tmp_path / "b", calib=[calib_txt], **OPTS)
    p1, p2 = first["super_expert_profile"], second["super_expert_profile"]
    assert not p1["hit"] and p1["expert_bytes_read"] > 0 and p1["path"]
    assert p2["hit"] and p2["path"] == p1["path"]
    assert second["io"]["expert_bytes_read"] == first["io"]["expert_bytes_read"] - p1["expert_bytes_read"]
    assert second["super_experts"] == first["super_experts"] and second["plan"] == first["plan"]
    assert model_files(tmp_path / "a") == model_files(tmp_path / "b")
    # another calibration: another key, profiled again
    other = tmp_path / "other.txt"
    other.write_text("zeta eta theta\n" * 50)
    assert not lowmoe.prune(src, tmp_path / "c", calib=[other], **OPTS)["super_expert_profile"]["hit"]
    # `lowmoe profile` writes it ahead for the prunes that follow
    args = ["--seq-len", "16", "--n-samples", "8", "--device", "cpu"]
    m2 = synth_dir("mixtral", **BIG)
    r = CliRunner().invoke(main, ["-q", "profile", str(m2), "--calib", str(calib_txt), "--json", *args])
    assert r.exit_code == 0, r.output
    assert not json.loads(r.output)["hit"]
    rep = lowmoe.prune(m2, tmp_path / "d", calib=[calib_txt], **OPTS)
    assert rep["super_expert_profile"]["hit"]


def test_planned_memory_is_flat_in_the_number_of_layers(synth_dir):
    kw = dict(hidden_size=64, intermediate_size=256, experts=8, top_k=2, shard_size="400KB")
    cks = [Checkpoint(synth_dir("mixtral", layers=n, **kw)) for n in (2, 4)]
    ram = plan_lazy_budget(cks[0], device=CPU, dtype=torch.float32, batch_size=2, seq_len=16).min_max_ram + 2_000_000
    plans = [plan_lazy_budget(ck, device=CPU, dtype=torch.float32, batch_size=2, seq_len=16, max_ram=ram) for ck in cks]
    assert 1 < plans[0].layers[0].group_size < 8
    assert plans[0].host_peak_bytes == plans[1].host_peak_bytes
    assert plans[0].device_peak_bytes == plans[1].device_peak_bytes
    assert plans[0].min_max_ram == plans[1].min_max_ram


@pytest.mark.slow
def test_real_peak_rss_under_max_ram(tmp_path, calib_txt):
    """A prune in its own process, experts (25 MB each in fp32) larger than everything else: the peak RSS
    stays under --max-ram set just above the floor, with groups smaller than the layer."""
    import subprocess
    import sys

    from lowmoe.toy.synth import synth_model

    src = synth_model(tmp_path / "m", "mixtral", layers=3, hidden_size=512, intermediate_size=4096, experts=8, top_k=2,
                      dtype="bfloat16", shard_size="200MB")
    floor = inspect_model(src, seq_len=16, batch_size=2)["budget"]["min_max_ram_bytes"]
    budget = floor + 60 * 10**6
    cmd = [sys.executable, "-m", "lowmoe", "-q", "prune", str(src), str(tmp_path / "o"), "--keep", "4", "--calib",
           str(calib_txt), "--n-samples", "4", "--seq-len", "16", "--batch-size", "2", "--device", "cpu",
           "--max-ram", str(budget)]
    subprocess.run(cmd, check=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
    rep = json.loads((tmp_path / "o" / "lowmoe_report.json").read_text())
    assert max(rep["budget"]["group_sizes"].values()) < 8
    assert rep["memory"]["peak_rss_bytes"] <= budget, (rep["memory"]["peak_rss_bytes"], budget)
