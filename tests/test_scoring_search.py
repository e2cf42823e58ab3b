"""NAEE reconstruction search: its loss equals the error of the actually pruned checkpoint, the
search finds the best kept set, and it scales to 64 experts."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import lowmoe
from lowmoe.engine.calibration import load_tokenizer, tokenize
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.engine.hf import MoeProbe
from lowmoe.methods.reconstruction import ReconstructionMethod

KEEP = [0, 2, 5, 7]  # two per DeepSeek group of four


def _observe(path, calib, layer_idx, **opts):
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ck = Checkpoint(path)
    tokens = tokenize([calib], load_tokenizer(path), seq_len=16, n_samples=4)
    meth = ReconstructionMethod(ck.num_experts, ck.top_k, **opts)
    x = {}
    block = model.model.layers[layer_idx].get_submodule(ck.adapter.runtime_moe_prefix.rstrip("."))
    h = block.register_forward_pre_hook(lambda m, a: x.__setitem__("x", a[0]))
    with torch.no_grad(), MoeProbe(ck.adapter, model.model.layers[layer_idx], meth.observe):
        model(tokens.input_ids)
    h.remove()
    return model, ck, meth, x["x"], block


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss"])
def test_loss_equals_pruned_checkpoint_error(arch, synth_dir, calib_txt, tmp_path):
    path = synth_dir(arch)
    ck = Checkpoint(path)
    L = ck.moe_layers()[-1]
    _, ck, meth, x, block = _observe(path, calib_txt, L, max_tokens=10**6)
    plan = {"format": "lowmoe-plan/1", "num_experts_per_tok": ck.top_k,
            "layers": {str(i): {"keep": KEEP} for i in ck.moe_layers()}}
    lowmoe.prune(path, tmp_path / "p", plan=plan, progress=False)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "p", dtype=torch.float32).eval()
    pblock = pruned.model.layers[L].get_submodule(ck.adapter.runtime_moe_prefix.rstrip("."))
    with torch.no_grad():
        z, zk = block(x), pblock(x)  # (B, S, H): full and pruned MoE output (a shared expert cancels)
        z, zk = (z[0], zk[0]) if isinstance(z, tuple) else (z, zk)
    want = float(((z.double() - zk.double()) ** 2).sum())
    mask = torch.zeros(1, ck.num_experts, dtype=torch.bool)
    mask[0, KEEP] = True
    got = float(meth.losses(mask)[0])
    assert want > 0
    assert got == pytest.approx(want, rel=1e-3)


def test_beam_search_matches_exhaustive(synth_dir, calib_txt):
    path = synth_dir("mixtral")
    _, ck, meth, _, _ = _observe(path, calib_txt, 1)
    best = meth.decide(1, 3, protected=set(), groups=1, tensors={}, adapter=ck.adapter)
    assert meth.state()["search"] == "exhaustive" and meth.state()["candidates"] == 56
    _, _, wide, _, _ = _observe(path, calib_txt, 1, exhaustive_limit=0, beam=1000)  # beam keeps every state: exact
    assert wide.decide(1, 3, protected=set(), groups=1, tensors={}, adapter=ck.adapter).keep == best.keep
    assert wide.state()["search"] == "beam(1000)"
    _, _, prot, _, _ = _observe(path, calib_txt, 1)
    e = next(j for j in range(8) if j not in best.keep)
    assert e in prot.decide(1, 3, protected={e}, groups=1, tensors={}, adapter=ck.adapter).keep


def test_groups_and_64_experts(tmp_path, synth_dir, calib_txt):
    rep = lowmoe.prune(synth_dir("deepseek_v3"), tmp_path / "ds", keep=4, method="reconstruction", calib=[calib_txt],
                       progress=False, seq_len=16, n_samples=4)
    for lp in rep["plan"]["layers"].values():
        assert sum(e < 4 for e in lp["keep"]) == 2  # equal per DeepSeek group
    big = synth_dir("mixtral", layers=1, experts=64, top_k=4, intermediate_size=8)
    rep = lowmoe.prune(big, tmp_path / "big", keep=16, method="reconstruction", calib=[calib_txt], progress=False,
                       seq_len=16, n_samples=4)
    st = rep["layer_stats"]["0"]
    keep = rep["plan"]["layers"]["0"]["keep"]
    assert st["search"] == "beam(4)" and len(keep) == 16
    # the reported error is the written checkpoint's: ‖Z - Z_kept‖² / ‖Z‖² of the MoE block on the calibration tokens
    _, ck, meth, x, block = _observe(big, calib_txt, 0, max_tokens=10**6)
    pruned = AutoModelForCausalLM.from_pretrained(tmp_path / "big", dtype=torch.float32).eval()
    pblock = pruned.model.layers[0].get_submodule(ck.adapter.runtime_moe_prefix.rstrip("."))
    with torch.no_grad():
        z, zk = block(x), pblock(x)
        z, zk = (z[0], zk[0]) if isinstance(z, tuple) else (z, zk)
    want = float(((z.double() - zk.double()) ** 2).sum() / (z.double() ** 2).sum())
    assert st["relative_error"] == pytest.approx(want, rel=1e-3)
    # and the beam's set beats 200 random 16-of-64 sets on the same loss
    g = torch.Generator().manual_seed(0)
    masks = torch.zeros(200, 64, dtype=torch.bool)
    for i in range(200):
        masks[i, torch.randperm(64, generator=g)[:16]] = True
    mine = torch.zeros(1, 64, dtype=torch.bool)
    mine[0, keep] = True
    assert float(meth.losses(mine)[0]) < float(meth.losses(masks).min())
