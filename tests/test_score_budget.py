"""``lowmoe score`` under --max-ram / --max-vram and with or without prefetching: same scores; and the
flags' errors (budget too small, a device that is not there) are one line, before any work."""

from __future__ import annotations

import math

import pytest
import torch
from click.testing import CliRunner

from lowmoe.engine.budget import SAFETY, layer_sizes, plan_budget
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.cli import main
from lowmoe.score import score

from .helpers import lazy_chunking_ram

CAL = {"seq_len": 16, "n_samples": 4, "batch_size": 2, "progress": False, "device": "cpu"}
METHODS = ["frequency", "reap", "easy-ep"]


@pytest.mark.parametrize("arch", ["mixtral", "qwen2_moe"])
def test_scores_equal_with_ram_budget_and_without_prefetch(synth_dir, calib_txt, arch):
    model = synth_dir(arch)
    ref = score(model, calib=[calib_txt], method=METHODS, keep=4, **CAL)
    E = Checkpoint(model).num_experts
    # unbudgeted: each layer's experts are read from the shards as one group (the whole layer)
    assert set(ref["budget"]["group_sizes"].values()) == {E} and ref["options"]["device"] == "cpu"
    ram = lazy_chunking_ram(model, CAL["batch_size"], CAL["seq_len"])
    small = score(model, calib=[calib_txt], method=METHODS, keep=4, max_ram=ram, **CAL)
    serial = score(model, calib=[calib_txt], method=METHODS, keep=4, prefetch=False, **CAL)
    moe = sorted(int(L) for L in ref["layers"])
    assert small["budget"]["chunked_layers"] == moe, "the RAM budget must force expert chunking"
    assert max(small["budget"]["group_sizes"].values()) < E
    assert small["budget"]["plan"]["max_ram"] == ram
    for other in (small, serial):
        for L, e in ref["layers"].items():
            assert other["layers"][L]["scores"] == e["scores"], L  # bit-identical, not just close
            assert other["layers"][L]["keep"] == e["keep"], L
    io = serial["io"]
    assert io["wait_s"]["layer"] >= io["read_s"]["layer"] - 2e-4  # nothing overlapped: every read waited for


def test_max_vram_rehearsal_on_cpu(synth_dir, calib_txt):
    model = synth_dir("mixtral")
    ck = Checkpoint(model)
    base = plan_budget(ck, device=torch.device("cpu"), dtype=torch.float32, batch_size=2, seq_len=16)
    L = layer_sizes(ck)[0]
    vram = math.ceil((base.activation_bytes + L.resident_bytes(4) + 2 * L.expert_bytes(4)) / (1 - SAFETY)) + 1
    ref = score(model, calib=[calib_txt], method="reap", **CAL)
    rep = score(model, calib=[calib_txt], method="reap", max_vram=vram, **CAL)
    assert set(rep["budget"]["group_sizes"].values()) == {1}
    assert rep["budget"]["accounted_peak_bytes"] <= vram
    assert all(rep["layers"][k]["scores"] == v["scores"] for k, v in ref["layers"].items())


@pytest.mark.parametrize("args, message", [
    (["--max-vram", "20KB"], "--max-vram 20.0 KB"),
    (["--max-ram", "100MB"], "--max-ram 100.0 MB is too small"),
    (["--max-vram", "lots"], "--max-vram 'lots': expected a size such as 20GiB"),
    (["--device", "tpu"], "--device 'tpu': expected auto, cpu, cuda or cuda:N"),
    (["--dtype", "int4"], "Invalid value for '--dtype'"),
])
def test_score_cli_flag_errors(synth_dir, calib_txt, args, message, tmp_path):
    r = CliRunner().invoke(main, ["score", str(synth_dir("mixtral")), "--calib", str(calib_txt), "--device", "cpu",
                                  "--out", str(tmp_path / "s.json"), *args])
    assert r.exit_code == 2, r.output
    assert message in r.output, r.output
    if "Invalid value" not in message:
        lines = [x for x in r.output.splitlines() if x.strip()]
        assert len(lines) == 1 and lines[0].startswith("lowmoe: error: "), r.output
    assert not (tmp_path / "s.json").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_score_cuda_without_cuda_is_a_clean_error(synth_dir, calib_txt):
    r = CliRunner().invoke(main, ["score", str(synth_dir("mixtral")), "--calib", str(calib_txt), "--device", "cuda"])
    assert r.exit_code == 2
    assert "lowmoe: error: --device cuda: CUDA is not available on this machine" in r.output
    assert "use --device cpu or auto" in r.output


def test_score_cli_defaults_to_auto(synth_dir, calib_txt, tmp_path):
    out = tmp_path / "s.json"
    r = CliRunner().invoke(main, ["-q", "score", str(synth_dir("mixtral")), "--calib", str(calib_txt), "--seq-len", "16",
                                  "--n-samples", "4", "--out", str(out), "--dtype", "bf16", "--no-prefetch", "--json"])
    assert r.exit_code == 0, r.output
    import json

    opts = json.loads(out.read_text())["options"]
    want = "cuda:0" if torch.cuda.is_available() else "cpu"
    assert opts["device"] == want and opts["dtype"] == "bf16" and opts["prefetch"] is False


def test_reconstruction_scores_under_expert_chunking(synth_dir, calib_txt):
    """reconstruction runs the experts itself (its Gram matrix of expert outputs); on an expert-chunked
    layer it must find the device and dtype from the experts' input, and give the same keep-sets."""
    model = synth_dir("mixtral")
    ref = score(model, calib=[calib_txt], method="reconstruction", keep=4, **CAL)
    small = score(model, calib=[calib_txt], method="reconstruction", keep=4,
                  max_ram=lazy_chunking_ram(model, CAL["batch_size"], CAL["seq_len"]), **CAL)
    assert small["budget"]["chunked_layers"] == sorted(int(L) for L in ref["layers"])
    for L, e in ref["layers"].items():
        assert small["layers"][L]["keep"] == e["keep"], L
