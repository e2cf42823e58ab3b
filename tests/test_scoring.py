"""Scoring methods against a direct computation from the full transformers model.

The reference loads the whole model with ``AutoModelForCausalLM.from_pretrained``, hooks each MoE
block's input and its router (transformers' own routing decision), computes every expert's output
f_e(x) from the expert weights with its own SwiGLU formula, and applies each paper's formula. lowmoe
computes the same scores streaming one layer at a time from safetensors (``lowmoe.score``), so
agreement also shows that streamed scoring equals whole-model scoring.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import lowmoe
from lowmoe.engine.calibration import load_tokenizer, tokenize
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.engine.hf import MoeCall
from lowmoe.score import score
from lowmoe.methods.scoring import FrequencyScorer, choose_keep, make_scorer

from .helpers import FAMILIES, edit_checkpoint

METHODS = ["frequency", "gate-mass", "reap", "easy-ep", "tcess"]
CAL = {"seq_len": 24, "n_samples": 6, "batch_size": 4}


def reference_calls(path, calib, **cal):
    """Per MoE layer: (x (T, H) MoE input, logits (T, E), top-k index, top-k weights, f (T, E, H)
    every expert's output, scoring) from the full model on the same calibration tokens."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ck = Checkpoint(path)
    tokens = tokenize([calib], load_tokenizer(path), seq_len=cal["seq_len"], n_samples=cal["n_samples"])
    out, handles = {}, []
    for L in ck.moe_layers():
        block = model.model.layers[L].get_submodule(ck.adapter.runtime_moe_prefix.rstrip("."))
        router = getattr(block, ck.adapter.runtime_router)
        rec = out.setdefault(L, {})
        handles.append(block.register_forward_pre_hook(lambda m, a, rec=rec: rec.__setitem__("x", a[0].reshape(-1, a[0].shape[-1]))))
        handles.append(router.register_forward_hook(lambda m, a, o, rec=rec: rec.__setitem__("router", o)))
    with torch.no_grad():
        model(tokens.input_ids)
    for h in handles:
        h.remove()
    res = {}
    for L, rec in out.items():
        experts = model.model.layers[L].get_submodule(ck.adapter.runtime_moe_prefix.rstrip(".")).experts
        x = rec["x"]
        f = expert_outputs(model.config, experts, x)
        logits, w, idx = rec["router"]
        if ck.adapter.family == "gpt_oss":  # the router's bias is part of the logits scoring sees
            router = getattr(model.model.layers[L].get_submodule(ck.adapter.runtime_moe_prefix.rstrip(".")), ck.adapter.runtime_router)
            assert router.bias.abs().sum() > 0
            torch.testing.assert_close(logits, x @ router.weight.T + router.bias)
        res[L] = {"x": x, "logits": logits.float(), "idx": idx, "w": w.float(), "f": f,
                  "scoring": ck.adapter.router_scoring}
    return res


def expert_outputs(config, experts, x: torch.Tensor) -> torch.Tensor:
    """(T, E, H): every expert's own output on every token, written here from the weights with the
    family's formula (not transformers' or lowmoe's expert code): SwiGLU ``down(silu(gate x) * up x)``
    over [gate; up] rows, or GPT-OSS's interleaved gate/up columns with biases, gate clamped above at
    ``swiglu_limit``, up clamped to ±limit, ``(up + 1) * gate * sigmoid(alpha * gate)``."""
    gu, dn = experts.gate_up_proj.detach(), experts.down_proj.detach()
    if config.model_type == "gpt_oss":  # (E, H, 2I) interleaved, (E, I, H), biases
        gub, dnb = experts.gate_up_proj_bias.detach(), experts.down_proj_bias.detach()
        gu_x = torch.einsum("th,ehi->tei", x, gu) + gub
        gate, up = gu_x[..., 0::2].clamp(max=config.swiglu_limit), gu_x[..., 1::2].clamp(-config.swiglu_limit, config.swiglu_limit)
        assert bool((gu_x[..., 0::2] > config.swiglu_limit).any() and (gu_x[..., 1::2].abs() > config.swiglu_limit).any())
        act = (up + 1) * gate * torch.sigmoid(config.swiglu_alpha * gate)
        return torch.einsum("tei,eih->teh", act, dn) + dnb
    assert config.hidden_act == "silu"
    inter = gu.shape[1] // 2  # (E, 2I, H), (E, H, I)
    g = torch.einsum("th,eih->tei", x, gu[:, :inter])
    u = torch.einsum("th,eih->tei", x, gu[:, inter:])
    return torch.einsum("tei,ehi->teh", F.silu(g) * u, dn)


def reference_scores(r, method, top_k, num_experts):
    x, logits, idx, w, f = r["x"], r["logits"], r["idx"], r["w"], r["f"]
    t = x.shape[0]
    fo = f.gather(1, idx[:, :, None].expand(-1, -1, f.shape[-1]))  # (T, k, H) chosen experts' outputs
    norms = fo.norm(dim=-1).double()
    out = torch.zeros(num_experts, dtype=torch.float64)
    if method == "frequency":
        return torch.bincount(idx.reshape(-1), minlength=num_experts).double() / (t * top_k)
    if method == "gate-mass":
        return out.index_add(0, idx.reshape(-1), w.reshape(-1).double()) / t
    if method == "reap":
        p = torch.sigmoid(logits) if r["scoring"] == "sigmoid" else torch.softmax(logits, -1)
        g = p.gather(1, idx)
        g = g / g.sum(-1, keepdim=True)
        s = out.index_add(0, idx.reshape(-1), (g.double() * norms).reshape(-1))
        return s / torch.bincount(idx.reshape(-1), minlength=num_experts).double().clamp_min(1)
    if method == "easy-ep":
        routed = (fo * w[:, :, None]).sum(1)
        s_t = (1 - F.cosine_similarity(x, x + routed, dim=-1)).clamp_min(0).double()
        return out.index_add(0, idx.reshape(-1), (w.double() * norms * s_t[:, None]).reshape(-1))
    if method == "tcess":
        return out.index_add(0, idx.reshape(-1), logits.gather(1, idx).double().reshape(-1)) / t
    raise AssertionError(method)


def biased_gpt_oss(src: Path, dst: Path) -> Path:
    """A copy of a synthetic GPT-OSS checkpoint whose router and expert biases are not zero and whose
    SwiGLU clamp (``swiglu_limit``) engages on the calibration tokens (synth writes zero biases and
    N(0, 0.02) weights, which would leave both untested)."""
    shutil.copytree(src, dst)
    g = torch.Generator().manual_seed(3)
    edit_checkpoint(dst, lambda k, v: v + torch.randn(v.shape, generator=g).to(v.dtype) if k.endswith("bias") else v)
    cfg = json.loads((dst / "config.json").read_text())
    cfg["swiglu_limit"] = 0.4
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


@pytest.mark.parametrize("arch", FAMILIES)
def test_scores_match_full_model(arch, synth_dir, calib_txt, tmp_path):
    path = synth_dir(arch) if arch != "gpt_oss" else biased_gpt_oss(synth_dir(arch), tmp_path / "gpt_oss")
    ck = Checkpoint(path)
    rep = score(path, calib=[calib_txt], method=METHODS, progress=False, **CAL)
    ref = reference_calls(path, calib_txt, **CAL)
    assert sorted(int(L) for L in rep["layers"]) == ck.moe_layers()
    for L, r in ref.items():
        for m in METHODS:
            got = torch.tensor(rep["layers"][str(L)]["scores"][m], dtype=torch.float64)
            want = reference_scores(r, m, ck.top_k, ck.num_experts)
            torch.testing.assert_close(got, want, rtol=2e-4, atol=1e-7, msg=f"{arch} layer {L} {m}")


def test_streamed_prune_uses_the_same_scores(synth_dir, calib_txt, tmp_path):
    """A one-shot prune (streamed, cache on disk) keeps exactly the experts ``score`` ranks highest."""
    path = synth_dir("mixtral")
    rep = score(path, calib=[calib_txt], method="reap", keep=4, progress=False, **CAL)
    pr = lowmoe.prune(path, tmp_path / "o", keep=4, method="reap", calib=[calib_txt], sequential=False,
                      progress=False, **CAL)
    for L, e in rep["layers"].items():
        torch.testing.assert_close(torch.tensor(pr["scores"][L]), torch.tensor(e["scores"]["reap"]), rtol=1e-5, atol=1e-9)
        # protection: the prune pre-pass profiles 4 sequences, score uses all; both must agree here
        assert pr["plan"]["layers"][L]["keep"] == e["keep"]["reap"]


def _call(idx, w, dom, num_experts=4):
    t = idx.shape[0]
    return MoeCall(torch.zeros(t, num_experts), idx, w, torch.zeros(t, 2), torch.zeros(t, 2), None,
                   token_domain=torch.full((t,), dom))


def test_mixed_domains_normalise_per_domain_then_sum():
    s = make_scorer("gate-mass", 4, 1)
    # domain 0: 2 tokens with big weights on expert 0; domain 1: 6 tokens with small weights on expert 3
    s.observe(_call(torch.tensor([[0], [0]]), torch.tensor([[10.0], [10.0]]), 0))
    s.observe(_call(torch.tensor([[3]] * 6), torch.tensor([[0.1]] * 6), 1))
    got = s.scores()
    # each domain normalised to mass 1, weighted by its share of tokens (2/8, 6/8)
    torch.testing.assert_close(got, torch.tensor([0.25, 0, 0, 0.75], dtype=torch.float64))
    assert s.state()["domains"]["1"]["usage"] == [0.0, 0.0, 0.0, 1.0]
    one = FrequencyScorer(4, 1)
    one.observe(_call(torch.tensor([[1], [2]]), torch.ones(2, 1), 0))
    assert one.scores().tolist() == [0.0, 0.5, 0.5, 0.0]  # one domain: the raw formula


def test_choose_keep_protected_and_groups():
    s = torch.tensor([5.0, 4, 3, 2, 1, 0, 9, 8])
    assert choose_keep(s, 2) == [6, 7]
    assert choose_keep(s, 2, protected={5}) == [5, 6]
    assert choose_keep(s, 4, groups=2) == [0, 1, 6, 7]


@pytest.mark.parametrize("arch", ["qwen3_moe", "olmoe", "deepseek_v2", "phimoe", "gpt_oss"])
def test_expert_outputs_probe_keeps_the_model_output(arch, synth_dir):
    """With slot outputs requested, the probe's own weighted sum replaces the experts module's: the
    model's logits are unchanged, and routed_output = Σ_k weight · slot output."""
    from lowmoe.engine.hf import MoeProbe

    path = synth_dir(arch)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ck = Checkpoint(path)
    ids = torch.randint(3, 250, (2, 10), generator=torch.Generator().manual_seed(1))
    seen = []

    def cb(call):
        seen.append(call)

    cb.needs_expert_outputs = True
    with torch.no_grad():
        ref = model(ids).logits
        with MoeProbe(ck.adapter, model.model.layers[ck.moe_layers()[-1]], cb):
            got = model(ids).logits
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    c = seen[0]
    torch.testing.assert_close((c.expert_outputs * c.top_k_weights[:, :, None]).sum(1), c.routed_output, rtol=1e-5, atol=1e-6)
    rep = make_scorer("reap", ck.num_experts, ck.top_k)
    rep.observe(c)
    assert torch.isfinite(rep.scores()).all() and rep.scores().sum() > 0
