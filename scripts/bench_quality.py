"""Does pruning work? Prune the toy MoE for one domain with every method and measure what is left.

For each domain and expert sparsity (50 % → keep 4 of 8, 75 % → keep 2 of 8), the shipped toy
model (or ``--model``) is pruned with every method in ``lowmoe.available_methods()`` calibrated on
that domain's calibration split, plus a random-plan floor (``--random-seeds`` random plans, applied
with ``plan=``). Each pruned model is evaluated on the domain's held-out test split and on the
other domains (teacher-forced, streaming: the same exact-match events as greedy decoding). One
table shows accuracy and perplexity relative to the full model; results also go to JSON and, when
matplotlib is installed, a plot.

    python scripts/bench_quality.py                                   # full table (EEP off: it is a search)
    python scripts/bench_quality.py --domains sort --sparsity 0.5 --methods frequency,reap --n 50
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import lowmoe
from lowmoe.toy import tasks
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.errors import LowmoeError
from lowmoe.evaluate import evaluate

log = logging.getLogger("bench_quality")

SLOW_METHODS = {"eep"}  # searches: minutes per run on 2 cores; opt in with --methods


def random_plan(ck: Checkpoint, keep: int, seed: int) -> dict:
    """A plan keeping ``keep`` uniformly random experts in every MoE layer (the floor any method must beat)."""
    rng = np.random.default_rng(seed)
    layers = {str(layer): {"keep": sorted(int(e) for e in rng.choice(ck.num_experts, keep, replace=False))} for layer in ck.moe_layers()}
    return {"format": "lowmoe-plan/1", "num_experts_per_tok": min(ck.top_k, keep), "layers": layers, "method": "random", "seed": seed}


def summarise(ev: dict, full: dict, domain: str) -> dict:
    """Target-domain and other-domain accuracy and perplexity, relative to the full model."""
    def rel(name):
        r, f = ev["tasks"][name], full["tasks"][name]
        return {"exact": r["exact_match"], "exact_rel": r["exact_match"] / f["exact_match"] if f["exact_match"] else float("nan"),
                "ppl": r["perplexity"], "ppl_ratio": r["perplexity"] / f["perplexity"]}

    target = rel(domain)
    others = [rel(d) for d in ev["tasks"] if d != domain]
    out = {"target": target, "per_domain": {d: rel(d) for d in ev["tasks"]}}
    if others:
        out["others"] = {k: statistics.fmean(o[k] for o in others if o[k] == o[k]) for k in ("exact", "exact_rel", "ppl_ratio")}
    return out


def bench(model: Path, domains: list[str], sparsities: list[float], methods: list[str], random_seeds: int, n: int, calib_n: int,
          workdir: Path, seed: int = 0, eval_domains: list[str] | None = None) -> dict:
    ck = Checkpoint(model)
    eval_domains = eval_domains or tasks.DOMAINS
    ev_kw = {"tasks": eval_domains, "n": n, "seed": seed, "mode": "streaming", "batch_size": 100}
    t0 = time.time()
    full = evaluate(model, **ev_kw)
    rows = []
    for domain in domains:
        calib = tasks.calib_file(domain, n=calib_n, out_dir=workdir, seed=seed)
        for sparsity in sparsities:
            keep = max(1, round(ck.num_experts * (1 - sparsity)))
            runs: list[tuple[str, dict]] = [("random", {"plan": random_plan(ck, keep, s)}) for s in range(random_seeds)]
            runs += [(m, {"keep": keep, "method": m, "calib": [str(calib)], "seed": seed, "seq_len": 128, "n_samples": calib_n})
                     for m in methods]
            results: dict[str, list[dict]] = {}
            for method, opts in runs:
                out = workdir / f"{domain}-{keep}-{method}"
                t1 = time.time()
                try:
                    report = lowmoe.prune(model, out, overwrite=True, progress=False, **opts)
                except (NotImplementedError, LowmoeError) as e:
                    log.warning("%s / keep %d / %s: skipped (%s)", domain, keep, method, e)
                    results.setdefault(method, []).append({"skipped": str(e)})
                    continue
                prune_s = time.time() - t1
                ev = evaluate(out, **ev_kw)
                res = summarise(ev, full, domain)
                res.update(prune_s=round(prune_s, 2), keep_plan={k: v.get("keep") for k, v in report["plan"]["layers"].items()})
                results.setdefault(method, []).append(res)
                shutil.rmtree(out, ignore_errors=True)
                log.info("%s keep %d %-14s target exact %.3f (full %.3f)  ppl x%.2f", domain, keep, method,
                         res["target"]["exact"], full["tasks"][domain]["exact_match"], res["target"]["ppl_ratio"])
            for method, rs in results.items():
                ok = [r for r in rs if "skipped" not in r]
                row = {"domain": domain, "sparsity": sparsity, "keep": keep, "method": method, "runs": len(ok)}
                if not ok:
                    rows.append({**row, "skipped": rs[0]["skipped"]})
                    continue
                for part in ("target", "others"):
                    if part in ok[0]:
                        for k in ok[0][part]:
                            vals = [r[part][k] for r in ok]
                            row[f"{part}_{k}"] = statistics.fmean(vals)
                            if len(ok) > 1:
                                row[f"{part}_{k}_std"] = statistics.pstdev(vals)
                row["prune_s"] = statistics.fmean(r["prune_s"] for r in ok)
                row["detail"] = ok
                rows.append(row)
    return {"model": str(model), "n": n, "calib_n": calib_n, "seed": seed, "eval_domains": eval_domains,
            "full": {d: {"exact": r["exact_match"], "ppl": r["perplexity"]} for d, r in full["tasks"].items()},
            "rows": rows, "wall_s": round(time.time() - t0, 1)}


def format_table(result: dict) -> str:
    head = (f"{'domain':<11}{'sparsity':>9}{'method':>15}{'runs':>5}{'exact':>8}{'full':>7}{'rel':>11}{'ppl×':>8}"
            f"{'others rel':>11}{'others ppl×':>12}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        pre = f"{r['domain']:<11}{r['sparsity']:>8.0%} {r['method']:>15}{r['runs']:>5}"
        if "skipped" in r:
            lines.append(pre + f"  skipped: {r['skipped'][:60]}")
            continue
        rel = f"{r['target_exact_rel']:.2f}" + ("±{:.2f}".format(r["target_exact_rel_std"]) if "target_exact_rel_std" in r else "")
        others = (f"{r['others_exact_rel']:>11.2f}{r['others_ppl_ratio']:>12.2f}") if "others_exact_rel" in r else ""
        lines.append(pre + f"{r['target_exact']:>8.3f}{result['full'][r['domain']]['exact']:>7.3f}{rel:>11}"
                     f"{r['target_ppl_ratio']:>8.2f}" + others)
    return "\n".join(lines)


def plot(result: dict, path: Path) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.warning("matplotlib is not installed: no plot (pip install 'lowmoe[plot]')")
        return None
    rows = [r for r in result["rows"] if "skipped" not in r]
    groups = sorted({(r["domain"], r["sparsity"]) for r in rows})
    methods = sorted({r["method"] for r in rows}, key=lambda m: (m != "random", m))
    fig, ax = plt.subplots(figsize=(min(18, 3 + 1.5 * len(groups)), 4.5))
    width = 0.8 / max(1, len(methods))
    for i, m in enumerate(methods):
        xs, ys, es = [], [], []
        for g, (d, s) in enumerate(groups):
            r = next((r for r in rows if r["domain"] == d and r["sparsity"] == s and r["method"] == m), None)
            if r:
                xs.append(g + i * width)
                ys.append(r["target_exact_rel"])
                es.append(r.get("target_exact_rel_std", 0.0))
        ax.bar(xs, ys, width, yerr=es, label=m)
    ax.set_xticks([g + 0.4 - width / 2 for g in range(len(groups))], [f"{d}\n{s:.0%}" for d, s in groups])
    ax.set_ylabel("target-domain exact match / full model")
    ax.axhline(1.0, color="k", lw=0.5)
    ax.set_ylim(0, 1.2)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(tasks.TOY_MODEL))
    p.add_argument("--domains", default=",".join(d for d in tasks.DOMAINS if d != "text"))
    p.add_argument("--sparsity", default="0.5,0.75", help="fractions of experts removed")
    p.add_argument("--methods", default="all", help="comma list, or 'all' (every available method except searches: eep)")
    p.add_argument("--random-seeds", type=int, default=5)
    p.add_argument("--n", type=int, default=200, help="test examples per domain")
    p.add_argument("--calib-n", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench_quality", help="folder for results.json and quality.png")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    for noisy in ("lowmoe", "transformers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    available = lowmoe.available_methods()
    if args.methods == "all":
        methods = [m for m in available if m not in SLOW_METHODS]
    else:
        methods = [m.strip() for m in args.methods.split(",") if m.strip() and m.strip() != "random"]
        unknown = [m for m in methods if m not in available]
        if unknown:
            p.error(f"unknown method {unknown[0]!r}; available: {', '.join(available)}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="lowmoe-bench-") as tmp:
        result = bench(Path(args.model), tasks.check_domains(args.domains), [float(s) for s in args.sparsity.split(",")], methods,
                       args.random_seeds, args.n, args.calib_n, Path(tmp), seed=args.seed)
    (out / "results.json").write_text(json.dumps(result, indent=1) + "\n")
    print(format_table(result))
    png = plot(result, out / "quality.png")
    print(f"\nresults: {out / 'results.json'}" + (f", plot: {png}" if png else "") + f"  ({result['wall_s']:.0f}s)")
    return result


if __name__ == "__main__":
    main()
