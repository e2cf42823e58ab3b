"""Benchmark: peak RSS of an EEP search (``lowmoe prune --method eep``) under --max-ram budgets.

    cd scripts && OMP_NUM_THREADS=1 python bench_eep_budget.py --model /tmp/lowmoe-bench/mix4l \\
        --max-ram none 1GiB 900MB [--baseline-src DIR] --json ../docs/results/eep-budget-mix4l.json

Each run is its own process (``/usr/bin/time -v``: wall and peak RSS): the same search (``--init``
seed pass, ``--generations`` x ``--population``, fitness on ``--examples`` arithmetic examples the
project generates) with no budget and with each ``--max-ram``. A budget the code refuses is recorded
with its one-line error. ``--baseline-src DIR`` runs every budget again on the code in DIR (a ``git
archive`` export with a ``COMMIT`` file; ``--baseline-max-ram`` other budgets for it). Every run that finishes must write the same weights and
the same search curve as the unbudgeted run of the current code (``identical_to_unbudgeted``).
``--plan-only`` runs no search: it stores the plans (``lowmoe inspect --method eep``) for a model too
large to search here.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import machine, save_result, weights_digest
from bench_quant_stream import code_under_test


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="a checkpoint (e.g. lowmoe synth ... /tmp/lowmoe-bench/mix4l)")
    ap.add_argument("--max-ram", nargs="+", default=["none"], help="budgets to run ('none': no flag)")
    ap.add_argument("--keep", default="half")
    ap.add_argument("--init", default="frequency", help="EEP --init: a scoring method (a seed pass) or random")
    ap.add_argument("--generations", type=int, default=2)
    ap.add_argument("--population", type=int, default=4)
    ap.add_argument("--examples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--quant", default="none", help="EEP -O quant=: the search's layer cache (none, int8, nf4)")
    ap.add_argument("--baseline-src", default=None)
    ap.add_argument("--baseline-max-ram", nargs="+", default=None, help="budgets for the baseline (default: --max-ram's)")
    ap.add_argument("--plan-only", action="store_true",
                    help="no search: store what lowmoe inspect --method eep plans (floors, and under each --max-ram)")
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--json", required=True)
    return ap.parse_args()


def run_one(args, model: Path, calib: Path, out: Path, budget: str, src: str | None, root: Path) -> dict:
    env, commit, where = code_under_test(src, root)
    cmd = [sys.executable, "-m", "lowmoe", "-q", "prune", str(model), str(out), "--method", "eep", "--keep", args.keep,
           "--calib", str(calib), "--init", args.init, "--generations", str(args.generations), "--population",
           str(args.population), "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size), "--dtype",
           args.dtype, "--device", "cpu", "--seed", "0", "--overwrite"] + (["--quant", args.quant] if args.quant != "none" else [])
    if budget != "none":
        cmd += ["--max-ram", budget]
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=root)
    wall = time.perf_counter() - t0
    rss = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024
    run = {"max_ram": budget, "lowmoe_commit": commit, "lowmoe_imported_from": where, "rc": p.returncode,
           "wall_s": round(wall, 1), "peak_rss_bytes": rss}
    if p.returncode != 0:
        errors = [ln for ln in p.stderr.splitlines() if ln.startswith("lowmoe: error:")]
        run["error"] = errors[-1] if errors else p.stderr.strip().splitlines()[-1]
        return run
    rep = json.loads((out / "lowmoe_report.json").read_text())
    eep = rep["eep"]
    pop = eep.get("population_budget")
    run.update(evaluations=eep["evaluations"], search_s=eep["search_s"], weights_sha256=weights_digest(out),
               curve=[{k: v for k, v in c.items() if k != "elapsed_s"} for c in eep["curve"]],
               plan_layers=rep["plan"]["layers"],
               sourced=bool(pop and pop.get("sourced")), source_reads=eep["stream_stats"].get("source_reads"),
               candidate_groups=bool(pop and pop.get("candidate_groups")),
               wave_chunks=None if pop is None else pop.get("wave_chunks"),
               merge_block=None if pop is None else pop.get("merge_block"),
               planned_host_peak_bytes=None if pop is None else pop["host_peak_bytes"],
               planned_host_terms=None if pop is None else pop.get("host_terms"),
               group_sizes=None if pop is None else sorted({p["group_size"] for p in pop["layers"].values()}))
    return run


def plans(args, model: Path) -> list[dict]:
    """What ``lowmoe inspect MODEL --method eep`` plans, from the index alone: the search's floors and,
    under each --max-ram, how the population pass would hold a layer and its host terms."""
    from lowmoe.inspect import inspect_model

    out = []
    for budget in args.max_ram:
        b = inspect_model(model, method="eep", keep=args.keep, seq_len=args.seq_len, batch_size=args.batch_size,
                          dtype=args.dtype, max_ram=None if budget == "none" else budget, quant=args.quant,
                          n_samples=args.examples)["budget"]
        out.append({"max_ram": budget, "seed_min_max_ram_bytes": b["min_max_ram_bytes"], **b["eep"]})
    return out


def main() -> None:
    args = parse_args()
    from lowmoe.engine.checkpoint import Checkpoint
    from lowmoe.toy import tasks

    model = Path(args.model).resolve()
    ck = Checkpoint(model)
    root = Path(args.workdir or tempfile.mkdtemp(prefix="lowmoe-eep-budget-")).resolve()
    root.mkdir(parents=True, exist_ok=True)
    calib = root / "arith.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in tasks.make_split("arithmetic", "calib", args.examples, seed=0)))
    result = {"command": "python " + " ".join(sys.argv),  # as invoked (OMP_NUM_THREADS: "omp_num_threads")
              "machine": machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
              "model": {"path": str(model), "arch": ck.config.get("model_type"), "layers": ck.num_layers,
                        "experts": ck.num_experts, "bytes": ck.total_bytes(),
                        "largest_layer_bytes": max(ck.layer_bytes(L) for L in range(ck.num_layers))},
              "search": {"keep": args.keep, "init": args.init, "generations": args.generations,
                         "population": args.population, "examples": args.examples, "seq_len": args.seq_len,
                         "batch_size": args.batch_size, "dtype": args.dtype, "quant": args.quant},
              "runs": []}
    if args.plan_only:
        result["plans"] = plans(args, model)
        save_result(args.json, result)
        print(json.dumps(result["plans"], indent=1))
        return
    try:
        for label, src in [("current", None)] + ([("baseline", args.baseline_src)] if args.baseline_src else []):
            for budget in (args.baseline_max_ram or args.max_ram) if label == "baseline" else args.max_ram:
                out = root / f"out-{label}-{budget}"
                run = {"label": label, **run_one(args, model, calib, out, budget, src, root)}
                result["runs"].append(run)
                print(json.dumps({k: v for k, v in run.items() if k not in ("curve", "plan_layers", "planned_host_terms")}),
                      flush=True)
                shutil.rmtree(out, ignore_errors=True)
        ref = next((r for r in result["runs"] if r["label"] == "current" and r["max_ram"] == "none" and r["rc"] == 0), None)
        for r in result["runs"]:
            if ref is not None and r["rc"] == 0:
                r["identical_to_unbudgeted"] = all(r[k] == ref[k] for k in ("weights_sha256", "curve", "plan_layers"))
        save_result(args.json, result)
    finally:
        if args.workdir is None:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
