"""Per family, on a tiny checkpoint written by transformers' own save_pretrained: one streamed layer
equals the same layer inside the full model, and a pruned checkpoint equals the original with the
same experts removed in memory. Also: lowmoe's synthetic checkpoints load cleanly, MTP layers, the
complete Hugging Face output."""

from __future__ import annotations

import copy
import json
import shutil

import pytest
import torch
import transformers
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

import lowmoe
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.errors import CheckpointError, UnsupportedModelError
from lowmoe.engine.adapters import BY_FAMILY, supported_families
from lowmoe.engine.hf import LayerInputs, ModelSkeleton, materialize_layer, run_layer
from lowmoe.toy.synth import save_pretrained_model

from .helpers import FAMILIES

ALL_FAMILIES = supported_families()
IDS = torch.randint(3, 250, (2, 12), generator=torch.Generator().manual_seed(0))


def load(path):
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    return model.eval(), info


def assert_clean_load(info):
    assert not info["missing_keys"], info["missing_keys"]
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info.get("mismatched_keys"), info.get("mismatched_keys")


@pytest.fixture(scope="session")
def hf_saved(tmp_path_factory):
    """hf_saved(family) -> a tiny random model written by transformers' own save_pretrained (cached)."""
    root = tmp_path_factory.mktemp("hf_saved")
    made: dict[str, object] = {}

    def make(family: str):
        model_type = BY_FAMILY[family].model_types[0]
        if model_type not in CONFIG_MAPPING:
            pytest.skip(f"transformers {transformers.__version__} does not know model_type {model_type!r}")
        if family not in made:
            made[family] = save_pretrained_model(root / family, family)
        return made[family]

    return make


@pytest.mark.parametrize("arch", FAMILIES)
def test_synth_checkpoint_loads_clean(arch, synth_dir):
    _, info = load(synth_dir(arch))
    assert_clean_load(info)


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_streamed_layers_equal_full_model(family, hf_saved):
    path = hf_saved(family)
    model, info = load(path)
    assert_clean_load(info)
    with torch.no_grad():
        ref = model(IDS, output_hidden_states=True).hidden_states
    ck = Checkpoint(path)
    ck.validate()
    skel = ModelSkeleton(ck.config, ck.adapter)
    assert set(ck.moe_layers()) == skel.moe_layers and ck.moe_layers()
    h = ck.read(["model.embed_tokens.weight"])["model.embed_tokens.weight"][IDS]
    inputs = LayerInputs.build(skel, h, skel.rotary("cpu"))
    moe = set(ck.moe_layers())
    with torch.no_grad():
        for layer_idx in range(ck.num_layers - 1):  # the last hidden state has the final norm applied
            rt = ck.adapter.to_runtime(layer_idx, ck.read_layer(layer_idx), layer_idx in moe)
            h = run_layer(skel, materialize_layer(skel, layer_idx, rt, "cpu", torch.float32), layer_idx, h, inputs)
            torch.testing.assert_close(h, ref[layer_idx + 1], rtol=1e-5, atol=1e-5)


def _plan_for(ck: Checkpoint) -> dict:
    # Keep 4 of 8, two per DeepSeek group (groups of 4): a valid grouped model.
    keeps = [[0, 2, 5, 7], [1, 3, 4, 6], [0, 1, 4, 5]]
    layers = {str(L): {"keep": keeps[i % len(keeps)]} for i, L in enumerate(ck.moe_layers())}
    return {"format": "lowmoe-plan/1", "num_experts_per_tok": 2, "layers": layers}


def _reference_pruned(model, ck: Checkpoint, plan: dict):
    """The original model with the plan's experts removed in memory: inside each MoE block (shared
    experts aside), every tensor with a dimension of size E (experts on dim 0, or on the last dim for
    (1, E) / (E,) router biases) is sliced to the kept experts; loaded into a model built from a
    config with E' experts."""
    E = ck.num_experts
    block = ck.adapter.runtime_moe_prefix
    new = {}
    for k, v in model.state_dict().items():
        parts = k.split(".")
        layer = int(parts[2]) if k.startswith("model.layers.") else None
        keep = plan["layers"].get(str(layer), {}).get("keep") if layer is not None else None
        inner = k[len(f"model.layers.{layer}."):] if layer is not None else ""
        if keep is not None and inner.startswith(block) and "shared" not in inner and v.dim() >= 1:
            if v.shape[0] == E:
                v = v[keep].clone()
            elif v.shape[-1] == E:
                v = v[..., keep].clone()
        new[k] = v
    cfg = copy.deepcopy(model.config)
    for key in ck.adapter.expert_count_keys:
        setattr(cfg, key, 4)
    ref = AutoModelForCausalLM.from_config(cfg).eval()
    ref.load_state_dict(new, strict=True)
    return ref


@pytest.mark.parametrize("family", ALL_FAMILIES)
def test_prune_with_plan_matches_in_memory_removal(family, hf_saved, tmp_path):
    src = hf_saved(family)
    ck = Checkpoint(src)
    plan = _plan_for(ck)
    report = lowmoe.prune(src, tmp_path / "out", plan=plan, progress=False)
    assert report["num_experts"] == {"before": 8, "after": 4}
    written = json.loads((tmp_path / "out" / "config.json").read_text())
    assert written[ck.adapter.expert_count_keys[0]] == 4 and written[ck.adapter.top_k_key] == ck.top_k
    pruned, info = load(tmp_path / "out")
    assert_clean_load(info)
    model, _ = load(src)
    ref = _reference_pruned(model, ck, plan)
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)
    if ck.adapter.grouped_routing:
        assert pruned.config.n_group == 2
        assert not [n for n in report["notes"] if "group-limited" in n]


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


def test_deepseek_v3_saved_by_transformers_without_mtp_prunes_and_loads(hf_saved, tmp_path):
    """DeepseekV3Config defaults to num_nextn_predict_layers=1, but save_pretrained writes no MTP layer:
    the missing layer is skipped with a note, nothing is invented, and the output loads."""
    src = hf_saved("deepseek_v3")
    ck = Checkpoint(src)
    assert ck.config["num_nextn_predict_layers"] == 1
    assert ck.extra_layers() == [] and ck.missing_extra_layers() == [3]
    report = lowmoe.prune(src, tmp_path / "out", plan=_plan_for(ck), progress=False)
    assert any(n.startswith("layer 3: config.json's num_nextn_predict_layers declares it") for n in report["notes"])
    out = Checkpoint(tmp_path / "out")
    assert not out.layer_keys(3)
    _, info = load(tmp_path / "out")
    assert_clean_load(info)


def test_output_is_a_complete_hugging_face_model(hf_saved, tmp_path):
    """Tokenizer, chat template and generation config are copied byte for byte; README.md is a model
    card naming the base model, method, kept experts, calibration data and the command."""
    src = tmp_path / "base"
    shutil.copytree(hf_saved("qwen3_moe"), src)
    (src / "chat_template.jinja").write_text("{% for m in messages %}<{{ m.role }}>{{ m.content }}{% endfor %}")
    (src / "README.md").write_text("---\nlicense: apache-2.0\n---\n# the base model's card\n")
    ck = Checkpoint(src)
    plan = _plan_for(ck)
    lowmoe.prune(src, tmp_path / "out", plan=plan, progress=False)
    out = tmp_path / "out"
    for name in ("generation_config.json", "chat_template.jinja", "tokenizer.json", "tokenizer_config.json"):
        assert (src / name).is_file(), name
        assert (out / name).read_bytes() == (src / name).read_bytes(), name
    assert GenerationConfig.from_pretrained(out).to_dict() == GenerationConfig.from_pretrained(src).to_dict()
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "<user>hi"
    card = (out / "README.md").read_text()
    assert card.startswith("---\nbase_model: base\n") and "license: apache-2.0" in card
    assert "the base model's card" not in card
    assert "**Method**: `frequency`" not in card and "**Method**: `plan`" in card
    assert "8 -> 4" in card and "applied from `dict`" in card
    for layer, lp in plan["layers"].items():
        assert f"| {layer} | {', '.join(map(str, lp['keep']))} |" in card
    assert "**Command**: `" in card


def test_family_without_probes_refuses_scoring_before_writing(hf_saved, calib_txt, tmp_path):
    src = hf_saved("llama4_text")
    with pytest.raises(UnsupportedModelError, match="llama4_text experts cannot be scored.*--plan"):
        lowmoe.prune(src, tmp_path / "out", keep=4, method="frequency", calib=[str(calib_txt)], progress=False)
    assert not (tmp_path / "out").exists()


def test_layer_with_experts_but_no_router_is_refused(hf_saved, tmp_path):
    """MoE layers are found from the index (a router present); a layer whose router is missing but
    whose experts are there is an incomplete checkpoint, not a dense layer."""
    src = tmp_path / "m"
    shutil.copytree(hf_saved("glm4_moe"), src)
    ck = Checkpoint(src)
    wm = dict(ck.weight_map)
    del wm["model.layers.2.mlp.gate.weight"]
    (src / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": wm}))
    with pytest.raises(CheckpointError, match=r"model\.layers\.2\.mlp\.gate\.weight"):
        Checkpoint(src).validate()


# Default run: one family per new code path (index-found MoE layers, renamed/fused router, hybrid
# linear-attention / Mamba layers, per-layer-type rotary); every family with -m slow.
SCORING_QUICK = ("glm4_moe", "granitemoe", "qwen3_next", "jamba", "mimo_v2_flash")


@pytest.mark.parametrize("family", [f if f in SCORING_QUICK else pytest.param(f, marks=pytest.mark.slow)
                                    for f in ALL_FAMILIES if BY_FAMILY[f].probes])
def test_calibration_scoring_prunes_every_family(family, hf_saved, calib_txt, tmp_path):
    """Scoring on calibration data (router probes on transformers' own MoE block) works per family."""
    report = lowmoe.prune(hf_saved(family), tmp_path / "out", keep=4, method="frequency", calib=[str(calib_txt)],
                          n_samples=4, seq_len=32, progress=False)
    assert report["num_experts"] == {"before": 8, "after": 4}
    assert all(len(v) == 8 for v in report["scores"].values()) and report["scores"]
    _, info = load(tmp_path / "out")
    assert_clean_load(info)
