"""Bad input: one clear line naming what is wrong, a non-zero exit, and nothing lost."""

from __future__ import annotations

import errno
import json
import shutil

import pytest
from click.testing import CliRunner

import lowmoe
from lowmoe.cli import main
from lowmoe.errors import (CalibrationError, CheckpointError, ConfigError, OutputError, PlanError,
                           UnsupportedModelError)

from .helpers import dir_digest

OPTS = dict(n_samples=4, seq_len=32, batch_size=4, progress=False)


@pytest.fixture
def model_copy(synth_dir, tmp_path):
    dst = tmp_path / "model"
    shutil.copytree(synth_dir("mixtral"), dst)
    return dst


def run_cli(*args):
    result = CliRunner().invoke(main, ["-q", *map(str, args)])
    return result.exit_code, result.output


def test_missing_shard(model_copy, calib_txt, tmp_path):
    shard = sorted(model_copy.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}.*missing"):
        lowmoe.prune(model_copy, tmp_path / "out", keep=4, calib=[calib_txt], **OPTS)


def test_corrupt_shard(model_copy, calib_txt, tmp_path):
    shard = sorted(model_copy.glob("model-*.safetensors"))[0]
    shard.write_bytes(shard.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=shard.name):
        lowmoe.prune(model_copy, tmp_path / "out", keep=4, calib=[calib_txt], **OPTS)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_index_names_missing_tensor(model_copy, calib_txt, tmp_path):
    idx = model_copy / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    key = "model.layers.1.block_sparse_moe.experts.3.w2.weight"
    del data["weight_map"][key]
    idx.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="experts.3.w2.weight"):
        lowmoe.prune(model_copy, tmp_path / "out", keep=4, calib=[calib_txt], **OPTS)


def test_index_points_to_wrong_shard(model_copy, calib_txt, tmp_path):
    idx = model_copy / "model.safetensors.index.json"
    data = json.loads(idx.read_text())
    key = "model.layers.0.self_attn.q_proj.weight"
    other = next(s for s in sorted(set(data["weight_map"].values())) if s != data["weight_map"][key])
    data["weight_map"][key] = other
    idx.write_text(json.dumps(data))
    with pytest.raises(CheckpointError, match="q_proj.weight"):
        lowmoe.prune(model_copy, tmp_path / "out", keep=4, calib=[calib_txt], **OPTS)


def test_unsupported_family_lists_supported(model_copy, calib_txt, tmp_path):
    cfg = json.loads((model_copy / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "llama", ["LlamaForCausalLM"]
    (model_copy / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="supported: mixtral, qwen2_moe"):
        lowmoe.prune(model_copy, tmp_path / "out", keep=4, calib=[calib_txt], **OPTS)


@pytest.mark.parametrize("keep,msg", [(1, "experts per token"), (8, "must be <"), (9, "only 8"), ("lots", "expected an expert count")])
def test_bad_keep(synth_dir, calib_txt, tmp_path, keep, msg):
    with pytest.raises(ConfigError, match=msg):
        lowmoe.prune(synth_dir("mixtral"), tmp_path / "out", keep=keep, calib=[calib_txt], **OPTS)
    assert not (tmp_path / "out").exists()  # failed before touching the output


def test_calibration_errors(synth_dir, tmp_path):
    src = synth_dir("mixtral")
    with pytest.raises(ConfigError, match="nope.txt: file not found"):
        lowmoe.prune(src, tmp_path / "o1", keep=4, calib=[tmp_path / "nope.txt"], **OPTS)
    (tmp_path / "empty.txt").write_text("  \n")
    with pytest.raises(CalibrationError, match="empty.txt: calibration file is empty"):
        lowmoe.prune(src, tmp_path / "o2", keep=4, calib=[tmp_path / "empty.txt"], **OPTS)
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a", "answer": "b"}\n{oops\n')
    with pytest.raises(CalibrationError, match="bad.jsonl:2: not valid JSON"):
        lowmoe.prune(src, tmp_path / "o3", keep=4, calib=[tmp_path / "bad.jsonl"], **OPTS)
    (tmp_path / "fields.jsonl").write_text('{"question": "a"}\n')
    with pytest.raises(CalibrationError, match="fields.jsonl:1: record has none of the fields"):
        lowmoe.prune(src, tmp_path / "o4", keep=4, calib=[tmp_path / "fields.jsonl"], **OPTS)


def test_plan_errors(synth_dir, tmp_path):
    src = synth_dir("mixtral")
    bad = {"format": "lowmoe-plan/1", "num_experts_per_tok": 2, "layers": {"0": {"keep": [0, 1, 2, 3]}}}
    with pytest.raises(PlanError, match="missing \\[1, 2\\]"):
        lowmoe.prune(src, tmp_path / "o", plan=bad, progress=False)
    bad["layers"] = {str(i): {"keep": [0, 1, 2, 30]} for i in range(3)}
    with pytest.raises(PlanError, match="outside 0..7"):
        lowmoe.prune(src, tmp_path / "o", plan=bad, progress=False)
    bad["layers"] = {"0": {"keep": [0, 1, 2]}, "1": {"keep": [0, 1, 2, 3]}, "2": {"keep": [0, 1, 2, 3]}}
    with pytest.raises(PlanError, match="same number of experts"):
        lowmoe.prune(src, tmp_path / "o", plan=bad, progress=False)
    (tmp_path / "p.json").write_text("{not json")
    with pytest.raises(PlanError, match="p.json: plan is not valid JSON"):
        lowmoe.prune(src, tmp_path / "o", plan=tmp_path / "p.json", progress=False)


def test_disk_full_is_one_line_and_resumable(synth_dir, calib_txt, tmp_path, monkeypatch):
    import lowmoe.engine.writer as writer

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(writer.OpenShard, "add", full)
    with pytest.raises(OutputError, match="disk full.*--resume"):
        lowmoe.prune(synth_dir("mixtral"), tmp_path / "out", keep=4, calib=[calib_txt], max_shard_size="40KB", **OPTS)
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()


def test_cli_error_is_one_line_without_traceback(synth_dir, calib_txt, tmp_path):
    src = synth_dir("mixtral")
    before = dir_digest(src)
    code, out = run_cli("prune", src, tmp_path / "out", "--keep", "1", "--calib", calib_txt)
    assert code == 2
    lines = [ln for ln in out.strip().splitlines() if ln]
    assert len(lines) == 1 and lines[0].startswith("lowmoe: error: --keep 1") and "Traceback" not in out
    code, out = run_cli("prune", tmp_path / "nowhere", tmp_path / "out", "--keep", "4", "--calib", calib_txt)
    assert code == 2 and "not a directory" in out
    assert dir_digest(src) == before


def test_cli_synth_inspect_prune_plan(calib_txt, tmp_path):
    code, out = run_cli("synth", tmp_path / "m", "--arch", "olmoe", "--layers", "2", "--hidden-size", "32",
                        "--intermediate-size", "32", "--shard-size", "30KB")
    assert code == 0, out
    code, out = run_cli("inspect", tmp_path / "m")
    assert code == 0 and "olmoe" in out and "8 per MoE layer, top-2" in out
    code, out = run_cli("prune", tmp_path / "m", tmp_path / "p", "--keep", "half", "--calib", calib_txt,
                        "--n-samples", "4", "--seq-len", "32", "--save-plan", tmp_path / "plan.json")
    assert code == 0, out
    assert json.loads((tmp_path / "plan.json").read_text())["format"] == "lowmoe-plan/1"
    code, out = run_cli("prune", tmp_path / "m", tmp_path / "p2", "--plan", tmp_path / "plan.json")
    assert code == 0, out


@pytest.mark.parametrize("where", ["before", "after"])
def test_verbose_flags_before_or_after_the_subcommand(synth_dir, calib_txt, tmp_path, where):
    """README lists -v / -vv with prune's options: they work after the subcommand as well as before it."""
    src = synth_dir("mixtral")
    args = ["prune", str(src), str(tmp_path / "o"), "--keep", "9", "--calib", str(calib_txt)]
    flag = lambda f: [f, *args] if where == "before" else [*args, f]  # noqa: E731
    r = CliRunner().invoke(main, flag("-vv"))  # -vv: the error propagates with its traceback
    assert isinstance(r.exception, ConfigError) and "--keep" in str(r.exception), r.output
    r = CliRunner().invoke(main, flag("-v"))  # -v: still the one-line error, exit 2
    assert r.exit_code == 2 and "No such option" not in r.output and "lowmoe: error: --keep" in r.output, r.output
    ok = ["prune", str(src), str(tmp_path / "ok"), "--keep", "4", "--calib", str(calib_txt), "--n-samples", "2", "--seq-len", "16"]
    r = CliRunner().invoke(main, ok + ["-q"] if where == "after" else ["-q", *ok])
    assert r.exit_code == 0 and "it/s" not in r.output and "layer   0: keep" in r.output, r.output  # -q: no progress bars


def test_output_piped_into_a_closed_reader_prints_no_error():
    """``lowmoe families | head -1``: the reader closes the pipe early; lowmoe stops without a message."""
    import subprocess
    import sys

    r = subprocess.run(f"{sys.executable} -m lowmoe families | head -1", shell=True, capture_output=True, text=True,
                       timeout=120)
    assert r.stdout.startswith("mixtral") and len(r.stdout.splitlines()) == 1
    assert r.stderr == "", r.stderr
