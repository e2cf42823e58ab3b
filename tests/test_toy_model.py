"""The shipped toy MoEs: normal sharded HF checkpoints, small, trained, reproducible; ``toy-moe`` is
specialised by domain (routing prior), ``toy-moe-learned`` learned its routing freely."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from lowmoe.toy import tasks
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.evaluate import evaluate

from .helpers import toy_routing_frequency

TOY = tasks.TOY_MODEL
REPORT = json.loads((TOY / "training_report.json").read_text())
TOYS = [TOY, tasks.TOY_MODEL_LEARNED]


def report(toy: Path) -> dict:
    return json.loads((toy / "training_report.json").read_text())
EASY = ["reverse", "sort", "brackets"]


def _train_script():
    path = Path(__file__).resolve().parents[1] / "scripts" / "train_toy_moe.py"
    spec = importlib.util.spec_from_file_location("train_toy_moe", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("toy", TOYS, ids=lambda p: p.name)
def test_files_and_size(toy):
    names = {p.name for p in toy.iterdir()}
    assert {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "model.safetensors.index.json", "training_report.json"} <= names
    assert len([n for n in names if n.endswith(".safetensors")]) >= 2
    assert sum(p.stat().st_size for p in toy.parent.rglob("*") if p.is_file()) <= 12 * 2**20  # all assets
    ck = Checkpoint(toy)
    assert ck.adapter.family == "mixtral" and ck.num_experts == 8 and ck.top_k == 2 and ck.moe_layers() == [0, 1, 2, 3]


@pytest.mark.parametrize("toy", TOYS, ids=lambda p: p.name)
def test_loads_in_transformers_without_key_mismatch(toy):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, info = AutoModelForCausalLM.from_pretrained(str(toy), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert model.dtype == torch.float32
    tok = AutoTokenizer.from_pretrained(str(toy))
    assert tok("ab\n", add_special_tokens=False)["input_ids"] == [67, 68, 201] and tok.pad_token_id == 0


@pytest.mark.parametrize("toy", TOYS, ids=lambda p: p.name)
def test_report_metrics_reproduce_and_easy_domains_are_learned(toy):
    rep = report(toy)
    ev = rep["eval"]
    res = evaluate(toy, tasks=list(rep["metrics"]), n=ev["n"], seed=ev["seed"], mode="streaming", batch_size=100)
    for d, m in rep["metrics"].items():
        assert res["tasks"][d]["exact_match"] == pytest.approx(m["exact_match"], abs=0.011), d  # ≤ 2 of 200 flips (float order)
        assert res["tasks"][d]["perplexity"] == pytest.approx(m["perplexity"], rel=1e-3), d
    for d in EASY:
        assert res["tasks"][d]["exact_match"] >= 0.9, d  # measured now, not read from the report


def test_experts_specialise_by_domain():
    """Routing recomputed on the shipped weights (transformers' router logits over 60 test records per
    domain): each domain's preferred pair (the training prior's) takes most of its top-2 slots, averaged
    over layers; uniform routing gives 0.25."""
    pref = {d: tuple(p) for d, p in REPORT["route_preference"].items()}
    routing = toy_routing_frequency(TOY, list(pref), n=60)
    share = {d: float(routing[d][:, list(pref[d])].sum(-1).mean()) for d in pref}
    assert all(s > 0.5 for s in share.values()), share
    for d, freq in routing.items():
        assert freq.shape == (4, 8) and torch.allclose(freq.sum(-1), torch.ones(4)), d
    # the stored report agrees with the weights (it is what the docs quote)
    stored = {d: sum(v) / len(v) for d, v in REPORT["preferred_pair_share"].items()}
    assert share == pytest.approx(stored, abs=0.1)


def test_learned_toy_is_not_specialised_by_domain():
    """Trained without the routing prior (recomputed on the shipped weights): no domain keeps to one
    pair of experts in every layer as the specialised toy's do, and each layer spreads every domain's
    slots over more than two experts."""
    rep = report(tasks.TOY_MODEL_LEARNED)
    assert rep["args"]["route_weight"] == 0 and rep["args"]["balance_weight"] > 0
    pref = {d: tuple(p) for d, p in REPORT["route_preference"].items()}
    routing = toy_routing_frequency(tasks.TOY_MODEL_LEARNED, list(pref), n=60)
    share = {d: float(routing[d][:, list(pref[d])].sum(-1).mean()) for d in pref}
    assert sum(share.values()) / len(share) < 0.5, share
    for d, freq in routing.items():
        top_pair = freq.sort(-1).values[:, -2:].sum(-1)
        assert bool((top_pair < 0.99).all()), (d, freq)  # the top pair does not take every slot


@pytest.mark.parametrize("toy, costs", [(TOY, False), (tasks.TOY_MODEL_LEARNED, True)], ids=["toy-moe", "toy-moe-learned"])
def test_half_the_experts_cost_sort_accuracy_on_the_learned_toy_only(tmp_path, toy, costs):
    """What each toy is for: keeping the 4 experts EASY-EP picks for sort loses nothing on the
    specialised toy (its sort experts are a pair), and more than 10 points on the learned toy, whose
    domains are balanced over all 8 experts (the room EEP's search has, docs/eep.md)."""
    import lowmoe

    calib = tasks.calib_file("sort", 64, tmp_path)
    lowmoe.prune(toy, tmp_path / "half", keep=4, method="easy-ep", calib=[calib], layout="per-sample", progress=False)
    acc = {m: evaluate(m, tasks=["sort"], n=200, split="test", mode="streaming")["tasks"]["sort"]["exact_match"]
           for m in (toy, tmp_path / "half")}
    drop = acc[toy] - acc[tmp_path / "half"]
    assert (drop > 0.10) if costs else (drop < 0.03), acc


def test_per_domain_balance_loss_sees_what_the_batch_loss_misses():
    """Two domains, each routed to its own half of the experts: the batch as a whole is balanced
    (the loss at its minimum, top-k = 2), each domain alone is collapsed (E = 4). Sending every
    domain's tokens to both halves in turn is balanced both ways."""
    balance_loss = _train_script().balance_loss
    B, S, E = 4, 4, 4
    dom = torch.tensor([0, 0, 1, 1])
    mask = torch.ones(B, S, dtype=torch.bool)

    def router(first_half: torch.Tensor) -> tuple[torch.Tensor]:  # (B, S) bool: to experts 0, 1 (else 2, 3)
        logits = torch.full((B, S, E), -20.0)
        logits[..., :2] = torch.where(first_half[..., None], 0.0, -20.0)
        logits[..., 2:] = torch.where(first_half[..., None], -20.0, 0.0)
        return (logits.reshape(B * S, E),)

    by_domain = router((dom == 0)[:, None].expand(B, S))
    assert balance_loss(by_domain, dom, mask, 2, "batch").item() == pytest.approx(2.0, abs=1e-4)
    assert balance_loss(by_domain, dom, mask, 2, "domain").item() == pytest.approx(4.0, abs=1e-4)
    in_turn = router((torch.arange(S) % 2 == 0)[None].expand(B, S))
    assert balance_loss(in_turn, dom, mask, 2, "batch").item() == pytest.approx(2.0, abs=1e-4)
    assert balance_loss(in_turn, dom, mask, 2, "domain").item() == pytest.approx(2.0, abs=1e-4)


@pytest.mark.parametrize("routing", [[], ["--route-weight", "0", "--balance-weight", "0.1", "--balance-scope", "domain"]],
                         ids=["prior", "balanced-per-domain"])
def test_training_is_reproducible(tmp_path, routing):
    train = _train_script()
    args = ["--steps", "4", "--batch-size", "8", "--layers", "2", "--hidden", "32", "--expert-ffn", "32",
            "--eval-n", "6", "--eval-every", "2", "--domains", "sort,text", "--shard-size", "40KB"] + routing
    train.main(args + ["--out", str(tmp_path / "a")])
    train.main(args + ["--out", str(tmp_path / "b")])
    ra, rb = (json.loads((tmp_path / x / "training_report.json").read_text()) for x in "ab")
    assert ra["metrics"] == rb["metrics"] and ra["routing_frequency"] == rb["routing_frequency"]
    from safetensors.torch import load_file

    for shard in sorted((tmp_path / "a").glob("*.safetensors")):
        a, b = load_file(shard), load_file(tmp_path / "b" / shard.name)
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert len(list((tmp_path / "a").glob("*.safetensors"))) >= 2


@pytest.mark.slow
@pytest.mark.parametrize("toy", TOYS, ids=lambda p: p.name)
def test_script_reproduces_the_shipped_model(tmp_path, toy):
    """Full retraining (~11-30 min on 2 cores): same seed and settings -> the shipped metrics, within noise."""
    train = _train_script()
    rep = report(toy)
    a = rep["args"]
    argv = ["--out", str(tmp_path / "toy"), "--seed", str(rep["seed"]), "--steps", str(a["steps"]),
            "--batch-size", str(a["batch_size"]), "--lr", str(a["lr"]), "--route-weight", str(a["route_weight"]),
            "--balance-weight", str(a.get("balance_weight", 0)), "--balance-scope", a.get("balance_scope", "batch"),
            "--threads", str(a["threads"]), "--loss-balance", a.get("loss_balance", "token")]
    train.main(argv)
    new = json.loads((tmp_path / "toy" / "training_report.json").read_text())
    for d, m in rep["metrics"].items():
        assert new["metrics"][d]["exact_match"] == pytest.approx(m["exact_match"], abs=0.05), d
