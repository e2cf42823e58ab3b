"""Plans with fields (``align``, DERN's ``neurons``) are written from each output expert's sources,
as plain merges are: the layer's experts are never decoded whole, experts a plan leaves as they are
are copied as stored bytes, and the output is the same bytes as the whole-layer path's. Also: a
fused layer read lazily gives one expert's weights by reading that expert's rows alone."""

from __future__ import annotations

import random

import pytest
import torch

import lowmoe
from lowmoe.engine import apply, lazy, rundir
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.engine.lazy import QuantizedStored, ShardFiles, StoredTensor, read_lazy_layer
from lowmoe.errors import PlanError
from lowmoe.methods.merging import dern
from lowmoe.methods.merging.stats import expert_weights, num_neurons

from .helpers import count_decodes, dir_digest, four_way_merge_plan

FP8 = dict(layers=3, hidden_size=64, intermediate_size=32, experts=8, top_k=2, shard_size="60KB", dtype="bfloat16",
           quant="fp8", fp8_block=32)


def _neurons(ck) -> int:
    L = ck.moe_layers()[0]
    return num_neurons(ck.adapter, L, read_lazy_layer(ck, ShardFiles(ck.path), L))


def align_plan(ck) -> dict:
    """``four_way_merge_plan`` with members 1 and 7 permuted before the merge."""
    n, rng = _neurons(ck), random.Random(0)
    plan = four_way_merge_plan(ck)
    for lp in plan["layers"].values():
        lp["align"] = {str(e): rng.sample(range(n), n) for e in (1, 7)}
    return plan


def neurons_plan(ck) -> dict:
    """A DERN plan keeping 0, 2, 7, 4: sources 1 and 5 feed slots 0 and 2 (experts 0 and 7) only, so
    slots 1 and 3 (experts 2 and 4) are left as they are."""
    n, rng = _neurons(ck), random.Random(1)
    sources = {str(d): {"weight": w, "slot": [rng.choice([0, 2]) for _ in range(n)], "neuron": [rng.randrange(n) for _ in range(n)]}
               for d, w in ((1, 0.5), (5, 0.25))}
    return {"format": "lowmoe-plan/1", "num_experts_per_tok": 2,
            "layers": {str(L): {"keep": [0, 2, 7, 4], "neurons": {"slot_weights": [1.0, 0.0, 2.0, 1.0], "sources": sources}}
                       for L in ck.moe_layers()}}


def _weights(d):
    return {k: v for k, v in dir_digest(d).items() if k not in ("lowmoe_report.json", "README.md")}


def _expert(key: str) -> int:
    return int(key.split(".experts.")[1].split(".")[0])


@pytest.mark.parametrize("arch,field", [("mixtral", "align"), ("mixtral", "neurons"), ("qwen3_moe", "neurons"),
                                        ("deepseek_v3-fp8", "align"), ("deepseek_v3-fp8", "neurons")])
def test_a_plan_with_fields_decodes_only_its_sources(synth_dir, tmp_path, monkeypatch, arch, field):
    fp8 = arch.endswith("-fp8")
    src = synth_dir(arch.removesuffix("-fp8"), **(FP8 if fp8 else {}))
    ck = Checkpoint(src)
    plan = align_plan(ck) if field == "align" else neurons_plan(ck)
    decoded = count_decodes(monkeypatch, QuantizedStored if fp8 else StoredTensor)
    copied: list[str] = []
    copy_to = StoredTensor.copy_to
    monkeypatch.setattr(StoredTensor, "copy_to", lambda self, f: (copied.append(self.key), copy_to(self, f))[1])
    rep = lowmoe.prune(src, tmp_path / "lazy", plan=plan, progress=False)
    assert rep["plan"]["layers"] == plan["layers"]
    for L in ck.moe_layers():
        got = [_expert(k) for k in decoded if k.startswith(f"model.layers.{L}.") and ".experts." in k]
        if field == "align":  # each merged expert's sources, once per projection
            assert sorted(got) == sorted(e for e in (0, 1, 5, 7) for _ in range(3)), (L, got)
        else:  # the fed slots' experts twice (sums, then their own neurons), the sources once
            assert sorted(got) == sorted([0, 7] * 6 + [1, 5] * 3), (L, got)
        # 2 (one source, coefficient 1 / a slot nothing feeds) and 4 are copied as stored bytes, values and scales
        kept = sorted(_expert(k) for k in copied if k.startswith(f"model.layers.{L}.") and ".experts." in k)
        assert kept == sorted([2, 4] * 3 * (2 if fp8 else 1)), (L, kept)
    monkeypatch.setattr(lazy, "reads_lazily", lambda ck: False)  # the whole-layer path, for reference
    monkeypatch.setattr(rundir, "read_lazy_layer", lambda ck, files, L: ck.read_layer(L))
    lowmoe.prune(src, tmp_path / "whole", plan=plan, progress=False)
    assert _weights(tmp_path / "lazy") == _weights(tmp_path / "whole")


@pytest.mark.parametrize("quant", ["none", "mxfp4"])
def test_an_aligned_fused_merge_reads_rows_not_the_layer(synth_dir, tmp_path, monkeypatch, quant):
    """``align`` over GPT-OSS's fused experts (bf16, or MXFP4 merged rows re-quantized): each merged
    row reads its sources' rows, permuted as they are read (``align.AlignedRows``), and no fused
    tensor is decoded whole; the same bytes as the whole-layer path."""
    mxfp4 = quant == "mxfp4"
    src = synth_dir("gpt_oss", dtype="bfloat16", **({"quant": "mxfp4"} if mxfp4 else {}))
    ck = Checkpoint(src)
    plan = align_plan(ck)
    assert all(len(lp["align"]) == 2 for lp in plan["layers"].values())
    cls = QuantizedStored if mxfp4 else StoredTensor
    read, whole, rows = cls.read, [], []

    def spy(self):
        stored = self.main if mxfp4 else self
        if ".experts." in self.key:
            (whole if isinstance(stored, StoredTensor) else rows).append(self.key)
        return read(self)

    monkeypatch.setattr(cls, "read", spy)
    monkeypatch.setattr(lazy.StoredRows, "read", lambda self, real=lazy.StoredRows.read: (rows.append(self.key), real(self))[1])
    lowmoe.prune(src, tmp_path / "lazy", plan=plan, progress=False)
    assert whole == [] and rows, whole
    monkeypatch.setattr(cls, "read", read)
    monkeypatch.setattr(lazy, "reads_lazily", lambda ck: False)  # the whole-layer path, for reference:
    monkeypatch.setattr(rundir, "read_lazy_layer", lambda ck, files, L: ck.read_layer(L))
    # the layer permuted whole (``apply_alignment``), as before rows were (MXFP4's merged rows included)
    monkeypatch.setattr(apply.PlanFields, "fused_rows", lambda self, adapter, lp: adapter.expert_layout == "fused" and not lp.extra)
    lowmoe.prune(src, tmp_path / "whole", plan=plan, progress=False)
    assert _weights(tmp_path / "lazy") == _weights(tmp_path / "whole")


def test_dern_blocks_of_slots_give_the_same_bits(synth_dir, tmp_path, monkeypatch):
    """DERN's write merges the fed slots a block at a time, reading the sources once per block: one
    slot a block gives the same bytes as all of them at once."""
    src = synth_dir("mixtral")
    plan = neurons_plan(Checkpoint(src))
    lowmoe.prune(src, tmp_path / "one", plan=plan, progress=False)
    blocks = []
    real = dern._slot_blocks

    def one_each(*a):
        got = real(*a)
        blocks.append(got)
        return [[j] for b in got for j in b]

    monkeypatch.setattr(dern, "_slot_blocks", one_each)
    lowmoe.prune(src, tmp_path / "many", plan=plan, progress=False)
    assert blocks and all(b == [[0, 2]] for b in blocks), blocks  # the default: one block (the layer's bytes hold both)
    assert _weights(tmp_path / "one") == _weights(tmp_path / "many")


@pytest.mark.parametrize("bad, match", [
    ({"align": {"9": "x"}}, r"'align': '9' is not an expert"),
    ({"align": {"-1": []}}, r"'align': '-1' is not an expert"),
    ({"align": {"one": []}}, r"'align': 'one' is not an expert"),
    ({"align": {"1": [0, 0]}}, r"'align'\['1'\]: expected a permutation of 0\.\.31"),
    ({"neurons": {"slot_weights": [1, 1, 1, 1], "sources": {"x": {}}}}, r"'neurons': source 'x' is not an expert"),
    ({"neurons": {"slot_weights": [1, 1, 1, 1], "sources": {"1": {"slot": [9], "neuron": [0]}}}},
     r"'neurons': source '1' needs 'slot' and 'neuron' lists of 32 valid indices"),
    ({"neurons": {"slot_weights": [1, 1, 1, 1], "sources": {"1": {"slot": [0.5] * 32, "neuron": list(range(32))}}}},
     r"'neurons': source '1' needs 'slot' and 'neuron' lists of 32 valid indices"),
    ({"neurons": {"slot_weights": [1, 1, 1, 1], "sources": {"1": [0, 1]}}},
     r"'neurons': source '1' needs 'slot' and 'neuron' lists of 32 valid indices"),
])
def test_bad_fields_are_refused_before_anything_is_written(synth_dir, tmp_path, bad, match):
    src = synth_dir("mixtral")
    ck = Checkpoint(src)
    plan = four_way_merge_plan(ck)
    for lp in plan["layers"].values():
        lp.update(bad)
    with pytest.raises(PlanError, match=match):
        lowmoe.prune(src, tmp_path / "out", plan=plan, progress=False)
    out = tmp_path / "out"
    assert not (out / "config.json").exists() and not list(out.glob("*.safetensors")), sorted(p.name for p in out.iterdir())


def test_fused_expert_weights_read_one_expert_only(synth_dir):
    """GPT-OSS's experts are fused on dim 0: one expert's canonical weights from a lazily read layer
    read that expert's rows (bytes counted), and equal those of the layer read whole."""
    src = synth_dir("gpt_oss", dtype="bfloat16")
    ck = Checkpoint(src)
    L = ck.moe_layers()[0]
    files = ShardFiles(ck.path)
    layer = read_lazy_layer(ck, files, L)
    whole = ck.read_layer(L)
    before = files.bytes_read
    w = expert_weights(ck.adapter, L, layer, 3)
    stored = [layer.stored(k) for k in layer if layer.stored(k) is not None]
    assert files.bytes_read - before == sum(s.row_bytes for s in stored), "only expert 3's rows are read"
    ref = expert_weights(ck.adapter, L, whole, 3)
    assert w.keys() == ref.keys() and all(torch.equal(w[k], ref[k]) for k in w)
    with pytest.raises(IndexError):
        expert_weights(ck.adapter, L, layer, ck.num_experts)


@pytest.mark.parametrize("quant", ["none", "mxfp4"])
def test_a_fused_dern_plan_reads_rows_not_the_layer(synth_dir, tmp_path, monkeypatch, quant):
    """DERN's plan over GPT-OSS's fused experts read lazily: no fused expert tensor is read whole (the
    kept rows, then each source's and fed slot's rows), and the bytes equal the whole-layer path's."""
    kw = dict(dtype="bfloat16") if quant == "none" else dict(dtype="bfloat16", quant="mxfp4", intermediate_size=64,
                                                             hidden_size=64, shard_size="60KB")
    src = synth_dir("gpt_oss", **kw)
    ck = Checkpoint(src)
    plan = neurons_plan(ck)
    whole: list[str] = []  # expert tensors decoded whole (an MXFP4 entry over rows is rows)
    cls = QuantizedStored if quant == "mxfp4" else StoredTensor
    read = cls.read

    def counted(self):
        if not isinstance(getattr(self, "main", None), lazy.StoredRows):
            whole.append(self.key)
        return read(self)

    monkeypatch.setattr(cls, "read", counted)
    rep = lowmoe.prune(src, tmp_path / "lazy", plan=plan, progress=False)
    assert rep["plan"]["layers"] == plan["layers"]
    assert not [k for k in whole if ".experts." in k], "no fused expert tensor decoded whole"
    monkeypatch.setattr(lazy, "reads_lazily", lambda ck: False)  # the whole-layer path, for reference
    monkeypatch.setattr(rundir, "read_lazy_layer", lambda ck, files, L: ck.read_layer(L))
    lowmoe.prune(src, tmp_path / "whole", plan=plan, progress=False)
    assert _weights(tmp_path / "lazy") == _weights(tmp_path / "whole")
