"""Every family's hand-written adapter against what transformers itself says about the family
(``hf.derive_layout``): config keys from its config class, MoE block and router from the module tree
it builds, on-disk tensor names and layout from the weight conversion its ``save_pretrained`` applies.
This keeps the families table honest against the installed transformers."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers
from click.testing import CliRunner
from transformers import AutoConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from lowmoe.cli import main
from lowmoe.engine.adapters import ALL_EXPERT_COUNT_KEYS, BY_FAMILY, supported_families
from lowmoe.engine.adapters.base import Adapter
from lowmoe.engine.hf import derive_layout
from lowmoe.toy.synth import tiny_hf_config

# Adapter fields derive_layout does not give, and why (a field neither compared nor listed here fails
# test_every_adapter_field_is_compared_or_explained).
NOT_DERIVED = {
    "family": "lowmoe's own name for the family",
    "router_scoring": "softmax or sigmoid is code in the router's forward, not data in the config or module tree",
    "dense_layers": "a callable; compared through the MoE layers it gives (moe_layers below) where a family has one",
    "extra_layers_key": "MTP layers are not built by transformers (save_pretrained writes none): nothing to derive",
    "probes": "whether the MoE block calls experts(hidden, top_k_index, top_k_weights) is code, not structure; "
              "test_calibration_scoring_prunes_every_family runs the probes on every family that claims them",
    "notes": "free text",
    "runtime_gate_up": "the same name (gate_up_proj) in every transformers 5.x experts module; checked through "
                       "to_runtime below",
    "runtime_down": "as runtime_gate_up (down_proj)",
}
# Compared as sets: their order in the table does not matter to lowmoe.
UNORDERED = {"router_tensors", "router_extra", "moe_renames", "layer_renames", "layer_concats"}


def derived(family: str):
    adapter = BY_FAMILY[family]
    if adapter.model_types[0] not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} does not know model_type {adapter.model_types[0]!r}")
    return adapter, derive_layout(tiny_hf_config(family))


def test_every_adapter_field_is_compared_or_explained():
    # per-expert layouts give expert_projs, fused ones fused_dir and fused_tensors
    compared = set(derive_layout(tiny_hf_config("mixtral")).fields()) | set(derive_layout(tiny_hf_config("gpt_oss")).fields())
    names = {f.name for f in dataclasses.fields(Adapter)}
    assert names - compared - set(NOT_DERIVED) == set(), "an Adapter field is neither derived nor explained"
    assert set(NOT_DERIVED) & compared == set()


@pytest.mark.parametrize("family", supported_families())
def test_adapter_agrees_with_transformers(family):
    adapter, d = derived(family)
    assert not d.missing, d.missing
    fields = d.fields()
    for name, value in fields.items():
        mine = getattr(adapter, name)
        if name == "expert_count_keys":
            # the config class may carry several count keys; every one it sets must be the adapter's
            assert value and set(value) <= set(mine) | set(ALL_EXPERT_COUNT_KEYS) and mine[0] in value, (value, mine)
        elif name in UNORDERED:
            assert set(value) == set(mine), (name, value, mine)
        else:
            assert value == mine, (name, value, mine)
    L, E = d.layer, d.num_experts
    # the on-disk keys transformers' save_pretrained writes for one MoE layer, as the adapter names them
    assert set(d.expert_keys) == set(adapter.routed_expert_keys(L, E))
    assert set(d.router_keys) == set(adapter.router_keys(L))
    # and the adapter turns them into transformers' runtime state dict (and back) tensor for tensor
    lp = f"model.layers.{L}."
    runtime = {k[len(lp):]: v for k, v in d.runtime.items()}
    got = adapter.to_runtime(L, d.disk, is_moe=True)
    assert set(got) == set(runtime)
    assert all(torch.equal(got[k], v) for k, v in runtime.items())
    back = adapter.to_disk(L, runtime, is_moe=True)
    assert set(back) == set(d.disk) and all(torch.equal(back[k], v) for k, v in d.disk.items())
    cfg = tiny_hf_config(family).to_dict()
    if adapter.dense_layers is not None:
        assert adapter.moe_layers(cfg) == list(d.moe_layers)


@pytest.mark.parametrize("model_type, why", [
    ("llama", "no decoder layer has a module with an `experts` child"),
    ("qwen3_vl_moe_text", "no *ForCausalLM class"),
])
def test_families_that_cannot_be_derived_say_why(model_type, why):
    if model_type not in CONFIG_MAPPING:
        pytest.skip(f"transformers {transformers.__version__} does not know model_type {model_type!r}")
    d = derive_layout(AutoConfig.for_model(model_type, num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                           num_attention_heads=4, num_key_value_heads=2, vocab_size=64))
    assert d.missing and any(why in v for v in d.missing.values()), d.missing
    assert not d.expert_keys


def test_families_derive_prints_an_adapter_line_or_a_one_line_error():
    """`lowmoe families --derive MODEL_TYPE`: the Adapter fields of a family to add, as one line that
    builds the same adapter as the table's (here for mellum, which the table has)."""
    r = CliRunner().invoke(main, ["families", "--derive", "mellum"])
    assert r.exit_code == 0, r.output
    line = r.output.strip()
    assert line.startswith("Adapter(family='mellum', ") and "\n" not in line
    made = eval(line, {"Adapter": Adapter})  # noqa: S307 -- our own output, a literal Adapter(...) call
    mine = BY_FAMILY["mellum"]
    for f in dataclasses.fields(Adapter):
        if f.name not in NOT_DERIVED and f.name != "expert_count_keys":
            assert getattr(made, f.name) == getattr(mine, f.name), f.name
    for args, msg in ((["--derive", "llama"], "no decoder layer has a module with an `experts` child"),
                      (["--derive", "no_such_type"], "transformers does not know it")):
        r = CliRunner().invoke(main, ["families", *args])
        assert r.exit_code == 2 and msg in r.output and "--derive" in r.output and "Traceback" not in r.output
