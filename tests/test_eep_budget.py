"""The EEP population evaluation under ``--max-ram`` / ``--max-vram``: a budget that keeps a layer's
experts in host memory and runs a candidate's E' experts in groups (``budget.ChunkedExperts``) gives
exactly the unbudgeted fitness, keeps the accounted peak under the budget, and a budget too small
for one expert fails before any work."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import lowmoe
from lowmoe.engine.budget import SAFETY, layer_sizes, plan_budget, plan_population
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.errors import ConfigError

from .helpers import dir_digest
from .helpers import evaluator, merged, population, records, write_jsonl

KEEP = 4


def router_bytes(ck: Checkpoint, layer_idx: int, keep: int) -> int:
    numel = sum(math.prod(ck.tensor_info(k)[0]) for k in ck.adapter.router_keys(layer_idx))
    return numel * keep // ck.num_experts * 4


def grouping_ram(src, *, batch_size: int, seq_len: int, groups_of: int = 1) -> int:
    """A --max-ram that leaves the CPU compute copy room for the resident weights, a candidate's
    router and 2 groups of ``groups_of`` of its experts (not all 4 of them, nor the whole layer)."""
    ck = Checkpoint(src)
    cpu = torch.device("cpu")
    base = plan_population(ck, plan_budget(ck, device=cpu, dtype=torch.float32, batch_size=batch_size, seq_len=seq_len,
                                           max_ram=10**12), num_experts=KEEP, batch_size=batch_size, seq_len=seq_len)
    L = max(layer_sizes(ck), key=lambda s: s.resident_numel + s.expert_numel * s.num_experts)
    need = (base.plan.activation_bytes + L.resident_bytes(4) + router_bytes(ck, L.layer_idx, KEEP)
            + (2 * groups_of + 1) * L.expert_bytes(4))
    return base.plan.host_fixed_bytes + base.plan.host_layer_bytes + math.ceil(need / (1 - SAFETY))


def ram_plan(src, ram: int, *, batch_size: int = 4, seq_len: int):
    ck = Checkpoint(src)
    return plan_budget(ck, device=torch.device("cpu"), dtype=torch.float32, batch_size=batch_size, seq_len=seq_len,
                       max_ram=ram)


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3", "gpt_oss"])
def test_streamed_fitness_under_a_ram_budget_equals_unbudgeted(synth_dir, tmp_path, arch):
    """Pruning- and merging-phase candidates, prefix sharing, the trimmed last layer: bit-identical
    (GPT-OSS: fused experts, merged by one matrix product)."""
    src = synth_dir(arch)
    ref = evaluator(src, tmp_path / "ref")
    seq_len = int(ref.data.input_ids.shape[1])
    ram = grouping_ram(src, batch_size=4, seq_len=seq_len)
    small = evaluator(src, tmp_path / "small", budget=ram_plan(src, ram, seq_len=seq_len))
    moe = ref.ck.moe_layers()
    assert small.budget.chunked_layers == moe, "the RAM budget must keep every MoE layer's experts on the host"
    assert {p.group_size for p in small.budget.layers.values()} == {1}
    rng = np.random.default_rng(0)
    cands = population(ref.space, rng) + [merged(ref.space, ref.space.random_onehot(rng), rng)]
    onehot = [bool(np.isin(c.em[0], [0.0, 1.0]).all()) for c in cands]
    assert any(onehot) and not all(onehot), "pruning- and merging-phase candidates"
    got, want = small.evaluate(cands), ref.evaluate(cands)
    for g, w in zip(got, want):
        assert (g.acc, g.ll) == (w.acc, w.ll)  # exactly, not just close
    assert small.stats["chunked_blocks"] == small.stats["layer_builds"] > 0
    assert 0 < small.stats["accounted_peak_bytes"] <= small.budget.plan.device_budget < ram
    # a second generation reuses the streams and still agrees
    more = [merged(ref.space, cands[0], rng), ref.space.random_onehot(rng)]
    assert [(f.acc, f.ll) for f in small.evaluate(more)] == [(f.acc, f.ll) for f in ref.evaluate(more)]


@pytest.mark.parametrize("wave", [2, 3])
def test_held_layer_groups_go_to_the_device_once_a_wave(synth_dir, tmp_path, monkeypatch, wave):
    """A layer held in host memory whose candidate experts visit the device in groups runs its 3
    activation chunks in waves of 2 (then 1) or 3: the same fitness to the bit, and fewer groups
    brought to the device than a chunk at a time."""
    from dataclasses import replace

    from lowmoe.engine.experts import ChunkedExperts

    src = synth_dir("mixtral")
    ref = evaluator(src, tmp_path / "ref")
    seq_len = int(ref.data.input_ids.shape[1])
    assert ref.num_chunks == 3
    ck = Checkpoint(src)
    base = plan_population(ck, ram_plan(src, grouping_ram(src, batch_size=4, seq_len=seq_len), seq_len=seq_len),
                           num_experts=KEEP, batch_size=4, seq_len=seq_len, num_chunks=3)
    assert base.chunked_layers == ck.moe_layers() and not base.sourced and base.wave_chunks == 1
    waved = replace(base, plan=replace(base.plan, wave_chunks=wave, wave_chunk_bytes=1))
    loads: list[int] = []
    real = ChunkedExperts.release

    def release(self, wait=True):
        if wait:  # the evaluator's own call once a block has run (not the collector's)
            loads.append(self.group_loads)
        return real(self, wait)

    monkeypatch.setattr(ChunkedExperts, "release", release)
    rng = np.random.default_rng(4)
    cands = population(ref.space, rng) + [merged(ref.space, ref.space.random_onehot(rng), rng)]
    want = [(f.acc, f.ll) for f in ref.evaluate(cands)]
    one = evaluator(src, tmp_path / "one", budget=base)
    assert [(f.acc, f.ll) for f in one.evaluate(cands)] == want
    per_chunk, loads[:] = list(loads), []
    many = evaluator(src, tmp_path / "many", budget=waved)
    assert [(f.acc, f.ll) for f in many.evaluate(cands)] == want
    assert len(loads) == len(per_chunk) > 0 and sum(loads) < sum(per_chunk)
    assert all(a <= b for a, b in zip(loads, per_chunk))


def test_held_plan_gives_the_room_left_to_waves(synth_dir):
    """With experts far larger than a chunk's activations, the room the groups cannot use goes to
    waves: all 3 chunks where the budget leaves room for the 2 waiting ones, fewer a byte below
    that, counted in the plan's peaks."""
    from lowmoe.engine.budget import WAVE_TERMS, activation_terms, largest

    src = synth_dir("mixtral", layers=2, hidden_size=256, intermediate_size=2048, shard_size="8MB")
    ck = Checkpoint(src)
    per = sum(v for k, v in activation_terms(ck.config, batch_size=4, seq_len=32, dtype_bytes=4, top_k=ck.top_k,
                                             num_experts=ck.num_experts).items() if k in WAVE_TERMS)
    assert 3 * per < layer_sizes(ck)[0].expert_bytes(4), "a wave is cheaper than another expert"

    def plan(ram: int, chunks: int = 3):
        return plan_population(ck, ram_plan(src, ram, seq_len=32), num_experts=KEEP, batch_size=4, seq_len=32,
                               num_chunks=chunks)

    ram = grouping_ram(src, batch_size=4, seq_len=32)
    three, one = plan(ram), plan(ram, chunks=1)
    assert {p.group_size for p in three.layers.values()} == {1} and three.wave_chunks == 3 and one.wave_chunks == 1
    assert three.plan.device_terms["wave_chunks_waiting"] == 2 * per
    assert three.plan.device_peak_bytes <= three.plan.device_budget * (1 - SAFETY)
    assert three.plan.host_peak_bytes == one.plan.host_peak_bytes + 2 * per <= ram
    def short(r: int) -> bool:  # refused, or waves of fewer than 3
        try:
            return plan(r).wave_chunks < 3
        except ConfigError:
            return True

    least = largest(ram // 2, ram, short) + 1  # the smallest budget with waves of 3
    below = plan(least - 1)
    assert below.wave_chunks < 3 and {p.group_size for p in below.layers.values()} == {1}
    # a candidate's 4 experts in one group held on the device: nothing waits for a group, no waves planned
    one_group = plan(grouping_ram(src, batch_size=4, seq_len=32, groups_of=2))
    assert one_group.chunked_layers and {p.group_size for p in one_group.layers.values()} == {KEEP}
    assert one_group.wave_chunks == 1 and "wave_chunks_waiting" not in one_group.plan.device_terms


def test_a_layer_that_fits_takes_the_fast_path(synth_dir, tmp_path):
    """Qwen2-MoE (shared experts): a roomy budget keeps the unbudgeted path, a tight one chunks; same fitness."""
    src = synth_dir("qwen2_moe")
    roomy = evaluator(src, tmp_path / "roomy", budget=ram_plan(src, 2 * 10**9, seq_len=64))
    seq_len = int(roomy.data.input_ids.shape[1])  # the evaluator plans for its data's shape
    assert roomy.budget.chunked_layers == []
    tight = evaluator(src, tmp_path / "tight", budget=ram_plan(src, grouping_ram(src, batch_size=4, seq_len=seq_len),
                                                                seq_len=seq_len))
    assert tight.budget.chunked_layers == roomy.ck.moe_layers()
    cands = population(roomy.space, np.random.default_rng(1))
    want = [(f.acc, f.ll) for f in roomy.evaluate(cands)]
    assert [(f.acc, f.ll) for f in tight.evaluate(cands)] == want
    assert roomy.stats["chunked_blocks"] == 0 and tight.stats["chunked_blocks"] > 0
    for ev in (roomy, tight):
        assert 0 < ev.stats["accounted_peak_bytes"] <= ev.budget.plan.device_budget


def test_too_small_budget_fails_before_the_search(synth_dir, tmp_path):
    src = synth_dir("mixtral", intermediate_size=64)  # experts larger than the embedding matrix
    ck = Checkpoint(src)
    base = plan_budget(ck, device=torch.device("cpu"), dtype=torch.float32, batch_size=4, seq_len=64)
    L = layer_sizes(ck)[0]
    # room for the layer's resident weights + one expert (what the one-shot stream needs), not the candidate's router
    wb = L.resident_bytes(4) + L.expert_bytes(4)
    vram = next(v for v in range(int((wb + base.activation_bytes) / (1 - SAFETY)) - 8, 10**9)
                if int(v * (1 - SAFETY)) - base.activation_bytes >= wb)
    assert plan_budget(ck, device=torch.device("cpu"), dtype=torch.float32, batch_size=4, seq_len=64,
                       max_vram=vram).layers[0].group_size == 1
    train = write_jsonl(tmp_path / "train.jsonl", records(8))
    whole = plan_budget(ck, device=torch.device("cpu"), dtype=torch.float32, batch_size=4, seq_len=64, max_vram=vram)
    with pytest.raises(ConfigError, match=r"^--max-vram .*EEP search, layer 0: .*raise --max-vram"):
        plan_population(ck, whole, num_experts=KEEP, batch_size=4, seq_len=64)
    # the run refuses it before any work (the seed passes read experts in groups of at least one, two
    # groups at a time: their floor is the first one checked)
    with pytest.raises(ConfigError, match=r"^--max-vram .*raise --max-vram") as e:
        lowmoe.prune(src, tmp_path / "out", keep=KEEP, method="eep", calib=[train], seq_len=64, batch_size=4,
                     progress=False, device="cpu", max_vram=vram,
                     method_options={"generations": 1, "population": 2, "layer_groups": "layer"})
    assert "\n" not in str(e.value)
    assert not (tmp_path / "out" / ".lowmoe-work" / "eep" / "acts-train").exists()
    assert not (tmp_path / "out" / ".lowmoe-work" / "eep" / "state.json").exists()


def test_prune_eep_with_max_ram_writes_the_same_checkpoint(synth_dir, tmp_path):
    # layers large enough that a budget holding one in host memory but not on the (CPU) device clears
    # the seed passes' floor (the interpreter's share is the same in both)
    src = synth_dir("mixtral", layers=2, hidden_size=256, intermediate_size=2048, shard_size="8MB")
    train = write_jsonl(tmp_path / "train.jsonl", records(8))
    opts = dict(keep=KEEP, method="eep", calib=[train], seq_len=32, batch_size=4, progress=False, device="cpu",
                method_options={"generations": 2, "population": 2, "prune_generations": 1, "layer_groups": "layer"})
    ref = lowmoe.prune(src, tmp_path / "a", **opts)
    ram = grouping_ram(src, batch_size=4, seq_len=32)
    small = lowmoe.prune(src, tmp_path / "b", max_ram=ram, **opts)
    stats = small["eep"]["stream_stats"]
    assert stats["chunked_layers"] == Checkpoint(src).moe_layers() and stats["chunked_blocks"] > 0
    assert 0 < stats["accounted_peak_bytes"] <= stats["device_budget_bytes"] < ram
    assert [c["phase"] for c in ref["eep"]["curve"]] == ["prune", "merge"]
    def curve(r):
        return [{k: v for k, v in c.items() if k != "elapsed_s"} for c in r["eep"]["curve"]]

    assert curve(small) == curve(ref)
    assert small["plan"]["layers"] == ref["plan"]["layers"]
    digest = {k: v for k, v in dir_digest(tmp_path / "a").items() if k.endswith(".safetensors")}
    assert digest and {k: v for k, v in dir_digest(tmp_path / "b").items() if k.endswith(".safetensors")} == digest
