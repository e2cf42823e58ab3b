"""Helpers shared by several test modules (fixtures live in conftest.py)."""

from __future__ import annotations

import hashlib
import json
import math
import random
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

import lowmoe
from lowmoe.engine import faults
from lowmoe.engine.budget import SAFETY, layer_sizes, plan_budget, plan_lazy_budget
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.engine.quant import layer_weights
from lowmoe.engine.rundir import REPORT, PruneRun
from lowmoe.methods.eep.population import PopulationEvaluator
from lowmoe.methods.eep.space import Candidate, SearchSpace
from lowmoe.toy import tasks

FAMILIES = ["mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3", "phimoe", "gpt_oss"]


def write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return path


@torch.no_grad()
def toy_routing_frequency(toy: Path, domains: list[str], n: int = 100, seed: int = 0) -> dict[str, torch.Tensor]:
    """Recomputed from the weights (not read from training_report.json): per domain, a (layers, experts)
    tensor of the fraction of top-k slots each expert takes over every prompt+answer token of ``n``
    test records, using transformers' own model and router logits."""
    from transformers import AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(toy)).eval()
    tok = AutoTokenizer.from_pretrained(str(toy))
    k, E = model.config.num_experts_per_tok, model.config.num_local_experts
    out: dict[str, torch.Tensor] = {}
    for d in domains:
        counts = torch.zeros(model.config.num_hidden_layers, E)
        for rec in tasks.make_split(d, "test", n, seed=seed):
            ids = tok(rec["prompt"] + rec["answer"], add_special_tokens=False)["input_ids"]
            res = model(input_ids=torch.tensor([ids]), output_router_logits=True)
            for layer, logits in enumerate(res.router_logits):
                counts[layer] += torch.bincount(logits.topk(k, -1).indices.reshape(-1), minlength=E).float()
        out[d] = counts / counts.sum(-1, keepdim=True)
    return out


def records(n=12):
    recs = [{"prompt": f"add:\n{a}+{b}=", "answer": f"{a + b}\n"} for a in range(4) for b in range(n // 4)]
    recs.append({"prompt": "pick one:", "options": ["ab", "c", "dd"], "answer": 1})
    return recs


def merged(space: SearchSpace, base: Candidate, rng, scale=0.2) -> Candidate:
    """A merging-phase candidate: real rows, W_RM != W_EM."""
    return Candidate(base.em + rng.normal(0, scale, base.em.shape), base.rm + rng.normal(0, scale, base.rm.shape)).canonical()


def population(space, rng):
    a, b = space.random_onehot(rng), space.random_onehot(rng)
    # c shares a's first group (prefix sharing within the generation), d is a merged a
    c = Candidate(a.em.copy(), a.rm.copy())
    c.em[-1], c.rm[-1] = b.em[-1], b.rm[-1]
    return [a, b, c.canonical(), merged(space, a, rng), merged(space, b, rng)]


def evaluator(src, tmp_path, dtype=torch.float32, top_k=2, weights=None, **kw):
    from lowmoe.engine.calibration import load_tokenizer
    from lowmoe.methods.eep.fitness import FitnessData

    ck = Checkpoint(src)
    data = FitnessData.from_records(records(8), load_tokenizer(src))
    space = SearchSpace.build(ck.moe_layers(), ck.num_experts, 4, "layer")
    weights = layer_weights(ck, "none", None) if weights is None else weights
    return PopulationEvaluator(ck, weights, space, data, tmp_path / "acts", device="cpu",
                               dtype=dtype, top_k=top_k, batch_size=4, **kw)


def chunking_ram(model, batch_size: int, seq_len: int) -> int:
    """A --max-ram that leaves the CPU compute copy room for the resident weights + 2 groups of 2
    experts (so every MoE layer is expert-chunked, with layer prefetching still on)."""
    ck = Checkpoint(model)
    base = plan_budget(ck, device=torch.device("cpu"), dtype=torch.float32, batch_size=batch_size, seq_len=seq_len)
    L = max(layer_sizes(ck), key=lambda s: s.resident_numel + s.expert_numel * s.num_experts)
    need = base.activation_bytes + L.resident_bytes(4) + 4 * L.expert_bytes(4)
    return base.host_fixed_bytes + 2 * base.host_layer_bytes + math.ceil(need / (1 - SAFETY)) + 1


def lazy_chunking_ram(model, batch_size: int, seq_len: int, group: int = 2) -> int:
    """The smallest --max-ram under which a pass reading experts lazily (prune, score) runs every MoE
    layer in groups of ``group`` experts, layer prefetching on."""
    ck = Checkpoint(model)
    kw = dict(device=torch.device("cpu"), dtype=torch.float32, batch_size=batch_size, seq_len=seq_len)
    lo = plan_lazy_budget(ck, **kw).min_max_ram
    hi = lo * 4

    def g(ram: int) -> int:
        plan = plan_lazy_budget(ck, max_ram=ram, **kw)
        sizes = [p.group_size for L, p in plan.layers.items() if L in set(ck.moe_layers())]
        return min(sizes) if plan.prefetch_layers else 0

    assert g(hi) > group, "the model's layers are too small to be chunked in groups of this size"
    while lo < hi:
        mid = (lo + hi) // 2
        if g(mid) >= group:
            hi = mid
        else:
            lo = mid + 1
    return lo


def dies_after(n: int, evaluate):
    """``evaluate`` that raises KeyboardInterrupt (a killed run) on its call number ``n + 1``."""
    calls = {"n": 0}

    def dying(cands):
        calls["n"] += 1
        if calls["n"] > n:
            raise KeyboardInterrupt
        return evaluate(cands)

    return dying


def edit_checkpoint(path: Path, fn) -> None:
    """Rewrite every tensor of a synthetic checkpoint through ``fn(name, tensor) -> tensor``."""
    index = json.loads((path / "model.safetensors.index.json").read_text())
    for shard in sorted(set(index["weight_map"].values())):
        tensors = load_file(str(path / shard))
        save_file({k: fn(k, v) for k, v in tensors.items()}, str(path / shard), metadata={"format": "pt"})


OPTS = dict(keep=4, n_samples=8, seq_len=32, batch_size=4, progress=False, protect_super_experts=False)


def _perm_cols(p: torch.Tensor, interleaved: bool) -> torch.Tensor:
    return torch.stack([2 * p, 2 * p + 1], 1).reshape(-1) if interleaved else p


def reference_layer(sd: dict, pre: str, lp: dict, E: int, fused_gpt_oss: bool) -> dict[str, torch.Tensor]:
    """The plan's merge done directly on runtime tensors: gate_up_proj (E, 2I, H) [gate; up] and
    down_proj (E, H, I), or GPT-OSS's (E, H, 2I) interleaved / (E, I, H) with biases."""
    ex, router = pre + "mlp.experts.", pre + ("mlp.router." if fused_gpt_oss else "mlp.gate.")
    gu, dn = sd[ex + "gate_up_proj"].clone(), sd[ex + "down_proj"].clone()
    gub = sd[ex + "gate_up_proj_bias"].clone() if fused_gpt_oss else None
    dnb = sd[ex + "down_proj_bias"].clone() if fused_gpt_oss else None
    I = dn.shape[1] if fused_gpt_oss else dn.shape[2]
    for e, perm in lp.get("align", {}).items():  # neuron permutation of expert e
        p, e = torch.tensor(perm), int(e)
        if fused_gpt_oss:
            gu[e], gub[e], dn[e] = gu[e][:, _perm_cols(p, True)], gub[e][_perm_cols(p, True)], dn[e][p]
        else:
            gu[e], dn[e] = torch.cat([gu[e][:I][p], gu[e][I:][p]]), dn[e][:, p]
    keep = lp["keep"]
    onehot = torch.zeros(len(keep), E)
    onehot[torch.arange(len(keep)), torch.tensor(keep)] = 1
    W = torch.tensor(lp["merge"]) if "merge" in lp else onehot
    R = torch.tensor(lp["router"]) if "router" in lp else W
    mix = lambda t: torch.einsum("je,e...->j...", W, t)  # noqa: E731
    out = {ex + "gate_up_proj": mix(gu), ex + "down_proj": mix(dn), router + "weight": R @ sd[router + "weight"]}
    if fused_gpt_oss:
        out[ex + "gate_up_proj_bias"], out[ex + "down_proj_bias"] = mix(gub), mix(dnb)
        out[router + "bias"] = R @ sd[router + "bias"]
    if "neurons" in lp:  # DERN: usage-weighted average of each retained neuron and the segments sent to it
        nv = lp["neurons"]
        gu2, dn2 = out[ex + "gate_up_proj"].clone(), out[ex + "down_proj"].clone()
        gub2 = out[ex + "gate_up_proj_bias"].clone() if fused_gpt_oss else None
        for j, wr in enumerate(nv["slot_weights"]):
            for m in range(I):
                srcs = [(int(d), n, s["weight"]) for d, s in nv["sources"].items() for n in range(I)
                        if s["slot"][n] == j and s["neuron"][n] == m]
                if not srcs:
                    continue
                tot = wr + sum(w for _, _, w in srcs)
                if fused_gpt_oss:
                    cols = [2 * m, 2 * m + 1]
                    gu2[j][:, cols] = (wr * gu2[j][:, cols] + sum(w * gu[d][:, [2 * n, 2 * n + 1]] for d, n, w in srcs)) / tot
                    gub2[j][cols] = (wr * gub2[j][cols] + sum(w * gub[d][[2 * n, 2 * n + 1]] for d, n, w in srcs)) / tot
                    dn2[j][m] = (wr * dn2[j][m] + sum(w * dn[d][n] for d, n, w in srcs)) / tot
                else:
                    rows = [m, I + m]
                    gu2[j][rows] = (wr * gu2[j][rows] + sum(w * gu[d][[n, I + n]] for d, n, w in srcs)) / tot
                    dn2[j][:, m] = (wr * dn2[j][:, m] + sum(w * dn[d][:, n] for d, n, w in srcs)) / tot
        out[ex + "gate_up_proj"], out[ex + "down_proj"] = gu2, dn2
        if fused_gpt_oss:
            out[ex + "gate_up_proj_bias"] = gub2
    return out


def check_against_reference(synth_dir, calib_txt, tmp_path, arch, method, options):
    """Prune with ``method``; the loaded output's tensors and logits equal ``reference_layer``'s."""
    src = synth_dir(arch)
    report = lowmoe.prune(src, tmp_path / "out", method=method, calib=[calib_txt], method_options=options, **OPTS)
    plan = report["plan"]
    assert report["num_experts"]["after"] == 4
    orig = AutoModelForCausalLM.from_pretrained(src)
    out = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    sd, got = orig.state_dict(), out.state_dict()
    E = orig.config.num_local_experts if hasattr(orig.config, "num_local_experts") else orig.config.num_experts
    expected = dict(sd)
    for L, lp in plan["layers"].items():
        assert len(lp["keep"]) == 4
        if method != "dern":
            assert "merge" in lp and any(sum(x > 0 for x in row) > 1 for row in lp["merge"]), "nothing was merged"
        expected.update(reference_layer(sd, f"model.layers.{L}.", lp, E, arch == "gpt_oss"))
    assert set(got) == set(expected)
    for k in got:
        assert torch.allclose(got[k], expected[k], atol=1e-5), k
    # logits of the loaded output equal those of a model built from the reference tensors
    cfg = AutoConfig.from_pretrained(tmp_path / "out")
    ref = AutoModelForCausalLM.from_config(cfg)
    ref.load_state_dict(expected)
    ids = torch.randint(3, 200, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(out(ids).logits, ref.eval()(ids).logits, atol=1e-4)


def write_calib(path: Path, n_lines: int = 200, seed: int = 0) -> Path:
    rng = random.Random(seed)
    words = ["alpha", "beta", "gamma", "delta", "12+3=15", "def f(x):", "return x", "(())", "sort 3 1 2"]
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(n_lines)) + "\n")
    return path


def dir_digest(path: Path) -> dict[str, str]:
    """sha256 of every file under ``path`` (relative name -> digest)."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(path).rglob("*")) if p.is_file()}


# ---- faults (tests/test_faults_*.py) -------------------------------------------------------------

# a prune small enough to kill at every step
PRUNE = dict(keep=4, n_samples=6, seq_len=16, batch_size=2, max_shard_size="20KB", progress=False)


def output_files(out) -> dict[str, str]:
    """Digest of every output file but the report (it holds timings) and the model card; the report's plan separately."""
    d = dir_digest(out)
    plan = json.loads((out / REPORT).read_text())["plan"]
    # the model card names the command that made the output (a CLI line or a Python call): compared apart
    return {**{k: v for k, v in d.items() if k not in (REPORT, "README.md")}, "plan": json.dumps(plan, sort_keys=True)}


def step_counts(fn, *args, **kw) -> dict[str, int]:
    faults.reset()
    fn(*args, **kw)
    return {s: faults.hits(s) for s in faults.STEPS if faults.hits(s)}


class Killed(Exception):
    """Stands for a kill: raised from inside a run, between two of its steps."""


def prune_killed_after_layer(monkeypatch, layer_idx: int, *args, **kw) -> None:
    """``lowmoe.prune(*args, **kw)``, killed right after layer ``layer_idx`` is recorded in the manifest."""
    orig = PruneRun.finish_layer

    def dying(self, idx):
        orig(self, idx)
        if idx == layer_idx:
            raise Killed()

    monkeypatch.setattr(PruneRun, "finish_layer", dying)
    try:
        try:
            lowmoe.prune(*args, **kw)
        except Killed:
            return
        raise AssertionError(f"the run was not killed after layer {layer_idx}")
    finally:
        monkeypatch.setattr(PruneRun, "finish_layer", orig)


def four_way_merge_plan(ck) -> dict:
    """A saved plan merging every MoE layer of ``ck`` to 4 experts: 0 and 1 averaged, 2 alone
    (coefficient 1), 5 and 7 mixed 1:3, 4 alone; the other experts are nobody's source."""
    E = ck.num_experts
    merge = [[0.5, 0.5] + [0.0] * (E - 2), [0.0, 0.0, 1.0] + [0.0] * (E - 3),
             [0.0] * 5 + [0.25, 0.0, 0.75], [0.0] * 4 + [1.0] + [0.0] * (E - 5)]
    return {"format": "lowmoe-plan/1", "num_experts_per_tok": 2,
            "layers": {str(L): {"keep": [0, 2, 7, 4], "merge": merge} for L in ck.moe_layers()}}


def count_decodes(monkeypatch, cls) -> list[str]:
    """Patch ``cls.read`` (a stored entry decoded: ``lazy.StoredTensor``, ``lazy.QuantizedStored``) to
    record each entry's key; returns the list it fills."""
    decoded: list[str] = []
    read = cls.read

    def counted(self):
        decoded.append(self.key)
        return read(self)

    monkeypatch.setattr(cls, "read", counted)
    return decoded
