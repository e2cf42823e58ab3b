"""Merging methods on hand-built cases whose correct merge is known (no checkpoint, no pipeline)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lowmoe.engine.adapters.families import GPT_OSS, MIXTRAL
from lowmoe.engine.apply import apply_layer
from lowmoe.methods import PLAN_FIELDS
from lowmoe.errors import ConfigError, PlanError
from lowmoe.engine.hf import MoeCall
from lowmoe.methods.merging import DiverseGroup, HcMerge, MergeFreq
from lowmoe.methods.merging.align import alignment, apply_alignment
from lowmoe.methods.merging.c_prune import clusters_at, decide_layer, global_merges
from lowmoe.methods.merging.common import agglomerate, assign_to_leaders, groups_to_plan
from lowmoe.methods.merging.dern import Dern, apply_neurons
from lowmoe.methods.merging.stats import (expert_features, expert_weights, neuron_features, permute_neurons,
                                          set_expert_weights)
from lowmoe.methods import make_layer_method
from lowmoe.engine.plan import LayerPlan

H, I = 8, 6


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def mixtral_layer(experts: list[dict], router: torch.Tensor) -> dict[str, torch.Tensor]:
    """On-disk tensors of Mixtral layer 0 from canonical experts {gate, up, down}."""
    t = {"model.layers.0.block_sparse_moe.gate.weight": router}
    for e, w in enumerate(experts):
        for key, name in zip(MIXTRAL.expert_keys(0, e), ("gate", "up", "down")):
            t[key] = w[name].clone()
    return t


def rand_expert(g) -> dict[str, torch.Tensor]:
    return {"gate": torch.randn(I, H, generator=g), "up": torch.randn(I, H, generator=g), "down": torch.randn(H, I, generator=g)}


class LinearExperts(nn.Module):
    """f_e(x) = x @ W[e]: enough of transformers' experts interface (hidden, top_k_index, top_k_weights)."""

    def __init__(self, W: torch.Tensor):
        super().__init__()
        self.W = W  # (E, H, H)

    def forward(self, hidden, idx, w):
        out = torch.zeros_like(hidden)
        for j in range(idx.shape[1]):
            out += w[:, j:j + 1] * torch.einsum("th,thk->tk", hidden, self.W[idx[:, j]])
        return out


def call(logits: torch.Tensor, top: torch.Tensor, hidden=None, experts=None) -> MoeCall:
    T = logits.shape[0]
    hidden = torch.zeros(T, H) if hidden is None else hidden
    w = torch.full(top.shape, 1.0 / top.shape[1])
    return MoeCall(logits, top, w, hidden, torch.zeros_like(hidden), experts)


def routing(counts: list[int], k: int = 1) -> torch.Tensor:
    """top-k index (T, k) in which expert e is chosen counts[e] times (k = 1)."""
    return torch.tensor([e for e, c in enumerate(counts) for _ in range(c)]).reshape(-1, k)


# ---- grouping helpers --------------------------------------------------------------------------


def test_agglomerate_finds_the_obvious_clusters_and_respects_protection():
    pts = torch.tensor([[0.0], [0.1], [5.0], [5.2], [9.0]])
    dist = (pts - pts.T).abs()
    clusters, history = agglomerate(dist, 3, "average")
    assert clusters == [[0, 1], [2, 3], [4]]
    assert [h["distance"] for h in history] == pytest.approx([0.1, 0.2])
    # 0 and 1 both protected: they may not be merged while another merge is possible
    clusters, _ = agglomerate(dist, 3, "average", protected={0, 1})
    assert clusters == [[0], [1], [2, 3, 4]]
    # average vs single linkage differ: {2,3} to {4}: average 3.9, single 3.8 < {0,1} to {2,3} 4.9
    assert agglomerate(dist, 2, "single")[0] == [[0, 1], [2, 3, 4]]


def test_assign_to_leaders_keeps_protected_leaders_alone():
    sim = torch.eye(4)
    sim[2, 0] = sim[3, 0] = 0.9
    sim[2, 1] = sim[3, 1] = 0.5
    assert assign_to_leaders(sim, [0, 1], set()) == [[0, 2, 3], [1]]
    assert assign_to_leaders(sim, [0, 1], {0}) == [[0], [1, 2, 3]]


def test_groups_to_plan_frequency_weights_and_router_modes():
    freq = torch.tensor([0.5, 0.1, 0.3, 0.1])
    lp = groups_to_plan([[2, 3], [0, 1]], freq, 4, "leader")
    assert lp.keep == [0, 2]  # slots ordered by leader id
    assert torch.allclose(torch.tensor(lp.merge), torch.tensor([[0.5 / 0.6, 0.1 / 0.6, 0, 0], [0, 0, 0.75, 0.25]]))
    assert lp.router == [[1, 0, 0, 0], [0, 0, 1, 0]]
    assert groups_to_plan([[2, 3], [0, 1]], freq, 4, "mean").router == lp.merge
    # never-routed group: equal weights
    assert groups_to_plan([[0, 1]], torch.zeros(2), 2).merge == [[0.5, 0.5]]


# ---- merge-freq ----------------------------------------------------------------------------------


def test_merge_freq_groups_by_router_logits_and_merges_frequency_weighted():
    g = gen(1)
    base = torch.randn(64, 2, generator=g)
    # logit columns: 1 ~ 0, 3 ~ 2 (plus noise); experts 0 and 2 are the most used
    logits = torch.stack([base[:, 0], base[:, 0] + 0.05 * torch.randn(64, generator=g),
                          base[:, 1], base[:, 1] + 0.05 * torch.randn(64, generator=g)], 1)
    top = routing([30, 10, 20, 4])
    m = MergeFreq(4, 1)
    m.observe(call(logits[:64], top))
    experts = [rand_expert(g) for _ in range(4)]
    tensors = mixtral_layer(experts, torch.randn(4, H, generator=g))
    lp = m.decide(0, 2, protected=set(), groups=1, tensors=tensors, adapter=MIXTRAL)
    assert m.groups == [[0, 1], [2, 3]]
    f = torch.tensor([30, 10, 20, 4.0]) / 64
    assert lp.keep == [0, 2] and lp.merge[0] == pytest.approx([30 / 40, 10 / 40, 0, 0])
    out = apply_layer(MIXTRAL, 0, tensors, lp, 4, fields=PLAN_FIELDS)
    want = (f[2] * experts[2]["up"] + f[3] * experts[3]["up"]) / (f[2] + f[3])
    assert torch.allclose(out[MIXTRAL.expert_keys(0, 1)[1]], want, atol=1e-6)
    # leader's router row by default
    assert torch.equal(out["model.layers.0.block_sparse_moe.gate.weight"][1], tensors["model.layers.0.block_sparse_moe.gate.weight"][2])


def test_alignment_merges_permuted_twins_back_to_the_original():
    """Expert 1 = expert 0 with its neurons shuffled: with alignment the merge is expert 0 exactly;
    without, averaging mixes unrelated neurons."""
    g = gen(2)
    e0 = rand_expert(g)
    perm = torch.randperm(I, generator=g)
    e1 = permute_neurons(e0, perm)
    others = [rand_expert(g), rand_expert(g)]
    tensors = mixtral_layer([e0, e1] + others, torch.randn(4, H, generator=g))
    assert alignment(neuron_features(e0), neuron_features(e1)) == torch.argsort(perm).tolist()
    logits = torch.randn(40, 4, generator=g)
    logits[:, 1] = logits[:, 0] + 0.01 * torch.randn(40, generator=g)  # the router treats 1 like 0
    results = {}
    for align in (False, True):
        m = MergeFreq(4, 1, align=align)
        m.observe(call(logits, routing([20, 2, 12, 6])))
        lp = m.decide(0, 3, protected=set(), groups=1, tensors=tensors, adapter=MIXTRAL)
        assert m.groups[0] == [0, 1] and ("align" in lp.extra) == align
        out = apply_layer(MIXTRAL, 0, tensors, lp, 4, fields=PLAN_FIELDS)
        results[align] = [out[k] for k in MIXTRAL.expert_keys(0, 0)]
    for got, name in zip(results[True], ("gate", "up", "down")):
        assert torch.allclose(got, e0[name], atol=1e-5)
    assert not torch.allclose(results[False][0], e0["gate"], atol=1e-2)


@pytest.mark.parametrize("arch, kw", [("mixtral", {}), ("gpt_oss", {"dtype": "bfloat16"}),
                                      ("gpt_oss", {"dtype": "bfloat16", "quant": "mxfp4"}),
                                      ("qwen3_moe", {"dtype": "bfloat16", "quant": "fp8", "fp8_block": 16})])
def test_expert_features_are_the_canonical_weights_features(synth_dir, arch, kw):
    """``expert_features`` (built a stored tensor at a time, from a lazily read layer) holds the same
    values as ``neuron_features(expert_weights(...))``, for per-expert and fused layouts, bf16, FP8 and MXFP4."""
    from lowmoe.engine.checkpoint import Checkpoint
    from lowmoe.engine.lazy import ShardFiles, read_lazy_layer

    ck = Checkpoint(synth_dir(arch, **kw))
    L = ck.moe_layers()[0]
    layer = read_lazy_layer(ck, ShardFiles(ck.path), L)
    for e in (0, ck.num_experts - 1):
        want = neuron_features(expert_weights(ck.adapter, L, layer, e))
        got = expert_features(ck.adapter, L, layer, e)
        assert got.dtype == torch.float32 and torch.equal(got, want), (arch, e)


def test_align_plan_field_validates():
    tensors = mixtral_layer([rand_expert(gen(3)) for _ in range(2)], torch.randn(2, H))
    with pytest.raises(PlanError, match="permutation"):
        apply_alignment(MIXTRAL, 0, tensors, {"1": [0, 0, 1, 2, 3, 4]})
    with pytest.raises(PlanError, match="not an expert"):
        apply_alignment(MIXTRAL, 0, tensors, {"7": list(range(I))})


# ---- hc-merge / diverse-group -------------------------------------------------------------------


def test_hc_merge_clusters_experts_with_similar_outputs_on_all_tokens():
    g = gen(4)
    A, B = torch.randn(H, H, generator=g), torch.randn(H, H, generator=g)
    W = torch.stack([A, A + 0.01 * torch.randn(H, H, generator=g), B, B + 0.01 * torch.randn(H, H, generator=g),
                     -A + 0.01 * torch.randn(H, H, generator=g)])
    x = torch.randn(50, H, generator=g) + 1.0  # nonzero mean so mean outputs differ
    m = HcMerge(5, 1)
    # expert 4 is never routed, but HC-SMoE uses every token's output: it still gets clustered
    m.observe(call(torch.zeros(50, 5), routing([20, 5, 15, 10, 0]), x, LinearExperts(W)))
    tensors = mixtral_layer([rand_expert(g) for _ in range(5)], torch.randn(5, H, generator=g))
    lp = m.decide(0, 3, protected=set(), groups=1, tensors=tensors, adapter=MIXTRAL)
    assert sorted(map(sorted, m.groups)) == [[0, 1], [2, 3], [4]]
    assert lp.keep == [0, 2, 4]
    mu = torch.stack([(x @ W[e]).mean(0) for e in range(5)]).double()
    assert torch.allclose(m.stats.mean_outputs(), mu, atol=1e-5)


def test_diverse_group_keeps_far_apart_experts_and_merges_router_rows():
    g = gen(5)
    a, b = rand_expert(g), rand_expert(g)
    twin = {k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in a.items()}
    experts = [a, twin, b, {k: -v for k, v in a.items()}]  # 3 is the opposite of 0: maximal disparity
    router = torch.randn(4, H, generator=g)
    tensors = mixtral_layer(experts, router)
    m = DiverseGroup(4, 1)
    m.observe(call(torch.zeros(40, 4), routing([10, 20, 6, 4])))
    lp = m.decide(0, 3, protected=set(), groups=1, tensors=tensors, adapter=MIXTRAL)
    # start: most used (1); farthest from it: 3 (opposite of its twin 0); then 2; 0 joins its twin 1
    assert m.info["kept_order"] == [1, 3, 2]
    assert sorted(map(sorted, m.groups)) == [[0, 1], [2], [3]]
    out = apply_layer(MIXTRAL, 0, tensors, lp, 4, fields=PLAN_FIELDS)
    row = out["model.layers.0.block_sparse_moe.gate.weight"][0]  # slot 0 = group led by expert 1
    assert torch.allclose(row, (10 * router[0] + 20 * router[1]) / 30, atol=1e-6)


# ---- DERN ----------------------------------------------------------------------------------------


def test_dern_segments_go_to_their_matching_neurons():
    g = gen(6)
    keep0, keep1 = rand_expert(g), rand_expert(g)
    # dropped expert 2: neurons 0-2 are neurons 3,1,4 of expert 0; neurons 3-5 are neurons 0,5,2 of expert 1
    dropped = {"gate": torch.cat([keep0["gate"][[3, 1, 4]], keep1["gate"][[0, 5, 2]]]),
               "up": torch.cat([keep0["up"][[3, 1, 4]], keep1["up"][[0, 5, 2]]]),
               "down": torch.cat([keep0["down"][:, [3, 1, 4]], keep1["down"][:, [0, 5, 2]]], 1)}
    dropped["gate"][0] *= 3.0  # same direction (cosine 1 on gate), but a different neuron: merge averages it
    tensors = mixtral_layer([keep0, keep1, dropped, rand_expert(g)], torch.randn(4, H, generator=g))
    m = Dern(4, 1)
    m.observe(call(torch.zeros(40, 4), routing([20, 12, 8, 0])))
    lp = m.decide(0, 2, protected=set(), groups=1, tensors=tensors, adapter=MIXTRAL)
    src = lp.extra["neurons"]["sources"]
    assert lp.keep == [0, 1] and set(src) == {"2"}  # expert 3 was never routed: contributes nothing
    assert src["2"]["slot"] == [0, 0, 0, 1, 1, 1] and src["2"]["neuron"] == [3, 1, 4, 0, 5, 2]
    out = apply_layer(MIXTRAL, 0, tensors, lp, 4, fields=PLAN_FIELDS)
    g0 = out[MIXTRAL.expert_keys(0, 0)[0]]
    # neuron 3 of expert 0: (u0·g + u2·3g) / (u0 + u2), u = frequency
    assert torch.allclose(g0[3], (20 * keep0["gate"][3] + 8 * 3 * keep0["gate"][3]) / 28, atol=1e-5)
    # neurons that received an identical segment are unchanged; expert shapes are kept
    assert torch.allclose(g0[[0, 1, 2, 4, 5]], keep0["gate"][[0, 1, 2, 4, 5]], atol=1e-5)
    assert torch.allclose(out[MIXTRAL.expert_keys(0, 1)[2]], keep1["down"], atol=1e-5)
    # a random projection of the features (match_dim) still finds exact copies
    mp = Dern(4, 1, match_dim=5, seed=0)
    mp.observe(call(torch.zeros(40, 4), routing([20, 12, 8, 0])))
    lpp = mp.decide(0, 2, protected=set(), groups=1, tensors=tensors, adapter=MIXTRAL)
    assert lpp.extra["neurons"]["sources"]["2"]["neuron"] == [3, 1, 4, 0, 5, 2]


def test_dern_plan_field_validates():
    tensors = mixtral_layer([rand_expert(gen(7)) for _ in range(3)], torch.randn(3, H))
    bad = {"slot_weights": [1.0], "sources": {"2": {"weight": 1.0, "slot": [0] * I, "neuron": [9] * I}}}
    with pytest.raises(PlanError, match="valid indices"):
        apply_layer(MIXTRAL, 0, tensors, LayerPlan([0], extra={"neurons": bad}), 3, fields=PLAN_FIELDS)
    with pytest.raises(PlanError, match="expected"):
        apply_neurons(MIXTRAL, 0, {}, tensors, [1, 2])


# ---- C-Prune ---------------------------------------------------------------------------------------


def test_c_prune_global_step_drops_in_heterogeneous_layers_and_merges_in_homogeneous_ones():
    # layer 0: experts are near-duplicates in pairs (cheap merges); layer 1: all far apart
    hom = [{"a": [0], "b": [1], "distance": 0.01}, {"a": [2], "b": [3], "distance": 0.02}, {"a": [0, 1], "b": [2, 3], "distance": 0.5}]
    het = [{"a": [0], "b": [1], "distance": 0.9}, {"a": [0, 1], "b": [2], "distance": 0.95}, {"a": [0, 1, 2], "b": [3], "distance": 0.99}]
    summaries = {0: {"history": hom, "frequency": [0.25] * 4, "importance": [1.0, 1.0, 1.0, 1.0]},
                 1: {"history": het, "frequency": [0.4, 0.3, 0.2, 0.1], "importance": [4.0, 3.0, 0.5, 2.0]}}
    m = global_merges(summaries, 4, 2)  # budget: 2 layers x 2 merges; the cheapest are layer 0's
    assert m == {0: 3, 1: 1}
    assert clusters_at(4, hom, 2) == [[0, 1], [2, 3]]
    opts = {"router": "leader", "overflow": "drop", "align": False}
    plan0, info0 = decide_layer(summaries[0], 4, 2, m[0], set(), opts)
    assert info0["global_clusters"] == 1 and sorted(map(sorted, info0["groups"])) == [[0, 1], [2, 3]]
    plan1, info1 = decide_layer(summaries[1], 4, 2, m[1], set(), opts)
    # c = 3 clusters {0,1},{2},{3} at the global threshold; the least important ({2}: 0.5/9.5) is removed
    assert info1["global_clusters"] == 3 and info1["removed_clusters"] == [[2]]
    assert plan1.keep == [0, 3] and plan1.merge[0] == pytest.approx([0.4 / 0.7, 0.3 / 0.7, 0, 0])
    # a protected expert is never in a removed cluster
    _, info1p = decide_layer(summaries[1], 4, 2, m[1], {2}, opts)
    assert info1p["removed_clusters"] == [[3]]
    # overflow=merge: cut at k instead
    _, info1m = decide_layer(summaries[1], 4, 2, m[1], set(), dict(opts, overflow="merge"))
    assert info1m["removed_clusters"] == [] and sorted(map(sorted, info1m["groups"])) == [[0, 1, 2], [3]]


# ---- layouts and options ---------------------------------------------------------------------------


def test_fused_gpt_oss_weights_round_trip_and_permute():
    g = gen(8)
    E = 3
    base = "model.layers.0.mlp.experts."
    t = {base + "gate_up_proj": torch.randn(E, H, 2 * I, generator=g), base + "gate_up_proj_bias": torch.randn(E, 2 * I, generator=g),
         base + "down_proj": torch.randn(E, I, H, generator=g), base + "down_proj_bias": torch.randn(E, H, generator=g)}
    before = {k: v.clone() for k, v in t.items()}
    w = expert_weights(GPT_OSS, 0, t, 1)
    assert torch.equal(w["gate"], t[base + "gate_up_proj"][1][:, ::2].T) and torch.equal(w["up_bias"], t[base + "gate_up_proj_bias"][1][1::2])
    x = torch.randn(5, H, generator=g)

    def f(w):  # a GPT-OSS-shaped expert function (activation irrelevant for the check)
        return (torch.relu(x @ w["gate"].T + w["gate_bias"]) * (x @ w["up"].T + w["up_bias"])) @ w["down"].T + w["down_bias"]

    perm = torch.randperm(I, generator=g)
    out, cloned = dict(t), set()
    set_expert_weights(GPT_OSS, 0, out, 2, permute_neurons(w, perm), torch.float32, cloned)
    assert torch.allclose(f(expert_weights(GPT_OSS, 0, out, 2)), f(w), atol=1e-5)  # same function
    assert torch.equal(out[base + "down_proj"][0], t[base + "down_proj"][0]) and out[base + "down_proj"] is not t[base + "down_proj"]
    back = apply_alignment(GPT_OSS, 0, out, {"2": torch.argsort(perm).tolist()})
    for k, v in before.items():  # the caller's tensors are never written in place
        assert torch.equal(t[k], v), k
    for name in ("gate", "up", "down", "gate_bias", "up_bias", "down_bias"):
        assert torch.allclose(expert_weights(GPT_OSS, 0, back, 2)[name], w[name])


def test_options_are_validated():
    with pytest.raises(ConfigError, match="similarty"):
        make_layer_method("merge-freq", 8, 2, similarty="weight")
    with pytest.raises(ConfigError, match="router-logits"):
        make_layer_method("merge-freq", 8, 2, similarity="logits")
    with pytest.raises(ConfigError, match="true or false"):
        make_layer_method("hc-merge", 8, 2, align="maybe")
    assert make_layer_method("diverse-group", 8, 2, align="yes", seed=0).opts["align"] is True
