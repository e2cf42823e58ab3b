"""``c-prune``: layer-wise clustering by parameter similarity + a global, cross-layer cluster decision
(C-Prune, arXiv 2504.07807), under the uniform expert count stock loaders need.

A runner (``methods.RUNNERS["c-prune"]``) with two streamed passes, one layer in memory at a
time in each:

**Scoring pass** (the original model, one-shot: every layer sees the unpruned model's activations,
because the global decision needs every layer before any is changed). Per MoE layer:

* parameter similarity S_ij = cos(θ_i, θ_j) of the flattened expert weights, and the full
  average-linkage dendrogram on D = 1 − S (``common.agglomerate``; merge distances only grow);
* usage frequency f_e and importance s_e = Σ_{t routed to e} g_e(t)·‖f_e(x_t)‖ / T (the gate-weighted
  output norm; C-Prune's cluster importance formula is not public, this is lowmoe's choice), and a
  cluster's importance I(c) = Σ_{e∈c} s_e / Σ_e s_e (its share of the layer's routed output).

**Global step.** The budget is L·(E − k) merges over the L MoE layers. Parameter distances are on
one scale in every layer (cosine), so the merges of all layers are ranked together by distance and
the cheapest L·(E − k) are taken: layer l gets m_l merges and C-Prune, unconstrained, would keep
c_l = E − m_l clusters there (reported as ``global_clusters``). Stock loaders need k experts in every
layer, so:

* a layer with c_l > k (its experts are dissimilar: merging more would mix unrelated experts) cuts
  its dendrogram at c_l clusters and **removes** its c_l − k least important clusters (C-Prune's
  global cluster pruning; ``overflow=merge`` instead keeps merging down to k);
* a layer with c_l ≤ k cuts its dendrogram at exactly k clusters (it would have merged further).

Every kept cluster merges frequency-weighted (θ' = Σ f_i θ_i / Σ f_i) into its most-used member's
slot, with that member's router row (``router=mean``: weighted average); ``align=true`` aligns
neurons first. Protected experts are never in a removed cluster and never merged into.

**Write pass.** The plan is saved under the work directory, then each layer is read, the plan
applied and written. A run killed in the write pass resumes from the saved plan.
"""

from __future__ import annotations

import json
import logging
import time

import torch

from ...engine.plan import LayerPlan
from ...engine.progress import progress
from ...engine.rundir import WORK_DIR, write_layers
from ...engine.stream import walk
from ...errors import OutputError
from ..oneshot import guards, protected_experts
from .align import align_groups
from .common import COMMON_OPTIONS, agglomerate, groups_to_plan, lead_clusters, parse_options, report_matrix
from .stats import LayerStats, gram_to_cosine, weight_gram

log = logging.getLogger(__name__)

OPTIONS = {**COMMON_OPTIONS, "overflow": ("drop", ("drop", "merge"))}
PLAN_FILE = "c-prune-plan.json"


def clusters_at(num_experts: int, history: list[dict], n_merges: int) -> list[list[int]]:
    """The clusters after the first ``n_merges`` merges of a dendrogram ``history``."""
    members = {e: [e] for e in range(num_experts)}
    owner = {e: e for e in range(num_experts)}
    for h in history[:n_merges]:
        a, b = owner[h["a"][0]], owner[h["b"][0]]
        members[a] = sorted(members[a] + members.pop(b))
        for e in members[a]:
            owner[e] = a
    return [members[k] for k in sorted(members)]


def global_merges(summaries: dict[int, dict], num_experts: int, keep_n: int) -> dict[int, int]:
    """m_l per layer: the cheapest L·(E − k) merges over all layers (ties -> earlier layer, step)."""
    ranked = sorted((h["distance"], layer, step) for layer, s in summaries.items() for step, h in enumerate(s["history"]))
    budget = len(summaries) * (num_experts - keep_n)
    taken = {layer: 0 for layer in summaries}
    for _, layer, _ in ranked[:budget]:
        taken[layer] += 1
    return taken


def decide_layer(summary: dict, num_experts: int, keep_n: int, m_global: int, protected: set[int], opts: dict) -> tuple[LayerPlan, dict]:
    """The layer's plan (without alignment) from its scoring summary and its global merge count
    (see module docstring); ``info["groups"]`` lists the kept groups, leader first."""
    freq, sal = torch.tensor(summary["frequency"]), torch.tensor(summary["importance"])
    total = float(sal.sum()) or 1.0
    c_global = num_experts - m_global
    dropped: list[list[int]] = []
    if c_global > keep_n and opts["overflow"] == "drop":
        clusters = clusters_at(num_experts, summary["history"], m_global)
        imp = {tuple(c): sum(float(sal[e]) for e in c) / total for c in clusters}
        order = sorted(clusters, key=lambda c: (any(e in protected for e in c), imp[tuple(c)], c))
        dropped = order[:c_global - keep_n]
        kept = [c for c in clusters if c not in dropped]
    else:
        kept = clusters_at(num_experts, summary["history"], num_experts - keep_n)
    groups = lead_clusters(kept, freq, protected)
    plan = groups_to_plan(groups, freq, num_experts, opts["router"])
    info = {"groups": groups, "global_clusters": c_global, "kept_clusters": [sorted(g) for g in groups], "removed_clusters": dropped,
            "cluster_importance": {",".join(map(str, sorted(g))): round(sum(float(sal[e]) for e in g) / total, 6)
                                   for g in groups + dropped}}
    return plan, info


def run_c_prune(run, cfg, top_k: int) -> dict:
    """``RUNNERS["c-prune"]``: the scoring pass, the global step, the write pass."""
    ck, adapter = run.ck, run.adapter
    opts = parse_options("c-prune", dict(cfg.method_options), OPTIONS)
    keep_n = cfg.resolve_keep(ck.num_experts)
    E = ck.num_experts
    plan_path = run.out / WORK_DIR / PLAN_FILE
    extra: dict = {}
    if run.next_layer > 0:  # resuming in the write pass: the plan was saved before the first layer was written
        if not plan_path.is_file():
            raise OutputError(f"{run.out}: {PLAN_FILE} is missing from {WORK_DIR}; cannot resume (use --overwrite)")
        saved = json.loads(plan_path.read_text())
        run.layers = {int(k): LayerPlan.from_json(v, f"{plan_path}: {k}") for k, v in saved["layers"].items()}
        extra = saved["extra"]
    else:
        t_begin = time.perf_counter()
        tokens = cfg.calibration(ck)
        t_tokens = time.perf_counter()
        stream = cfg.stream(ck, tokens, run.out / WORK_DIR / "cache", run.budget)
        try:
            summaries, protected_by_layer, pass_report = _scoring_pass(run, cfg, stream, t_begin, t_tokens)
        finally:
            stream.close()  # its loader thread, cuBLAS workspaces and page-locked buffers
        m = global_merges(summaries, E, keep_n)
        layer_info = {}
        for layer_idx, s in summaries.items():
            protected = protected_by_layer[layer_idx]
            plan, info = decide_layer(s, E, keep_n, m[layer_idx], protected, opts)
            groups = info.pop("groups")
            if opts["align"]:
                tensors = ck.read_layer(layer_idx)  # one layer at a time, again
                perms = align_groups(adapter, layer_idx, tensors, groups, torch.tensor(s["frequency"]))
                if perms:
                    plan.extra["align"] = perms
                del tensors
            run.layers[layer_idx] = plan
            run.scores[layer_idx] = [float(x) for x in s["importance"]]
            run.protected[layer_idx] = sorted(protected)
            run.stats[layer_idx] = {"frequency": s["frequency"], "global_merges": m[layer_idx],
                                    "similarity": s["similarity"], **info}
            layer_info[str(layer_idx)] = {"global_clusters": info["global_clusters"], "removed_clusters": info["removed_clusters"],
                                          "cluster_importance": info["cluster_importance"]}
        extra = {"c_prune": {"budget_merges": len(summaries) * (E - keep_n), "options": opts,
                             "scoring_s": pass_report.pop("scoring_s"), "layers": layer_info,
                             "note": "scoring is one-shot (original activations); per-layer counts are uniform (k), "
                                     "global_clusters is what the global threshold alone would keep"},
                 "calibration": {"sequences": int(tokens.input_ids.shape[0]), "seq_len": int(tokens.input_ids.shape[1]),
                                 "tokens_counted": tokens.num_tokens, "files": [str(c) for c in cfg.calib]},
                 **pass_report}
        plan_path.parent.mkdir(parents=True, exist_ok=True)
        plan_path.write_text(json.dumps({"layers": {str(k): v.to_json() for k, v in run.layers.items()}, "extra": extra}))
    write_layers(run, "c-prune: write", cfg.progress)
    return extra


def _scoring_pass(run, cfg, stream, t_begin: float, t_tokens: float) -> tuple[dict, dict, dict]:
    """The scoring pass over the original model: per MoE layer the statistics the global step needs
    (``summaries``), the protected experts, and the pass's report entries (its stages, io, cache)."""
    ck, adapter, E = run.ck, run.adapter, run.ck.num_experts
    stream.embed()
    setup = {"tokenize": t_tokens - t_begin, "setup": time.perf_counter() - t_tokens}
    t_profile = time.perf_counter()
    guarding = guards(stream, enabled=cfg.protect_super_experts, progress=cfg.progress)
    summaries: dict[int, dict] = {}
    protected_by_layer: dict[int, set[int]] = {}
    t_score = time.perf_counter()
    setup["profile"] = t_score - t_profile
    before = stream.io.stage_snapshot()  # the stages of the pass itself, not of the profile's

    def summarize(layer_idx: int, tensors: dict, observers: list) -> None:
        """The layer's statistics for the global step; no plan yet (one-shot: original outputs propagate)."""
        stats = observers[0]
        protected = protected_experts(guarding, layer_idx)
        protected_by_layer[layer_idx] = protected
        sim = gram_to_cosine(weight_gram(adapter, layer_idx, tensors, E))
        _, history = agglomerate(1 - sim, 1, "average", protected)
        summaries[layer_idx] = {"frequency": stats.frequency().tolist(), "importance": stats.saliency().tolist(),
                                "history": history, "similarity": report_matrix(sim)}
        return None

    # routed experts read in groups as the layer computes (``methods.LAZY_RUNNERS``); the weight
    # similarity then reads them once more, a projection at a time (``weight_gram``)
    reader = stream.layers(0, run.moe, lazy=True)
    steps = walk(stream, reader, observers_for=lambda idx: [LayerStats(E, ck.top_k, saliency=True)] + guarding,
                 decide=summarize, apply=lambda idx, tensors, lp: None)
    for _ in progress(steps, len(reader), "c-prune: score", cfg.progress):
        pass
    stream.cache.drop(ck.num_layers)
    return summaries, protected_by_layer, {
        "scoring_s": round(time.perf_counter() - t_score, 3), "cache_bytes_written": stream.cache.bytes_written,
        **stream.pass_report(t_begin, t_score, setup, since=before)}
