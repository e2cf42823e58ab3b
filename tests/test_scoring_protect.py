"""Super-expert protection and domain-specific plans on synthetic checkpoints built for the purpose."""

from __future__ import annotations

import random
from pathlib import Path

import torch

import lowmoe
from lowmoe.engine.calibration import load_tokenizer
from lowmoe.score import score
from lowmoe.methods.scoring.super_experts import find_super_experts
from lowmoe.toy.synth import synth_model

from .helpers import edit_checkpoint

CAL = {"seq_len": 32, "n_samples": 6, "batch_size": 3}


def test_thresholds():
    m = torch.ones(400, dtype=torch.float64) + torch.linspace(0, 0.01, 400)
    m[10], m[20], m[30] = 50.0, 8.0, 4.0  # 4 is below max/10 = 5 and below the 99.5th percentile
    found, summary = find_super_experts({0: m[:200], 1: m[200:]})
    assert found == {0: {10, 20}}
    assert summary["threshold"] > 4.0 and summary["global_max"] == 50.0
    assert [(s["layer"], s["expert"]) for s in summary["super_experts"]] == [(0, 10), (0, 20)]


def test_planted_super_expert_is_protected(tmp_path, calib_txt):
    path = synth_model(tmp_path / "m", "mixtral", layers=3, hidden_size=32, intermediate_size=32, experts=8, top_k=2,
                       shard_size="40KB")
    usage = score(path, calib=[calib_txt], method="frequency", protect_super_experts=False, progress=False, **CAL)
    s1 = usage["layers"]["1"]["scores"]["frequency"]
    planted = min((e for e in range(8) if s1[e] > 0), key=lambda e: s1[e])  # the least used expert of layer 1
    edit_checkpoint(path, lambda k, v: v * 1000 if k == f"model.layers.1.block_sparse_moe.experts.{planted}.w2.weight" else v)

    rep = lowmoe.prune(path, tmp_path / "o", keep=2, method="frequency", calib=[calib_txt], progress=False, **CAL)
    assert rep["protected_experts"] == {"0": [], "1": [planted], "2": []}
    assert planted in rep["plan"]["layers"]["1"]["keep"]
    assert [(s["layer"], s["expert"]) for s in rep["super_experts"]["super_experts"]] == [(1, planted)]
    off = lowmoe.prune(path, tmp_path / "o2", keep=2, method="frequency", calib=[calib_txt], progress=False,
                       protect_super_experts=False, **CAL)
    assert planted not in off["plan"]["layers"]["1"]["keep"]
    # lowmoe score finds it from the scoring pass itself, and names it
    rep2 = score(path, calib=[calib_txt], method="reap", keep=2, progress=False, **CAL)
    assert [(s["layer"], s["expert"]) for s in rep2["super_experts"]["super_experts"]] == [(1, planted)]
    assert planted in rep2["layers"]["1"]["keep"]["reap"]


def domain_model(root: Path) -> tuple[Path, Path, Path]:
    """A Mixtral whose routers send letters (domain A) to experts 0-3 and digits (domain B) to 4-7.

    Embeddings of letters point along e_0, of digits along e_1; router rows 0-3 along e_0 and 4-7
    along e_1 (plus small per-row noise so experts within a group differ). Attention weights are
    small, so every layer's MoE input keeps the token's direction; the other coordinates of each
    token's embedding are random, so within a group different tokens prefer different experts."""
    path = synth_model(root / "dom", "mixtral", layers=2, hidden_size=32, intermediate_size=32, experts=8, top_k=2,
                       shard_size="40KB")
    tok = load_tokenizer(path)
    letters, digits = "abcdefghij", "0123456789"
    ids = {c: tok(c, add_special_tokens=False)["input_ids"][0] for c in letters + digits}
    gen = torch.Generator().manual_seed(0)

    def fn(k, v):
        if k == "model.embed_tokens.weight":
            v = v.clone()
            for c, i in ids.items():
                v[i] = torch.randn(32, generator=gen) * 0.5  # tokens differ: every expert of the group gets used
                v[i, :2] = 0.0
                v[i, 0 if c in letters else 1] = 1.0
            return v
        if k.endswith("block_sparse_moe.gate.weight"):
            v = torch.randn(8, 32, generator=gen) * 0.3
            v[:4, 0] += 3.0
            v[4:, 1] += 3.0
            return v
        return v

    edit_checkpoint(path, fn)
    rng = random.Random(0)
    a = root / "letters.txt"
    a.write_text("".join(rng.choice(letters) for _ in range(600)))
    b = root / "digits.txt"
    b.write_text("".join(rng.choice(digits) for _ in range(600)))
    return path, a, b


def test_two_domains_give_different_plans(tmp_path):
    path, a, b = domain_model(tmp_path)
    methods = ["frequency", "gate-mass", "reap", "easy-ep", "tcess", "reconstruction"]
    for cal, want in ((a, [0, 1, 2, 3]), (b, [4, 5, 6, 7])):
        rep = score(path, calib=[cal], method=methods, keep=4, protect_super_experts=False, progress=False, **CAL)
        for m in methods:
            assert [rep["layers"][L]["keep"][m] for L in ("0", "1")] == [want] * 2, (cal.name, m)
        # and the prune pipeline (sequential) writes that plan
        pr = lowmoe.prune(path, tmp_path / f"o-{cal.stem}", keep=4, method="easy-ep", calib=[cal], progress=False,
                          protect_super_experts=False, **CAL)
        assert [pr["plan"]["layers"][L]["keep"] for L in ("0", "1")] == [want] * 2
    # both domains at once: per-domain statistics, usage per domain in the report
    rep = score(path, calib=[a, b], method="frequency", progress=False, **CAL)
    usage = rep["layers"]["0"]["usage"]
    assert sum(usage["letters"][:4]) > 0.95 and sum(usage["digits"][4:]) > 0.95
