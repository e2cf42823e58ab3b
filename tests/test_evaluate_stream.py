"""Streaming evaluation through ``pipeline.Stream``: budgets, prefetching, device/dtype flags;
``lowmoe -q demo`` prints no progress bars."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from lowmoe.toy import tasks
from lowmoe.engine.budget import plan_lazy_budget
from lowmoe.engine.calibration import load_tokenizer
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.cli import main
from lowmoe.cli.eval import eval_command
from lowmoe.errors import ConfigError
from lowmoe.evaluate import evaluate, load_items


def qa_file(tmp_path, n=12):
    path = tmp_path / "qa.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"q{i}: {'ab' * i}=", "answer": f"{i}\n"}) + "\n" for i in range(n)))
    return path


def chunking_vram(model, jsonl, batch_size: int) -> int:
    """The smallest --max-vram a streaming eval of ``jsonl`` can run under: its experts are read from
    the shards in groups (as prune and score read them), here of one or two experts."""
    ck = Checkpoint(model)
    items = load_items(load_tokenizer(model), jsonl=jsonl, n=100)["qa"]
    width = max(len(it.prompt_ids) + len(it.answer_ids) for it in items)
    kw = dict(device=torch.device("cpu"), dtype=torch.float32, batch_size=batch_size, seq_len=width,
              num_chunks=-(-len(items) // batch_size))

    def fits(vram: int) -> bool:
        try:
            plan_lazy_budget(ck, max_vram=vram, **kw)
            return True
        except ConfigError:
            return False

    lo, hi = 1, 4 * ck.total_bytes()
    assert fits(hi)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (lo, mid) if fits(mid) else (mid + 1, hi)
    return lo


@pytest.mark.parametrize("arch", ["mixtral", "deepseek_v3"])
def test_streaming_same_with_chunking_and_without_prefetch(synth_dir, tmp_path, arch):
    model, path = synth_dir(arch), qa_file(tmp_path)
    kw = {"jsonl": path, "n": 12, "mode": "streaming", "batch_size": 4, "device": "cpu"}
    ref = evaluate(model, **kw)
    vram = chunking_vram(model, path, 4)
    small = evaluate(model, max_vram=vram, **kw)
    serial = evaluate(model, prefetch=False, **kw)
    moe = sorted(Checkpoint(model).moe_layers())
    E = Checkpoint(model).num_experts
    # every MoE layer's experts read from the shards in groups: one group of all E without a budget
    assert ref["budget"]["chunked_layers"] == small["budget"]["chunked_layers"] == moe
    assert set(ref["budget"]["group_sizes"].values()) == {E} and max(small["budget"]["group_sizes"].values()) <= 2
    assert small["budget"]["accounted_peak_bytes"] <= vram
    for other in (small, serial):
        a, b = ref["tasks"]["qa"], other["tasks"]["qa"]
        assert a["correct"] == b["correct"] and a["perplexity"] == b["perplexity"]  # bit-identical
    assert ref["io"]["count"]["layer"] == len(moe) + (Checkpoint(model).num_layers - len(moe))
    assert ref["device"] == "cpu" and ref["dtype"] == "fp32"


def test_streaming_bf16_close_to_fp32():
    kw = {"tasks": "reverse,sort", "n": 30, "mode": "streaming", "batch_size": 30, "device": "cpu"}
    fp32, bf16 = evaluate(tasks.TOY_MODEL, **kw), evaluate(tasks.TOY_MODEL, dtype="bf16", **kw)
    assert bf16["dtype"] == "bf16"
    for name, r in fp32["tasks"].items():
        b = bf16["tasks"][name]
        assert b["perplexity"] == pytest.approx(r["perplexity"], rel=0.05)  # bf16 rounding, fp32 log-probs
        assert sum(x != y for x, y in zip(r["correct"], b["correct"])) <= 3


@pytest.mark.parametrize("args, message", [
    (["--max-vram", "1GiB"], "--max-vram: only used with --streaming"),
    (["--quant", "nf4"], "--quant: only used with --streaming"),
    (["--streaming", "--max-ram", "10MB"], "--max-ram 10.0 MB is too small"),
    (["--streaming", "--max-vram", "1KB"], "--max-vram 1.0 KB"),
    (["--device", "cuda:x"], "--device 'cuda:x': expected auto, cpu, cuda or cuda:N"),
])
def test_eval_flag_errors_are_one_line(args, message):
    res = CliRunner().invoke(eval_command, ["toy", "--tasks", "sort", "--n", "4", *args])
    assert res.exit_code == 2, res.output
    lines = [x for x in res.output.splitlines() if x.strip()]
    assert len(lines) == 1 and lines[0].startswith("lowmoe: error:") and message in lines[0], res.output


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message for a machine without CUDA")
def test_eval_cuda_without_cuda():
    res = CliRunner().invoke(eval_command, ["toy", "--tasks", "sort", "--n", "4", "--device", "cuda", "--streaming"])
    assert res.exit_code == 2 and "--device cuda: CUDA is not available on this machine" in res.output
    assert "use --device cpu or auto" in res.output


def test_eval_cli_dtype_and_budget(tmp_path):
    out = tmp_path / "r.json"
    res = CliRunner().invoke(main, ["-q", "eval", "toy", "--tasks", "sort", "--n", "8", "--streaming", "--dtype", "bf16",
                                    "--max-ram", "8GiB", "--no-prefetch", "--json", str(out)])
    assert res.exit_code == 0, res.output
    r = json.loads(out.read_text())["result"]
    assert r["dtype"] == "bf16" and r["budget"]["plan"]["max_ram"] == 8 * 2**30
    assert r["budget"]["plan"]["prefetch_layers"] is False
    assert "bf16" in res.output


BAR_CHARS = ("█", "▏", "▎", "▍", "▌", "▋", "▊", "▉", "it/s", "layer/s", "s/layer")


def test_quiet_demo_prints_no_progress_bars(tmp_path, monkeypatch):
    import lowmoe.evaluate as ev

    real = ev.prune_and_compare
    monkeypatch.setattr("lowmoe.cli.commands.prune_and_compare", lambda **kw: real(**kw, calib_n=8))  # the real demo, less calibration
    args = ["demo", "--domain", "reverse", "--method", "frequency", "--n", "4", "--out", str(tmp_path / "d")]
    quiet = CliRunner().invoke(main, ["-q", *args])
    assert quiet.exit_code == 0, quiet.output
    assert "held-out exact match" in quiet.stdout
    assert not any(c in quiet.stderr for c in BAR_CHARS), quiet.stderr[:500]
    loud = CliRunner().invoke(main, args)  # the same run shows bars without -q: the check above can fail
    assert loud.exit_code == 0 and any(c in loud.stderr for c in BAR_CHARS)


def test_demo_on_the_learned_toy_with_eep_picks_on_held_out_calibration_examples(tmp_path, monkeypatch):
    """``lowmoe demo --toy learned --method eep``: the learned toy is pruned, the search gets a dev file
    of calibration-split examples it did not search on, and the table compares with the full model."""
    import lowmoe.evaluate as ev
    from lowmoe.toy import tasks

    real = ev.prune_and_compare
    seen = {}

    def small(**kw):  # the real demo, a small search
        seen.update(kw)
        return real(**kw, calib_n=8, method_options={"generations": 2, "population": 4})

    monkeypatch.setattr("lowmoe.cli.commands.prune_and_compare", small)
    out = tmp_path / "d"
    res = CliRunner().invoke(main, ["-q", "demo", "--toy", "learned", "--method", "eep", "--n", "4", "--out", str(out)])
    assert res.exit_code == 0, res.output
    assert seen["model"] == tasks.TOY_MODEL_LEARNED and "pruned the learned toy MoE for 'sort' with eep" in res.stdout
    assert "held-out exact match" in res.stdout and "Δexact" in res.stdout
    report = json.loads((out / "lowmoe_report.json").read_text())
    assert Path(report["input"]) == tasks.TOY_MODEL_LEARNED
    data = report["eep"]["fitness_data"]
    assert data["train"]["examples"] == 8 and data["dev"]["examples"] == 8
    calib, dev = (tasks.read_jsonl(tmp_path / "d-calib" / f"sort-{s}.jsonl") for s in ("calib", "dev"))
    assert len(dev) == 8 and not {r["prompt"] for r in calib} & {r["prompt"] for r in dev}
