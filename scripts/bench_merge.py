#!/usr/bin/env python
"""Benchmarks of the merging methods (issue 6).

``memory``: peak RSS and wall time of ``lowmoe.prune`` per merging method on the >= 2 GB synthetic
Mixtral-layout model (16 layers, bf16), against ``frequency`` (drop only) as the baseline. Each run
is its own process (peak RSS = that process's ru_maxrss); merging must stay streamed, so the peak
should stay near frequency's, far below the model size.

``quality``: exact match and answer perplexity of each method on one task domain of the toy MoE
(``lowmoe/assets/toy-moe``) at 50 % and 75 % expert sparsity, against ``frequency`` and the
unpruned model; calibration = that domain's ``calib`` split, evaluation = its ``test`` split.

    nice -n 10 python scripts/bench_merge.py memory [--model /tmp/lowmoe-bench/mix2g]
    nice -n 10 python scripts/bench_merge.py quality [--domain arithmetic] [--n 100]
"""

from __future__ import annotations

import argparse
import json
import random
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import BENCH_DIR, ensure_model, machine, save_result, weights_digest  # noqa: E402
# (label, method, method_options)
VARIANTS = [
    ("frequency (drop)", "frequency", {}),
    ("merge-freq", "merge-freq", {}),
    ("merge-freq +align", "merge-freq", {"align": "true"}),
    ("hc-merge", "hc-merge", {}),
    ("hc-merge +align", "hc-merge", {"align": "true"}),
    ("diverse-group (weight)", "diverse-group", {}),
    ("diverse-group (output)", "diverse-group", {"representation": "output"}),
    ("c-prune", "c-prune", {}),
    ("c-prune +align", "c-prune", {"align": "true"}),
    ("dern", "dern", {}),
    ("dern match_dim=256", "dern", {"match_dim": "256"}),
]

# The memory run skips the +align variants of hc-merge / c-prune (same alignment cost as merge-freq's).
MEMORY_SKIP = {"hc-merge +align", "c-prune +align"}


def child_prune(model: Path, out: Path, method: str, options: dict, threads: int = 2, **kw) -> dict:
    """Run lowmoe.prune in a fresh process; its report (with that process's peak RSS)."""
    code = (f"import json, sys, torch, lowmoe; torch.set_num_threads({int(threads)}); a = json.loads(sys.argv[1]); "
            "r = lowmoe.prune(a.pop('model'), a.pop('out'), **a); "
            "print('REPORT' + json.dumps({k: r.get(k) for k in ('memory', 'timings', 'wall_s', 'bytes', 'num_experts', 'budget')}))")
    args = dict(model=str(model), out=str(out), method=method, method_options=options, progress=False, overwrite=True, **kw)
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-c", code, json.dumps(args)], capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise RuntimeError(f"{method} {options} failed:\n{p.stderr[-3000:]}")
    line = next(l for l in p.stdout.splitlines() if l.startswith("REPORT"))
    rep = json.loads(line[len("REPORT"):])
    rep["process_wall_s"] = wall
    rep["child_maxrss"] = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    return rep


def write_calib(path: Path, n_lines: int = 400) -> Path:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "delta", "12+3=15", "def f(x):", "return x", "(())", "sort 3 1 2", "the", "of"]
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(14)) for _ in range(n_lines)) + "\n")
    return path


def slug(label: str) -> str:
    """A variant's id without spaces, for docs/results keys: 'merge-freq +align' -> 'merge-freq-+align'."""
    return re.sub(r"[^A-Za-z0-9+-]+", "-", label).strip("-")


def command() -> str:
    return "python scripts/bench_merge.py " + " ".join(a if " " not in a else repr(a) for a in sys.argv[1:])


def gb(n: float) -> str:
    return f"{n / 2**30:.2f} GB"


def memory(args) -> None:
    model = ensure_model(Path(args.model))
    work = Path(tempfile.mkdtemp(prefix="bench-merge-", dir=BENCH_DIR))
    calib = write_calib(work / "calib.txt")
    rows = []
    try:
        for label, method, opts in VARIANTS:
            if args.only and label not in args.only:
                continue
            if not args.only and (label in MEMORY_SKIP or (args.methods and method not in args.methods)):
                continue
            out = work / "out"
            rep = child_prune(model, out, method, opts, threads=args.threads, keep=args.keep, calib=[str(calib)], n_samples=args.n_samples,
                              seq_len=args.seq_len, batch_size=args.batch_size, max_shard_size=args.max_shard_size,
                              max_ram=args.max_ram)
            digest = weights_digest(out) if args.digest else None
            shutil.rmtree(out, ignore_errors=True)
            mem = rep["memory"]
            plan = (rep.get("budget") or {}).get("plan") or {}
            rows.append({"label": label, "id": slug(label), "method": method, "options": opts, "wall_s": rep["wall_s"],
                         "process_wall_s": round(rep["process_wall_s"], 1), "peak_rss_bytes": mem["peak_rss_bytes"],
                         "largest_layer_bytes": mem["largest_layer_bytes"], "model_bytes": mem["model_bytes"],
                         "output_bytes": rep["bytes"]["output"], "max_ram_bytes": plan.get("max_ram"),
                         "planned_host_peak_bytes": plan.get("host_peak_bytes"),
                         "merge_scratch_bytes": plan.get("merge_scratch_bytes"), "weights_sha256": digest})
            within = f"  planned {gb(plan['host_peak_bytes'])}" if plan.get("host_peak_bytes") else ""
            print(f"{label:26s} wall {rep['wall_s']:7.1f} s  peak RSS {gb(mem['peak_rss_bytes'])}{within}", flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    base = rows[0] if rows and rows[0]["method"] == "frequency" else None
    print(f"\nmodel {model}: {gb(rows[0]['model_bytes'])}, largest layer {gb(rows[0]['largest_layer_bytes'])}; "
          f"keep {args.keep}/8, calibration {args.n_samples} x {args.seq_len} tokens, output shards {args.max_shard_size}"
          f"{f', --max-ram {args.max_ram}' if args.max_ram else ''}\n")
    print("| method | wall s | peak RSS | planned host peak | RSS / model | vs frequency (wall, RSS) |")
    print("|---|---:|---:|---:|---:|---:|")
    for r in rows:
        rel = f"{r['wall_s'] / base['wall_s']:.2f}x, {r['peak_rss_bytes'] / base['peak_rss_bytes']:.2f}x" if base else ""
        planned = gb(r["planned_host_peak_bytes"]) if r["planned_host_peak_bytes"] else "-"
        print(f"| {r['label']} | {r['wall_s']:.1f} | {gb(r['peak_rss_bytes'])} | {planned} | "
              f"{r['peak_rss_bytes'] / r['model_bytes']:.2f} | {rel} |")
    if args.json:
        save_result(args.json, {"command": command(), "machine": machine(), "model": str(model),
                                "model_bytes": rows[0]["model_bytes"], "largest_layer_bytes": rows[0]["largest_layer_bytes"],
                                "keep": args.keep, "n_samples": args.n_samples, "seq_len": args.seq_len,
                                "threads": args.threads, "max_ram": args.max_ram, "rows": rows})


def quality(args) -> None:
    import torch

    import lowmoe
    from lowmoe.toy import tasks
    from lowmoe.evaluate import evaluate

    torch.set_num_threads(args.threads)
    model = Path(args.model)
    work = Path(tempfile.mkdtemp(prefix="bench-merge-q-"))
    calib = tasks.calib_file(args.domain, n=args.calib_n, out_dir=work)
    results = {"command": command(), "domain": args.domain, "n": args.n, "calib_n": args.calib_n,
               "model": str(model), "rows": []}
    base = evaluate(model, tasks=[args.domain], n=args.n, split="test")["tasks"][args.domain]
    results["unpruned"] = {"exact_match": base["exact_match"], "perplexity": base["perplexity"]}
    print(f"unpruned: exact {base['exact_match']:.3f}  ppl {base['perplexity']:.3f}", flush=True)
    try:
        for keep in args.keep:
            for label, method, opts in VARIANTS:
                if args.only and label not in args.only and method != "frequency":
                    continue
                out = work / "out"
                t0 = time.time()
                lowmoe.prune(model, out, keep=keep, method=method, calib=[str(calib)], method_options=opts,
                             n_samples=args.calib_n, seq_len=160, layout="per-sample", progress=False, overwrite=True)
                r = evaluate(out, tasks=[args.domain], n=args.n, split="test")["tasks"][args.domain]
                row = {"keep": keep, "label": label, "id": slug(label), "method": method, "options": opts, "exact_match": r["exact_match"],
                       "perplexity": r["perplexity"], "prune_s": round(time.time() - t0, 1)}
                results["rows"].append(row)
                print(f"keep {keep}  {label:26s} exact {r['exact_match']:.3f}  ppl {r['perplexity']:.3f}", flush=True)
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    E = json.loads((model / "config.json").read_text())["num_local_experts"]
    print(f"\ntoy MoE, domain {args.domain}, {args.n} test prompts; unpruned exact {base['exact_match']:.3f}, ppl {base['perplexity']:.2f}\n")
    print("| sparsity | method | exact match | Δ vs frequency | answer ppl | ppl vs frequency |")
    print("|---|---|---:|---:|---:|---:|")
    for keep in args.keep:
        rows = [r for r in results["rows"] if r["keep"] == keep]
        f = next(r for r in rows if r["method"] == "frequency")
        for r in rows:
            print(f"| {100 * (1 - keep / E):.0f}% (keep {keep}/{E}) | {r['label']} | {r['exact_match']:.3f} | "
                  f"{r['exact_match'] - f['exact_match']:+.3f} | {r['perplexity']:.2f} | {r['perplexity'] / f['perplexity']:.2f}x |")
    if args.json:
        save_result(args.json, {**results, "machine": machine()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    m = sub.add_parser("memory", help="peak RSS and wall time per method on the >= 2 GB synthetic model")
    m.add_argument("--model", default=str(BENCH_DIR / "mix2g"))
    m.add_argument("--keep", type=int, default=4)
    m.add_argument("--n-samples", type=int, default=8)
    m.add_argument("--seq-len", type=int, default=128)
    m.add_argument("--batch-size", type=int, default=4)
    m.add_argument("--max-shard-size", default="256MB", help="output shard size (the writer buffers up to one shard)")
    m.add_argument("--methods", nargs="*", help="only these methods")
    m.add_argument("--only", nargs="*", help="only these variant labels, e.g. 'dern match_dim=256'")
    m.add_argument("--threads", type=int, default=2)
    m.add_argument("--max-ram", default=None, help="run every method under this --max-ram (e.g. 4GiB)")
    m.add_argument("--digest", action="store_true", help="record each output's weights digest (to compare runs)")
    m.add_argument("--json", help="store the figures here, with the command and the machine")
    q = sub.add_parser("quality", help="exact match per method on the toy MoE, one domain, 50%% and 75%% sparsity")
    q.add_argument("--model", default=str(Path(__file__).resolve().parent.parent / "lowmoe" / "assets" / "toy-moe"))
    q.add_argument("--domain", default="arithmetic")
    q.add_argument("--keep", type=int, nargs="+", default=[4, 2])
    q.add_argument("--n", type=int, default=100)
    q.add_argument("--calib-n", type=int, default=64)
    q.add_argument("--only", nargs="*", help="only these variant labels (frequency always runs), e.g. 'merge-freq +align' dern")
    q.add_argument("--threads", type=int, default=2)
    q.add_argument("--json", help="store the figures here, with the command and the machine")
    args = ap.parse_args()
    memory(args) if args.cmd == "memory" else quality(args)


if __name__ == "__main__":
    main()
