"""--device / --dtype resolution: valid values, clear errors before any work."""

from __future__ import annotations

import json
import os

import pytest
import torch
from click.testing import CliRunner

from lowmoe.cli import main
from lowmoe.engine.device import (all_finite, describe_device, dtype_bytes, dtype_name, finite_flag, resolve_device,
                                  resolve_dtype)
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.errors import ConfigError
from lowmoe.score import score

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error path")


def test_cpu_and_auto():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device(" CPU ") == torch.device("cpu")
    want = "cuda" if torch.cuda.is_available() else "cpu"
    assert resolve_device("auto").type == want
    assert resolve_device(None).type == want
    assert resolve_device(torch.device("cpu")) == torch.device("cpu")


@pytest.mark.parametrize("bad", ["gpu", "cuda:x", "cuda:-1", "tpu", "mps:0"])
def test_bad_device_names(bad):
    with pytest.raises(ConfigError, match="--device"):
        resolve_device(bad)


@no_cuda
@pytest.mark.parametrize("name", ["cuda", "cuda:0", "cuda:3"])
def test_cuda_without_cuda_is_a_clear_error(name):
    with pytest.raises(ConfigError, match="CUDA is not available.*--device cpu"):
        resolve_device(name)


@pytest.mark.parametrize("name,want", [("bf16", torch.bfloat16), ("bfloat16", torch.bfloat16), ("fp16", torch.float16),
                                       ("float16", torch.float16), ("fp32", torch.float32), ("FP32", torch.float32)])
def test_dtypes(name, want):
    assert resolve_dtype(name, torch.device("cpu")) is want
    assert dtype_bytes(want) == {torch.float32: 4}.get(want, 2)
    assert dtype_name(want) == {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32"}[want]


def test_bad_dtype():
    with pytest.raises(ConfigError, match="--dtype 'int8'.*bf16, fp16, fp32"):
        resolve_dtype("int8")


def test_describe_cpu():
    d = describe_device(torch.device("cpu"))
    assert d == {"device": "cpu", "threads": torch.get_num_threads(), "cpus": os.cpu_count()}


@no_cuda
def test_cli_prune_cuda_on_cpu_machine_fails_fast(synth_dir, calib_txt, tmp_path):
    r = CliRunner().invoke(main, ["prune", str(synth_dir("mixtral")), str(tmp_path / "o"), "--keep", "4",
                                  "--calib", str(calib_txt), "--device", "cuda"])
    assert r.exit_code == 2, r.output
    assert "--device cuda: CUDA is not available" in r.output
    assert not (tmp_path / "o").exists(), "nothing may be written before the options are checked"


def test_cli_prune_bf16_alias_runs(synth_dir, calib_txt, tmp_path):
    """``--dtype bf16`` computes in bfloat16: its scores are lowmoe.score's bf16 scores, not the fp32 ones;
    the written weights keep the checkpoint's stored dtype."""
    src = synth_dir("mixtral")
    cal = ["--n-samples", "4", "--seq-len", "16", "--batch-size", "2"]
    reports = {}
    for name in ("bf16", "fp32"):
        r = CliRunner().invoke(main, ["-q", "prune", str(src), str(tmp_path / name), "--keep", "4", "--method", "reap",
                                      "--calib", str(calib_txt), "--device", "cpu", "--dtype", name, "--one-shot", *cal])
        assert r.exit_code == 0, r.output
        reports[name] = json.loads((tmp_path / name / "lowmoe_report.json").read_text())
    bf16 = score(src, calib=[calib_txt], method="reap", dtype="bf16", progress=False, n_samples=4, seq_len=16, batch_size=2)
    assert bf16["options"]["dtype"] == "bf16"
    for L, s in reports["bf16"]["scores"].items():
        assert s == pytest.approx(bf16["layers"][L]["scores"]["reap"], rel=1e-5), L
        assert s != pytest.approx(reports["fp32"]["scores"][L], rel=1e-6), L  # bf16 rounding shows
        assert s == pytest.approx(reports["fp32"]["scores"][L], rel=0.05), L
    stored = Checkpoint(src).read(["model.embed_tokens.weight"])["model.embed_tokens.weight"].dtype
    out = Checkpoint(tmp_path / "bf16").read(["model.embed_tokens.weight"])["model.embed_tokens.weight"]
    assert out.dtype == stored


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_finite_flag_finds_any_nan_or_inf(dtype):
    """One NaN or +/-Inf anywhere (vector tails, strided views) makes the flag false; finite tensors pass."""
    gen = torch.Generator().manual_seed(0)
    for n in (1, 7, 16, 33, 129, 4097):
        x = torch.randn(n, generator=gen).to(dtype)
        assert all_finite(x) and all_finite(x.view(1, -1).t())
        for bad in (float("nan"), float("inf"), float("-inf")):
            pos = int(torch.randint(n, (1,), generator=gen))
            y = x.clone()
            y[pos] = bad
            assert not all_finite(y), (n, pos, bad)
            assert not bool(finite_flag(y.view(1, -1).t()))
    m = torch.randn(64, 33, generator=gen).to(dtype)
    m[5, 7] = float("nan")
    assert not all_finite(m.t()) and all_finite(m[6:].t())


def test_finite_flag_on_empty_and_other_dtypes():
    assert all_finite(torch.empty(0, 3))
    f8 = torch.zeros(4, dtype=torch.float8_e4m3fn)
    assert all_finite(f8)
    f8[2] = float("nan")
    assert not all_finite(f8)  # no aminmax for fp8 on CPU: isfinite's path
