"""--max-vram / --max-ram: planning, failing early, expert chunking that changes no number."""

from __future__ import annotations

import pytest
import torch

import lowmoe
from lowmoe.engine.budget import build_layer, choose_placement, layer_sizes, parse_budget, plan_budget
from lowmoe.engine.experts import ChunkedExperts
from lowmoe.engine.memory import Accountant
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.errors import ConfigError
from lowmoe.engine.hf import LayerInputs, ModelSkeleton, MoeProbe, expert_output, moe_modules, run_layer
from lowmoe.pipeline import REPORT

from .helpers import FAMILIES, dir_digest

CPU = torch.device("cpu")
OPTS = dict(keep=4, n_samples=8, seq_len=16, batch_size=2, progress=False, device="cpu")
# big enough that weights, not activations, dominate (one expert ~197 KB in fp32)
BIG = dict(layers=2, hidden_size=64, intermediate_size=256, experts=8, top_k=2, shard_size="400KB")


def model_files(path):
    return {k: v for k, v in dir_digest(path).items() if k != REPORT}


# ---- units --------------------------------------------------------------------------------------

def test_parse_budget():
    assert parse_budget("20GiB", "--max-vram") == 20 * 2**30
    assert parse_budget("500MB", "--max-ram") == 500 * 10**6
    assert parse_budget(None, "--max-vram") is None
    with pytest.raises(ConfigError, match="--max-vram 'lots'"):
        parse_budget("lots", "--max-vram")
    with pytest.raises(ConfigError, match="--max-ram '0'.*positive"):
        parse_budget("0", "--max-ram")


def test_choose_placement():
    assert choose_placement(resident=10, per_expert=5, num_experts=8, weights_budget=None).group_size is None
    assert choose_placement(resident=10, per_expert=5, num_experts=8, weights_budget=50).group_size is None
    p = choose_placement(resident=10, per_expert=5, num_experts=8, weights_budget=40)  # room 30 -> 2 groups of 3
    assert p.group_size == 3 and p.double_buffer and p.device_bytes == 10 + 2 * 3 * 5
    p = choose_placement(resident=10, per_expert=5, num_experts=8, weights_budget=17)  # room for one expert only
    assert p.group_size == 1 and not p.double_buffer
    assert choose_placement(resident=10, per_expert=5, num_experts=8, weights_budget=14) is None
    assert choose_placement(resident=10, per_expert=0, num_experts=0, weights_budget=9) is None  # dense layer too big


def test_accountant_follows_object_lifetime():
    acct = Accountant(activation_bytes=100)
    x = torch.nn.Linear(2, 2)
    acct.track(x, 40)
    t = acct.add(30)
    assert acct.current == 70 and acct.peak == 170
    del x
    acct.release(t)
    assert acct.current == 0 and acct.peak == 170


def test_layer_sizes_match_the_index(synth_dir):
    ck = Checkpoint(synth_dir("mixtral", **BIG))
    for s in layer_sizes(ck):
        assert s.num_experts == 8 and s.expert_numel == 3 * 64 * 256
        assert (s.resident_numel + 8 * s.expert_numel) * 4 == s.stored_bytes  # fp32 on disk


# ---- chunked experts compute exactly what transformers' module computes -------------------------

def _layer_pair(src, layer_idx, dtype, group_size, double_buffer=True):
    ck = Checkpoint(src)
    skel = ModelSkeleton(ck.config, ck.adapter)
    rt = ck.adapter.to_runtime(layer_idx, ck.read_layer(layer_idx), True)
    whole = build_layer(skel, layer_idx, rt, CPU, dtype)
    chunked = build_layer(skel, layer_idx, rt, CPU, dtype, group_size=group_size, double_buffer=double_buffer)
    return ck, skel, whole, chunked


def _record(ck, skel, layer, layer_idx, h, needs_outputs):
    calls = []

    def cb(call):
        calls.append(call)

    cb.needs_expert_outputs = needs_outputs
    with MoeProbe(ck.adapter, layer, cb):
        out = run_layer(skel, layer, layer_idx, h, LayerInputs.build(skel, h, skel.rotary(CPU)))
    return out, calls


@pytest.mark.parametrize("arch", FAMILIES)
def test_chunked_layer_is_bit_identical(synth_dir, arch):
    src = synth_dir(arch)
    layer_idx = Checkpoint(src).moe_layers()[-1]
    ck, skel, whole, chunked = _layer_pair(src, layer_idx, torch.float32, group_size=3)
    assert isinstance(moe_modules(ck.adapter, chunked)[2], ChunkedExperts)
    g = torch.Generator().manual_seed(0)
    h = torch.randn(2, 12, ck.config["hidden_size"], generator=g)
    with torch.no_grad():
        for needs in (False, True):
            out_w, calls_w = _record(ck, skel, whole, layer_idx, h, needs)
            out_c, calls_c = _record(ck, skel, chunked, layer_idx, h, needs)
            assert torch.equal(out_w, out_c)
            assert len(calls_w) == len(calls_c) == 1
            a, b = calls_w[0], calls_c[0]
            for f in ("router_logits", "top_k_index", "top_k_weights", "moe_input", "routed_output"):
                assert torch.equal(getattr(a, f), getattr(b, f)), f
            assert (a.expert_outputs is None) == (not needs)
            if needs:
                assert torch.equal(a.expert_outputs, b.expert_outputs)
            x = a.moe_input.reshape(-1, a.moe_input.shape[-1])[:7]
            for e in range(ck.num_experts):
                assert torch.equal(expert_output(a.experts, x, e), expert_output(b.experts, x, e))
    assert moe_modules(ck.adapter, chunked)[2].group_loads > 0


@pytest.mark.parametrize("top_k,group,double", [(4, 1, False), (4, 3, True), (3, 5, True)])
def test_chunked_many_experts_per_token_bf16(synth_dir, top_k, group, double):
    # top-k > 2 spreads one token over several groups: the sum must still follow expert order
    src = synth_dir("qwen3_moe", top_k=top_k)
    ck, skel, whole, chunked = _layer_pair(src, 1, torch.bfloat16, group_size=group, double_buffer=double)
    h = torch.randn(3, 10, ck.config["hidden_size"], generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    with torch.no_grad():
        out_w, _ = _record(ck, skel, whole, 1, h, True)
        out_c, _ = _record(ck, skel, chunked, 1, h, True)
    assert torch.equal(out_w, out_c)


def test_chunked_keeps_at_most_two_groups(synth_dir):
    src = synth_dir("mixtral")
    ck = Checkpoint(src)
    skel = ModelSkeleton(ck.config, ck.adapter)
    acct = Accountant()
    rt = ck.adapter.to_runtime(0, ck.read_layer(0), True)
    layer = build_layer(skel, 0, rt, CPU, torch.float32, group_size=2, accountant=acct)
    experts = moe_modules(ck.adapter, layer)[2]
    per_expert = experts._per_expert_bytes
    resident = acct.current
    h = torch.randn(2, 16, ck.config["hidden_size"], generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        run_layer(skel, layer, 0, h, LayerInputs.build(skel, h, skel.rotary(CPU)))
        loads_first = experts.group_loads
        run_layer(skel, layer, 0, h, LayerInputs.build(skel, h, skel.rotary(CPU)))
    assert acct.peak <= resident + 2 * 2 * per_expert
    assert acct.current == resident + 2 * per_expert  # the last group stays for the next call
    assert experts.group_loads - loads_first == loads_first - 1, "the resident group is reused by the next call"
    del layer, experts
    assert acct.current == 0


# ---- planning and failing early -----------------------------------------------------------------

def test_plan_whole_when_no_budget(synth_dir):
    ck = Checkpoint(synth_dir("mixtral", **BIG))
    p = plan_budget(ck, device=CPU, dtype=torch.float32, batch_size=2, seq_len=16)
    assert p.chunked_layers == [] and p.prefetch_layers and p.weights_budget is None


def test_plan_chunks_under_a_third_of_the_model(synth_dir):
    ck = Checkpoint(synth_dir("mixtral", **BIG))
    budget = ck.total_bytes() // 3
    p = plan_budget(ck, device=CPU, dtype=torch.float32, batch_size=2, seq_len=16, max_vram=budget)
    assert p.chunked_layers == [0, 1]
    assert p.device_peak_bytes <= budget
    # bf16 compute halves the weights: bigger groups, or whole layers
    p16 = plan_budget(ck, device=CPU, dtype=torch.bfloat16, batch_size=2, seq_len=16, max_vram=budget // 2)
    assert p16.layers[0].group_size is not None and p16.layers[0].group_size >= p.layers[0].group_size
    assert plan_budget(ck, device=CPU, dtype=torch.bfloat16, batch_size=2, seq_len=16, max_vram=budget).chunked_layers == []


def test_too_small_vram_fails_before_any_work(synth_dir, calib_txt, tmp_path):
    src = synth_dir("mixtral", **BIG)
    with pytest.raises(ConfigError, match=r"--max-vram .*layer 0 cannot run even one expert.*raise --max-vram"):
        lowmoe.prune(src, tmp_path / "o", calib=[calib_txt], max_vram="500KB", **OPTS)
    with pytest.raises(ConfigError, match=r"--max-vram .*activation chunk alone.*--batch-size 2 x --seq-len 16"):
        lowmoe.prune(src, tmp_path / "o", calib=[calib_txt], max_vram="100KB", **OPTS)
    assert not (tmp_path / "o").exists()


def test_max_ram(synth_dir, calib_txt, tmp_path):
    ck = Checkpoint(synth_dir("mixtral", **BIG))
    free = plan_budget(ck, device=CPU, dtype=torch.float32, batch_size=2, seq_len=16)
    one = plan_budget(ck, device=CPU, dtype=torch.float32, batch_size=2, seq_len=16, max_ram=free.host_peak_bytes * 10)
    assert one.prefetch_layers and one.chunked_layers == []
    assert free.host_layer_bytes > ck.layer_bytes(0)  # per-expert checkpoints: + the stacked runtime copy
    # room for one layer but not two: prefetching is turned off, said in the notes
    two = free.host_fixed_bytes + 2 * free.host_layer_bytes
    p = plan_budget(ck, device=CPU, dtype=torch.float32, batch_size=2, seq_len=16, max_ram=two - 1)
    assert not p.prefetch_layers and any("prefetching is off" in n for n in p.notes)
    assert p.device_budget == two - 1 - free.host_fixed_bytes - free.host_layer_bytes  # left for the compute copy
    # two layers fit, but then nothing is left to compute with: prefetching gives way, not the run
    p = plan_budget(ck, device=CPU, dtype=torch.float32, batch_size=2, seq_len=16, max_ram=two + 100_000)
    assert not p.prefetch_layers and any("too little for the compute copy" in n for n in p.notes)
    # on a CPU run the compute copy lives in RAM too: with ~1 MB left for it, experts get chunked
    p = plan_budget(ck, device=CPU, dtype=torch.float32, batch_size=2, seq_len=16,
                    max_ram=free.host_fixed_bytes + free.host_layer_bytes + 1_100_000)
    assert p.device_budget == 1_100_000 and p.chunked_layers == [0, 1] and not p.prefetch_layers
    with pytest.raises(ConfigError, match="--max-ram"):
        plan_budget(ck, device=CPU, dtype=torch.float32, batch_size=2, seq_len=16,
                    max_ram=free.host_fixed_bytes + free.host_layer_bytes - 1)
    with pytest.raises(ConfigError, match="--max-ram .* too small"):
        lowmoe.prune(ck.path, tmp_path / "o", calib=[calib_txt], max_ram="100MB", **OPTS)
    assert not (tmp_path / "o").exists()


# ---- end to end: same bytes, budget held ---------------------------------------------------------

@pytest.mark.parametrize("method", ["frequency", "reap"])
def test_prune_under_a_third_of_the_model(synth_dir, calib_txt, tmp_path, method):
    src = synth_dir("mixtral", **BIG)
    budget = Checkpoint(src).total_bytes() // 3
    ref = lowmoe.prune(src, tmp_path / "ref", calib=[calib_txt], method=method, **OPTS)
    rep = lowmoe.prune(src, tmp_path / "bud", calib=[calib_txt], method=method, max_vram=budget, **OPTS)
    assert rep["budget"]["chunked_layers"] == [0, 1], "expert chunking must engage"
    assert rep["budget"]["accounted_peak_bytes"] <= budget
    assert ref["budget"]["accounted_peak_bytes"] > budget, "the unbudgeted run would not have fit"
    assert rep["plan"] == ref["plan"] and rep["scores"] == ref["scores"]
    assert model_files(tmp_path / "bud") == model_files(tmp_path / "ref")
    assert rep["io"]["count"].get("experts", 0) > 0


def test_toy_model_same_plan_under_budget_and_without_prefetch(calib_txt, tmp_path):
    from lowmoe.toy.tasks import TOY_MODEL

    budget = Checkpoint(TOY_MODEL).total_bytes() // 4
    opts = dict(OPTS, method="reap", seq_len=32)
    ref = lowmoe.prune(TOY_MODEL, tmp_path / "ref", calib=[calib_txt], prefetch=False, **opts)
    bud = lowmoe.prune(TOY_MODEL, tmp_path / "bud", calib=[calib_txt], max_vram=budget, **opts)
    assert bud["budget"]["chunked_layers"] and bud["budget"]["accounted_peak_bytes"] <= budget
    assert bud["plan"] == ref["plan"] and bud["scores"] == ref["scores"]
    assert model_files(tmp_path / "bud") == model_files(tmp_path / "ref")
