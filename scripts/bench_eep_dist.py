"""Benchmark: EEP evaluations per hour with 1 and with N processes (torchrun, gloo), one thread each.

    python scripts/bench_eep_dist.py [--nproc 2] [--repeats 2] [--generations 4] [--population 16]
                                     [--examples 64] [--layers 8] [--hidden 256] [--inter 512]
                                     [--save docs/results/eep-dist-cpu.json]

Each run is the real command a user types, in a subprocess with ``OMP_NUM_THREADS=1``:

    python -m lowmoe prune MODEL OUT --method eep --init random ...                      (1 process)
    python -m torch.distributed.run --standalone --nproc-per-node N -m lowmoe prune ...  (N processes)

on a synthetic Mixtral-layout model made in a temporary directory (deleted afterwards) and the toy
arithmetic task as fitness data. The figure is the search's own ``evaluations_per_hour`` from
``lowmoe_report.json`` (candidate evaluations over the search's wall time on rank 0, gathers
included; seeds off with ``--init random``, so only generations are timed). The 1- and N-process runs
alternate, ``--repeats`` times each, and the median is kept; the plans of every run must be equal
(same seed: the same search). The machine is shared: the 1-minute load average before and after
each run is stored with it, and wall times move with it. So the search's CPU time on every rank
(``search_cpu_s`` in the report) gives a second figure, robust to the load: evaluations per hour
when each process has a core to itself, i.e. over the slowest rank's CPU time (gloo's waits block,
they burn no CPU) -- and the total CPU time shows what splitting the work costs in all.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import machine, save_result


def make_inputs(root: Path, args) -> tuple[Path, Path]:
    from lowmoe.toy import tasks
    from lowmoe.toy.synth import synth_model

    model = synth_model(root / "model", "mixtral", layers=args.layers, hidden_size=args.hidden,
                        intermediate_size=args.inter, experts=8, top_k=2, shard_size="200MB")
    calib = root / "calib.jsonl"
    calib.write_text("".join(json.dumps(r) + "\n" for r in tasks.make_split("arithmetic", "calib", args.examples, seed=0)))
    return model, calib


def one_run(nproc: int, model: Path, calib: Path, out: Path, args) -> dict:
    prune = ["prune", str(model), str(out), "--method", "eep", "--keep", "4", "--calib", str(calib), "--init", "random",
             "--generations", str(args.generations), "--population", str(args.population), "--seq-len", "64",
             "--batch-size", "8", "--seed", "0", "--overwrite"]
    launcher = [sys.executable] if nproc == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(nproc)]
    cmd = [*launcher, "-m", "lowmoe", "-q", *prune]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({r.returncode}):\n{r.stderr[-3000:]}")
    rep = json.loads((out / "lowmoe_report.json").read_text())
    eep = rep["eep"]
    cpu = eep["search_cpu_s"]
    return {"processes": nproc, "evaluations": eep["evaluations"], "search_s": eep["search_s"],
            "evaluations_per_hour": eep["evaluations_per_hour"], "search_cpu_s": cpu,
            # with a core to each process, the search takes its slowest rank's CPU time
            "evaluations_per_core_hour": round(eep["evaluations"] / max(cpu) * 3600, 1), "wall_s": round(wall, 2),
            "load_avg_1m_before": round(load0, 2), "load_avg_1m_after": round(os.getloadavg()[0], 2),
            "plan": json.dumps(rep["plan"]["layers"], sort_keys=True)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--population", type=int, default=16)  # lowmoe's default
    ap.add_argument("--examples", type=int, default=64)  # --n-samples's default
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--inter", type=int, default=512)
    ap.add_argument("--save", default=None, help="store the result JSON here (e.g. docs/results/eep-dist-cpu.json)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="lowmoe-bench-dist-"))
    try:
        model, calib = make_inputs(root, args)
        model_bytes = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        runs = []
        for rep in range(args.repeats):
            for n in (1, args.nproc):
                r = one_run(n, model, calib, root / f"out-{n}", args)
                print(f"repeat {rep}: {n} process(es): {r['evaluations']} evaluations in {r['search_s']:.1f}s = "
                      f"{r['evaluations_per_hour']:.0f} evaluations/h; CPU s per rank {r['search_cpu_s']} = "
                      f"{r['evaluations_per_core_hour']:.0f} evaluations/h with a core each (wall {r['wall_s']:.1f}s, load "
                      f"{r['load_avg_1m_before']:.1f} -> {r['load_avg_1m_after']:.1f})", flush=True)
                runs.append(r)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    same_plan = len({r["plan"] for r in runs}) == 1
    for r in runs:
        del r["plan"]
    ns = (1, args.nproc)
    med = {n: statistics.median(r["evaluations_per_hour"] for r in runs if r["processes"] == n) for n in ns}
    core = {n: statistics.median(r["evaluations_per_core_hour"] for r in runs if r["processes"] == n) for n in ns}
    cpu_total = {n: statistics.median(sum(r["search_cpu_s"]) for r in runs if r["processes"] == n) for n in ns}
    speedup, core_speedup = med[args.nproc] / med[1], core[args.nproc] / core[1]
    print(f"median evaluations/h (wall): 1 process {med[1]:.0f}, {args.nproc} processes {med[args.nproc]:.0f} -> "
          f"{speedup:.2f}x; with a core per process (slowest rank's CPU time): {core[1]:.0f} -> "
          f"{core[args.nproc]:.0f} = {core_speedup:.2f}x; CPU s in all: {cpu_total[1]:.1f} -> {cpu_total[args.nproc]:.1f} "
          f"(same plan in every run: {same_plan})")
    result = {
        "command": "python scripts/bench_eep_dist.py " + " ".join(sys.argv[1:]),
        "machine": machine(),
        "model": {"family": "mixtral (synthetic)", "layers": args.layers, "hidden": args.hidden,
                  "intermediate": args.inter, "experts": 8, "bytes": model_bytes},
        "search": {"generations": args.generations, "population": args.population, "examples": args.examples,
                   "init": "random", "threads_per_process": 1, "backend": "gloo"},
        "runs": runs,
        "evaluations_per_hour": {str(n): round(med[n], 1) for n in ns},
        "speedup": round(speedup, 2),
        "evaluations_per_core_hour": {str(n): round(core[n], 1) for n in ns},
        "core_speedup": round(core_speedup, 2),
        "search_cpu_s_total": {str(n): round(cpu_total[n], 2) for n in ns},
        "same_plan": same_plan,
    }
    if args.save:
        save_result(args.save, result)
        print(f"saved {args.save}")


if __name__ == "__main__":
    main()
