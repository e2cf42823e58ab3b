"""Per family: synthetic checkpoints load in transformers, one streamed layer equals the same layer
inside the full model, and a pruned checkpoint equals the original with the same experts removed
in memory."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import lowmoe
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.engine.hf import LayerInputs, ModelSkeleton, materialize_layer, run_layer

from .helpers import FAMILIES

IDS = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))


def load(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def assert_clean_load(info):
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info.get("mismatched_keys"), info.get("mismatched_keys")


@pytest.mark.parametrize("arch", FAMILIES)
def test_streamed_layers_equal_full_model(arch, synth_dir):
    path = synth_dir(arch)
    model, info = load(path)
    assert_clean_load(info)
    with torch.no_grad():
        ref = model(IDS, output_hidden_states=True).hidden_states
    ck = Checkpoint(path)
    ck.validate()
    skel = ModelSkeleton(ck.config, ck.adapter)
    h = ck.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"][IDS]
    inputs = LayerInputs.build(skel, h, skel.rotary("cpu"))
    moe = set(ck.moe_layers())
    with torch.no_grad():
        for layer_idx in range(ck.num_layers - 1):  # the last hidden state has the final norm applied
            rt = ck.adapter.to_runtime(layer_idx, ck.read_layer(layer_idx), layer_idx in moe)
            h = run_layer(skel, materialize_layer(skel, layer_idx, rt, "cpu", torch.float32), layer_idx, h, inputs)
            torch.testing.assert_close(h, ref[layer_idx + 1], rtol=1e-5, atol=1e-5)


# The expert-count key of each family's config.json (README's table).
EXPERT_COUNT_KEY = {"mixtral": "num_local_experts", "qwen2_moe": "num_experts", "qwen3_moe": "num_experts",
                    "olmoe": "num_experts", "deepseek_v2": "n_routed_experts", "deepseek_v3": "n_routed_experts",
                    "phimoe": "num_local_experts", "gpt_oss": "num_local_experts"}


def _plan_for(ck: Checkpoint) -> dict:
    # Keep 4 of 8, two per DeepSeek group (groups of 4): a valid grouped model.
    keeps = [[0, 2, 5, 7], [1, 3, 4, 6], [0, 1, 4, 5]]
    layers = {str(L): {"keep": keeps[i % len(keeps)]} for i, L in enumerate(ck.moe_layers())}
    return {"format": "lowmoe-plan/1", "num_experts_per_tok": 2, "layers": layers}


def _reference_pruned(model, ck: Checkpoint, plan: dict):
    """The original model with the plan's experts removed in memory: slice the runtime (fused)
    expert tensors and router rows, then load them into a model built from the output config."""
    sd = model.state_dict()
    new = {}
    for k, v in sd.items():
        parts = k.split(".")
        layer = int(parts[2]) if k.startswith("model.layers.") else None
        keep = plan["layers"].get(str(layer), {}).get("keep") if layer is not None else None
        per_expert = keep is not None and (".experts." in k or k.endswith(("gate.weight", "router.weight", "router.bias",
                                                                            "e_score_correction_bias")))
        new[k] = v[keep].clone() if per_expert and v.shape[0] == ck.num_experts else v
    cfg = model.config.__class__.from_dict({**model.config.to_dict()})
    setattr(cfg, EXPERT_COUNT_KEY[model.config.model_type], 4)
    for key in ("num_local_experts", "num_experts", "n_routed_experts"):  # aliases follow the family's own key
        assert getattr(cfg, key, 4) == 4, key
    ref = AutoModelForCausalLM.from_config(cfg).eval()
    ref.load_state_dict(new, strict=True)
    return ref


@pytest.mark.parametrize("arch", FAMILIES)
def test_prune_with_plan_matches_in_memory_removal(arch, synth_dir, tmp_path):
    src = synth_dir(arch)
    ck = Checkpoint(src)
    plan = _plan_for(ck)
    report = lowmoe.prune(src, tmp_path / "out", plan=plan, progress=False)
    assert report["num_experts"] == {"before": 8, "after": 4}
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written[EXPERT_COUNT_KEY[arch]] == 4 and written["num_experts_per_tok"] == 2
    pruned, info = load(tmp_path / "out")
    assert_clean_load(info)
    model, _ = load(src)
    ref = _reference_pruned(model, ck, plan)
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
    if arch in ("deepseek_v2", "deepseek_v3"):
        assert pruned.config.n_group == 2 and report["notes"] == []


@pytest.mark.parametrize("arch", ["mixtral", "gpt_oss", "deepseek_v3"])
def test_keep_all_plan_is_bit_exact(arch, synth_dir, tmp_path):
    src = synth_dir(arch)
    ck = Checkpoint(src)
    plan = {"format": "lowmoe-plan/1", "num_experts_per_tok": 2,
            "layers": {str(L): {"keep": list(range(8))} for L in ck.moe_layers()}}
    lowmoe.prune(src, tmp_path / "out", plan=plan, progress=False)
    out = Checkpoint(tmp_path / "out")
    assert set(out.weight_map) == set(ck.weight_map)
    a, b = ck.read(sorted(ck.weight_map)), out.read(sorted(ck.weight_map))
    for k in a:
        assert a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]), k


def test_deepseek_grouping_disabled_when_groups_uneven(synth_dir, tmp_path):
    src = synth_dir("deepseek_v3")
    ck = Checkpoint(src)
    plan = {"format": "lowmoe-plan/1", "num_experts_per_tok": 2,
            "layers": {str(L): {"keep": [0, 1, 2, 4]} for L in ck.moe_layers()}}  # 3 + 1 per group
    report = lowmoe.prune(src, tmp_path / "out", plan=plan, progress=False)
    pruned, info = load(tmp_path / "out")
    assert_clean_load(info)
    assert pruned.config.n_group == 1 and pruned.config.topk_group == 1
    assert any("group-limited routing disabled" in n for n in report["notes"])


def test_deepseek_mtp_layer_is_passed_through(synth_dir, tmp_path):
    src = synth_dir("deepseek_v3", mtp_layers=1)
    ck = Checkpoint(src)
    assert ck.extra_layers() == [3]
    lowmoe.prune(src, tmp_path / "out", plan=_plan_for(ck), progress=False)
    out = Checkpoint(tmp_path / "out")
    keys = ck.layer_keys(3)
    assert keys and all(torch.equal(a, b) for a, b in zip(ck.read(keys).values(), out.read(keys).values()))


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_preserved(dtype, synth_dir, tmp_path):
    src = synth_dir("qwen3_moe", dtype=dtype)
    lowmoe.prune(src, tmp_path / "out", plan=_plan_for(Checkpoint(src)), progress=False)
    out = tmp_path / "out"
    for shard in out.glob("*.safetensors"):
        with safe_open(str(shard), "pt") as f:
            for k in f.keys():
                assert f.get_tensor(k).dtype == getattr(torch, dtype), k


def test_layer_split_across_shards_is_read(synth_dir):
    ck = Checkpoint(synth_dir("mixtral"))
    shards = {ck.weight_map[k] for k in ck.layer_keys(1)}
    assert len(shards) >= 2  # 40KB shards split every layer
    tensors = ck.read_layer(1)
    assert sorted(tensors) == sorted(ck.layer_keys(1))
    for k, t in tensors.items():  # each value is the tensor stored under that key in its own shard
        with safe_open(str(ck.path / ck.weight_map[k]), "pt") as f:
            assert torch.equal(t, f.get_tensor(k)), k
