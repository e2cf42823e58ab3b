#!/usr/bin/env python
"""Benchmark of issue 7: one device, overlapped I/O, a memory budget.

On a synthetic Mixtral-layout model, time the streamed scoring pass (``lowmoe prune --method
frequency``: read, score, write, propagate, layer by layer) and compare:

  read      reading every shard once, nothing else (the disk's floor)
  resident  the same prune with every layer already in memory (no disk reads in the timed part:
            the compute floor; on CUDA the layers are held in pinned host memory, which is as
            close to "resident" as a model larger than the card allows)
  overlap   the prune with prefetching on (layer L+1 and the next activation chunk read while L
            computes)
  serial    the same with ``--no-prefetch``
  budget    the overlapped prune under ``--max-vram`` (default: a third of the model's size); on a
            CPU run this budgets the compute copy, a rehearsal of the GPU plan
  ram       (``--max-ram``) the prune under a host RAM budget, with its peak RSS

Target (issue 7): overlap <= 1.3 x max(read, resident); peak VRAM under the budget.
Each run is its own process, so peak RSS (ru_maxrss) and CUDA peaks are per run; the page cache is
dropped before each run when this process may (root), otherwise runs read from a warm cache and the
script says so.

    python scripts/bench_gpu.py [--model DIR] [--device auto] [--dtype bf16] [--max-vram 1GiB]
                                [--n-samples 16] [--seq-len 256] [--runs read,resident,overlap,serial,budget]

With no --model it uses /tmp/lowmoe-bench/mix2g (made once with ``lowmoe synth``, ~2.9 GB). For the
GPU figures make a model >= 3x the budget, e.g. ``--synth-layers 32 --synth-hidden 4096`` (~30 GB).
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import BENCH_DIR, drop_caches, ensure_model  # noqa: E402


def calib_file(path: Path) -> Path:
    if not path.is_file():
        import random

        rng = random.Random(0)
        words = ["the", "model", "routes", "tokens", "to", "experts", "def f(x):", "return x + 1", "12 + 30 = 42",
                 "Question:", "Answer:", "sort [3, 1, 2]", "(())", "hello world"]
        path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(2000)) + "\n")
    return path


# ---- one measurement, in a child process ----------------------------------------------------------

def one(spec: dict) -> dict:
    import torch

    import lowmoe
    from lowmoe.engine.checkpoint import Checkpoint
    from lowmoe.engine.memory import peak_rss_bytes

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    model = Path(spec["model"])
    out = {"run": spec["run"]}
    if spec["run"] == "read":
        t0 = time.perf_counter()
        n = 0
        for p in sorted(model.glob("*.safetensors")):
            with open(p, "rb", buffering=0) as f:
                while True:
                    b = f.read(64 << 20)
                    if not b:
                        break
                    n += len(b)
        out.update(wall_s=time.perf_counter() - t0, bytes=n)
        return out
    opts = dict(keep="half", method=spec.get("method", "frequency"), calib=[spec["calib"]], n_samples=spec["n_samples"],
                seq_len=spec["seq_len"], batch_size=spec["batch_size"], device=spec["device"], dtype=spec["dtype"],
                progress=False, overwrite=True, prefetch=spec["run"] != "serial")
    if spec["run"] == "budget":
        opts["max_vram"] = spec["max_vram"]
    if spec["run"] == "ram":
        opts["max_ram"] = spec["max_ram"]
    preload_s = None
    if spec["run"] == "resident":
        # every layer in memory before the clock starts; the prune then reads from there
        t0 = time.perf_counter()
        ck = Checkpoint(model)
        held = {L: ck.read_layer(L) for L in range(ck.num_layers)}
        if spec["device"] != "cpu" and torch.cuda.is_available():
            held = {L: {k: v.pin_memory() for k, v in t.items()} for L, t in held.items()}
        preload_s = time.perf_counter() - t0
        Checkpoint.read_layer = lambda self, L: held[L] if self.path == ck.path and L in held else _orig_read(self, L)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rep = lowmoe.prune(model, spec["out"], **opts)
    wall = time.perf_counter() - t0
    out.update(wall_s=wall, peak_rss=peak_rss_bytes(), preload_s=preload_s, io=rep.get("io"),
               budget={k: v for k, v in (rep.get("budget") or {}).items() if k != "plan"},
               planned=(rep.get("budget") or {}).get("plan", {}), plan=rep["plan"]["layers"])
    if torch.cuda.is_available():
        out["cuda_peak"] = int(torch.cuda.max_memory_allocated())
    shutil.rmtree(spec["out"], ignore_errors=True)
    return out


def _orig_read(self, L):  # replaced below, before any monkeypatching
    raise RuntimeError


# ---- the driver ---------------------------------------------------------------------------------

def gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--synth-layers", type=int, default=16)
    ap.add_argument("--synth-hidden", type=int, default=1024)
    ap.add_argument("--synth-intermediate", type=int, default=3584)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--max-vram", default=None, help="default: a third of the model's size")
    ap.add_argument("--max-ram", default=None, help="also run under this host RAM budget")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--runs", default="read,resident,overlap,serial,budget")
    ap.add_argument("--repeat", type=int, default=1, help="run the list this many times (interleaved); report medians")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(json.loads(args.one)), default=str))
        return

    from lowmoe.engine.checkpoint import Checkpoint
    from lowmoe.engine.device import describe_device, resolve_device

    model = args.model or ensure_model(BENCH_DIR / "mix2g", args.synth_layers, args.synth_hidden, args.synth_intermediate)
    ck = Checkpoint(model)
    size = ck.total_bytes()
    device = resolve_device(args.device)
    max_vram = args.max_vram or str(size // 3)
    work = Path(tempfile.mkdtemp(prefix="lowmoe-bench-gpu-", dir=BENCH_DIR if BENCH_DIR.is_dir() else None))
    calib = calib_file(work / "calib.txt")
    runs = ([r for r in args.runs.split(",") if r] + (["ram"] if args.max_ram else [])) * max(1, args.repeat)
    print(f"model   {model}: {gb(size)}, {ck.num_layers} layers, largest layer {gb(max(ck.layer_bytes(i) for i in range(ck.num_layers)))}")
    print(f"device  {describe_device(device)}; dtype {args.dtype}; calibration {args.n_samples} x {args.seq_len} tokens")
    results: dict[str, dict] = {}
    walls: dict[str, list[float]] = {}
    for run in runs:
        cold = drop_caches()
        spec = dict(run=run, model=str(model), calib=str(calib), out=str(work / f"out-{run}"), device=str(device),
                    dtype=args.dtype, n_samples=args.n_samples, seq_len=args.seq_len, batch_size=args.batch_size,
                    max_vram=max_vram, max_ram=args.max_ram, threads=args.threads)
        p = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True)
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            print(f"{run:9s} FAILED\n{p.stderr[-2000:]}")
            continue
        r = json.loads(line[0][7:])
        r["cold_cache"] = cold
        walls.setdefault(run, []).append(r["wall_s"])
        r["walls_s"] = walls[run]
        r["wall_s"] = sorted(walls[run])[len(walls[run]) // 2]  # median so far
        results[run] = r
        extra = ""
        if r.get("io"):
            extra += f"  io wait {r['io']['total_wait_s']:.2f} s ({100 * r['io'].get('wait_fraction', 0):.1f}% of wall)"
        if r.get("budget", {}).get("chunked_layers"):
            extra += f"  chunked layers {len(r['budget']['chunked_layers'])}, accounted peak {gb(r['budget']['accounted_peak_bytes'])}"
        if r.get("cuda_peak") is not None:
            extra += f"  CUDA peak {gb(r['cuda_peak'])}"
        if r.get("peak_rss"):
            extra += f"  peak RSS {gb(r['peak_rss'])}"
        print(f"{run:9s} {walls[run][-1]:8.2f} s{'' if cold else ' (warm page cache)'}{extra}", flush=True)
    if args.repeat > 1:
        print("medians: " + ", ".join(f"{k} {v['wall_s']:.2f} s" for k, v in results.items()))
    if {"read", "resident", "overlap"} <= set(results):
        floor = max(results["read"]["wall_s"], results["resident"]["wall_s"])
        print(f"overlap / max(read, resident) = {results['overlap']['wall_s'] / floor:.2f}  (target <= 1.3)")
    if {"serial", "overlap"} <= set(results):
        print(f"overlap gain: serial {results['serial']['wall_s']:.2f} s -> overlapped {results['overlap']['wall_s']:.2f} s "
              f"({results['serial']['wall_s'] / results['overlap']['wall_s']:.2f}x)")
    if "budget" in results:
        r = results["budget"]
        from lowmoe.engine.budget import parse_budget

        b = parse_budget(max_vram, "--max-vram")
        peak = r.get("cuda_peak") if device.type == "cuda" else r["budget"].get("accounted_peak_bytes")
        what = "CUDA max_memory_allocated" if device.type == "cuda" else "accounted device peak (CPU rehearsal)"
        print(f"budget {gb(b)} ({gb(size)} model / {size / b:.1f}): {what} {gb(peak)} -> {'under' if peak <= b else 'OVER'}; "
              f"same plan as unbudgeted: {r['plan'] == results.get('overlap', r)['plan']}")
    if "ram" in results:
        r = results["ram"]
        from lowmoe.engine.budget import parse_budget

        b = parse_budget(args.max_ram, "--max-ram")
        print(f"--max-ram {gb(b)}: peak RSS {gb(r['peak_rss'])} ({'under' if r['peak_rss'] <= b else 'OVER'}); planned host peak "
              f"{gb(r['planned'].get('host_peak_bytes'))}; prefetch {'on' if r['planned'].get('prefetch_layers') else 'off'}")
    if args.json:
        args.json.write_text(json.dumps({"model": str(model), "model_bytes": size, "device": describe_device(device),
                                         "dtype": args.dtype, "results": results}, indent=1, default=str))
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    from lowmoe.engine.checkpoint import Checkpoint as _CK

    _orig_read = _CK.read_layer  # noqa: F811 -- the real reader, for the resident run's fallback
    main()
