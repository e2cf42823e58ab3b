"""Benchmark: EEP candidate evaluations per hour and peak RSS, streamed population vs whole model.

    python scripts/bench_eep.py [--model /tmp/lowmoe-bench/mix2g] [--population 16] [--generations 3]
                                [--examples 8] [--quant none] [--threads 1] [--baseline-evals 6]

1. **streamed** (a subprocess): the real EEP search (``lowmoe.eep.evolve``) for ``--generations``
   generations of ``--population``, every generation one population-parallel streamed pass
   (``PopulationEvaluator``: one layer in memory, prefix sharing, retained parent streams).
   The candidates it evaluated are saved.
2. **whole model** (a subprocess): the same candidates, one at a time, with every tensor of the model
   in memory (``WholeModelEvaluator``: apply the plan, build the transformers model, forward) on the
   same fitness tokens. ``--baseline-evals`` of them are timed (its cost per candidate is constant).

Throughput is reported per wall hour and per CPU hour (process CPU time: robust on a shared
machine), plus peak RSS of each process, and a check that both give the same fitness values.
The default model is the >= 2 GB synthetic Mixtral of the project benchmarks (made on first use).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import BENCH_MODEL, ensure_model  # noqa: E402


def setup(args):
    import torch

    torch.set_num_threads(args.threads)
    from lowmoe import tasks
    from lowmoe.calibration import load_tokenizer
    from lowmoe.checkpoint import Checkpoint
    from lowmoe.eep.fitness import FitnessData
    from lowmoe.eep.space import SearchSpace

    ck = Checkpoint(args.model)
    data = FitnessData.from_records(tasks.make_split(args.domain, "calib", args.examples, seed=0), load_tokenizer(ck.path))
    space = SearchSpace.build(ck.moe_layers(), ck.num_experts, args.keep, args.layer_groups)
    return ck, data, space


def run_streamed(args) -> dict:
    import torch

    from lowmoe.eep.evolve import Evolution, EvolveOptions
    from lowmoe.eep.population import PopulationEvaluator
    from lowmoe.memory import peak_rss_bytes
    from lowmoe.quant import layer_weights

    ck, data, space = setup(args)
    work = Path(args.work)
    t0 = time.perf_counter()
    weights = layer_weights(ck, args.quant, work / f"quant-{args.quant}")
    quant_s = time.perf_counter() - t0
    ev = PopulationEvaluator(ck, weights, space, data, work / "acts", device="cpu", dtype=torch.float32, top_k=args.top_k,
                             batch_size=args.batch_size)
    gens = []

    def evaluate(cands):
        w0, c0 = time.perf_counter(), time.process_time()
        fits = ev.evaluate(cands)
        gens.append({"candidates": len(cands), "wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0})
        print(f"  streamed generation {len(gens) - 1}: {len(cands)} candidates in {gens[-1]['wall_s']:.1f} s wall, "
              f"{gens[-1]['cpu_s']:.1f} s CPU", flush=True)
        return fits

    evo = Evolution(space, EvolveOptions(generations=args.generations, population=args.population, seed=0), evaluate)
    evo.on_generation = lambda g: ev.retain([e.cand for e in evo.parents()[:args.retain]], max_bytes=int(args.retain_gb * 1e9))
    st = evo.run()
    cands = [{"cand": e.cand.to_json(), "fitness": e.fitness.to_json()} for e in st.archive]
    return {"generations": gens, "candidates": cands, "stats": ev.stats, "peak_rss": peak_rss_bytes(), "quant_s": quant_s,
            "bytes_read": weights.bytes_read, "largest_layer": max(ck.layer_bytes(i) for i in range(ck.num_layers)),
            "model_bytes": ck.total_bytes(), "tokens": data.num_tokens}


def run_whole(args) -> dict:
    from lowmoe.eep.population import WholeModelEvaluator
    from lowmoe.eep.space import Candidate
    from lowmoe.memory import peak_rss_bytes

    ck, data, space = setup(args)
    cands = json.loads(Path(args.candidates).read_text())
    w0 = time.perf_counter()
    ev = WholeModelEvaluator(ck, space, data, top_k=args.top_k, batch_size=args.batch_size)
    load_s = time.perf_counter() - w0
    # spread the timed subset over the run (early random and later children alike)
    step = max(1, len(cands) // args.baseline_evals)
    subset = cands[::step][:args.baseline_evals]
    out = []
    for c in subset:
        w0, c0 = time.perf_counter(), time.process_time()
        f = ev.evaluate_one(Candidate.from_json(c["cand"]))
        out.append({"wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0, "fitness": f.to_json(),
                    "streamed": c["fitness"]})
        print(f"  whole-model candidate {len(out)}: {out[-1]['wall_s']:.1f} s wall, {out[-1]['cpu_s']:.1f} s CPU", flush=True)
    return {"evals": out, "load_s": load_s, "peak_rss": peak_rss_bytes()}


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", type=Path, default=BENCH_MODEL)
    p.add_argument("--population", type=int, default=16)
    p.add_argument("--generations", type=int, default=3)
    p.add_argument("--examples", type=int, default=8)
    p.add_argument("--domain", default="arithmetic")
    p.add_argument("--keep", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--layer-groups", default="4")
    p.add_argument("--quant", default="none", choices=["none", "int8", "nf4"])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--retain", type=int, default=None, help="streams kept for at most this many parents (default: all)")
    p.add_argument("--retain-gb", type=float, default=10.0)
    p.add_argument("--baseline-evals", type=int, default=6)
    p.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    p.add_argument("--mode", default="both", choices=["both", "streamed", "whole"], help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--candidates", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode != "both":
        res = run_streamed(args) if args.mode == "streamed" else run_whole(args)
        Path(args.result).write_text(json.dumps(res))
        return
    ensure_model(args.model)
    from lowmoe.memory import fmt_bytes

    with tempfile.TemporaryDirectory(prefix="bench-eep-") as tmp:
        tmp = Path(tmp)
        base = [sys.executable, __file__, "--model", str(args.model), "--population", str(args.population),
                "--generations", str(args.generations), "--examples", str(args.examples), "--domain", args.domain,
                "--keep", str(args.keep), "--top-k", str(args.top_k), "--layer-groups", str(args.layer_groups),
                "--quant", args.quant, "--threads", str(args.threads), "--batch-size", str(args.batch_size),
                "--retain-gb", str(args.retain_gb), *(["--retain", str(args.retain)] if args.retain else []), "--baseline-evals", str(args.baseline_evals)]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        print(f"streamed population search ({args.generations} generations x {args.population}, quant {args.quant}) ...", flush=True)
        subprocess.run(base + ["--mode", "streamed", "--work", str(tmp / "w"), "--result", str(tmp / "s.json")], check=True, env=env)
        s = json.loads((tmp / "s.json").read_text())
        (tmp / "c.json").write_text(json.dumps(s["candidates"]))
        print("whole model in memory, one candidate at a time ...", flush=True)
        subprocess.run(base + ["--mode", "whole", "--candidates", str(tmp / "c.json"), "--result", str(tmp / "b.json")], check=True, env=env)
        b = json.loads((tmp / "b.json").read_text())
    n = sum(g["candidates"] for g in s["generations"])
    s_wall, s_cpu = sum(g["wall_s"] for g in s["generations"]), sum(g["cpu_s"] for g in s["generations"])
    later = s["generations"][1:]
    b_wall = sum(e["wall_s"] for e in b["evals"]) / len(b["evals"])
    b_cpu = sum(e["cpu_s"] for e in b["evals"]) / len(b["evals"])
    max_dll = max(abs(e["fitness"]["ll"] - e["streamed"]["ll"]) for e in b["evals"])
    same_acc = all(e["fitness"]["acc"] == e["streamed"]["acc"] for e in b["evals"])
    fig = {
        "model": str(args.model), "model_bytes": s["model_bytes"], "largest_layer_bytes": s["largest_layer"],
        "fitness_tokens": s["tokens"], "population": args.population, "generations": args.generations, "quant": args.quant,
        "threads": args.threads, "layer_groups": args.layer_groups,
        "streamed": {"evals": n, "evals_per_hour_wall": n / s_wall * 3600, "evals_per_cpu_hour": n / s_cpu * 3600,
                     "children_evals_per_cpu_hour": (sum(g["candidates"] for g in later) / sum(g["cpu_s"] for g in later) * 3600) if later else None,
                     "peak_rss": s["peak_rss"], "stats": s["stats"], "bytes_read": s["bytes_read"], "quant_build_s": s["quant_s"]},
        "whole_model": {"evals_timed": len(b["evals"]), "evals_per_hour_wall": 3600 / b_wall, "evals_per_cpu_hour": 3600 / b_cpu,
                        "load_s": b["load_s"], "peak_rss": b["peak_rss"]},
        "same_fitness": {"accuracy_equal": same_acc, "max_abs_ll_diff": max_dll},
    }
    fig["speedup_cpu"] = fig["streamed"]["evals_per_cpu_hour"] / fig["whole_model"]["evals_per_cpu_hour"]
    fig["speedup_wall"] = fig["streamed"]["evals_per_hour_wall"] / fig["whole_model"]["evals_per_hour_wall"]
    print()
    print(f"model {args.model} ({fmt_bytes(s['model_bytes'])}, largest layer {fmt_bytes(s['largest_layer'])}), "
          f"{s['tokens']} fitness tokens, {args.threads} thread(s), quant {args.quant}")
    print(f"streamed population : {fig['streamed']['evals_per_cpu_hour']:8.1f} evals/CPU-hour  "
          f"{fig['streamed']['evals_per_hour_wall']:8.1f} evals/wall-hour  peak RSS {fmt_bytes(s['peak_rss'])}  "
          f"(layer runs {s['stats']['layer_runs']}, saved by prefix sharing {s['stats']['layer_runs_saved']})")
    if later:
        print(f"  children generations only: {fig['streamed']['children_evals_per_cpu_hour']:.1f} evals/CPU-hour")
    print(f"whole model in RAM  : {fig['whole_model']['evals_per_cpu_hour']:8.1f} evals/CPU-hour  "
          f"{fig['whole_model']['evals_per_hour_wall']:8.1f} evals/wall-hour  peak RSS {fmt_bytes(b['peak_rss'])}")
    print(f"speedup: {fig['speedup_cpu']:.2f}x per CPU-hour, {fig['speedup_wall']:.2f}x per wall-hour; "
          f"same fitness: accuracy equal {same_acc}, max |Δll| {max_dll:.2e}")
    if args.json:
        args.json.write_text(json.dumps(fig, indent=1))


if __name__ == "__main__":
    main()
