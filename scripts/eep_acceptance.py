"""EEP on a shipped toy MoE: search vs the best one-shot scoring method, and top-2 -> top-1.

    python scripts/eep_acceptance.py [--model lowmoe/assets/toy-moe-learned] [--domains sort,arithmetic,brackets,reverse]
                                     [--generations 40] [--population 16] [--n-search 256] [--n-test 1000]
    python scripts/eep_acceptance.py --domains sort+brackets,sort+arithmetic --combine mean   # pairs of domains

A ``+`` joins domains into one row: every method is calibrated / searched on all of them at once (each
domain one ``--calib`` file, and one ``--dev`` file per domain for EEP; ``--n-search``, ``--n-dev``,
``--n-oneshot`` and ``--n-test`` are per domain), and the row's accuracy is the mean of the per-domain
test accuracies (equal test counts, so the paired standard error is that of the pooled examples).

For every row and every sparsity (8 -> 4 experts = 50%, 8 -> 2 = 75%):

* **one-shot baselines**: every scoring method (``lowmoe.methods.scoring.SCORERS``) prunes with the domain's
  ``calib`` split as calibration; the best of them *on the test split* is the bar (generous to them).
* **EEP**: ``--method eep`` with fitness on ``--n-search`` calib-split examples and the final pick on
  ``--n-search`` other calib-split examples (``--dev``). The search never sees the test split.
* **top-k 2 -> 1**: EEP with ``--keep 8 --top-k 1`` (merging only) vs the full model routed top-1.

Every model is scored with ``lowmoe.evaluate`` (exact match, teacher-forced: the same event as
greedy decoding reproducing the answer) on ``--n-test`` held-out test examples. Prints a table and writes the figures as JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import lowmoe  # noqa: E402
from lowmoe.toy import tasks  # noqa: E402
from lowmoe.engine.checkpoint import Checkpoint  # noqa: E402
from lowmoe.evaluate import evaluate  # noqa: E402
from lowmoe.methods.scoring import SCORERS  # noqa: E402


def test_acc(model_dir: Path, domain: str, n: int) -> tuple[float, list[bool]]:
    """Exact match on the test split and the per-example outcomes. Teacher-forced: the same event as
    greedy exact match (tests/test_evaluate.py checks it), about 10x faster."""
    r = evaluate(model_dir, tasks=[domain], n=n, split="test", mode="streaming", device="cpu")["tasks"][domain]
    return r["exact_match"], r["correct"]


def row_acc(model_dir: Path, domains: list[str], n: int) -> tuple[float, list[bool], dict[str, float]]:
    """Mean test accuracy over ``domains`` (n each), the pooled per-example outcomes, the per-domain accuracies."""
    per, pooled = {}, []
    for d in domains:
        per[d], c = test_acc(model_dir, d, n)
        pooled += c
    return sum(per.values()) / len(per), pooled, per


def paired_se(a: list[bool], b: list[bool]) -> float:
    """Standard error of acc(b) - acc(a) on the same examples: sqrt(discordant pairs) / n (McNemar)."""
    return sum(x != y for x, y in zip(a, b)) ** 0.5 / len(a)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=tasks.TOY_MODEL_LEARNED)
    p.add_argument("--domains", default="sort,arithmetic,brackets,reverse")
    p.add_argument("--keeps", default="4,2", help="experts kept per layer, comma-separated ('' : top-k 2 -> 1 only)")
    p.add_argument("--generations", type=int, default=40)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--n-search", type=int, default=256)
    p.add_argument("--n-dev", type=int, default=None, help="dev examples for the final pick (default: --n-search)")
    p.add_argument("--n-test", type=int, default=1000)
    p.add_argument("--n-oneshot", type=int, default=128, help="calibration prompts for the one-shot scorers")
    p.add_argument("--layer-groups", default="layer")
    p.add_argument("--init", default="auto", help="EEP --init: auto (every scorer's plan), random, or one scorer")
    p.add_argument("--combine", default="mean", help="EEP fitness over several domains: mean, min or weighted")
    p.add_argument("--eep-option", "-O", action="append", default=[], metavar="KEY=VALUE",
                   help="extra EEP method option (e.g. prune_crossover_prob=0.3); repeatable")
    p.add_argument("--quant", default="none", choices=["none", "int8", "nf4"],
                   help="the search's layer cache (the written model always comes from the original weights)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--methods", default=",".join(sorted(SCORERS)), help="one-shot scoring methods to compare with")
    p.add_argument("--no-topk", action="store_true", help="skip the top-2 -> top-1 experiment")
    p.add_argument("--oracle", action="store_true",
                   help="diagnostic, not a result: EEP searches and picks on the --n-test test examples themselves, so "
                        "its test accuracy bounds what this search (space, budget) can reach when fitness is the metric")
    p.add_argument("--json", type=Path, default=None)
    p.add_argument("--merge", type=Path, nargs="+", default=None,
                   help="no runs: merge these result JSONs (rows run one at a time) into --json and print the table")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    command = "python scripts/eep_acceptance.py " + " ".join(sys.argv[1:])
    machine = {"cpus": os.cpu_count(), "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}
    if args.merge:
        merged = {"command": command, "machine": machine, "model": None, "args": [], "runs": [], "full_top2": {}}
        for f in args.merge:
            d = json.loads(f.read_text())
            merged["model"] = d["model"]
            merged["args"].append(d["args"])
            merged["runs"] += d["runs"]
            merged["full_top2"].update(d.get("full_top2", {}))
        if args.json:
            args.json.write_text(json.dumps(merged, indent=1))
        print(table(merged["runs"]))
        return
    results = {"command": command, "machine": machine, "model": str(args.model), "args": {k: str(v) for k, v in vars(args).items()}, "runs": []}
    full_top2: dict[str, float] = {}
    extra = dict(kv.split("=", 1) for kv in args.eep_option)
    with tempfile.TemporaryDirectory(prefix="eep-accept-") as tmp:
        tmp = Path(tmp)
        for row_name in args.domains.split(","):
            domains = row_name.split("+")
            # per domain, search / dev: two disjoint halves of the calib split; calibration for one-shot: the calib split
            n_dev = args.n_dev or args.n_search
            search, dev, calib = [], [], []
            for domain in domains:
                recs = tasks.make_split(domain, "calib", args.n_search + n_dev, seed=args.seed)
                calib.append(tasks.write_jsonl(recs, tmp / f"{domain}-calib.jsonl"))
                if args.oracle:  # the examples row_acc scores (evaluate's test split, its default seed 0)
                    recs = tasks.make_split(domain, "test", args.n_test, seed=0)
                    search.append(tasks.write_jsonl(recs, tmp / f"{domain}-search.jsonl"))
                    dev.append(tasks.write_jsonl(recs, tmp / f"{domain}-dev.jsonl"))
                    continue
                search.append(tasks.write_jsonl(recs[:args.n_search], tmp / f"{domain}-search.jsonl"))
                dev.append(tasks.write_jsonl(recs[args.n_search:], tmp / f"{domain}-dev.jsonl"))
            n_calib = args.n_search + n_dev
            n_fit = args.n_test if args.oracle else args.n_search
            full, full_correct, full_per = row_acc(args.model, domains, args.n_test)
            full_top2[row_name] = full
            print(f"[{row_name}] full model (8 experts, top-2): {full:.3f} {full_per}", flush=True)
            for keep in [int(k) for k in args.keeps.split(",") if k]:
                one_shot, outcomes, one_shot_per = {}, {}, {}
                for m in args.methods.split(","):
                    out = tmp / f"{row_name}-{m}-{keep}"
                    lowmoe.prune(args.model, out, keep=keep, method=m, calib=calib, layout="per-sample", seq_len=160,
                                 n_samples=min(n_calib, args.n_oneshot) * len(domains), progress=False, overwrite=True)
                    one_shot[m], outcomes[m], one_shot_per[m] = row_acc(out, domains, args.n_test)
                best_m = max(one_shot, key=one_shot.get)
                out = tmp / f"{row_name}-eep-{keep}"
                t0 = time.time()
                rep = lowmoe.prune(args.model, out, keep=keep, method="eep", calib=search, seq_len=160,
                                   n_samples=n_fit * len(domains), batch_size=16, layout="per-sample",
                                   seed=args.seed, progress=False, overwrite=True,
                                   method_options={"dev": [str(d) for d in dev], "generations": args.generations,
                                                   "population": args.population, "layer_groups": args.layer_groups,
                                                   "init": args.init, "quant": args.quant, "combine": args.combine,
                                                   **extra})
                eep_acc, eep_correct, eep_per = row_acc(out, domains, args.n_test)
                row = {"domain": row_name, "domains": domains, "keep": keep, "sparsity": 1 - keep / 8, "oracle": args.oracle,
                       "full": full, "full_per_domain": full_per, "one_shot": one_shot,
                       "one_shot_per_domain": one_shot_per, "best_one_shot": best_m,
                       "eep": eep_acc, "eep_per_domain": eep_per, "eep_vs_full": eep_acc / full if full else None,
                       "margin": eep_acc - one_shot[best_m],
                       "margin_se": paired_se(outcomes[best_m], eep_correct), "eep_search_s": round(time.time() - t0, 1),
                       "eep_train_fitness": rep["eep"]["best"]["fitness"], "eep_dev_fitness": rep["eep"]["best"]["dev"],
                       "eep_evaluations": rep["eep"]["evaluations"], "eep_phase": rep["eep"]["best"]["phase"],
                       "eep_generation": rep["eep"]["best"]["generation"], "eep_seeds": rep["eep"].get("seeds"),
                       "eep_curve_last": rep["eep"]["curve"][-1] if rep["eep"]["curve"] else None,
                       "eep_plan": rep["eep"]["best"]["groups"], "eep_best_prune_phase": rep["eep"].get("best_prune_phase"),
                       "eep_pick": rep["eep"].get("pick")}
                seed = rep["eep"].get("seed")
                if seed is not None:  # the one-shot plan the search grew from, on the same test examples
                    groups = rep["eep"]["best"]["groups"]
                    plan = {"format": "lowmoe-plan/1", "num_experts_per_tok": Checkpoint(args.model).top_k,
                            "layers": {str(L): {"keep": k} for g, k in enumerate(seed["keep"]) for L in groups[g]["layers"]}}
                    lowmoe.prune(args.model, tmp / "seed", plan=plan, progress=False, overwrite=True)
                    seed_acc, seed_correct, _ = row_acc(tmp / "seed", domains, args.n_test)
                    row.update(seed_method=seed["method"], seed_train_fitness=seed["fitness"], seed_dev_fitness=seed["dev"],
                               seed_test=seed_acc, margin_vs_seed=eep_acc - seed_acc,
                               margin_vs_seed_se=paired_se(seed_correct, eep_correct))
                results["runs"].append(row)
                if args.json:  # after every row, so a cut-short run keeps what it measured
                    args.json.write_text(json.dumps({**results, "full_top2": full_top2}, indent=1))
                print(f"[{row_name}] keep {keep}/8: full {full:.3f} | best one-shot {best_m} {one_shot[best_m]:.3f} | EEP {eep_acc:.3f} "
                      f"{eep_per} (margin {row['margin']:+.3f} ± {row['margin_se']:.3f}; {eep_acc / full:.1%} of full; "
                      f"search {row['eep_search_s']} s, {row['eep_evaluations']} evals)"
                      + (f" | its seed ({seed['method']}): test {row['seed_test']:.3f}, dev {seed['dev']['acc']:.3f}, "
                         f"EEP dev {row['eep_dev_fitness']['acc']:.3f}" if seed is not None and seed["dev"] else "")
                      + (" | pick ({rule}): searched dev {searched_dev:.3f} vs seed {seed_dev:.3f}, gain {gain:+.3f} ± {se:.3f} "
                         "-> {picked}".format(**row["eep_pick"]) if row["eep_pick"] else ""), flush=True)
            if not args.no_topk:
                top1 = tmp / f"{row_name}-top1"
                plan = {"format": "lowmoe-plan/1", "num_experts_per_tok": 1,
                        "layers": {str(L): {"keep": list(range(8))} for L in range(Checkpoint(args.model).num_layers)}}
                lowmoe.prune(args.model, top1, plan=plan, progress=False, overwrite=True)
                plain, plain_correct, _ = row_acc(top1, domains, args.n_test)
                out = tmp / f"{row_name}-eep-top1"
                lowmoe.prune(args.model, out, keep=8, top_k=1, method="eep", calib=search, seq_len=160,
                             n_samples=args.n_search * len(domains), batch_size=16,
                             seed=args.seed, progress=False, overwrite=True,
                             method_options={"dev": [str(d) for d in dev], "generations": args.generations,
                                             "population": args.population, "combine": args.combine,
                                             "layer_groups": args.layer_groups, "quant": args.quant})
                merged, merged_correct, _ = row_acc(out, domains, args.n_test)
                se = paired_se(plain_correct, merged_correct)
                results["runs"].append({"domain": row_name, "keep": 8, "top_k": 1, "plain_top1": plain, "eep_top1": merged,
                                        "margin": merged - plain, "margin_se": se})
                print(f"[{row_name}] top-2 -> top-1: plain top-1 {plain:.3f} | EEP merge {merged:.3f} "
                      f"(margin {merged - plain:+.3f} ± {se:.3f})", flush=True)
    results["full_top2"] = full_top2
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    print(table(results["runs"]))


def table(runs: list[dict]) -> str:
    """The pruning rows as a markdown table (margin: EEP - best one-shot chosen on test, paired SE)."""
    lines = ["| domains | sparsity | full | best one-shot (on test) | EEP | margin | EEP / full | EEP's seed (test) | "
             "EEP per domain |", "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        if "top_k" in r or "full" not in r:
            continue
        bold = abs(r["margin"]) > 2 * r["margin_se"]
        margin = f"{r['margin']:+.3f} ± {r['margin_se']:.3f}"
        seed = f"{r['seed_test']:.3f} ({r['seed_method']})" if "seed_test" in r else "-"
        per = ", ".join(f"{d} {a:.3f}" for d, a in r["eep_per_domain"].items()) if len(r["eep_per_domain"]) > 1 else ""
        lines.append(f"| {r['domain']} | {r['sparsity']:.0%} (8→{r['keep']}) | {r['full']:.3f} | "
                     f"{r['one_shot'][r['best_one_shot']]:.3f} ({r['best_one_shot']}) | {r['eep']:.3f} | "
                     f"{'**' + margin + '**' if bold else margin} | {r['eep_vs_full']:.1%} | {seed} | {per} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
