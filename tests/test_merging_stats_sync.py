"""The merging methods' routing statistics are observed without waiting for the device.

``LayerStats`` keeps the counts, gate mass, token count and router-logit Gram that frequency-
weighted merging, DERN and C-Prune decide from. It used to select the counted tokens with a boolean
mask and copy each call's routing to the host: on a GPU each of those waits for every kernel queued
before it, at every chunk of every layer. A ``meta`` tensor has no data, so any such read raises;
the totals stay those of the counted tokens alone (counts and gate mass to the bit).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lowmoe
from lowmoe.engine.hf import MoeCall
from lowmoe.methods.merging.stats import LayerStats

from .test_scoring_sync import _call, _Reads

E, K, H = 6, 2, 8


class _LinearExperts(nn.Module):
    """f_e(x) = x @ W_e: the (x, top_k_index, top_k_weights) forward transformers' experts modules have."""

    def __init__(self, seed=0):
        super().__init__()
        self.w = nn.Parameter(torch.randn(E, H, H, generator=torch.Generator().manual_seed(seed)))

    def forward(self, x, idx, w):
        return torch.einsum("th,tkhg,tk->tg", x, self.w[idx], w)


def _with_experts(call: MoeCall) -> MoeCall:
    call.experts = _LinearExperts().to(call.moe_input.device)
    return call


def _counted(calls):
    """The counted tokens' rows of every call, concatenated: index, weights, logits, inputs."""
    rows = [(c.top_k_index[c.token_mask], c.top_k_weights[c.token_mask], c.router_logits[c.token_mask],
             c.moe_input[c.token_mask]) for c in calls]
    return [torch.cat(parts) for parts in zip(*rows)]


def test_routing_statistics_and_saliency_read_nothing_from_the_device():
    st = LayerStats(E, K, router_gram=True, saliency=True)
    assert st.needs_expert_outputs  # the saliency comes from the probe's slot outputs
    st.observe(_call(16, device="meta"))  # raises if it reads a value: .item(), .cpu(), x[mask]
    st.observe(_call(16, device="meta", seed=1))
    unmasked = _call(16, device="meta", seed=2)
    unmasked.token_mask = None
    st.observe(unmasked)


def test_routing_statistics_are_those_of_the_counted_tokens():
    calls = [_call(40, seed=s) for s in range(3)]
    st = LayerStats(E, K, router_gram=True)
    for c in calls:
        st.observe(c)
    idx, w, logits, _ = _counted(calls)
    counts = torch.zeros(E, dtype=torch.float64).index_add_(0, idx.reshape(-1), torch.ones(idx.numel(), dtype=torch.float64))
    mass = torch.zeros(E, dtype=torch.float64).index_add_(0, idx.reshape(-1), w.reshape(-1).double())
    assert st.tokens == idx.shape[0] and st.counts.tolist() == counts.tolist()
    assert st.gate_mass.tolist() == mass.tolist()  # the same additions in the same order
    lg = logits.double()
    assert torch.allclose(st.router_gram, lg.T @ lg, rtol=1e-12, atol=0)
    assert torch.allclose(st.frequency(), counts / (idx.shape[0] * K))
    assert st.counts.device.type == "cpu"


def test_a_value_computed_for_a_token_that_does_not_count_is_never_read():
    clean, dirty = _call(24, seed=5), _call(24, seed=5)
    pad = ~dirty.token_mask
    dirty.router_logits[pad] = float("nan")
    dirty.top_k_weights[pad] = float("inf")
    a, b = LayerStats(E, K, router_gram=True), LayerStats(E, K, router_gram=True)
    a.observe(clean)
    b.observe(dirty)
    assert torch.equal(a.counts, b.counts) and torch.equal(a.gate_mass, b.gate_mass)
    assert torch.equal(a.router_gram, b.router_gram) and a.tokens == b.tokens


def test_reading_between_calls_then_observing_more():
    calls = [_call(20, seed=s) for s in range(3)]
    whole, read = LayerStats(E, K, router_gram=True), LayerStats(E, K, router_gram=True)
    for c in calls:
        whole.observe(c)
    read.observe(calls[0])
    assert read.tokens == int(calls[0].token_mask.sum())  # read...
    for c in calls[1:]:
        read.observe(c)  # ...then observed again
    assert read.tokens == whole.tokens and torch.equal(read.counts, whole.counts)
    assert torch.equal(read.router_gram, whole.router_gram)


def test_nothing_observed_and_nothing_counted():
    st = LayerStats(E, K, router_gram=True, outputs="mean")
    assert st.tokens == 0 and st.counts.tolist() == [0.0] * E and st.router_gram.tolist() == [[0.0] * E] * E
    masked = _with_experts(_call(8))
    masked.token_mask[:] = False
    st.observe(masked)
    assert st.tokens == 0 and st.counts.tolist() == [0.0] * E
    with pytest.raises(RuntimeError, match="no expert outputs"):
        st.mean_outputs()
    assert LayerStats(E, K).router_gram is None and LayerStats(E, K).output_gram is None


@pytest.mark.parametrize("slots", [False, True])
@pytest.mark.parametrize("max_tokens", [None, 30])
def test_all_token_outputs_and_saliency_use_the_counted_tokens(max_tokens, slots):
    """Outputs run the experts on the counted rows only (up to ``max_tokens``). The saliency comes
    from the probe's slot outputs when the call has them (``slots``), else from the experts run on
    the counted rows (past the cap: each token's routed experts alone)."""
    calls = [_with_experts(_call(20, seed=s)) for s in range(3)]
    for c in calls:
        with torch.no_grad():
            c.expert_outputs = torch.einsum("th,tkhg->tkg", c.moe_input, c.experts.w[c.top_k_index]) if slots else None
        if slots:
            c.expert_outputs[~c.token_mask] = float("nan")  # padding: computed, never read
    st = LayerStats(E, K, outputs="gram", saliency=True, max_tokens=max_tokens)
    for c in calls:
        st.observe(c)
    idx, w, _, x = _counted(calls)
    n = x.shape[0] if max_tokens is None else min(max_tokens, x.shape[0])
    experts = calls[0].experts
    with torch.no_grad():
        outs = torch.stack([x[:n] @ experts.w[e] for e in range(E)]).double()  # (E, n, H)
        norms = torch.stack([(x @ experts.w[e]).norm(dim=-1) for e in range(E)]).T.double()  # (T, E)
    sal = torch.zeros(E, dtype=torch.float64).index_add_(0, idx.reshape(-1), (norms.gather(1, idx) * w.double()).reshape(-1))
    assert st.output_tokens == n and st.tokens == x.shape[0]
    assert torch.allclose(st.mean_outputs(), outs.mean(1), rtol=1e-5, atol=1e-6)
    flat = outs.reshape(E, -1)
    assert torch.allclose(st.output_gram, flat @ flat.T, rtol=1e-5)
    assert torch.allclose(st.saliency(), sal / x.shape[0], rtol=1e-5)


@pytest.mark.parametrize("method", ["merge-freq", "dern", "c-prune"])
def test_a_merging_prune_observes_the_routing_without_a_host_read(synth_dir, calib_txt, tmp_path, monkeypatch, method):
    """In a real prune (two calibration domains, padding) the routing statistics and C-Prune's
    saliency ask nothing of the device at any layer call."""
    reads, seen = _Reads(), []
    orig = LayerStats.observe

    def observe(self, call):
        seen.append(call.top_k_index.shape[0])
        with reads:
            orig(self, call)

    monkeypatch.setattr(LayerStats, "observe", observe)
    math = tmp_path / "math.txt"
    math.write_text("\n".join(f"{i} plus {i} is {2 * i}" for i in range(40)))
    rep = lowmoe.prune(synth_dir("mixtral"), tmp_path / "out", keep=4, method=method, calib=[calib_txt, math],
                       n_samples=8, seq_len=16, batch_size=2, progress=False, device="cpu")
    assert rep["plan"]["layers"] and seen
    assert not reads.ops, dict(reads.ops)
