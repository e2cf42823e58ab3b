"""FP8 block-quantized checkpoints (DeepSeek-V3 / Qwen3-FP8 layout): the codec against hand-computed
values and transformers' own dequantization, ``lowmoe synth --quant fp8``'s layout, and pruning:
kept experts byte-identical, merged ones re-quantized, the output loads in transformers and its
logits equal the input model's with the same experts removed in memory."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import lowmoe
from lowmoe.engine import rundir
from lowmoe.engine import lazy
from lowmoe.engine.lazy import QuantizedStored
from lowmoe.cli import main
from lowmoe.engine.apply import merge_experts
from lowmoe.engine.budget import plan_lazy_budget
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.engine.formats import (FP8_MAX, QuantFormat, detect_format, fp8_block_dequantize, fp8_block_quantize,
                                   fp8_scale_shape, roundtrip_error)
from lowmoe.errors import CheckpointError, LowmoeError

from .helpers import count_decodes, dir_digest, four_way_merge_plan, prune_killed_after_layer
from .quantized import IDS, load, reference_pruned, same_bytes, stored

FP8 = torch.float8_e4m3fn
SYNTH = dict(layers=3, hidden_size=64, intermediate_size=32, experts=8, top_k=2, shard_size="60KB", dtype="bfloat16",
             quant="fp8", fp8_block=32)


# ---- codec ---------------------------------------------------------------------------------------


def test_dequantize_hand_computed():
    q = torch.tensor([[1.0, 2.0, 0.5], [-4.0, 3.0, 448.0], [0.25, -1.5, 6.0]]).to(FP8)
    s = torch.tensor([[2.0, 0.5], [10.0, -1.0]])  # block (2, 2): rows {0,1},{2}; cols {0,1},{2}
    w = fp8_block_dequantize(q, s, (2, 2), torch.float32)
    assert w.tolist() == [[2.0, 4.0, 0.25], [-8.0, 6.0, 224.0], [2.5, -15.0, -6.0]]


def test_scale_grid_uses_ceiling_division():
    # DeepSeek-R1's kv_a_proj_with_mqa and an expert down_proj
    assert fp8_scale_shape((576, 7168), (128, 128)) == (5, 56)
    assert fp8_scale_shape((7168, 2048), (128, 128)) == (56, 16)
    assert fp8_scale_shape((8, 576, 7168), (128, 128)) == (8, 5, 56)
    with pytest.raises(ValueError, match="expected"):
        fp8_block_dequantize(torch.zeros(576, 7168).to(FP8), torch.ones(4, 56), (128, 128))


def test_quantize_edge_block_and_zero_block():
    w = torch.zeros(3, 3)
    w[0, 0], w[1, 1], w[2, 2], w[0, 2] = 448.0 * 0.5, -2.0, 0.07, 0.0
    q, s = fp8_block_quantize(w, (2, 2))
    assert q.dtype == FP8 and s.dtype == torch.float32 and tuple(s.shape) == (2, 2)
    # amax / 448 per block; the edge block (2, 2) holds only w[2, 2]; an all-zero block gets scale 1
    assert s.flatten().tolist() == pytest.approx([0.5, 1.0, 1.0, 0.07 / FP8_MAX])
    assert q.float()[0, 0] == 448.0 and q.float()[2, 2] == 448.0
    assert torch.equal(fp8_block_dequantize(q, s, (2, 2), torch.float32)[1, 1], torch.tensor(-2.0))


def test_requantizing_dequantized_values_recovers_the_codes():
    # the codes come back; the scale only up to float32 rounding of (448 s) / 448 -- which is why
    # kept experts are copied as stored, never re-quantized
    g = torch.Generator().manual_seed(0)
    q = (torch.randn(96, 80, generator=g) * 100).clamp(-448, 448).to(FP8)
    q[0, 0], q[64, 0], q[0, 64], q[64, 64] = 448.0, -448.0, 448.0, 448.0  # every block reaches 448
    s = torch.rand(2, 2, generator=g) * 0.01
    q2, s2 = fp8_block_quantize(fp8_block_dequantize(q, s, (64, 64), torch.float32), (64, 64))
    assert same_bytes(q, q2)
    torch.testing.assert_close(s2, s, rtol=1e-6, atol=0)


def test_roundtrip_error_within_e4m3_rounding():
    w = torch.randn(200, 300, generator=torch.Generator().manual_seed(1)) * 0.02
    q, s = fp8_block_quantize(w, (128, 128))
    back = fp8_block_dequantize(q, s, (128, 128), torch.float32)
    big = torch.nn.functional.pad(s, (0, 0, 0, 0)).repeat_interleave(128, 0)[:200].repeat_interleave(128, 1)[:, :300]
    # e4m3: 3 mantissa bits -> relative error <= 2^-4 (normal), absolute <= 2^-10 * scale (subnormal)
    bound = torch.maximum(w.abs() * 2 ** -4, big * 2 ** -10) * (1 + 1e-6)
    assert ((back - w).abs() <= bound).all()
    assert roundtrip_error(w, QuantFormat("fp8", (128, 128)))["fro_rel"] < 0.04


def test_matches_transformers_dequantization():
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    w = torch.randn(256, 384, generator=torch.Generator().manual_seed(2))
    q, s = fp8_block_quantize(w, (128, 128))
    ref = Fp8Dequantize(None)._dequantize_one(q, s, output_dtype=torch.bfloat16)
    assert torch.equal(fp8_block_dequantize(q, s, (128, 128), torch.bfloat16), ref)


def test_scale_dtype_is_kept():
    q, s = QuantFormat("fp8", (32, 32)).quantize("x.weight", torch.randn(64, 64), scale_dtype=torch.bfloat16).values()
    assert q.dtype == FP8 and s.dtype == torch.bfloat16


@pytest.mark.parametrize("qc, match", [
    ({"quant_method": "fp8", "activation_scheme": "static", "weight_block_size": [128, 128]}, "activation_scheme"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "scale_fmt": "ue8m0"}, "scale_fmt"),
    ({"quant_method": "fp8", "weight_block_size": [128, 128], "expert_dtype": "fp4"}, "expert_dtype"),
    ({"quant_method": "fp8"}, "weight_block_size"),
    ({"quant_method": "compressed-tensors"}, "quant_method 'compressed-tensors'"),
])
def test_unsupported_quantization_config_is_refused(qc, match):
    with pytest.raises(LowmoeError, match=match):
        detect_format({"quantization_config": qc})


def test_scale_without_weight_is_an_error():
    with pytest.raises(CheckpointError, match="a.weight_scale_inv"):
        QuantFormat("fp8").group_keys(["a.weight_scale_inv", "b.weight"])


# ---- synth layout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_synth_layout(arch, synth_dir):
    path = synth_dir(arch, **SYNTH)
    cfg = json.loads((path / "config.json").read_text())
    qc = cfg["quantization_config"]
    assert qc["quant_method"] == "fp8" and qc["weight_block_size"] == [32, 32] and qc["activation_scheme"] == "dynamic"
    assert ("modules_to_not_convert" in qc) == (arch == "qwen3_moe")
    raw = stored(path)
    fp8 = {k for k, v in raw.items() if v.dtype == FP8}
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in fp8 and "model.layers.1.self_attn.o_proj.weight" in fp8
    for k in fp8:
        assert raw[k + "_scale_inv"].dtype == torch.float32
        assert tuple(raw[k + "_scale_inv"].shape) == fp8_scale_shape(tuple(raw[k].shape), (32, 32))
    for k in ("model.layers.1.mlp.gate.weight", "model.layers.1.input_layernorm.weight", "model.embed_tokens.weight",
              "lm_head.weight"):
        assert raw[k].dtype == torch.bfloat16, k
    if arch == "deepseek_v3":
        assert raw["model.layers.0.mlp.gate_proj.weight"].dtype == FP8  # the dense layer too


def test_synth_cli(tmp_path):
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "m"), "--arch", "qwen3_moe", "--layers", "2", "--quant", "fp8",
                                  "--dtype", "bfloat16", "--intermediate-size", "32"])
    assert r.exit_code == 0, r.output
    assert "fp8" in r.output
    assert Checkpoint(tmp_path / "m").quant_format == QuantFormat("fp8", (128, 128))


# ---- reading ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_read_equals_transformers_dequantized_load(arch, synth_dir):
    path = synth_dir(arch, **SYNTH)
    model = load(path, dtype=torch.bfloat16)  # transformers dequantizes on CPU
    sd = model.state_dict()
    ck = Checkpoint(path)
    ck.validate()
    for L in range(ck.num_layers):
        rt = ck.adapter.to_runtime(L, ck.read_layer(L), L in ck.moe_layers())
        for k, v in rt.items():
            assert torch.equal(v, sd[f"model.layers.{L}.{k}"]), k


# ---- pruning ----------------------------------------------------------------------------------------

PLAN_KEEP = {"format": "lowmoe-plan/1", "num_experts_per_tok": 2,
             "layers": {"1": {"keep": [0, 2, 5, 7]}, "2": {"keep": [1, 3, 4, 6]}}}


@pytest.mark.parametrize("arch", ["deepseek_v3", "qwen3_moe"])
def test_prune_copies_fp8_bytes_and_matches_in_memory_removal(arch, synth_dir, tmp_path):
    src = synth_dir(arch, **SYNTH)
    ck = Checkpoint(src)
    plan = PLAN_KEEP if arch == "deepseek_v3" else {**PLAN_KEEP, "layers": {**PLAN_KEEP["layers"], "0": {"keep": [1, 2, 3, 4]}}}
    report = lowmoe.prune(src, tmp_path / "out", plan=plan, progress=False)
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["quantization_config"] == ck.config["quantization_config"]
    a, b = stored(src), stored(out)
    for L, lp in plan["layers"].items():
        for j, e in enumerate(lp["keep"]):
            for proj in ("gate_proj", "up_proj", "down_proj"):
                for suffix in ("weight", "weight_scale_inv"):
                    k_in = f"model.layers.{L}.mlp.experts.{e}.{proj}.{suffix}"
                    assert same_bytes(a[k_in], b[k_in.replace(f".experts.{e}.", f".experts.{j}.")]), k_in
    for k, v in b.items():  # everything else that is not an expert: unchanged bytes
        if ".experts." not in k and ".gate." not in k:
            assert same_bytes(a[k], v), k
    assert sum(v.dtype == FP8 for v in b.values()) == sum(".experts." not in k and v.dtype == FP8 for k, v in a.items()) \
        + sum(v.dtype == FP8 for k, v in b.items() if ".experts." in k)
    # no dequantized copy: the output holds fewer tensor bytes than the input
    assert sum(v.nbytes for v in b.values()) < sum(v.nbytes for v in a.values())
    assert report["bytes"]["output"] < report["bytes"]["input"]
    assert report["quantization"]["method"] == "fp8" and report["quantization"]["requantized_experts"] == 0
    pruned = load(out)
    ref = reference_pruned(load(src), 8, plan)
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)


def test_merged_experts_are_requantized(synth_dir, tmp_path, calib_txt):
    src = synth_dir("deepseek_v3", **SYNTH)
    report = lowmoe.prune(src, tmp_path / "out", keep=4, method="merge-freq", calib=[calib_txt], n_samples=8, seq_len=32,
                          batch_size=4, progress=False, protect_super_experts=False)
    plan = report["plan"]["layers"]
    a, b = stored(src), stored(tmp_path / "out")
    ck_in, ck_out = Checkpoint(src), Checkpoint(tmp_path / "out")
    fmt = ck_in.quant_format
    n_merged = 0
    for L, lp in plan.items():
        for j, row in enumerate(lp["merge"]):
            src_experts = [i for i, c in enumerate(row) if c != 0]
            for proj in ("gate_proj", "up_proj", "down_proj"):
                key_out = f"model.layers.{L}.mlp.experts.{j}.{proj}.weight"
                assert b[key_out].dtype == FP8 and b[key_out + "_scale_inv"].dtype == torch.float32
                if len(src_experts) == 1 and row[src_experts[0]] == 1.0:
                    key_in = f"model.layers.{L}.mlp.experts.{src_experts[0]}.{proj}.weight"
                    assert same_bytes(a[key_in], b[key_out]) and same_bytes(a[key_in + "_scale_inv"], b[key_out + "_scale_inv"])
                    continue
                # the merge of the dequantized sources (the writer's kernel), re-quantized: these bytes
                keys_in = [f"model.layers.{L}.mlp.experts.{i}.{proj}.weight" for i in range(8)]
                deq = ck_in.read(keys_in)
                merged = merge_experts([deq[k] for k in keys_in], torch.tensor([row]))[0]
                want = fmt.quantize(key_out, merged)
                assert same_bytes(want[key_out], b[key_out]) and same_bytes(want[key_out + "_scale_inv"], b[key_out + "_scale_inv"])
                exact = sum(c * deq[k].float() for c, k in zip(row, keys_in) if c)
                got = ck_out.read([key_out])[key_out].float()
                assert (got - exact).norm() / exact.norm() < 0.05
                n_merged += proj == "gate_proj"
    q = report["quantization"]
    assert n_merged > 0 and q["requantized_experts"] == n_merged and 0 < q["requant_fro_rel_max"] < 0.05
    load(tmp_path / "out")  # loads in transformers


def test_scores_on_dequantized_weights_like_the_bf16_model(synth_dir, tmp_path, calib_txt):
    """Scoring sees the dequantized weights: pruning the FP8 model and a bf16 copy holding the
    same (dequantized) values picks the same experts."""
    src = synth_dir("qwen3_moe", **SYNTH)
    ck = Checkpoint(src)
    plain = tmp_path / "plain"
    plain.mkdir()
    from lowmoe.engine.writer import ShardWriter

    w = ShardWriter(plain, 1 << 30)
    for L in range(ck.num_layers):
        w.add_all(ck.read_layer(L))
    w.add_all(ck.read(ck.other_keys()))
    w.finalize()
    cfg = {k: v for k, v in ck.config.items() if k != "quantization_config"}
    (plain / "config.json").write_text(json.dumps(cfg))
    for p in ck.extra_files():
        (plain / p.name).write_bytes(p.read_bytes())
    opts = dict(keep=4, calib=[calib_txt], n_samples=8, seq_len=32, batch_size=4, progress=False, dtype="bf16")
    r1 = lowmoe.prune(src, tmp_path / "o1", **opts)
    r2 = lowmoe.prune(plain, tmp_path / "o2", **opts)
    assert r1["plan"]["layers"] == r2["plan"]["layers"]
    assert r1["scores"] == r2["scores"]


def test_killed_merge_run_resumes_to_the_same_bytes(synth_dir, tmp_path, calib_txt, monkeypatch):
    src = synth_dir("qwen3_moe", **SYNTH)
    opts = dict(keep=4, method="merge-freq", calib=[calib_txt], n_samples=8, seq_len=32, batch_size=4, progress=False,
                max_shard_size="20KB")  # several shards, flushed mid-layer: the resume replays re-quantized experts
    ref = lowmoe.prune(src, tmp_path / "ref", **opts)
    prune_killed_after_layer(monkeypatch, 1, src, tmp_path / "out", **opts)
    report = lowmoe.prune(src, tmp_path / "out", resume=True, **opts)
    assert report["resumed_from_layer"] == 2
    assert report["quantization"]["requantized_experts"] == ref["quantization"]["requantized_experts"] > 0
    files = [{k: v for k, v in dir_digest(d).items() if k != "lowmoe_report.json"} for d in (tmp_path / "ref", tmp_path / "out")]
    assert files[0] == files[1] and len([k for k in files[0] if k.endswith(".safetensors")]) > 2


def test_fp8_mtp_layer_is_copied_as_stored(synth_dir, tmp_path):
    src = synth_dir("deepseek_v3", mtp_layers=1, **SYNTH)
    ck = Checkpoint(src)
    assert ck.extra_layers() == [3]
    lowmoe.prune(src, tmp_path / "out", plan=PLAN_KEEP, progress=False)
    a, b = stored(src), stored(tmp_path / "out")
    mtp = [k for k in a if k.startswith("model.layers.3.")]
    assert any(a[k].dtype == FP8 for k in mtp) and a["model.layers.3.eh_proj.weight"].dtype == torch.bfloat16
    assert all(same_bytes(a[k], b[k]) for k in mtp)


def test_bad_quantized_checkpoints_fail_fast_with_one_line(synth_dir, tmp_path):
    import shutil

    src = synth_dir("qwen3_moe", **SYNTH)
    bad = tmp_path / "bad"
    shutil.copytree(src, bad)
    cfg = json.loads((bad / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "compressed-tensors", "format": "float-quantized"}
    (bad / "config.json").write_text(json.dumps(cfg))
    r = CliRunner().invoke(main, ["inspect", str(bad)])
    assert r.exit_code == 2 and "quant_method 'compressed-tensors'" in r.output and len(r.output.strip().splitlines()) == 1
    del cfg["quantization_config"]
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="weight_scale_inv.*no quantization_config"):
        Checkpoint(bad)


def test_fp8_experts_read_in_groups_and_copied_as_stored_bytes(synth_dir, tmp_path, calib_txt):
    """FP8 experts stream like bf16 ones (issue 13): located in the shards, dequantized a group at a
    time as the layer computes, and a selection plan copies their values and scales unread; a tight
    --max-ram gives smaller groups and the same bytes."""
    src = synth_dir("deepseek_v3", **SYNTH)
    ck = Checkpoint(src)
    opts = dict(keep=4, calib=[calib_txt], n_samples=4, seq_len=16, batch_size=2, progress=False)
    ref = lowmoe.prune(src, tmp_path / "ref", prefetch=False, **opts)
    assert ref["io"]["bytes_copied"] > 0, "kept FP8 experts are copied as stored bytes"
    assert ref["io"]["expert_bytes_read"] > 0, "FP8 experts are read by the group reader, not with the layer"
    free = plan_lazy_budget(ck, device=torch.device("cpu"), dtype=torch.float32, batch_size=2, seq_len=16)
    L = ck.moe_layers()[0]
    tight = free.min_max_ram + 2 * ck.layer_read_bytes(L) // ck.num_experts
    bud = lowmoe.prune(src, tmp_path / "bud", max_ram=tight, **opts)
    groups = set(bud["budget"]["group_sizes"].values())
    assert groups and max(groups) < ck.num_experts, "a tight --max-ram must read FP8 experts in smaller groups"
    assert bud["plan"] == ref["plan"] and bud["scores"] == ref["scores"]
    files = lambda d: {k: v for k, v in dir_digest(d).items() if k not in ("lowmoe_report.json", "README.md")}  # noqa: E731
    assert files(tmp_path / "bud") == files(tmp_path / "ref")


def test_merge_decodes_only_the_merged_experts_sources(synth_dir, tmp_path, monkeypatch):
    """A merge plan over FP8 experts read lazily: each re-quantized expert decodes only its sources
    with a nonzero coefficient (never the whole layer), copied experts are not decoded at all, and
    the output bytes equal those written from the layer read whole (copies there are written from
    read tensors, here from stored entries; the merged rows' bytes are checked against the full
    merge kernel in ``test_merged_experts_are_requantized``)."""
    src = synth_dir("deepseek_v3", **SYNTH)
    ck = Checkpoint(src)
    plan = four_way_merge_plan(ck)
    decoded = count_decodes(monkeypatch, QuantizedStored)
    lowmoe.prune(src, tmp_path / "lazy", plan=plan, progress=False)
    experts = {int(k.split(".experts.")[1].split(".")[0]) for k in decoded}
    assert experts == {0, 1, 5, 7}, "only the sources of the merged rows are decoded"
    assert len(decoded) == len(ck.moe_layers()) * 4 * 3  # 4 source experts x 3 projections, once each
    monkeypatch.setattr(lazy, "reads_lazily", lambda ck: False)  # the whole-layer path, for reference
    monkeypatch.setattr(rundir, "read_lazy_layer", lambda ck, files, L: ck.read_layer(L))
    lowmoe.prune(src, tmp_path / "whole", plan=plan, progress=False)
    files = lambda d: {k: v for k, v in dir_digest(d).items() if k not in ("lowmoe_report.json", "README.md")}  # noqa: E731
    assert files(tmp_path / "lazy") == files(tmp_path / "whole")
