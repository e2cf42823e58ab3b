"""The scorers observe a layer's calls without waiting for the device.

On a GPU every ``.item()``, every copy to the host and every boolean-mask index (its row count is a
device value) makes the host wait until the device has finished all it was given. A scorer that did
one per call stopped the queue at every chunk of every layer (issue 15: "no synchronising
.item()/.cpu() per batch in the scorers"). A ``meta`` tensor has no data, so any such read of one
raises: a scorer that observes meta calls reads nothing from the device. A TorchDispatchMode counts
the same operators in a real CPU prune. The scores stay those of the counted tokens alone, to the bit.
"""

from __future__ import annotations

import collections

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import lowmoe
from lowmoe.engine.hf import MoeCall
from lowmoe.methods.scoring import SCORERS, make_scorer, router_probs
from lowmoe.methods.scoring.base import Scorer
from lowmoe.methods.scoring.super_experts import MaximaObserver
from lowmoe.score import score

E, K, H = 6, 2, 8
HOST_READS = {"aten.nonzero.default", "aten._local_scalar_dense.default", "aten._unique2.default",
              "aten.masked_select.default", "aten.is_nonzero.default"}
MASK_INDEXING = {"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default", "aten._index_put_impl_.default"}


def _call(t: int, device="cpu", seed=0, domains=3, mask=True, num_domains=True) -> MoeCall:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(t, E, generator=g)
    idx = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(t)]) if t else torch.zeros(0, K, dtype=torch.long)
    w = torch.softmax(logits.gather(1, idx), -1)
    x, r = torch.randn(t, H, generator=g), torch.randn(t, H, generator=g)
    f = torch.randn(t, K, H, generator=g)
    m = torch.rand(t, generator=g) > 0.3 if mask else None
    dom = torch.randint(0, domains, (t,), generator=g)
    to = lambda v: None if v is None else v.to(device)  # noqa: E731
    return MoeCall(to(logits), to(idx), to(w), to(x), to(r), None, token_mask=to(m), expert_outputs=to(f),
                   token_domain=to(dom), num_domains=domains if num_domains else None)


def _reference(method: str, calls: list[MoeCall]) -> dict[int, list[float]]:
    """Per domain: the method's sums over the counted tokens alone, added one by one in token order
    (what the scorers computed when they selected the counted rows and added on the host)."""
    sums: dict[int, list[float]] = collections.defaultdict(lambda: [0.0] * E)
    for c in calls:
        sel = c.token_mask
        idx, w = c.top_k_index[sel], c.top_k_weights[sel]
        if method == "gate-mass":
            vals = w.double()
        elif method == "reap":
            g = router_probs(c)[sel].gather(1, idx)
            g = g / g.sum(-1, keepdim=True).clamp_min(1e-20)
            vals = g.double() * c.expert_outputs[sel].float().norm(dim=-1).double()
        elif method == "easy-ep":
            h, r = c.moe_input[sel].float(), c.routed_output[sel].float()
            s = (1.0 - torch.nn.functional.cosine_similarity(h, h + r, dim=-1, eps=1e-8)).clamp_min(0.0)
            vals = (w.float() * c.expert_outputs[sel].float().norm(dim=-1)).double() * s.double()[:, None]
        elif method == "tcess":
            vals = c.router_logits[sel].float().gather(1, idx).double()
        else:
            vals = torch.ones(idx.shape, dtype=torch.float64)
        for d, row, v in zip(c.token_domain[sel].tolist(), idx.tolist(), vals.tolist()):
            for e, x in zip(row, v):
                sums[d][e] += x
    return dict(sums)


@pytest.mark.parametrize("method", list(SCORERS))
def test_observe_reads_nothing_from_the_device(method):
    s = make_scorer(method, E, K)
    s.observe(_call(16, device="meta"))  # raises if it reads a value: .item(), .cpu(), x[mask]
    s.observe(_call(16, device="meta", seed=1))


def test_the_super_expert_maxima_read_nothing_until_the_layer_is_done():
    obs = MaximaObserver(E)
    obs.observe(_call(16, device="meta"))
    obs.observe(_call(16, device="meta", seed=1))
    cpu = MaximaObserver(E)
    calls = [_call(16, seed=s) for s in (0, 1)]
    for c in calls:
        cpu.observe(c)
    cpu.commit(3)
    slot_max = torch.cat([c.expert_outputs.abs().amax(-1).reshape(-1) for c in calls])
    idx = torch.cat([c.top_k_index.reshape(-1) for c in calls])
    want = [float(slot_max[idx == e].max()) if (idx == e).any() else 0.0 for e in range(E)]
    assert cpu.maxima[3].tolist() == want and cpu.maxima[3].device.type == "cpu"


@pytest.mark.parametrize("method", list(SCORERS))
def test_scores_are_those_of_the_counted_tokens_to_the_bit(method):
    calls = [_call(40, seed=s) for s in range(3)]
    s = make_scorer(method, E, K)
    for c in calls:
        s.observe(c)
    ref = _reference(method, calls)
    assert sorted(ref) == [d for d in range(3) if s._tokens[d] > 0]
    for d, want in ref.items():
        assert s._sums[d].tolist() == (want if method not in ("frequency",) else [0.0] * E)
        counted = [c.token_mask & (c.token_domain == d) for c in calls]
        assert float(s._tokens[d]) == sum(int(m.sum()) for m in counted)
        routed = torch.cat([c.top_k_index[m].reshape(-1) for c, m in zip(calls, counted)])
        assert s._counts[d].tolist() == torch.bincount(routed, minlength=E).double().tolist()


def test_a_value_computed_for_a_token_that_does_not_count_is_never_read():
    """Every token is computed on (no mask index); a NaN in a padding position stays out."""
    clean = _call(24, seed=5)
    dirty = _call(24, seed=5)
    pad = ~dirty.token_mask
    dirty.moe_input[pad] = float("nan")
    dirty.expert_outputs[pad] = float("inf")
    dirty.router_logits[pad] = float("nan")
    for method in SCORERS:
        a, b = make_scorer(method, E, K), make_scorer(method, E, K)
        a.observe(clean)
        b.observe(dirty)
        assert torch.equal(a.scores(), b.scores()), method
        assert a.state() == b.state()


def test_domains_found_on_the_way_and_reading_between_calls():
    """Without ``num_domains`` (a bare MoeCall) the scorer reads the largest domain once per call;
    scores read in the middle of a layer go on accumulating afterwards."""
    calls = [_call(20, seed=s, num_domains=False, domains=1 + s) for s in range(3)]
    s, t = make_scorer("gate-mass", E, K), make_scorer("gate-mass", E, K)
    for c in calls:
        s.observe(c)
    t.observe(calls[0])
    assert t.tokens == int(calls[0].token_mask.sum())  # read...
    for c in calls[1:]:
        t.observe(c)  # ...then observed again
    assert torch.equal(s.scores(), t.scores())
    assert s.state() == t.state()
    assert s.num_domains == len({d for c in calls for d in c.token_domain[c.token_mask].tolist()})


def test_a_call_with_no_tokens_and_a_scorer_that_saw_none():
    s = make_scorer("reap", E, K)
    assert s.scores().tolist() == [0.0] * E and s.tokens == 0 and s.state()["routed_tokens"] == [0.0] * E
    s.observe(_call(0))
    assert s.tokens == 0
    everything_masked = _call(8)
    everything_masked.token_mask[:] = False
    s.observe(everything_masked)
    assert s.tokens == 0 and s.scores().tolist() == [0.0] * E


class _Reads(TorchDispatchMode):
    """Counts the operators that read the device, and indexing with a boolean mask (``x[mask]``,
    ``x[mask] = v``): torch finds the mask's positions inside the index kernel, where a dispatch mode
    does not see the ``nonzero``."""

    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if name in HOST_READS:
            self.ops[name] += 1
        if name in MASK_INDEXING and len(args) > 1 and any(
                isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None):
            self.ops["mask_index"] += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("method", ["frequency", "reap", "easy-ep"])
def test_a_prune_observes_every_call_without_a_host_read(synth_dir, calib_txt, tmp_path, monkeypatch, method):
    """In a real prune (two calibration domains, answer tokens only, super experts protected) the
    observers of every layer call ask nothing of the device: the stream hands them the chunk's
    labels already on the device and the number of domains."""
    reads, calls = _Reads(), []
    orig_scorer, orig_maxima = Scorer.observe, MaximaObserver.observe

    def counted(orig):
        def observe(self, call):
            calls.append(call.num_domains)
            with reads:
                orig(self, call)
        return observe

    monkeypatch.setattr(Scorer, "observe", counted(orig_scorer))
    monkeypatch.setattr(MaximaObserver, "observe", counted(orig_maxima))
    math = tmp_path / "math.txt"
    math.write_text("\n".join(f"{i} plus {i} is {2 * i}" for i in range(40)))
    rep = lowmoe.prune(synth_dir("mixtral"), tmp_path / "out", keep=4, method=method, calib=[calib_txt, math],
                       n_samples=8, seq_len=16, batch_size=2, progress=False, device="cpu")
    assert rep["plan"]["layers"]
    assert calls and set(calls) == {2}
    assert not reads.ops, dict(reads.ops)


def test_score_with_two_domains_reads_each_layer_once(synth_dir, calib_txt, tmp_path, monkeypatch):
    """The totals reach the host when a layer is read, once per scorer and layer."""
    settles, alive = collections.Counter(), []  # scorers kept alive, so that no two share an id()
    orig = Scorer._settled

    def settled(self):
        if self._host is None and self._acc is not None:
            settles[id(self)] += 1
            alive.append(self)
        return orig(self)

    monkeypatch.setattr(Scorer, "_settled", settled)
    code = tmp_path / "code.txt"
    code.write_text("\n".join(f"def f{i}(x): return x * {i}" for i in range(40)))
    rep = score(synth_dir("mixtral"), calib=[calib_txt, code], method=["reap", "frequency"], n_samples=8,
                seq_len=16, batch_size=2, progress=False)
    assert len(settles) == 2 * len(rep["layers"]) and set(settles.values()) == {1}
    assert all(len(e["stats"]["reap"]["domains"]) == 2 for e in rep["layers"].values())
