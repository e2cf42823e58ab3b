"""Where a GPU pass's time goes beyond the disk (issue 15: what session 10 could not profile).

    python3 scripts/gpu_profile.py pinned [--sizes 64MiB,1GiB,3GiB]
        a fresh process's CUDA context creation, then page-locked (pinned) host allocations of these
        sizes, each timed (the staging pool of a 6.65 GB model is 3 x 0.8 GB): is the 1.5-2 s the
        first layer waits for, with nothing to read from the disk, this?
    python3 scripts/gpu_profile.py prune MODEL [--n-samples 8] [--seq-len 512] [--batch-size 2] [--dtype bf16]
        one warm-up prune (imports, profile cache), then the same prune under ``torch.profiler``:
        the operators by self CPU time and by self device time, and the CUDA runtime calls that
        block the host (synchronisations, pinned allocations, copies) with their counts and time
    python3 scripts/gpu_profile.py eep MODEL [--population 8] [--dtype bf16]
        EEP's streamed population pass (``PopulationEvaluator``) over merged candidates: one warm-up
        generation, then another generation of new candidates under ``torch.profiler``; wall and CPU
        seconds per evaluation and the same tables; then a third generation without the profiler and
        the evaluator's own per-stage table (read, load, build, compute, fitness: the report's
        ``eep.stages``). On a GPU, CPU time equal to the wall does not by
        itself mean the pass is CPU-bound: a CUDA synchronisation spins on the host by default
        (cudaDeviceScheduleAuto spins while the process has fewer CUDA contexts than the machine has
        cores), so the tables, not the two clocks, say where the time goes

Prints tables; nothing is stored (``--json FILE`` writes the figures). On a machine without CUDA the
``prune`` profile still runs (CPU activities only) and ``pinned`` says it needs CUDA.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

# CUDA runtime calls that make the host wait or allocate memory, and kernel launches (for their count)
BLOCKING = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy", "cudaMemcpyAsync",
            "cudaHostAlloc", "cudaMallocHost", "cudaHostRegister", "cudaMalloc", "cudaFree", "cudaLaunchKernel")


def pinned(sizes: list[int]) -> dict:
    """Time CUDA's context creation and pinned allocations, in a fresh process (this one)."""
    import torch

    if not torch.cuda.is_available():
        print("pinned: needs CUDA (nothing to measure on this machine)")
        return {}
    t0 = time.perf_counter()
    torch.cuda.init()
    torch.zeros(1, device="cuda")
    torch.cuda.synchronize()
    out = {"cuda_context_s": time.perf_counter() - t0, "pinned_s": {}}
    print(f"CUDA context and first kernel: {out['cuda_context_s']:.3f} s")
    keep = []
    for n in sizes:
        t0 = time.perf_counter()
        keep.append(torch.empty(n, dtype=torch.uint8, pin_memory=True))
        dt = time.perf_counter() - t0
        out["pinned_s"][str(n)] = dt
        print(f"pinned {n / 1e9:7.3f} GB: {dt:.3f} s ({n / dt / 1e9 if dt else float('inf'):.1f} GB/s)")
    t0 = time.perf_counter()
    again = torch.empty(sizes[-1], dtype=torch.uint8, pin_memory=True)
    out["pinned_again_s"] = time.perf_counter() - t0
    print(f"pinned {sizes[-1] / 1e9:7.3f} GB again (torch's host allocator cache is empty of that size): {out['pinned_again_s']:.3f} s")
    del keep, again
    return out


def prune_profile(model: Path, n_samples: int, seq_len: int, batch_size: int, dtype: str) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import lowmoe

    cuda = torch.cuda.is_available()
    work = Path(tempfile.mkdtemp(prefix="lowmoe-gpu-profile-"))
    calib = work / "calib.txt"
    calib.write_text("\n".join(f"the model routes tokens to experts {i} and writes {i + 1} numbers" for i in range(20000)))
    kw = dict(keep="half", method="frequency", calib=[calib], n_samples=n_samples, seq_len=seq_len, batch_size=batch_size,
              device="cuda" if cuda else "cpu", dtype=dtype, progress=False, overwrite=True)
    t0 = time.perf_counter()
    lowmoe.prune(model, work / "warm", **kw)  # imports, the super-expert profile cached
    warm_s = time.perf_counter() - t0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    t0 = time.perf_counter()
    with profile(activities=activities) as prof:
        rep = lowmoe.prune(model, work / "out", **kw)
    wall = time.perf_counter() - t0
    out = {"warm_up_s": warm_s, "profiled_wall_s": wall, "stages": {k: v["s"] for k, v in rep["stages"].items()}}
    print(f"warm-up prune {warm_s:.2f} s; profiled prune {wall:.2f} s (the profiler adds its own overhead)")
    print("stages: " + ", ".join(f"{k} {v:.2f}" for k, v in out["stages"].items() if v >= 0.01))
    out["runtime_calls"] = tables(prof, cuda)
    return out


def tables(prof, cuda: bool) -> dict:
    """Print the operators by self CPU and device time and the blocking CUDA runtime calls; return those calls."""
    events = prof.key_averages()
    print("\nby self CPU time:")
    print(events.table(sort_by="self_cpu_time_total", row_limit=25))
    if cuda:
        print("\nby self device time:")
        print(events.table(sort_by="self_device_time_total", row_limit=25))
    calls = {}
    for e in events:
        if e.key in BLOCKING:
            calls[e.key] = {"count": e.count, "cpu_s": e.self_cpu_time_total / 1e6}
    print("\nCUDA runtime calls (count, host seconds):")
    for k, v in sorted(calls.items(), key=lambda kv: -kv[1]["cpu_s"]):
        print(f"  {k:24s} {v['count']:8d} {v['cpu_s']:9.3f} s")
    if not calls:
        print("  none recorded (no CUDA here)")
    return calls


def eep_profile(model: Path, population: int, dtype: str) -> dict:
    import numpy as np
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench_eep import setup
    from lowmoe.engine.checkpoint import Checkpoint
    from lowmoe.engine.device import DTYPES, synchronize
    from lowmoe.engine.quant import layer_weights
    from lowmoe.methods.eep.population import PopulationEvaluator
    from lowmoe.methods.eep.space import Candidate

    cuda = torch.cuda.is_available()
    dev = torch.device("cuda" if cuda else "cpu")
    work = Path(tempfile.mkdtemp(prefix="lowmoe-gpu-profile-eep-"))
    experts = Checkpoint(model).num_experts
    ck, data, space = setup(argparse.Namespace(model=model, threads=torch.get_num_threads(), domain="arithmetic",
                                               examples=8, keep=max(1, experts // 2), layer_groups="4"))
    weights = layer_weights(ck, "none", work / "quant-none", device=str(dev))
    ev = PopulationEvaluator(ck, weights, space, data, work / "acts", device=dev, dtype=DTYPES[dtype], top_k=ck.top_k)
    rng = np.random.default_rng(0)

    def merged(n: int) -> list:  # merge-phase candidates: every expert of a group mixed into each output expert
        out = []
        for _ in range(n):
            em = rng.random((space.num_groups, space.keep, space.num_experts))
            em /= em.sum(-1, keepdims=True)
            out.append(Candidate(em, em.copy()).canonical())
        return out

    t0 = time.perf_counter()
    ev.evaluate(merged(population))  # imports, kernels, the layers' first reads
    warm_s = time.perf_counter() - t0
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    cands = merged(population)
    with profile(activities=activities) as prof:
        t0, c0 = time.perf_counter(), time.process_time()
        ev.evaluate(cands)
        synchronize(dev)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out = {"warm_up_s": warm_s, "profiled_wall_s": wall, "profiled_cpu_s": cpu, "evaluations": population,
           "wall_s_per_eval": wall / population, "cpu_s_per_eval": cpu / population, "stats": ev.stats}
    print(f"warm-up generation {warm_s:.2f} s; profiled generation of {population}: {wall:.2f} s wall, {cpu:.2f} s CPU "
          f"({wall / population:.3f} s wall, {cpu / population:.3f} s CPU per evaluation; the profiler adds its own overhead)")
    out["runtime_calls"] = tables(prof, cuda)
    # one more generation without the profiler: the evaluator's own per-stage table (report "stages")
    from bench_gpu import stages_table

    since = ev.io.stage_snapshot()
    t0, c0 = time.perf_counter(), time.process_time()
    ev.evaluate(merged(population))
    synchronize(dev)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    out.update(unprofiled_wall_s=wall, unprofiled_cpu_s=cpu, stages=ev.io.stages_json(wall, since=since))
    print(f"a generation without the profiler: {wall:.2f} s wall, {cpu:.2f} s CPU")
    print("\n".join(stages_table({"generation": {"stages": out["stages"], "wall_s": wall}})))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("what", choices=["pinned", "prune", "eep"])
    ap.add_argument("model", nargs="?", type=Path)
    ap.add_argument("--sizes", default="64MiB,1GiB,3GiB")
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--population", type=int, default=8)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.what == "pinned":
        from lowmoe.engine.writer import parse_size

        try:
            sizes = [parse_size(s) for s in args.sizes.split(",") if s.strip()]
        except ValueError as e:
            raise SystemExit(f"--sizes {args.sizes!r}: {e}") from None
        if not sizes:
            raise SystemExit(f"--sizes {args.sizes!r}: give at least one size, e.g. 64MiB,1GiB")
        if not args.child:  # a fresh process: the context and the allocator start empty
            cmd = [sys.executable, __file__, "pinned", "--sizes", args.sizes, "--child"] + (["--json", str(args.json)] if args.json else [])
            raise SystemExit(subprocess.call(cmd))
        result = pinned(sizes)
    else:
        if args.model is None or not (args.model / "config.json").is_file():
            raise SystemExit(f"{args.what}: give a model folder (got {args.model})")
        if args.what == "eep":
            result = eep_profile(args.model, args.population, args.dtype)
        else:
            result = prune_profile(args.model, args.n_samples, args.seq_len, args.batch_size, args.dtype)
    if args.json:
        from _bench import machine

        args.json.write_text(json.dumps({"command": "python " + " ".join(sys.argv), "machine": machine(), **result},
                                        indent=1, default=str) + "\n")


if __name__ == "__main__":
    main()
