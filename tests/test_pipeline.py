"""The streamed prune run: plans, determinism, resume, output safety."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

import lowmoe
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.errors import OutputError
from lowmoe.pipeline import MANIFEST, REPORT

from .helpers import dir_digest, prune_killed_after_layer

OPTS = dict(keep=4, method="frequency", n_samples=8, seq_len=32, batch_size=4, progress=False)


def model_files(path):
    """Digests of every output file except the report (it holds timings)."""
    return {k: v for k, v in dir_digest(path).items() if k != REPORT}


def test_frequency_prune_end_to_end(synth_dir, calib_txt, tmp_path):
    src = synth_dir("mixtral")
    before = dir_digest(src)
    report = lowmoe.prune(src, tmp_path / "out", calib=[calib_txt], **OPTS)
    assert dir_digest(src) == before, "the input model must never be modified"
    out = tmp_path / "out"
    assert (out / "model.safetensors.index.json").is_file() and (out / REPORT).is_file()
    assert not (out / MANIFEST).exists() and not (out / ".lowmoe-work").exists()
    plan = report["plan"]
    assert plan["format"] == "lowmoe-plan/1" and set(plan["layers"]) == {"0", "1", "2"}
    for L, lp in plan["layers"].items():
        assert len(lp["keep"]) == 4 and lp["keep"] == sorted(lp["keep"])
        scores = report["scores"][L]
        # the kept experts are the 4 most frequently routed ones
        assert sorted(lp["keep"]) == sorted(sorted(range(8), key=lambda e: (-scores[e], e))[:4])
        assert abs(sum(scores) - 1.0) < 1e-9  # frequency = share of top-k assignments
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.num_local_experts == 4
    assert report["memory"]["peak_rss_bytes"] > 0 and report["calibration"]["sequences"] == 8


def test_same_inputs_same_bytes_and_plan_reapply(synth_dir, calib_txt, tmp_path):
    src = synth_dir("qwen2_moe")
    r1 = lowmoe.prune(src, tmp_path / "a", calib=[calib_txt], **OPTS)
    lowmoe.prune(src, tmp_path / "b", calib=[calib_txt], **OPTS)
    assert model_files(tmp_path / "a") == model_files(tmp_path / "b")
    (tmp_path / "plan.json").write_text(json.dumps(r1["plan"]))
    r3 = lowmoe.prune(src, tmp_path / "c", plan=tmp_path / "plan.json", progress=False)
    assert r3["plan"]["layers"] == r1["plan"]["layers"]
    # the weights and every copied file are the same; the model card says how each was made
    card = "README.md"
    assert {k: v for k, v in model_files(tmp_path / "a").items() if k != card} == \
        {k: v for k, v in model_files(tmp_path / "c").items() if k != card}
    assert "applied from" in (tmp_path / "c" / card).read_text() and "applied from" not in (tmp_path / "a" / card).read_text()


def test_sequential_and_one_shot_differ_only_in_later_layers(synth_dir, calib_txt, tmp_path):
    src = synth_dir("mixtral")
    seq = lowmoe.prune(src, tmp_path / "s", calib=[calib_txt], **OPTS)
    one = lowmoe.prune(src, tmp_path / "o", calib=[calib_txt], sequential=False, **OPTS)
    assert seq["scores"]["0"] == one["scores"]["0"]  # layer 0 sees the same inputs either way
    assert seq["scores"]["1"] != one["scores"]["1"]  # layer 1 sees pruned vs original layer-0 outputs


@pytest.mark.parametrize("kill_after", [0, 1])
def test_resume_gives_identical_bytes(synth_dir, calib_txt, tmp_path, monkeypatch, kill_after):
    src = synth_dir("mixtral", layers=4)
    opts = dict(OPTS, max_shard_size="60KB")  # several shards, flushed mid-layer
    lowmoe.prune(src, tmp_path / "ref", calib=[calib_txt], **opts)

    prune_killed_after_layer(monkeypatch, kill_after, src, tmp_path / "out", calib=[calib_txt], **opts)
    out = tmp_path / "out"
    assert (out / MANIFEST).is_file()
    assert not (out / "model.safetensors.index.json").exists(), "a half-finished output must not look finished"
    assert not list(out.glob("model-*.safetensors"))
    with pytest.raises(OutputError, match="not empty"):
        lowmoe.prune(src, out, calib=[calib_txt], **opts)
    report = lowmoe.prune(src, out, calib=[calib_txt], resume=True, **opts)
    assert report["resumed_from_layer"] == kill_after + 1
    assert model_files(out) == model_files(tmp_path / "ref")


def test_resume_refuses_other_options(synth_dir, calib_txt, tmp_path, monkeypatch):
    src = synth_dir("mixtral")
    prune_killed_after_layer(monkeypatch, 0, src, tmp_path / "out", calib=[calib_txt], **OPTS)
    with pytest.raises(OutputError, match="other inputs or options"):
        lowmoe.prune(src, tmp_path / "out", calib=[calib_txt], resume=True, **dict(OPTS, keep=3))


def test_output_safety(synth_dir, calib_txt, tmp_path):
    src = synth_dir("mixtral")
    with pytest.raises(OutputError, match="overlaps the input"):
        lowmoe.prune(src, src, calib=[calib_txt], **OPTS)
    with pytest.raises(OutputError, match="overlaps the input"):
        lowmoe.prune(src, src / "sub", calib=[calib_txt], **OPTS)
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "keep.txt").write_text("user data")
    with pytest.raises(OutputError, match="--overwrite"):
        lowmoe.prune(src, tmp_path / "busy", calib=[calib_txt], **OPTS)
    assert (tmp_path / "busy" / "keep.txt").read_text() == "user data"


def test_top_k_reduction_without_pruning(synth_dir, calib_txt, tmp_path):
    src = synth_dir("mixtral")
    plan = {"format": "lowmoe-plan/1", "num_experts_per_tok": 1,
            "layers": {str(L): {"keep": list(range(8))} for L in range(3)}}
    lowmoe.prune(src, tmp_path / "out", plan=plan, progress=False)
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "out").config.num_experts_per_tok == 1


def test_merge_matrix_plan(synth_dir, tmp_path):
    """A merge row averages two experts' weights; a router row maps router rows the same way."""
    src = synth_dir("mixtral")
    ck = Checkpoint(src)
    m = [[0.0] * 8 for _ in range(4)]
    for j in range(4):
        m[j][2 * j] = m[j][2 * j + 1] = 0.5
    plan = {"format": "lowmoe-plan/1", "num_experts_per_tok": 2,
            "layers": {str(L): {"keep": [0, 2, 4, 6], "merge": m} for L in range(3)}}
    lowmoe.prune(src, tmp_path / "out", plan=plan, progress=False)
    out = Checkpoint(tmp_path / "out")
    p = "model.layers.1.block_sparse_moe."
    a, b = ck.read([p + "experts.2.w1.weight", p + "experts.3.w1.weight"]).values()
    torch.testing.assert_close(out.read([p + "experts.1.w1.weight"])[p + "experts.1.w1.weight"], (a + b) / 2)
    g = ck.read([p + "gate.weight"])[p + "gate.weight"]
    torch.testing.assert_close(out.read([p + "gate.weight"])[p + "gate.weight"][1], (g[2] + g[3]) / 2)


def test_sequential_scores_equal_pruned_model_in_transformers(synth_dir, calib_txt, tmp_path):
    """Layer L+1 is scored on the outputs of the already-pruned layer L: feeding the pruned
    checkpoint (run whole in transformers) through the ORIGINAL layer-(L+1) router gives the same
    routing frequencies as the streamed run."""
    from lowmoe.engine.calibration import load_tokenizer, tokenize

    src = synth_dir("mixtral")
    report = lowmoe.prune(src, tmp_path / "out", calib=[calib_txt], protect_super_experts=False, **OPTS)
    tokens = tokenize([calib_txt], load_tokenizer(src), seq_len=32, n_samples=8)
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    ck = Checkpoint(src)
    router_in = {}
    for i, layer in enumerate(model.model.layers):
        # attention weights are untouched by pruning, so the router input of pruned layer i equals
        # what the original layer i sees when fed the pruned model's hidden states
        layer.mlp.gate.register_forward_pre_hook(lambda mod, args, i=i: router_in.__setitem__(i, args[0]))
    with torch.no_grad():
        model(tokens.input_ids)
    mask = tokens.count_mask.reshape(-1)
    for L in (1, 2):
        w = ck.read([f"model.layers.{L}.block_sparse_moe.gate.weight"]).popitem()[1]
        logits = router_in[L].reshape(-1, w.shape[1])[mask] @ w.T
        idx = torch.topk(torch.softmax(logits, -1), 2, dim=-1).indices
        want = torch.bincount(idx.reshape(-1), minlength=8).double() / idx.numel()
        got = torch.tensor(report["scores"][str(L)], dtype=torch.float64)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
