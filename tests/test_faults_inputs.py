"""Inputs that lie: each gives one line naming the file, key or layer and what was expected, exit 2,
the input unchanged and nothing in OUT that looks finished (no index, no report)."""

from __future__ import annotations

import json
import os
import shutil

import pytest
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

import lowmoe
from lowmoe.cli import main
from lowmoe.engine.rundir import MANIFEST
from lowmoe.errors import OutputError

from .helpers import dir_digest

PRUNE = ["--keep", "4", "--n-samples", "4", "--seq-len", "16", "--batch-size", "2"]


@pytest.fixture
def model(synth_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(synth_dir("mixtral", layers=2), dst)
    return dst


def refused(tmp_path, model, *args, match: str, extra=PRUNE):
    """Run ``lowmoe prune MODEL OUT ...``; assert the one-line error, exit 2 and the state afterwards."""
    before = dir_digest(model)
    out = tmp_path / "out"
    r = CliRunner().invoke(main, ["-q", "prune", str(model), str(out), *map(str, args), *extra])
    lines = [ln for ln in r.output.splitlines() if ln.strip()]
    assert r.exit_code == 2, r.output
    assert len(lines) == 1 and lines[0].startswith("lowmoe: error: ") and "Traceback" not in r.output, r.output
    assert match in lines[0], lines[0]
    assert dir_digest(model) == before, "the input was modified"
    assert not (out / "model.safetensors.index.json").exists() and not (out / "lowmoe_report.json").exists()
    return lines[0]


def shard_of(model, key: str):
    wm = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    return model / wm[key]


def rewrite_header(path, edit):
    """Rewrite a safetensors shard with ``edit(header)`` applied to its JSON header (data unchanged)."""
    raw = path.read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(len(new).to_bytes(8, "little") + new + raw[8 + n:])


EXPERT_KEY = "model.layers.1.block_sparse_moe.experts.3.w1.weight"


def test_header_offsets_past_the_end(model, calib_txt, tmp_path):
    path = shard_of(model, EXPERT_KEY)

    def edit(h):
        b, e = h[EXPERT_KEY]["data_offsets"]
        h[EXPERT_KEY]["data_offsets"] = [b + 10**6, e + 10**6]

    rewrite_header(path, edit)
    line = refused(tmp_path, model, "--calib", calib_txt, match=path.name)
    assert EXPERT_KEY in line and "past the end" in line


def test_truncated_shard(model, calib_txt, tmp_path):
    path = shard_of(model, EXPERT_KEY)
    path.write_bytes(path.read_bytes()[:-17])  # a copy that stopped a few bytes short
    line = refused(tmp_path, model, "--calib", calib_txt, match=path.name)
    assert "truncated" in line


def test_header_not_json(model, calib_txt, tmp_path):
    path = shard_of(model, EXPERT_KEY)
    raw = bytearray(path.read_bytes())
    raw[8:12] = b"\xff\xfe{["
    path.write_bytes(bytes(raw))
    refused(tmp_path, model, "--calib", calib_txt, match=f"{path.name}: safetensors header is not a JSON object")


def test_shard_changed_between_kill_and_resume(model, calib_txt, tmp_path, monkeypatch):
    out = tmp_path / "out"
    monkeypatch.setenv("LOWMOE_FAULT", "layer-written:1:enospc")  # the first run stops after layer 0
    with pytest.raises(OutputError, match="disk full"):
        lowmoe.prune(model, out, keep=4, calib=[calib_txt], n_samples=4, seq_len=16, batch_size=2, progress=False)
    monkeypatch.delenv("LOWMOE_FAULT")
    assert (out / MANIFEST).is_file()
    path = shard_of(model, EXPERT_KEY)
    tensors = load_file(str(path))
    tensors[EXPERT_KEY] = tensors[EXPERT_KEY] * 2  # same size, same header: only the data and the time differ
    save_file(tensors, str(path), metadata={"format": "pt"})
    st = path.stat()
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    r = CliRunner().invoke(main, ["-q", "prune", str(model), str(out), "--calib", str(calib_txt), *PRUNE, "--resume"])
    assert r.exit_code == 2 and r.output.count("\n") == 1, r.output
    assert f"{path.name}: input shard changed since the run" in r.output
    assert (out / MANIFEST).is_file() and not (out / "model.safetensors.index.json").exists()


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_nan_or_inf_in_an_expert_weight_names_layer_and_expert(model, calib_txt, tmp_path, value):
    path = shard_of(model, EXPERT_KEY)
    tensors = load_file(str(path))
    tensors[EXPERT_KEY][2, 5] = value
    save_file(tensors, str(path), metadata={"format": "pt"})
    line = refused(tmp_path, model, "--calib", calib_txt, match=f"{path.name}: tensor {EXPERT_KEY!r} (layer 1, expert 3)")
    assert "NaN/Inf" in line


def test_nan_in_a_fused_expert_weight_names_the_expert(synth_dir, calib_txt, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(synth_dir("gpt_oss", layers=2), model)
    wm = json.loads((model / "model.safetensors.index.json").read_text())["weight_map"]
    key = next(k for k in wm if k.startswith("model.layers.0.") and "experts.down_proj" in k and k.endswith("_proj"))
    tensors = load_file(str(model / wm[key]))
    tensors[key][6].view(-1)[0] = float("nan")
    save_file(tensors, str(model / wm[key]), metadata={"format": "pt"})
    refused(tmp_path, model, "--calib", calib_txt, match="(layer 0, expert 6)")


def test_inf_in_calibration_activations_names_the_layer(model, calib_txt, tmp_path):
    key = "model.layers.0.self_attn.o_proj.weight"
    path = shard_of(model, key)
    tensors = load_file(str(path))
    tensors[key].fill_(3e38)  # finite weights whose outputs overflow float32
    save_file(tensors, str(path), metadata={"format": "pt"})
    line = refused(tmp_path, model, "--calib", calib_txt, match="the outputs of layer 0 contain NaN/Inf")
    assert "chunk" in line


@pytest.mark.parametrize("keep,match", [([0, 1, 1, 2], "keeps an expert twice"), ([0, 1, 2, 8], "outside 0..7"),
                                        ([0, 1, 2, -1], "outside 0..7")])
def test_plan_lists_an_expert_twice_or_out_of_range(model, tmp_path, keep, match):
    plan = {"format": "lowmoe-plan/1", "num_experts_per_tok": 2, "layers": {"0": {"keep": [0, 1, 2, 3]}, "1": {"keep": keep}}}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    line = refused(tmp_path, model, "--plan", tmp_path / "plan.json", match="plan.json: layer 1", extra=[])
    assert match in line


@pytest.mark.parametrize("experts,match", [(6, "'num_local_experts' is 6 but the index has expert 7 in layer 0"),
                                           (10, "the index has no tensor model.layers.0.block_sparse_moe.experts.8")])
def test_config_and_index_disagree_on_the_expert_count(model, calib_txt, tmp_path, experts, match):
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_local_experts"] = experts
    (model / "config.json").write_text(json.dumps(cfg))
    refused(tmp_path, model, "--calib", calib_txt, match=match)


def test_fused_expert_count_disagrees(synth_dir, calib_txt, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(synth_dir("gpt_oss", layers=2), model)
    cfg = json.loads((model / "config.json").read_text())
    cfg["num_local_experts"] = 6
    (model / "config.json").write_text(json.dumps(cfg))
    refused(tmp_path, model, "--calib", calib_txt, match="'num_local_experts' is 6 but model.layers.0.mlp.experts.")


@pytest.mark.parametrize("name,text", [("empty.jsonl", ""), ("blank.jsonl", "\n\n  \n"), ("empty.txt", "")])
def test_empty_calibration_file(model, tmp_path, name, text):
    (tmp_path / name).write_text(text)
    refused(tmp_path, model, "--calib", tmp_path / name, match=f"{name}: calibration file is empty")


def test_missing_tokenizer(model, calib_txt, tmp_path):
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (model / name).unlink()
    refused(tmp_path, model, "--calib", calib_txt, match=f"{model}: no tokenizer")
    assert not (tmp_path / "out").exists(), "refused before the output was created"


@pytest.mark.parametrize("key,value,match", [("num_hidden_layers", "2", "'num_hidden_layers' is '2'"),
                                             ("num_experts_per_tok", 0, "'num_experts_per_tok' is 0"),
                                             ("num_experts_per_tok", 9, "has only 8 experts"),
                                             ("num_local_experts", True, "'num_local_experts' is True")])
def test_config_values_of_the_wrong_kind(model, calib_txt, tmp_path, key, value, match):
    cfg = json.loads((model / "config.json").read_text())
    cfg[key] = value
    (model / "config.json").write_text(json.dumps(cfg))
    refused(tmp_path, model, "--calib", calib_txt, match=match)


def test_error_in_a_reader_thread_is_one_line(model, calib_txt, tmp_path):
    """A NaN in layer 1 is found by the prefetch thread (layer 1 is read while layer 0 computes)."""
    key = "model.layers.1.block_sparse_moe.gate.weight"
    path = shard_of(model, key)
    tensors = load_file(str(path))
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    refused(tmp_path, model, "--calib", calib_txt, match="(layer 1) has 1 NaN/Inf")
    refused(tmp_path, model, "--calib", calib_txt, "--overwrite", match="(layer 1) has 1 NaN/Inf")


def test_unexpected_error_is_one_line_without_traceback(model, calib_txt, tmp_path, monkeypatch):
    """A bug (not a user error) still prints one line, exit 1, and the traceback only with -vv."""
    import lowmoe.engine.writer as writer

    def boom(*a, **k):
        raise RuntimeError("something\nbroke")

    monkeypatch.setattr(writer.ShardWriter, "finalize", boom)
    r = CliRunner().invoke(main, ["-q", "prune", str(model), str(tmp_path / "o"), "--calib", str(calib_txt), *PRUNE])
    assert r.exit_code == 1 and "Traceback" not in r.output and r.output.count("\n") == 1, r.output
    assert "internal error: RuntimeError: something broke" in r.output and "-vv" in r.output
    r = CliRunner().invoke(main, ["-vv", "prune", str(model), str(tmp_path / "o2"), "--calib", str(calib_txt), *PRUNE])
    assert isinstance(r.exception, RuntimeError)
