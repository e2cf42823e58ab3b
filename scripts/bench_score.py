"""Benchmark ``lowmoe score``: wall time and peak RSS of each scoring method against one plain
streamed forward pass over the same calibration tokens (same reader, cache, layer compute; no hooks).

Every measurement runs in a fresh process so peak RSS is its own. Wall time and CPU time (user +
system of that process) are both reported: on a shared machine wall time swings with other load,
CPU time much less. The plain pass runs first and last (``--repeats`` times each); the ratio uses
their mean. Prints a table.

    nice -n 10 .venv/bin/python scripts/bench_score.py --model /tmp/lowmoe-bench/mix2g --n-samples 64 --seq-len 512

The model: ``lowmoe synth /tmp/lowmoe-bench/mix2g --arch mixtral --layers 16 --hidden-size 1024
--intermediate-size 3584 --experts 8 --top-k 2 --dtype bfloat16 --shard-size 1GB`` (2.9 GB).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import machine, save_result  # noqa: E402

METHODS = ["frequency", "gate-mass", "reap", "easy-ep", "tcess", "reconstruction"]


def write_calib(path: Path, n_chars: int) -> Path:
    rng = random.Random(0)
    words = ["alpha", "beta", "gamma", "def f(x):", "return x + 1", "12 + 30 = 42", "sort the list", "(())", "proof."]
    path.write_text(" ".join(rng.choice(words) for _ in range(n_chars // 6)))
    return path


def child_plain(args) -> dict:
    """One plain streamed forward pass: calibrate, embed, then every layer read (the next one
    prefetched, as in prune and score), built and run."""
    import torch

    from lowmoe.engine.cache import ActivationCache
    from lowmoe.engine.calibration import load_tokenizer, tokenize
    from lowmoe.engine.checkpoint import Checkpoint
    from lowmoe.engine.device import DTYPES
    from lowmoe.engine.stream import Stream

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    ck = Checkpoint(args.model)
    tokens = tokenize([args.calib], load_tokenizer(ck.path), seq_len=args.seq_len, n_samples=args.n_samples)
    tmp = Path(tempfile.mkdtemp(prefix="bench-plain-"))
    try:
        stream = Stream(ck, tokens, ActivationCache(tmp), torch.device(args.device), DTYPES[args.dtype], args.batch_size)
        stream.embed()
        for layer_idx, data in stream.layers(0, set(ck.moe_layers())):
            module = stream.materialize(layer_idx, data.runtime)
            del data
            stream.forward(layer_idx, module, write=True)
            del module
            stream.cache.drop(layer_idx)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return {"wall_s": time.perf_counter() - t0}


def child_score(args) -> dict:
    import torch

    from lowmoe.score import score

    torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rep = score(args.model, calib=[args.calib], method=args.method, seq_len=args.seq_len, n_samples=args.n_samples,
                batch_size=args.batch_size, device=args.device, dtype=args.dtype, progress=False,
                protect_super_experts=not args.no_protect)
    n_super = len(rep["super_experts"].get("super_experts", []))
    return {"wall_s": time.perf_counter() - t0, "super_experts": n_super}


def run_child(argv: list[str]) -> dict:
    r = subprocess.run([sys.executable, __file__, "--child", *argv], capture_output=True, text=True, check=False)
    if r.returncode != 0:
        raise SystemExit(f"child failed: {' '.join(argv)}\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="/tmp/lowmoe-bench/mix2g")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--n-samples", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=512)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=1, help="Plain passes to time (the fastest counts).")
    ap.add_argument("--no-protect", action="store_true", help="Score without super-expert detection.")
    ap.add_argument("--calib", default=None)
    ap.add_argument("--method", default=None)
    ap.add_argument("--child", action="store_true")
    ap.add_argument("--json", default=None, help="Also store the figures here, with the command and the machine.")
    args = ap.parse_args()

    if args.child:
        res = child_plain(args) if args.method is None else child_score(args)
        ru = resource.getrusage(resource.RUSAGE_SELF)
        res["peak_rss_bytes"] = ru.ru_maxrss * 1024
        res["cpu_s"] = ru.ru_utime + ru.ru_stime
        print(json.dumps(res))
        return

    work = Path(tempfile.mkdtemp(prefix="bench-score-"))
    calib = args.calib or str(write_calib(work / "calib.txt", args.n_samples * args.seq_len * 2))
    common = ["--model", args.model, "--calib", calib, "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len),
              "--batch-size", str(args.batch_size), "--dtype", args.dtype, "--device", args.device,
              "--threads", str(args.threads)] + (["--no-protect"] if args.no_protect else [])
    model_bytes = sum(p.stat().st_size for p in Path(args.model).glob("*.safetensors"))
    print(f"model {args.model} ({model_bytes / 1e9:.2f} GB), {args.n_samples} x {args.seq_len} tokens, "
          f"batch {args.batch_size}, {args.dtype} on {args.device}, {args.threads} threads", flush=True)
    def show(name, res):
        print(f"{name}: wall {res['wall_s']:.1f}s, cpu {res['cpu_s']:.1f}s, peak RSS {res['peak_rss_bytes'] / 2**20:.0f} MiB",
              flush=True)
        return res

    plains = [show("plain pass", run_child(common)) for _ in range(args.repeats)]
    results = [(m, show(m, run_child(common + ["--method", m]))) for m in args.methods.split(",")]
    plains += [show("plain pass", run_child(common)) for _ in range(args.repeats)]
    shutil.rmtree(work, ignore_errors=True)
    base = {k: sum(p[k] for p in plains) / len(plains) for k in ("wall_s", "cpu_s", "peak_rss_bytes")}
    print()
    print(f"| {'run':26s} | {'wall s':>7s} | {'x plain':>7s} | {'cpu s':>7s} | {'x plain':>7s} | {'peak RSS MiB':>12s} |")
    print(f"|{'-' * 28}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 9}|{'-' * 14}|")
    walls = ", ".join(f"{p['wall_s']:.0f}" for p in plains)
    rows = [(f"plain pass (mean of {len(plains)})", base)] + results
    for name, res in rows:
        print(f"| {name:26s} | {res['wall_s']:7.1f} | {res['wall_s'] / base['wall_s']:7.2f} | {res['cpu_s']:7.1f} | "
              f"{res['cpu_s'] / base['cpu_s']:7.2f} | {res['peak_rss_bytes'] / 2**20:12.0f} |")
    print(f"plain passes, wall s: {walls}")
    if args.json:
        save_result(args.json, {
            "command": "python scripts/bench_score.py " + " ".join(sys.argv[1:]), "machine": machine(),
            "model": args.model, "model_bytes": model_bytes, "n_samples": args.n_samples, "seq_len": args.seq_len,
            "batch_size": args.batch_size, "dtype": args.dtype, "threads": args.threads,
            "protect_super_experts": not args.no_protect,
            "plain": {**{k: round(v, 2) for k, v in base.items()}, "runs": plains},
            "methods": {m: {**res, "x_plain_wall": round(res["wall_s"] / base["wall_s"], 3),
                            "x_plain_cpu": round(res["cpu_s"] / base["cpu_s"], 3),
                            "rss_over_plain_bytes": res["peak_rss_bytes"] - base["peak_rss_bytes"]}
                        for m, res in results}})


if __name__ == "__main__":
    main()
