"""Building the EEP search's ``--quant`` cache: a fused expert tensor is quantized a few rows at a time
(never decoded whole), with the bytes of the whole tensor quantized at once, and the build's host
peak is planned from the index and checked against --max-ram before any work."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from safetensors import safe_open

import lowmoe.engine.quant as quant
from lowmoe.engine.budget import SAFETY, check_quant_build, plan_budget, quant_build_bytes
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.engine.quant import QuantizedWeights, cache_rows, quantize_tensor
from lowmoe.engine.writer import OpenShard
from lowmoe.errors import ConfigError, OutputError


@pytest.mark.parametrize("mode", ["nf4", "int8"])
@pytest.mark.parametrize("kw", [
    {},  # bf16 rows of whole blocks: one expert a step
    {"hidden_size": 24, "intermediate_size": 20, "experts": 16},  # rows that end inside a block: several a step
    {"quant": "mxfp4"},  # MXFP4 on disk: rows decoded from their blocks and scales
], ids=["bf16", "bf16-odd-rows", "mxfp4"])
def test_fused_experts_are_quantized_rows_at_a_time_as_the_whole_tensor(synth_dir, tmp_path, monkeypatch, mode, kw):
    src = synth_dir("gpt_oss", layers=1, dtype="bfloat16", **kw)
    ck = Checkpoint(src)
    fused = {k: ck.tensor_info(k)[0] for k in ck.adapter.fused_keys(0) if len(ck.tensor_info(k)[0]) == 3}
    assert fused
    seen: list[tuple[int, ...]] = []
    real = quant.quantize_tensor

    def spy(t, *a, **k):
        seen.append(tuple(t.shape))
        return real(t, *a, **k)

    monkeypatch.setattr(quant, "quantize_tensor", spy)
    QuantizedWeights(ck, tmp_path / "cache", mode)
    # no fused tensor was quantized (nor decoded) whole: each step is cache_rows rows of one
    whole = {(ck.num_experts, *s[1:]) for s in fused.values()}
    assert seen and not whole & set(seen)
    steps = {s for s in seen if len(s) == 3}
    assert steps <= {(min(cache_rows(s, mode), s[0]), *s[1:]) for s in fused.values()} | \
        {(s[0] % cache_rows(s, mode), *s[1:]) for s in fused.values()}
    if "experts" in kw:
        assert max(cache_rows(s, mode) for s in fused.values()) > 1
    with safe_open(str(tmp_path / "cache" / "layer0000.safetensors"), "pt") as f:
        for key in fused:
            want = real(ck.read([key])[key], mode)
            assert torch.equal(f.get_tensor(key + "::q"), want.codes), key
            assert torch.equal(f.get_tensor(key + "::absmax"), want.absmax), key
    # and it reads back as the whole tensor quantized and dequantized
    got = QuantizedWeights(ck, tmp_path / "cache", mode).layer(0)
    for key in fused:
        assert torch.equal(got[key], quantize_tensor(ck.read([key])[key], mode).dequantize(got[key].dtype)), key


def test_a_tensor_written_in_pieces_must_add_up(tmp_path):
    x = torch.arange(60, dtype=torch.int16).reshape(3, 4, 5)
    out = OpenShard(tmp_path / "a.safetensors", 1024)
    out.add_parts("x", torch.int16, [3, 4, 5], (x[i] for i in range(3)))
    out.close()
    with safe_open(str(tmp_path / "a.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("x"), x)
    bad = OpenShard(tmp_path / "b.safetensors", 1024)
    with pytest.raises(OutputError, match=r"^tensor x: pieces of 80 bytes in all, expected 120 for shape \[3, 4, 5\]$"):
        bad.add_parts("x", torch.int16, [3, 4, 5], (x[i] for i in range(2)))
    with pytest.raises(OutputError, match=r"^tensor y: a piece of dtype torch.float32, expected torch.int16$"):
        bad.add_parts("y", torch.int16, [4], iter([torch.zeros(4)]))
    bad.close()


@pytest.mark.parametrize("mode", ["nf4", "int8"])
def test_the_build_is_planned_and_refused_under_a_smaller_max_ram(synth_dir, mode):
    src = synth_dir("gpt_oss", layers=2, dtype="bfloat16", quant="mxfp4")
    ck = Checkpoint(src)
    need, terms = quant_build_bytes(ck, mode)
    assert need == sum(v for k, v in terms.items() if k != "layer")
    # a fused tensor counts cache_rows of its rows decoded, not the whole tensor: 4x the experts, the
    # same expert read (only the whole tensor's absmax grows)
    more = quant_build_bytes(Checkpoint(synth_dir("gpt_oss", layers=2, dtype="bfloat16", quant="mxfp4", experts=32)), mode)[1]
    assert 0 < more["expert_tensor_read"] == terms["expert_tensor_read"]
    assert more["layer_non_expert_weights"] > terms["layer_non_expert_weights"]  # the router grows
    plan = plan_budget(ck, device=torch.device("cpu"), dtype=torch.float32, batch_size=2, seq_len=16, max_ram=10**12)
    assert check_quant_build(ck, plan, mode) == need
    assert check_quant_build(ck, plan, "none") is None
    assert check_quant_build(ck, replace(plan, max_ram=None), mode) is None
    fits = int(need / (1 - SAFETY)) + 1
    assert check_quant_build(ck, replace(plan, max_ram=fits), mode) == need
    with pytest.raises(ConfigError, match=rf"^--max-ram .*: building the --quant {mode} cache needs .* at layer "
                                          r"\d \(interpreter .*\); raise --max-ram or use --quant none$"):
        check_quant_build(ck, replace(plan, max_ram=fits - 4096), mode)
