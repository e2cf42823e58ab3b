"""MXFP4 (GPT-OSS) checkpoints: the codec against hand-computed values and transformers' own
dequantization, ``lowmoe synth --arch gpt_oss --quant mxfp4``'s layout, and pruning: kept experts'
packed bytes copied, merged experts re-quantized, the output loads in transformers and its logits
equal the input model's with the same experts removed in memory."""

from __future__ import annotations

import json

import pytest
import torch
from click.testing import CliRunner

import lowmoe
from lowmoe.engine import rundir
from lowmoe.cli import main
from lowmoe.engine import lazy
from lowmoe.engine.apply import map_rows
from lowmoe.engine.budget import plan_lazy_budget
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.engine.formats import E2M1_VALUES, QuantFormat, mxfp4_dequantize, mxfp4_quantize, roundtrip_error
from lowmoe.engine.lazy import ExpertSource, QuantizedStored, ShardFiles, read_lazy_layer, reads_lazily
from lowmoe.errors import CheckpointError, ConfigError

from .helpers import dir_digest
from .quantized import IDS, load, reference_pruned, same_bytes, stored

SYNTH = dict(layers=2, hidden_size=64, intermediate_size=64, experts=8, top_k=2, shard_size="60KB", dtype="bfloat16",
             quant="mxfp4")
EXPERTS = ("gate_up_proj", "down_proj")


# ---- codec ---------------------------------------------------------------------------------------


def test_dequantize_hand_computed():
    blocks = torch.zeros(1, 1, 16, dtype=torch.uint8)
    blocks[0, 0, 0] = 0x21  # low nibble 1 (0.5) -> element 0, high nibble 2 (1.0) -> element 1
    blocks[0, 0, 1] = 0xF7  # low 7 (6.0) -> element 2, high 15 (-6.0) -> element 3
    blocks[0, 0, 15] = 0x8D  # low 13 (-3.0) -> element 30, high 8 (-0.0) -> element 31
    w = mxfp4_dequantize(blocks, torch.tensor([[128]], dtype=torch.uint8), torch.float32)  # scale 2^(128-127) = 2
    assert w.shape == (1, 32)
    assert w[0, :4].tolist() == [1.0, 2.0, 12.0, -12.0] and w[0, 30].item() == -6.0 and w[0, 4:30].abs().sum() == 0
    half = mxfp4_dequantize(blocks, torch.tensor([[126]], dtype=torch.uint8), torch.float32)  # 2^-1
    assert half[0, :4].tolist() == [0.25, 0.5, 3.0, -3.0]


def test_dequantize_every_byte_and_scale():
    """Every byte (two E2M1 nibbles, the low one first) under every E8M0 scale: E2M1_VALUES[nibble] x
    2^(scale - 127), in float32 and rounded once to bf16."""
    blocks = torch.arange(256, dtype=torch.uint8).view(16, 16).expand(256, 16, 16).reshape(256, 16, 16)
    scales = torch.arange(256, dtype=torch.uint8).view(256, 1).expand(256, 16).contiguous()
    want = torch.empty(256, 16, 32)
    lut = torch.tensor(E2M1_VALUES)
    byte = torch.arange(256).view(16, 16)
    for s in range(256):
        want[s, :, 0::2] = lut[byte & 0x0F] * 2.0 ** (s - 127)
        want[s, :, 1::2] = lut[byte >> 4] * 2.0 ** (s - 127)
    for dtype in (torch.float32, torch.bfloat16):  # (scale 255, 2^128, is inf in float32: 0 x inf is NaN in both)
        torch.testing.assert_close(mxfp4_dequantize(blocks, scales, dtype), want.view(256, 512).to(dtype),
                                   rtol=0, atol=0, equal_nan=True)


def test_quantize_hand_computed():
    w = torch.zeros(1, 32)
    w[0, :4] = torch.tensor([3.0, -1.5, 0.75, 0.0])  # amax 3 -> scale 2^-1 (3 / 0.5 = 6, the largest E2M1)
    blocks, scales = mxfp4_quantize(w)
    assert scales.tolist() == [[126]]
    # scaled: 6 (code 7), -3 (code 8+5=13), 1.5 (code 3), 0 (code 0): element 0 in the low nibble
    assert blocks[0, 0, :2].tolist() == [7 | 13 << 4, 3 | 0 << 4] and blocks[0, 0, 2:].sum() == 0


def test_quantize_rounds_ties_to_even_code():
    w = torch.zeros(1, 32)
    w[0, :6] = torch.tensor([6.0, 2.5, 0.25, 0.75, 5.0, -1.75])  # scale 1; ties between E2M1 neighbours
    blocks, scales = mxfp4_quantize(w)
    back = mxfp4_dequantize(blocks, scales, torch.float32)
    assert scales.tolist() == [[127]]
    assert back[0, :6].tolist() == [6.0, 2.0, 0.0, 1.0, 4.0, -2.0]


def test_roundtrip_of_representable_values_is_exact():
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(0, 16, (4, 6, 64), generator=g)
    vals = torch.tensor(E2M1_VALUES)[codes]
    vals[..., ::32] = 6.0  # every group reaches the largest code, so the scale is the one stored
    exps = torch.randint(-10, 10, (4, 6, 2), generator=g)
    w = torch.ldexp(vals.unflatten(-1, (2, 32)), exps.unsqueeze(-1)).flatten(-2)
    blocks, scales = mxfp4_quantize(w)
    assert torch.equal(mxfp4_dequantize(blocks, scales, torch.float32), w)
    assert torch.equal(scales, (exps + 127).to(torch.uint8))


def test_roundtrip_error_and_matches_transformers():
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    w = torch.randn(3, 40, 96, generator=torch.Generator().manual_seed(1)) * 0.02  # (E, out, in)
    blocks, scales = mxfp4_quantize(w)
    assert blocks.shape == (3, 40, 3, 16) and scales.shape == (3, 40, 3)
    back = mxfp4_dequantize(blocks, scales, torch.float32)
    # E2M1 spacing is at most 2 (between 4 and 6) at scale 2^x: |err| <= 2^x, with amax / 2^x in (3, 6]
    amax = w.unflatten(-1, (3, 32)).abs().amax(-1, keepdim=True)
    assert ((back - w).unflatten(-1, (3, 32)).abs() <= amax / 3 + 1e-12).all()
    fmt = QuantFormat("mxfp4")
    assert roundtrip_error(w.transpose(-1, -2), fmt, "e.down_proj")["fro_rel"] < 0.2
    # transformers dequantizes the same bytes to the same values, transposed to (E, in, out)
    ref = convert_moe_packed_tensors(blocks, scales, dtype=torch.bfloat16)
    got = fmt.dequantize({"e.down_proj_blocks": blocks, "e.down_proj_scales": scales}, "e.down_proj", torch.bfloat16)
    assert got.shape == (3, 96, 40) and torch.equal(got, ref)


def test_mismatched_blocks_and_scales_name_the_tensor():
    fmt = QuantFormat("mxfp4")
    with pytest.raises(CheckpointError, match="x.down_proj"):
        fmt.dequantize({"x.down_proj_blocks": torch.zeros(2, 4, 3, 16, dtype=torch.uint8),
                        "x.down_proj_scales": torch.zeros(2, 4, 2, dtype=torch.uint8)}, "x.down_proj", torch.float32)
    with pytest.raises(CheckpointError, match="y_blocks"):
        fmt.group_keys(["y_blocks"])


# ---- synth layout ----------------------------------------------------------------------------------


def test_synth_layout(synth_dir):
    path = synth_dir("gpt_oss", **SYNTH)
    cfg = json.loads((path / "config.json").read_text())
    assert cfg["quantization_config"] == {"quant_method": "mxfp4", "modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head"]}
    raw = stored(path)
    p = "model.layers.1.mlp.experts."
    E, H, I = 8, 64, 64
    assert raw[p + "gate_up_proj_blocks"].shape == (E, 2 * I, H // 32, 16) and raw[p + "gate_up_proj_blocks"].dtype == torch.uint8
    assert raw[p + "gate_up_proj_scales"].shape == (E, 2 * I, H // 32) and raw[p + "gate_up_proj_scales"].dtype == torch.uint8
    assert raw[p + "down_proj_blocks"].shape == (E, H, I // 32, 16) and raw[p + "down_proj_scales"].shape == (E, H, I // 32)
    assert raw[p + "gate_up_proj_bias"].shape == (E, 2 * I) and raw[p + "gate_up_proj_bias"].dtype == torch.bfloat16
    assert raw["model.layers.1.self_attn.q_proj.weight"].dtype == torch.bfloat16
    assert p + "gate_up_proj" not in raw and p + "down_proj" not in raw


def test_synth_cli_and_errors(tmp_path):
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "m"), "--arch", "gpt_oss", "--layers", "2", "--quant", "mxfp4",
                                  "--intermediate-size", "64"])
    assert r.exit_code == 0, r.output
    assert Checkpoint(tmp_path / "m").quant_format == QuantFormat("mxfp4")
    r = CliRunner().invoke(main, ["synth", str(tmp_path / "x"), "--arch", "mixtral", "--quant", "mxfp4"])
    assert r.exit_code == 2 and "--arch gpt_oss" in r.output
    with pytest.raises(ConfigError, match="multiples of 32"):
        lowmoe.toy.synth.synth_model(tmp_path / "y", "gpt_oss", hidden_size=48, quant="mxfp4")


# ---- reading and pruning ------------------------------------------------------------------------------


def test_read_equals_transformers_dequantized_load(synth_dir):
    path = synth_dir("gpt_oss", **SYNTH)
    sd = load(path, dtype=torch.bfloat16).state_dict()
    ck = Checkpoint(path)
    ck.validate()
    assert ck.tensor_info("model.layers.0.mlp.experts.gate_up_proj") == ((8, 64, 128), "BF16")
    for L in range(ck.num_layers):
        for k, v in ck.adapter.to_runtime(L, ck.read_layer(L), True).items():
            assert torch.equal(v, sd[f"model.layers.{L}.{k}"]), k


PLAN = {"format": "lowmoe-plan/1", "num_experts_per_tok": 2,
        "layers": {"0": {"keep": [0, 2, 5, 7]}, "1": {"keep": [6, 1, 3, 4]}}}


def test_prune_copies_packed_bytes_and_matches_in_memory_removal(synth_dir, tmp_path):
    src = synth_dir("gpt_oss", **SYNTH)
    report = lowmoe.prune(src, tmp_path / "out", plan=PLAN, progress=False)
    out = tmp_path / "out"
    assert json.loads((out / "config.json").read_text())["quantization_config"]["quant_method"] == "mxfp4"
    a, b = stored(src), stored(out)
    assert set(a) == set(b)
    for L, lp in PLAN["layers"].items():
        for j, e in enumerate(lp["keep"]):
            for name in EXPERTS:
                for part in ("_blocks", "_scales"):
                    k = f"model.layers.{L}.mlp.experts.{name}{part}"
                    assert same_bytes(a[k][e], b[k][j]), (k, e)
    for k, v in b.items():
        if ".experts." not in k and ".router." not in k:
            assert same_bytes(a[k], v), k
    assert sum(v.nbytes for v in b.values()) < sum(v.nbytes for v in a.values())
    assert report["quantization"]["method"] == "mxfp4" and report["quantization"]["requantized_experts"] == 0
    pruned = load(out)
    ref = reference_pruned(load(src), 8, PLAN)
    with torch.no_grad():
        torch.testing.assert_close(pruned(IDS).logits, ref(IDS).logits, rtol=1e-5, atol=1e-5)


def test_merged_experts_are_requantized(synth_dir, tmp_path):
    src = synth_dir("gpt_oss", **SYNTH)
    merge = [[0.5, 0.5, 0, 0, 0, 0, 0, 0], [0, 0, 1.0, 0, 0, 0, 0, 0], [0, 0, 0, 0.25, 0.75, 0, 0, 0], [0, 0, 0, 0, 0, 0, 0, 1.0]]
    plan = {"format": "lowmoe-plan/1", "num_experts_per_tok": 2,
            "layers": {str(L): {"keep": [0, 2, 4, 7], "merge": merge} for L in (0, 1)}}
    report = lowmoe.prune(src, tmp_path / "out", plan=plan, progress=False)
    a, b = stored(src), stored(tmp_path / "out")
    ck = Checkpoint(src)
    fmt = ck.quant_format
    W = torch.tensor(merge)
    for L in (0, 1):
        for name in EXPERTS:
            key = f"model.layers.{L}.mlp.experts.{name}"
            for j, src_e in ((1, 2), (3, 7)):  # one source, coefficient 1: its packed bytes
                assert same_bytes(a[key + "_blocks"][src_e], b[key + "_blocks"][j])
                assert same_bytes(a[key + "_scales"][src_e], b[key + "_scales"][j])
            # merged rows: the writer's merge of the dequantized experts, re-quantized
            merged = map_rows(ck.read([key])[key], [0, 2, 4, 7], W)
            want = fmt.quantize(key, merged)
            for j in (0, 2):
                assert same_bytes(want[key + "_blocks"][j], b[key + "_blocks"][j])
                assert same_bytes(want[key + "_scales"][j], b[key + "_scales"][j])
    q = report["quantization"]
    assert q["requantized_experts"] == 4 and 0 < q["requant_fro_rel_max"] < 0.2
    assert all(v["requantized"] == 2 for v in q["layers"].values())
    load(tmp_path / "out")  # loads in transformers


def test_merge_decodes_only_the_merged_experts_sources(synth_dir, tmp_path, monkeypatch):
    """A merge plan over MXFP4's fused experts read lazily: each re-quantized output expert decodes only
    the rows of its sources with a nonzero coefficient, one at a time (never the whole fused tensor), copied experts
    are not decoded at all, and the output bytes equal those written from the layer dequantized whole
    (whose merged rows ``test_merged_experts_are_requantized`` checks against the full merge)."""
    src = synth_dir("gpt_oss", **SYNTH)
    ck = Checkpoint(src)
    E = ck.num_experts
    merge = [[0.5, 0.5] + [0.0] * (E - 2), [0.0, 0.0, 1.0] + [0.0] * (E - 3),
             [0.0] * 5 + [0.25, 0.0, 0.75], [0.0] * 4 + [1.0] + [0.0] * (E - 5), [0.0] * E]
    plan = {"format": "lowmoe-plan/1", "num_experts_per_tok": 2,
            "layers": {str(L): {"keep": [0, 2, 7, 4, 3], "merge": merge} for L in ck.moe_layers()}}
    decoded: list[tuple[str, tuple[int, ...]]] = []
    read = QuantizedStored.read

    def counted(self):
        keep = getattr(self.main, "keep", None)
        assert keep is not None, f"{self.key}: a fused MXFP4 tensor was dequantized whole"
        decoded.append((self.key.rsplit(".", 1)[1], keep))
        return read(self)

    monkeypatch.setattr(QuantizedStored, "read", counted)
    report = lowmoe.prune(src, tmp_path / "lazy", plan=plan, progress=False)
    # the two merged outputs' sources, each row read on its own as it is added (``apply.merge_one``)
    per_layer = [(name, (row,)) for name in EXPERTS for row in (0, 1, 5, 7)]
    assert sorted(decoded) == sorted(per_layer * len(ck.moe_layers()))
    assert sum(len(rows) for _, rows in decoded) == len(ck.moe_layers()) * len(EXPERTS) * 4 < ck.num_layers * 2 * E
    assert report["quantization"]["requantized_experts"] == 3 * len(ck.moe_layers())  # a row without sources too
    b = stored(tmp_path / "lazy")
    assert not b["model.layers.0.mlp.experts.down_proj_blocks"][4].any()  # zeros, as the full merge gives
    monkeypatch.setattr(QuantizedStored, "read", read)
    monkeypatch.setattr(lazy, "reads_lazily", lambda ck: False)  # the whole-layer path, for reference
    monkeypatch.setattr(rundir, "read_lazy_layer", lambda ck, files, L: ck.read_layer(L))
    lowmoe.prune(src, tmp_path / "whole", plan=plan, progress=False)
    files = lambda d: {k: v for k, v in dir_digest(d).items() if k not in ("lowmoe_report.json", "README.md")}  # noqa: E731
    assert files(tmp_path / "lazy") == files(tmp_path / "whole")


# ---- streaming in expert groups ------------------------------------------------------------------


def _recording_loads(monkeypatch) -> list[int]:
    """Bytes of every expert group read from the shards (``ExpertSource.load``), in order."""
    sizes: list[int] = []
    load_group = ExpertSource.load

    def load(self, a, z, out=None):
        got = load_group(self, a, z, out)
        sizes.append(sum(t.numel() * t.element_size() for t in got.values()))
        return got

    monkeypatch.setattr(ExpertSource, "load", load)
    return sizes


def test_mxfp4_experts_read_in_groups_and_copied_as_stored_bytes(synth_dir, tmp_path, calib_txt, monkeypatch):
    """GPT-OSS's fused MXFP4 experts stream like per-expert ones: a group of experts is a contiguous
    byte range of ``_blocks``/``_scales``, read as stored bytes and dequantized as the layer computes
    (never the whole layer: ``QuantizedStored.read`` is not called); a tight --max-ram gives smaller
    groups, fewer bytes per read and the same output; kept experts are the input's packed rows."""
    src = synth_dir("gpt_oss", **SYNTH)
    ck = Checkpoint(src)
    assert reads_lazily(ck)
    opts = dict(keep=4, calib=[calib_txt], n_samples=4, seq_len=16, batch_size=2, progress=False)

    def whole_layer_dequantized(self):
        raise AssertionError(f"{self.key}: a fused MXFP4 tensor was dequantized whole")

    monkeypatch.setattr(QuantizedStored, "read", whole_layer_dequantized)
    sizes = _recording_loads(monkeypatch)
    ref = lowmoe.prune(src, tmp_path / "ref", prefetch=False, **opts)
    ref_max = max(sizes)
    assert ref["io"]["bytes_copied"] > 0 and ref["io"]["expert_bytes_read"] > 0
    L = ck.moe_layers()[0]
    layer_experts = sum(ck.tensor_bytes(k) for k in ck.adapter.fused_keys(L))
    assert ref_max <= layer_experts
    free = plan_lazy_budget(ck, device=torch.device("cpu"), dtype=torch.float32, batch_size=2, seq_len=16)
    tight = free.min_max_ram + 2 * ck.layer_read_bytes(L) // ck.num_experts
    sizes.clear()
    bud = lowmoe.prune(src, tmp_path / "bud", max_ram=tight, **opts)
    groups = set(bud["budget"]["group_sizes"].values())
    assert groups and max(groups) < ck.num_experts, "a tight --max-ram must read MXFP4 experts in smaller groups"
    assert max(sizes) < ref_max and max(sizes) <= layer_experts * max(groups) // ck.num_experts
    assert bud["plan"] == ref["plan"] and bud["scores"] == ref["scores"]
    files = lambda d: {k: v for k, v in dir_digest(d).items() if k not in ("lowmoe_report.json", "README.md")}  # noqa: E731
    assert files(tmp_path / "bud") == files(tmp_path / "ref")
    a, b = stored(src), stored(tmp_path / "bud")
    for layer, lp in bud["plan"]["layers"].items():
        for part in ("gate_up_proj_blocks", "gate_up_proj_scales", "down_proj_blocks", "down_proj_scales",
                     "gate_up_proj_bias", "down_proj_bias"):
            k = f"model.layers.{layer}.mlp.experts.{part}"
            assert same_bytes(a[k][lp["keep"]], b[k]), k


def test_group_decode_equals_whole_layer_dequantization(synth_dir):
    """A group read as packed bytes and decoded equals the same experts of the layer dequantized whole
    (and a run of consecutive experts is read with one call per stored part)."""
    src = synth_dir("gpt_oss", **SYNTH)
    ck = Checkpoint(src)
    files = ShardFiles(ck.path)
    lazy = read_lazy_layer(ck, files, 0)
    source = lazy.experts
    assert source is not None and source.packed
    whole = ck.adapter.to_runtime(0, ck.read_layer(0), True)
    sub = source.subset([1, 2, 3, 6])
    got = sub.decode(sub.load(0, 4), torch.bfloat16)
    for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias"):
        want = whole[f"mlp.experts.{name}"][[1, 2, 3, 6]]
        assert got[name].dtype == want.dtype and torch.equal(got[name], want), name
    # buffers are the stored bytes, not dequantized values
    assert sub.expert_stored_bytes() * 4 == sum(t.numel() for t in sub.load(0, 4).values())
    assert sub.expert_stored_bytes() < sub.expert_numel() * 2
