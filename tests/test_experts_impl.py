"""--experts-impl: the routed experts computed by transformers' per-expert loop or its grouped GEMM.

Grouped (transformers' ``grouped_mm``, what ``from_pretrained`` runs by default) asks the device for
far fewer operators and no host synchronisation per expert. lowmoe's own variants (experts in groups,
the kept experts of a pruned twin) give what the grouped module holding every expert gives: to the
bit with the eager loop; to rounding with the grouped GEMM on the CPU, where transformers' grouped
forward orders each expert's rows by an unstable sort of the whole call's routing and the CPU GEMM's
bits depend on a row's position (so even transformers' own module gives a token other bits in
another batch). The kept experts, the plan and the pruned checkpoint are the same.
"""

from __future__ import annotations

import collections

import pytest
import torch
from click.testing import CliRunner
from torch.utils._python_dispatch import TorchDispatchMode

import lowmoe
from lowmoe.cli import main as cli
from lowmoe.engine.budget import build_layer
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.engine.experts import ChunkedExperts, KeptExperts
from lowmoe.engine.hf import (LayerInputs, ModelSkeleton, MoeProbe, experts_run_grouped, experts_subset, moe_modules,
                              resolve_experts_impl, run_layer)
from lowmoe.errors import ConfigError
from lowmoe.pipeline import REPORT, PruneConfig, run_fingerprint
from lowmoe.score import score
from lowmoe.toy.synth import save_pretrained_model

from .helpers import FAMILIES, dir_digest

CPU = torch.device("cpu")
OPTS = dict(keep=4, n_samples=8, seq_len=16, batch_size=2, progress=False, device="cpu")
HOST_SYNCS = {"aten.nonzero.default", "aten._local_scalar_dense.default", "aten._unique2.default"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func)] += 1
        return func(*args, **(kwargs or {}))

    @property
    def syncs(self) -> int:
        return sum(v for k, v in self.ops.items() if k in HOST_SYNCS)


def _close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal to rounding: the last bits of the dtype, relative to the values' scale."""
    tol = {torch.float32: 1e-5, torch.bfloat16: 2e-2}[a.dtype]
    return torch.allclose(a.float(), b.float(), rtol=tol, atol=tol * float(b.abs().max()))


def _layers(src, dtype, group_size=3, experts="grouped", layer_idx=None):
    ck = Checkpoint(src)
    L = ck.moe_layers()[-1] if layer_idx is None else layer_idx
    skel = ModelSkeleton(ck.config, ck.adapter, experts=experts)
    rt = ck.adapter.to_runtime(L, ck.read_layer(L), True)
    return ck, skel, L, build_layer(skel, L, rt, CPU, dtype), build_layer(skel, L, rt, CPU, dtype, group_size=group_size)


def _run(ck, skel, layer, L, h, needs_outputs=False):
    calls = []

    def cb(call):
        calls.append(call)

    cb.needs_expert_outputs = needs_outputs
    with torch.no_grad(), MoeProbe(ck.adapter, layer, cb):
        out = run_layer(skel, layer, L, h, LayerInputs.build(skel, h, skel.rotary(CPU)))
    return out, calls


# ---- choosing ------------------------------------------------------------------------------------

def test_auto_is_grouped_on_cuda_and_eager_on_the_cpu():
    assert resolve_experts_impl("auto", torch.device("cuda", 0)) == "grouped"
    assert resolve_experts_impl("auto", "cuda") == "grouped"
    assert resolve_experts_impl("auto", CPU) == "eager"
    assert resolve_experts_impl("eager", "cuda") == "eager"
    assert resolve_experts_impl("grouped", CPU) == "grouped"
    with pytest.raises(ValueError, match="'fast'.*auto, eager, grouped"):
        resolve_experts_impl("fast", CPU)


@pytest.mark.parametrize("arch", FAMILIES)
def test_skeleton_builds_the_layers_it_says(synth_dir, arch):
    ck = Checkpoint(synth_dir(arch))
    L = ck.moe_layers()[0]
    for impl, grouped in (("eager", False), ("grouped", True)):
        skel = ModelSkeleton(ck.config, ck.adapter, experts=impl)
        assert skel.experts_impl == impl
        experts = moe_modules(ck.adapter, skel.new_layer(L))[2]
        assert experts_run_grouped(experts) is grouped


# ---- the same numbers, however the experts visit the device ------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", FAMILIES)
def test_grouped_experts_in_groups_match_the_whole_module(synth_dir, arch, dtype):
    top_k = 2 if arch == "phimoe" else 4  # top-4 spreads a token over several groups
    ck, skel, L, whole, chunked = _layers(synth_dir(arch, top_k=top_k), dtype)
    experts = moe_modules(ck.adapter, chunked)[2]
    assert isinstance(experts, ChunkedExperts) and experts.grouped
    h = torch.randn(2, 12, ck.config["hidden_size"], generator=torch.Generator().manual_seed(0)).to(dtype)
    for needs in (False, True):
        out_w, calls_w = _run(ck, skel, whole, L, h, needs)
        out_c, calls_c = _run(ck, skel, chunked, L, h, needs)
        a, b = calls_w[0], calls_c[0]
        assert torch.equal(a.top_k_index, b.top_k_index)
        assert _close(a.routed_output, b.routed_output) and _close(out_w, out_c)
        if needs:
            assert _close(a.expert_outputs, b.expert_outputs)
    assert experts.group_loads > 0


def test_eager_experts_in_groups_stay_bit_identical(synth_dir):
    ck, skel, L, whole, chunked = _layers(synth_dir("qwen3_moe", top_k=4), torch.float32, experts="eager")
    assert not moe_modules(ck.adapter, chunked)[2].grouped
    h = torch.randn(2, 12, ck.config["hidden_size"], generator=torch.Generator().manual_seed(0))
    assert torch.equal(_run(ck, skel, whole, L, h)[1][0].routed_output, _run(ck, skel, chunked, L, h)[1][0].routed_output)


def test_grouped_slot_outputs_are_the_modules_own_per_expert(synth_dir):
    """With one expert per group there is no tie to order: every slot output, weighting and sum is
    the grouped forward's own, so the experts call is bit-identical to calling the module per expert."""
    ck, skel, L, whole, chunked = _layers(synth_dir("mixtral"), torch.float32, group_size=1)
    inner, routed = moe_modules(ck.adapter, whole)[2], moe_modules(ck.adapter, chunked)[2]
    g = torch.Generator().manual_seed(5)
    hidden = torch.randn(30, ck.config["hidden_size"], generator=g)
    index = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(30)])
    weights = torch.rand(30, 2, generator=g)
    with torch.no_grad():
        ref = torch.zeros(60, hidden.shape[1])
        for e in range(8):  # each expert alone through transformers' grouped forward, unit weights
            rows = (index.reshape(-1) == e).nonzero().squeeze(1)
            one = experts_subset(inner, {n: p[e:e + 1] for n, p in inner.named_parameters()}, 1)
            ref[rows] = one(hidden[rows // 2], torch.zeros(len(rows), 1, dtype=torch.long), torch.ones(len(rows), 1))
        expected = (ref * weights.reshape(-1, 1)).view(30, 2, -1).sum(1)
        assert torch.equal(routed(hidden, index, weights), expected)


@pytest.mark.parametrize("family", ["glm4_moe", "qwen3_next", "granitemoehybrid"])
def test_grouped_experts_in_groups_beyond_the_synthetic_families(tmp_path, family):
    src = save_pretrained_model(tmp_path / family, family, experts=8, top_k=4)
    ck, skel, L, whole, chunked = _layers(src, torch.float32)
    h = torch.randn(1, 10, ck.config["hidden_size"], generator=torch.Generator().manual_seed(2))
    assert _close(_run(ck, skel, whole, L, h)[1][0].routed_output, _run(ck, skel, chunked, L, h)[1][0].routed_output)


def test_grouped_and_eager_agree_to_rounding(synth_dir):
    src = synth_dir("qwen3_moe", top_k=4)
    h = torch.randn(2, 12, Checkpoint(src).config["hidden_size"], generator=torch.Generator().manual_seed(1))
    ck, skel_g, L, whole_g, _ = _layers(src, torch.float32)
    _, skel_e, _, whole_e, _ = _layers(src, torch.float32, experts="eager")
    a, b = _run(ck, skel_g, whole_g, L, h)[0], _run(ck, skel_e, whole_e, L, h)[0]
    assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("impl", ["eager", "grouped"])
@pytest.mark.parametrize("keep", [[0, 2, 5, 7], [6, 1, 3]])
def test_kept_experts_are_a_module_holding_only_them(synth_dir, impl, keep):
    """The pruned twin's experts (slot j = expert keep[j] of the loaded layer) against transformers'
    module holding only those experts: one call of the loaded module's own forward, bit-identical
    with the eager loop (ascending or not), to rounding with the grouped GEMM."""
    ck, skel, L, whole, _ = _layers(synth_dir("mixtral"), torch.float32, experts=impl)
    inner = moe_modules(ck.adapter, whole)[2]
    kept = KeptExperts(inner, keep)
    alone = experts_subset(inner, {n: p[keep] for n, p in inner.named_parameters()}, len(keep))
    g = torch.Generator().manual_seed(3)
    hidden = torch.randn(20, ck.config["hidden_size"], generator=g)
    index = torch.randint(0, len(keep), (20, 2), generator=g)
    weights = torch.rand(20, 2, generator=g)
    with torch.no_grad(), Count() as c:
        out = kept(hidden, index, weights)
    with torch.no_grad():
        ref = alone(hidden, index, weights)
    assert torch.equal(out, ref) if impl == "eager" else _close(out, ref)
    if impl == "grouped" or keep == sorted(keep):
        assert c.ops["aten._unique2.default"] == 0  # no dispatch of lowmoe's (its hit-experts list)


# ---- what the device is asked for ---------------------------------------------------------------

def _experts_call(module, ck, T=48, seed=4):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(T, ck.config["hidden_size"], generator=g)
    index = torch.stack([torch.randperm(ck.num_experts, generator=g)[:2] for _ in range(T)])
    weights = torch.rand(T, 2, generator=g)
    with torch.no_grad(), Count() as c:
        module(hidden, index, weights)
    return c


def test_grouped_experts_need_no_host_synchronisation_per_expert(synth_dir, monkeypatch):
    """The eager loop waits for the device about five times per expert hit; the grouped module not
    at all; experts in groups once per call, whatever the number of groups: every expert's row count
    is read in one ``.tolist()`` (not dispatched, so counted apart), not a ``nonzero`` per group."""
    ck, _, _, whole_e, _ = _layers(synth_dir("mixtral"), torch.float32, experts="eager")
    _, _, _, whole_g, chunked_g = _layers(synth_dir("mixtral"), torch.float32, group_size=3)
    eager = _experts_call(moe_modules(ck.adapter, whole_e)[2], ck)
    grouped = _experts_call(moe_modules(ck.adapter, whole_g)[2], ck)
    reads = []
    tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or tolist(t))
    in_groups = _experts_call(moe_modules(ck.adapter, chunked_g)[2], ck)
    monkeypatch.undo()
    assert eager.syncs >= 4 * ck.num_experts
    assert grouped.syncs == 0
    assert in_groups.syncs == 0 and reads == [(ck.num_experts + 1,)]  # 8 experts in groups of 3: one read
    assert sum(grouped.ops.values()) * 3 < sum(eager.ops.values())


def test_slot_outputs_give_each_module_the_rows_a_mask_would():
    """Each module's rows, in ascending order, and each row's index in the module, as the per-module
    mask (``(local >= 0).nonzero()``, one wait each) gave them; the "no expert" sentinel rows stay zero."""
    from lowmoe.engine.experts import SlotOutputs

    g = torch.Generator().manual_seed(1)
    T, k, E, H = 40, 3, 8, 4
    idx = torch.randint(0, E + 1, (T, k), generator=g)  # E: transformers' "no expert"
    hidden = torch.randn(T, H, generator=g)
    slots = SlotOutputs(hidden, idx, torch.rand(T, k, generator=g), E)
    assert slots.hit == sorted({int(e) for e in idx.reshape(-1)} - {E})
    seen = []

    def forward(module, x, local, w):
        seen.append((x.clone(), local.clone()))
        return x * (local + 1) * w

    groups = [[(0, 0), (1, 1), (2, 2)], [(3, 0), (5, 2)], [(6, 0), (7, 1)]]  # expert 4 in no group
    for experts in groups:
        slots.run(forward, None, experts)
    flat = idx.reshape(-1)
    want_out = torch.zeros(T * k, H)
    for (x, local), experts in zip(seen, groups):
        lut = torch.full((E + 1,), -1)
        for e, i in experts:
            lut[e] = i
        ref = lut[flat]
        rows = (ref >= 0).nonzero().squeeze(1)
        assert torch.equal(x, hidden[rows // k]) and torch.equal(local.squeeze(1), ref[rows])
        want_out[rows] = hidden[rows // k] * (ref[rows] + 1).unsqueeze(1)
    assert torch.equal(slots.out, want_out)
    assert not slots.out[(flat == E) | (flat == 4)].any()


# ---- end to end ---------------------------------------------------------------------------------

@pytest.mark.parametrize("method", ["frequency", "reap"])  # reap reads every slot's expert output
def test_prune_with_grouped_experts_same_bytes_under_a_budget(synth_dir, calib_txt, tmp_path, method):
    src = synth_dir("qwen3_moe", layers=2, hidden_size=64, intermediate_size=256, experts=8, top_k=2, shard_size="400KB")
    opts = dict(OPTS, method=method)
    whole = lowmoe.prune(src, tmp_path / "whole", calib=[calib_txt], experts_impl="grouped", **opts)
    budget = Checkpoint(src).total_bytes() // 3
    small = lowmoe.prune(src, tmp_path / "small", calib=[calib_txt], experts_impl="grouped", max_vram=budget, **opts)
    assert whole["experts_impl"] == small["experts_impl"] == "grouped"
    assert small["budget"]["chunked_layers"] and set(small["budget"]["group_sizes"].values()) != {8}
    assert small["plan"] == whole["plan"]
    files = lambda p: {k: v for k, v in dir_digest(p).items() if k != REPORT}  # noqa: E731
    assert files(tmp_path / "whole") == files(tmp_path / "small")
    eager = lowmoe.prune(src, tmp_path / "eager", calib=[calib_txt], **opts)
    assert eager["experts_impl"] == "eager"  # auto on the CPU
    assert eager["plan"]["layers"] == whole["plan"]["layers"]


def test_score_reports_its_experts_impl(synth_dir, calib_txt, tmp_path):
    rep = score(synth_dir("mixtral"), calib=[calib_txt], n_samples=4, seq_len=16, batch_size=2, device="cpu",
                       progress=False, experts_impl="grouped")
    assert rep["options"]["experts_impl"] == "grouped"
    with pytest.raises(ConfigError, match="--experts-impl 'fast'"):
        score(synth_dir("mixtral"), calib=[calib_txt], device="cpu", experts_impl="fast")


def test_bad_experts_impl_is_one_line_and_nothing_written(synth_dir, calib_txt, tmp_path):
    with pytest.raises(ConfigError, match="--experts-impl 'fast': choose one of auto, eager, grouped"):
        lowmoe.prune(synth_dir("mixtral"), tmp_path / "out", calib=[calib_txt], experts_impl="fast", **OPTS)
    assert not (tmp_path / "out").exists()
    res = CliRunner().invoke(cli, ["prune", str(synth_dir("mixtral")), str(tmp_path / "cli"), "--keep", "4",
                                   "--calib", str(calib_txt), "--experts-impl", "fast"])
    assert res.exit_code == 2 and "--experts-impl" in res.output
    assert not (tmp_path / "cli").exists()


def test_resume_fingerprint_follows_the_choice(synth_dir, calib_txt, tmp_path):
    ck = Checkpoint(synth_dir("mixtral"))
    fp = {impl: run_fingerprint(PruneConfig(model=ck.path, out=tmp_path, keep=4, calib=(str(calib_txt),), experts_impl=impl), ck)
          for impl in ("auto", "eager", "grouped")}
    assert len(set(fp.values())) == 3
    again = PruneConfig(model=ck.path, out=tmp_path, keep=4, calib=(str(calib_txt),))
    assert run_fingerprint(again, ck) == fp["auto"]


def test_eep_population_with_grouped_experts(synth_dir, tmp_path):
    """EEP's evaluator computes its candidates (kept, merged and re-routed experts) with the grouped
    GEMM too: the same fitness as with the eager loop, to rounding."""
    import numpy as np

    from .helpers import evaluator, population

    src = synth_dir("mixtral")
    eager = evaluator(src, tmp_path / "e", experts="eager")
    grouped = evaluator(src, tmp_path / "g", experts="grouped")
    assert (eager.skel.experts_impl, grouped.skel.experts_impl) == ("eager", "grouped")
    cands = population(grouped.space, np.random.default_rng(0))
    for a, b in zip(eager.evaluate(cands), grouped.evaluate(cands)):
        assert a.acc == b.acc and a.ll == pytest.approx(b.ll, abs=1e-5)


def test_the_budget_counts_the_grouped_gemms_rows(synth_dir):
    """The grouped GEMM computes every (token, slot) row of a call at once: the plan books its
    gate/up/activation rows (4 T k I) and the sorted, projected and gathered rows (4 T k H)."""
    from lowmoe.engine.stream import plan_stream_budget

    src = synth_dir("qwen3_moe", top_k=4)
    ck = Checkpoint(src)
    kw = dict(device=CPU, dtype=torch.float32, batch_size=2, seq_len=16, lazy=True, n_samples=8)
    eager = plan_stream_budget(ck, **kw)  # auto on the CPU
    grouped = plan_stream_budget(ck, experts="grouped", **kw)
    assert (eager.grouped_experts, grouped.grouped_experts) == (False, True)
    T, k, H, b = 2 * 16, 4, ck.config["hidden_size"], 4
    inter = ck.config.get("moe_intermediate_size") or ck.config["intermediate_size"]
    assert "grouped_expert_rows" not in eager.device_terms
    assert grouped.device_terms["grouped_expert_rows"] == 4 * T * k * H * b
    assert grouped.device_terms["expert_intermediates"] >= 4 * T * k * inter * b > eager.device_terms["expert_intermediates"]
    assert grouped.device_peak_bytes > eager.device_peak_bytes


def test_quantized_experts_with_the_grouped_gemm(synth_dir):
    """--quant: each expert dequantized on its own, one grouped call per expert, summed as the grouped
    module sums: the grouped layer holding the dequantized weights, to rounding."""
    from lowmoe.engine.experts import QuantExperts
    from lowmoe.engine.hf import materialize_layer
    from lowmoe.engine.quant import build_quantized_layer

    ck = Checkpoint(synth_dir("qwen3_moe", layers=2, hidden_size=64, intermediate_size=64, top_k=4))
    skel = ModelSkeleton(ck.config, ck.adapter, experts="grouped")
    L = ck.moe_layers()[-1]
    rt = ck.adapter.to_runtime(L, ck.read_layer(L), True)
    q = build_quantized_layer(skel, L, rt, "cpu", torch.float32, "int8")
    experts = moe_modules(ck.adapter, q)[2]
    assert isinstance(experts, QuantExperts) and experts.grouped
    state = dict(rt)
    prefix = ck.adapter.runtime_moe_prefix + "experts."
    for p, qs in experts._q.items():
        state[prefix + p] = torch.stack([x.dequantize(torch.float32) for x in qs])
    for name, m in q.named_modules():  # the quantized attention and shared-expert projections
        if hasattr(m, "qweight"):
            state[name + ".weight"] = m.qweight.dequantize(torch.float32)
    ref = materialize_layer(skel, L, state, "cpu", torch.float32)
    h = torch.randn(2, 12, 64, generator=torch.Generator().manual_seed(0))
    a, b = _run(ck, skel, q, L, h)[1][0], _run(ck, skel, ref, L, h)[1][0]
    assert torch.equal(a.top_k_index, b.top_k_index) and _close(a.routed_output, b.routed_output)


def test_cli_takes_the_flag(synth_dir, calib_txt, tmp_path):
    src = str(synth_dir("mixtral"))
    res = CliRunner().invoke(cli, ["score", src, "--calib", str(calib_txt), "--n-samples", "4", "--seq-len", "16",
                                   "--device", "cpu", "--experts-impl", "grouped", "--out", str(tmp_path / "s.json"), "--json"])
    assert res.exit_code == 0, res.output
    import json

    assert json.loads((tmp_path / "s.json").read_text())["options"]["experts_impl"] == "grouped"
    res = CliRunner().invoke(cli, ["prune", src, str(tmp_path / "p"), "--keep", "4", "--calib", str(calib_txt),
                                   "--n-samples", "4", "--seq-len", "16", "--device", "cpu", "--experts-impl", "grouped"])
    assert res.exit_code == 0, res.output
    assert json.loads((tmp_path / "p" / REPORT).read_text())["experts_impl"] == "grouped"
