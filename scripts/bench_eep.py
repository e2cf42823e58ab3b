"""Benchmark: EEP candidate evaluations per hour and peak RSS, streamed population vs whole model.

    python scripts/bench_eep.py [--model /tmp/lowmoe-bench/mix2g] [--population 16] [--generations 3]
                                [--examples 8] [--quant none] [--threads 1] [--baseline-evals 6]
                                [--no-trim] [--device cpu|cuda]

1. **streamed** (a subprocess): the real EEP search (``lowmoe.methods.eep.evolve``) for ``--generations``
   generations of ``--population``, every generation one population-parallel streamed pass
   (``PopulationEvaluator``: one layer in memory, prefix sharing, retained parent streams).
   The candidates it evaluated are saved.
2. **whole model, teacher-forced** (a subprocess): the same candidates, one at a time, with every
   tensor of the model in memory (``WholeModelEvaluator``: apply the plan, build the transformers
   model, one forward) on the same fitness tokens. ``--baseline-evals`` of them are timed (its cost
   per candidate is constant), spread over the run.
3. **whole model, generation** (a subprocess): what EEP's reference code does per candidate -- the
   whole model resident, the candidate's merged weights loaded, fitness by greedy *generation*
   (transformers ``generate``, greedy, KV cache, batched with left padding, as many new tokens as the
   longest gold answer of the batch); an example is right iff its first |answer| generated tokens
   are the answer. Same candidates as 2; its accuracy is checked against the teacher-forced fitness.

Throughput is reported per wall hour and per CPU hour (process CPU time: robust on a shared
machine), plus peak RSS of each process, and a check that both give the same fitness values.
``--device cuda`` runs all three on the GPU (issue 15: GPU evaluations per hour next to the CPU's,
and the CPU seconds each GPU evaluation costs; CUDA's peak too).
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

from _bench import BENCH_MODEL, ensure_model, machine


def setup(args):
    import torch

    torch.set_num_threads(args.threads)
    from lowmoe.toy import tasks
    from lowmoe.engine.calibration import load_tokenizer
    from lowmoe.engine.checkpoint import Checkpoint
    from lowmoe.methods.eep.fitness import FitnessData
    from lowmoe.methods.eep.space import SearchSpace

    ck = Checkpoint(args.model)
    data = FitnessData.from_records(tasks.make_split(args.domain, "calib", args.examples, seed=0), load_tokenizer(ck.path))
    space = SearchSpace.build(ck.moe_layers(), ck.num_experts, args.keep, args.layer_groups)
    return ck, data, space


def run_streamed(args) -> dict:
    import torch

    from lowmoe.methods.eep.evolve import Evolution, EvolveOptions
    from lowmoe.methods.eep.population import PopulationEvaluator
    from lowmoe.engine.memory import peak_rss_bytes
    from lowmoe.engine.quant import layer_weights

    ck, data, space = setup(args)
    work = Path(args.work)
    t0 = time.perf_counter()
    weights = layer_weights(ck, args.quant, work / f"quant-{args.quant}", device=args.device)
    quant_s = time.perf_counter() - t0
    ev = PopulationEvaluator(ck, weights, space, data, work / "acts", device=args.device, dtype=getattr(torch, args.dtype),
                             top_k=args.top_k, batch_size=args.batch_size, trim=not args.no_trim)
    gens = []

    def evaluate(cands):
        w0, c0, r0 = time.perf_counter(), time.process_time(), ev.stats["layer_runs"]
        fits = ev.evaluate(cands)
        gens.append({"candidates": len(cands), "wall_s": time.perf_counter() - w0, "cpu_s": time.process_time() - c0,
                     "layer_runs": ev.stats["layer_runs"] - r0})
        print(f"  streamed generation {len(gens) - 1}: {len(cands)} candidates in {gens[-1]['wall_s']:.1f} s wall, "
              f"{gens[-1]['cpu_s']:.1f} s CPU, {gens[-1]['layer_runs']} layer runs", flush=True)
        return fits

    evo = Evolution(space, EvolveOptions(generations=args.generations, population=args.population, seed=0), evaluate)
    evo.on_generation = lambda g: ev.retain([e.cand for e in evo.parents()[:args.retain]], max_bytes=int(args.retain_gb * 1e9))
    st = evo.run()
    cands = [{"cand": e.cand.to_json(), "fitness": e.fitness.to_json()} for e in st.archive]
    return {"generations": gens, "candidates": cands, "stats": ev.stats, "peak_rss": peak_rss_bytes(), "quant_s": quant_s,
            "stages": ev.io.stages_json(sum(g["wall_s"] for g in gens)),  # where the generations' time went
            "cuda_peak": int(torch.cuda.max_memory_allocated()) if torch.cuda.is_available() else None,
            "bytes_read": weights.bytes_read, "largest_layer": max(ck.layer_bytes(i) for i in range(ck.num_layers)),
            "model_bytes": ck.total_bytes(), "tokens": data.num_tokens, "layers": ck.num_layers,
            "chunk_bytes": min(args.batch_size, data.input_ids.shape[0]) * data.input_ids.shape[1] * int(ck.config["hidden_size"]) * 4}


def greedy_fitness(model, data, batch_size: int) -> tuple[dict, list[int]]:
    """EEP-style fitness: accuracy of greedy generation (KV cache), batched with left padding, as
    many new tokens as the longest gold answer of the batch; right iff the first |answer| tokens match.
    Also returns every example's first generated token."""
    import torch

    if any(lbl is not None for lbl in data.labels):
        raise SystemExit("the generation baseline handles generative (prompt/answer) examples only")
    pad = int(model.config.pad_token_id or 0)
    right, first = 0, []
    for i in range(0, len(data.rows), batch_size):
        rows = data.rows[i:i + batch_size]
        ids = data.input_ids[i:i + batch_size]
        width = max(r.start for r in rows)
        prompt = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for b, r in enumerate(rows):
            prompt[b, width - r.start:] = ids[b, :r.start]
            mask[b, width - r.start:] = 1
        new = max(r.length for r in rows)
        out = model.generate(input_ids=prompt.to(model.device), attention_mask=mask.to(model.device), do_sample=False,
                             max_new_tokens=new, use_cache=True, pad_token_id=pad)[:, width:].cpu()
        # (a sequence that ended with EOS is padded: it is right only if the whole answer came before)
        right += sum(bool(torch.equal(out[b, :r.length], ids[b, r.start:r.start + r.length])) for b, r in enumerate(rows))
        first += out[:, 0].tolist()
    return {"acc": right / len(data.rows)}, first


def run_whole(args) -> dict:
    import torch

    from lowmoe.methods.eep.population import WholeModelEvaluator
    from lowmoe.methods.eep.space import Candidate
    from lowmoe.engine.memory import peak_rss_bytes

    ck, data, space = setup(args)
    cands = json.loads(Path(args.candidates).read_text())
    w0 = time.perf_counter()
    ev = WholeModelEvaluator(ck, space, data, top_k=args.top_k, batch_size=args.batch_size, dtype=getattr(torch, args.dtype),
                             device=args.device)
    load_s = time.perf_counter() - w0
    # spread the timed subset over the run (early random and later children alike)
    step = max(1, len(cands) // args.baseline_evals)
    subset = cands[::step][:args.baseline_evals]
    out = []
    for c in subset:
        w0, c0 = time.perf_counter(), time.process_time()
        cand = Candidate.from_json(c["cand"])
        if args.mode == "whole":
            f = ev.evaluate_one(cand).to_json()
        else:  # build the candidate's model as the teacher-forced baseline does, then generate
            with torch.no_grad():
                model = ev.model(cand)
                f, first = greedy_fitness(model, data, args.batch_size)
        wall, cpu = time.perf_counter() - w0, time.process_time() - c0
        if args.mode == "generate":  # untimed check: greedy's first token is the teacher-forced argmax
            with torch.no_grad():
                tf = [int(model(data.input_ids[i:i + 1].to(model.device), use_cache=False).logits[0, r.start - 1].argmax())
                      for i, r in enumerate(data.rows)]
            f["first_token_agree"] = sum(a == b for a, b in zip(first, tf)) / len(tf)
            del model
        out.append({"wall_s": wall, "cpu_s": cpu, "fitness": f, "streamed": c["fitness"]})
        print(f"  {args.mode} candidate {len(out)}: {out[-1]['wall_s']:.1f} s wall, {out[-1]['cpu_s']:.1f} s CPU, "
              f"acc {f['acc']:.3f} (streamed {c['fitness']['acc']:.3f})", flush=True)
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
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                   help="compute dtype of both the streamed search and the baselines")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"], help="where every evaluation runs")
    p.add_argument("--retain", type=int, default=None, help="streams kept for at most this many parents (default: all)")
    p.add_argument("--retain-gb", type=float, default=10.0)
    p.add_argument("--baseline-evals", type=int, default=6)
    p.add_argument("--json", type=Path, default=None, help="Also write the figures here.")
    p.add_argument("--no-trim", action="store_true",
                   help="run the MoE blocks on every position, padding included (bit-exact to the whole model)")
    p.add_argument("--mode", default="both", choices=["both", "streamed", "whole", "generate"], help=argparse.SUPPRESS)
    p.add_argument("--work", default=None, help=argparse.SUPPRESS)
    p.add_argument("--candidates", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.mode != "both":
        res = run_streamed(args) if args.mode == "streamed" else run_whole(args)
        Path(args.result).write_text(json.dumps(res))
        return
    ensure_model(args.model)
    from lowmoe.engine.memory import fmt_bytes

    with tempfile.TemporaryDirectory(prefix="bench-eep-") as tmp:
        tmp = Path(tmp)
        base = [sys.executable, __file__, "--model", str(args.model), "--population", str(args.population),
                "--generations", str(args.generations), "--examples", str(args.examples), "--domain", args.domain,
                "--keep", str(args.keep), "--top-k", str(args.top_k), "--layer-groups", str(args.layer_groups),
                "--quant", args.quant, "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--dtype", args.dtype,
                "--retain-gb", str(args.retain_gb), *(["--retain", str(args.retain)] if args.retain else []),
                "--baseline-evals", str(args.baseline_evals), "--device", args.device, *(["--no-trim"] if args.no_trim else [])]
        env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
        print(f"streamed population search ({args.generations} generations x {args.population}, quant {args.quant}) ...", flush=True)
        subprocess.run(base + ["--mode", "streamed", "--work", str(tmp / "w"), "--result", str(tmp / "s.json")], check=True, env=env)
        s = json.loads((tmp / "s.json").read_text())
        (tmp / "c.json").write_text(json.dumps(s["candidates"]))
        res = {}
        for mode, what in (("whole", "teacher-forced"), ("generate", "greedy generation")):
            print(f"whole model in memory, one candidate at a time, {what} ...", flush=True)
            subprocess.run(base + ["--mode", mode, "--candidates", str(tmp / "c.json"), "--result", str(tmp / f"{mode}.json")],
                           check=True, env=env)
            res[mode] = json.loads((tmp / f"{mode}.json").read_text())
    gens = s["generations"]
    n = sum(g["candidates"] for g in gens)
    s_wall, s_cpu = sum(g["wall_s"] for g in gens), sum(g["cpu_s"] for g in gens)
    tail = gens[len(gens) // 2:]  # the second half: cross-generation stream reuse at its steady state
    bound = 2 * s["largest_layer"] + s["chunk_bytes"] + 2**30
    fig = {
        "command": "python scripts/bench_eep.py " + " ".join(sys.argv[1:]), "machine": machine(),
        "model": str(args.model), "model_bytes": s["model_bytes"], "largest_layer_bytes": s["largest_layer"],
        "fitness_tokens": s["tokens"], "population": args.population, "generations": args.generations, "quant": args.quant,
        "threads": args.threads, "dtype": args.dtype, "layer_groups": args.layer_groups, "trim": not args.no_trim,
        "device": args.device,
        "rss_bound": bound, "chunk_bytes": s["chunk_bytes"],
        "streamed": {"evals": n, "evals_per_hour_wall": n / s_wall * 3600, "evals_per_cpu_hour": n / s_cpu * 3600,
                     "second_half_evals_per_cpu_hour": sum(g["candidates"] for g in tail) / sum(g["cpu_s"] for g in tail) * 3600,
                     "cpu_s_per_eval": s_cpu / n, "generations": gens, "peak_rss": s["peak_rss"], "cuda_peak": s["cuda_peak"],
                     "stats": s["stats"], "bytes_read": s["bytes_read"], "quant_build_s": s["quant_s"],
                     "stages": s["stages"]},
    }
    print()
    print(f"model {args.model} ({fmt_bytes(s['model_bytes'])}, largest layer {fmt_bytes(s['largest_layer'])}), "
          f"{s['tokens']} fitness tokens, {args.threads} thread(s), quant {args.quant}; "
          f"RSS bound 2 x layer + chunk + 1 GB = {fmt_bytes(bound)}")
    st = s["stats"]
    print(f"streamed population   : {fig['streamed']['evals_per_cpu_hour']:7.1f} evals/CPU-hour {fig['streamed']['evals_per_hour_wall']:7.1f} "
          f"evals/wall-hour  {s_cpu / n:.1f} CPU s/eval  peak RSS {fmt_bytes(s['peak_rss'])}"
          + (f"  CUDA peak {fmt_bytes(s['cuda_peak'])}" if s["cuda_peak"] else "") + f"  (second half {fig['streamed']['second_half_evals_per_cpu_hour']:.1f}/CPU-hour; "
          f"{st['layer_runs']} layer runs for {n} x {s['layers']} = {n * s['layers']} candidate layers; "
          f"{st['layer_runs_saved']} skipped from retained streams; {st['layer_builds']} MoE blocks built)")
    from bench_gpu import stages_table

    print("\n".join("  " + line for line in stages_table({"streamed": {"stages": s["stages"], "wall_s": s_wall}})))
    for mode, label in (("whole", "whole model, teacher-f"), ("generate", "whole model, generate")):
        b = res[mode]
        w = sum(e["wall_s"] for e in b["evals"]) / len(b["evals"])
        c = sum(e["cpu_s"] for e in b["evals"]) / len(b["evals"])
        same_acc = all(e["fitness"]["acc"] == e["streamed"]["acc"] for e in b["evals"])
        d = {"evals_timed": len(b["evals"]), "evals_per_hour_wall": 3600 / w, "evals_per_cpu_hour": 3600 / c,
             "load_s": b["load_s"], "peak_rss": b["peak_rss"], "accuracy_equal": same_acc, "evals": b["evals"],
             "speedup_cpu": fig["streamed"]["evals_per_cpu_hour"] * c / 3600,
             "speedup_wall": fig["streamed"]["evals_per_hour_wall"] * w / 3600,
             "rss_ratio": b["peak_rss"] / s["peak_rss"]}  # the baseline's peak RSS over the streamed search's
        if mode == "whole":
            d["max_abs_ll_diff"] = max(abs(e["fitness"]["ll"] - e["streamed"]["ll"]) for e in b["evals"])
        else:
            d["first_token_agree"] = min(e["fitness"]["first_token_agree"] for e in b["evals"])
        fig[mode] = d
        print(f"{label:22s}: {d['evals_per_cpu_hour']:7.1f} evals/CPU-hour {d['evals_per_hour_wall']:7.1f} evals/wall-hour  "
              f"peak RSS {fmt_bytes(b['peak_rss'])}  -> streamed is {d['speedup_cpu']:.2f}x per CPU-hour, "
              f"{d['speedup_wall']:.2f}x per wall-hour; accuracy equal {same_acc}"
              + (f", max |dll| {d['max_abs_ll_diff']:.2e}" if mode == "whole" else f", first-token agreement {d['first_token_agree']:.2f}"))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(fig, indent=1) + "\n")


if __name__ == "__main__":
    main()
