#!/usr/bin/env python
"""Benchmark of the streaming engine (issue 2).

On a synthetic Mixtral-layout model of >= 2 GB (>= 16 layers), measure peak RSS and wall time of
``lowmoe prune --keep half --method frequency`` against
  (a) loading the whole model with ``AutoModelForCausalLM.from_pretrained``, and
  (b) reading every input shard once and writing the output once (``cat`` > /dev/null, ``cp``).
Targets: peak RSS <= 2x the largest layer + 1 GB; wall time <= 2x (b).

Each measurement runs in its own process; peak RSS is that process's ru_maxrss.

    python scripts/bench_stream.py [--model DIR] [--n-samples 16] [--seq-len 256] [--json OUT]

``--json OUT`` stores the figures with the command line and the machine (docs/results/).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import BENCH_DIR, drop_caches, ensure_model, machine  # noqa: E402


def timed(cmd: list[str], **kw) -> tuple[float, int]:
    """Wall seconds and the child's peak RSS (bytes)."""
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(cmd, check=True, **kw)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(peak, before) * 1024


def child_peak(cmd: list[str]) -> tuple[float, int]:
    """Run ``cmd`` under /usr/bin/time-like accounting via a wrapper python that reports its own child."""
    code = ("import resource,subprocess,sys,time,json;t=time.perf_counter();subprocess.run(sys.argv[1:],check=True);"
            "print(json.dumps([time.perf_counter()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024]))")
    out = subprocess.run([sys.executable, "-c", code, *cmd], check=True, capture_output=True, text=True).stdout
    wall, peak = json.loads(out.strip().splitlines()[-1])
    return wall, peak


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=BENCH_DIR / "mix2g")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--skip-full-load", action="store_true", help="skip (a), loading the whole model")
    ap.add_argument("--json", type=Path, help="store the figures, the command and the machine here")
    args = ap.parse_args()
    model = ensure_model(args.model)
    from lowmoe.engine.checkpoint import Checkpoint

    ck = Checkpoint(model)
    largest = max(ck.layer_bytes(i) for i in range(ck.num_layers))
    total = ck.total_bytes()
    shards = sorted(str(p) for p in model.glob("*.safetensors"))
    work = Path(tempfile.mkdtemp(prefix="lowmoe-bench-", dir=BENCH_DIR))
    calib = work / "calib.txt"
    calib.write_text("\n".join(f"line {i}: the quick brown fox jumps over {i * 7 % 13} lazy dogs; 12+{i}={12 + i}"
                               for i in range(4000)))
    cold = drop_caches()

    # (b) read every shard once + write the output once
    t_cat, _ = child_peak(["sh", "-c", "cat " + " ".join(shards) + " > /dev/null"])
    t_full = rss_full = None
    drop_caches()
    t_cp, _ = child_peak(["cp", "-r", str(model), str(work / "copy")])
    shutil.rmtree(work / "copy")
    io_time = t_cat + t_cp

    drop_caches()
    t_prune, rss_prune = child_peak([sys.executable, "-m", "lowmoe", "-q", "prune", str(model), str(work / "out"),
                                     "--keep", "half", "--method", "frequency", "--calib", str(calib),
                                     "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len)])
    report = json.loads((work / "out" / "lowmoe_report.json").read_text())
    shutil.rmtree(work / "out")

    rows = [("lowmoe prune --keep half --method frequency", t_prune, rss_prune)]
    if not args.skip_full_load:
        drop_caches()
        code = (f"import torch;from transformers import AutoModelForCausalLM as A;"
                f"A.from_pretrained({str(model)!r}, dtype=torch.bfloat16)")
        t_full, rss_full = child_peak([sys.executable, "-c", code])
        rows.append(("(a) AutoModelForCausalLM.from_pretrained (bf16)", t_full, rss_full))
    rows.append(("(b) cat shards > /dev/null + cp -r", io_time, None))
    shutil.rmtree(work, ignore_errors=True)

    print(f"\nmodel {model}: {gb(total)}, {ck.num_layers} layers, largest layer {gb(largest)}; "
          f"calibration {args.n_samples} x {args.seq_len} tokens; cpus {os.cpu_count()}; "
          f"page cache {'dropped before each run' if cold else 'NOT dropped (warm reads)'}")
    print(f"{'run':52s} {'wall s':>8s} {'peak RSS':>10s}")
    for name, wall, rss in rows:
        print(f"{name:52s} {wall:8.1f} {gb(rss) if rss else '-':>10s}")
    rss_target = 2 * largest + 1e9
    print(f"\npeak RSS target  <= 2 x largest layer + 1 GB = {gb(rss_target)}: "
          f"{'MET' if rss_prune <= rss_target else 'MISSED'} ({gb(rss_prune)})")
    print(f"wall time target <= 2 x (b) = {2 * io_time:.1f} s: {'MET' if t_prune <= 2 * io_time else 'MISSED'} ({t_prune:.1f} s)")
    lt = report["timings"]["layers"]
    print(f"prune breakdown: read {sum(v.get('read_s', 0) for v in lt.values()):.1f}s, "
          f"compute {sum(v.get('compute_s', 0) for v in lt.values()):.1f}s, write {sum(v.get('write_s', 0) for v in lt.values()):.1f}s")
    if args.json:
        res = {"command": "python scripts/bench_stream.py " + " ".join(sys.argv[1:]), "machine": machine(),
               "page_cache_dropped": cold,
               "model": {"bytes": total, "gb": round(total / 1e9, 2), "layers": ck.num_layers, "largest_layer_bytes": largest,
                         "largest_layer_gb": round(largest / 1e9, 2), "dtype": str(ck.config.get("torch_dtype", ck.config.get("dtype")))},
               "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len},
               "prune": {"wall_s": round(t_prune, 1), "peak_rss_gb": round(rss_prune / 1e9, 2),
                         "read_s": round(sum(v.get("read_s", 0) for v in lt.values()), 1),
                         "compute_s": round(sum(v.get("compute_s", 0) for v in lt.values()), 1),
                         "write_s": round(sum(v.get("write_s", 0) for v in lt.values()), 1),
                         "io": report.get("io"),
                         "layer_read_hidden_fraction": round(1 - report["io"]["wait_s"]["layer"] / report["io"]["read_s"]["layer"], 3)
                         if report.get("io", {}).get("read_s", {}).get("layer") else None},
               "full_load": None if t_full is None else {"wall_s": round(t_full, 1), "peak_rss_gb": round(rss_full / 1e9, 2)},
               "read_and_copy": {"cat_s": round(t_cat, 1), "cp_s": round(t_cp, 1), "total_s": round(io_time, 1)},
               "targets": {"peak_rss_gb": round(rss_target / 1e9, 2), "peak_rss_met": rss_prune <= rss_target,
                           "wall_s": round(2 * io_time, 1), "wall_met": t_prune <= 2 * io_time}}
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(res, indent=1) + "\n")


if __name__ == "__main__":
    main()
