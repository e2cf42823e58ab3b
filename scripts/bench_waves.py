#!/usr/bin/env python
"""Benchmark of the experts-major schedule (issue 15): a layer whose experts do not fit at once.

Builds a synthetic Mixtral-layout model (random weights, under /tmp, deleted after) and prunes it
(``--keep half --method frequency``, not sequential, no super-expert profile) three ways, each in its own process:

* ``whole``     -- no budget: each layer's experts on the compute device as one group (read once);
* ``waves``     -- ``--max-ram`` small enough that layers run in expert groups: the activation chunks
                   go through a layer together (``Stream.forward`` waves), each group read once per wave;
* ``chunkwise`` -- the same ``--max-ram`` and plan, one chunk at a time (``Stream.wave_size`` forced to
                   1 in that process: the schedule before this change), every group read for every chunk.

Prints and stores (``--json``) wall time, peak RSS, expert bytes read, group sizes and chunks per wave
of each run, and checks that the three outputs are byte-identical.

    OMP_NUM_THREADS=1 python scripts/bench_waves.py --json docs/results/cpu-bench-waves.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _bench import machine, save_result, weights_digest  # noqa: E402
from bench_gpu import calib_file  # noqa: E402

CHILD = r"""
import json, resource, sys, time
import torch
torch.set_num_threads(1)
import lowmoe
from lowmoe.engine import stream
spec = json.loads(sys.argv[1])
if spec.pop("chunkwise"):
    stream.Stream.wave_size = lambda self, adapter, module: 1
t = time.perf_counter()
rep = lowmoe.prune(spec.pop("model"), spec.pop("out"), **spec)
wall = time.perf_counter() - t
peak = int(open("/proc/self/status").read().split("VmHWM:")[1].split()[0]) * 1024
b = rep["budget"]
print(json.dumps({"wall_s": round(wall, 3), "peak_rss_bytes": peak, "expert_bytes_read": rep["io"]["expert_bytes_read"],
                  "group_sizes": b["group_sizes"], "wave_chunks": (b.get("plan") or {}).get("wave_chunks", 1),
                  "planned_host_peak_bytes": (b.get("plan") or {}).get("host_peak_bytes"),
                  "compute_s": rep["stages"].get("compute", {}).get("s"),
                  "wait_experts_s": rep["stages"].get("wait_experts", {}).get("s")}))
"""



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden-size", type=int, default=512)
    ap.add_argument("--intermediate-size", type=int, default=1792)
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=2)
    ap.add_argument("--max-ram", default="700MB", help="the budget of the waves and chunkwise runs")
    ap.add_argument("--workdir", type=Path, default=None)
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lowmoe-bench-waves-", dir="/tmp"))
    try:
        model = work / "model"
        subprocess.run([sys.executable, "-m", "lowmoe", "-q", "synth", str(model), "--arch", "mixtral", "--layers",
                        str(args.layers), "--hidden-size", str(args.hidden_size), "--intermediate-size",
                        str(args.intermediate_size), "--experts", "8", "--top-k", "2"], check=True)
        calib = calib_file(work / "calib.txt")
        size = sum(p.stat().st_size for p in model.glob("*.safetensors"))
        base = dict(model=str(model), keep="half", method="frequency", calib=[str(calib)], n_samples=args.n_samples,
                    seq_len=args.seq_len, batch_size=args.batch_size, device="cpu", sequential=False,
                    protect_super_experts=False, progress=False)
        runs = {}
        for name, extra in (("whole", {}), ("waves", {"max_ram": args.max_ram}),
                            ("chunkwise", {"max_ram": args.max_ram})):
            spec = dict(base, out=str(work / name), chunkwise=name == "chunkwise", **extra)
            out = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], check=True, capture_output=True,
                                 text=True).stdout
            runs[name] = json.loads(out.strip().splitlines()[-1])
            runs[name]["output_sha256"] = weights_digest(work / name)
            r = runs[name]
            print(f"{name:10s} wall {r['wall_s']:7.2f} s  peak RSS {r['peak_rss_bytes'] / 1e9:.2f} GB  expert bytes read "
                  f"{r['expert_bytes_read'] / 1e9:.3f} GB  groups {sorted(set(r['group_sizes'].values()))}  "
                  f"chunks/wave {r['wave_chunks']}", flush=True)
        same = len({r["output_sha256"] for r in runs.values()}) == 1
        chunks = -(-args.n_samples // args.batch_size)
        print(f"model {size / 1e9:.2f} GB, {chunks} activation chunks; outputs byte-identical: {same}; "
              f"reads chunkwise/waves {runs['chunkwise']['expert_bytes_read'] / runs['waves']['expert_bytes_read']:.2f}x, "
              f"wall chunkwise/waves {runs['chunkwise']['wall_s'] / runs['waves']['wall_s']:.2f}x")
        if args.json:
            save_result(args.json, {"command": "python " + " ".join(sys.argv), "env": "OMP_NUM_THREADS=1",
                                    "machine": machine(), "model_bytes": size, "activation_chunks": chunks,
                                    "outputs_identical": same, "runs": runs})
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
