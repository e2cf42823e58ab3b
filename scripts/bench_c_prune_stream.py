#!/usr/bin/env python
"""Benchmark: host memory and time of ``lowmoe prune --method c-prune`` on one real model's layer geometry.

C-Prune drives its run itself: a scoring pass over the original model (routing statistics, expert
importance, and the weight similarity of every pair of experts), a global step, then the write pass.
Since session 14 its scoring pass reads a layer's routed experts in groups, as the one-shot prune does,
and the weight similarity reads them once more, one projection at a time. This runs it in a child
process (peak RSS is that process's ru_maxrss) on the Mixtral-8x7B geometry of ``bench_stream.py
--geometry mixtral-8x7b`` (3 layers of hidden 4096, intermediate 14336, 8 experts, bf16: 8.2 GiB,
2.8 GiB a layer; built once under ``--workdir`` and kept), pruned to 4 experts without flags and with
``--max-ram``, and prints peak RSS against the largest layer, the wall time, and whether the two
outputs are byte-identical.

    OMP_NUM_THREADS=1 python scripts/bench_c_prune_stream.py --json docs/results/c-prune-stream-mixtral-8x7b.json
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

from _bench import command_line, machine, save_result, weights_digest  # noqa: E402
from bench_stream import geometry_model, measured_child



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/lowmoe-bench-geometry", help="where the model is built (kept)")
    ap.add_argument("--n-samples", type=int, default=4)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--max-ram", default="6GiB", help="the budgeted run's --max-ram")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    model, ck, largest = geometry_model(args.workdir)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-c-prune-", dir=args.workdir) as tmp:
        calib = Path(tmp) / "calib.txt"
        calib.write_text("".join(f"{i} plus {i} is {2 * i}. The list {i}, {i + 1}, {i + 2} sorted.\n" for i in range(400)))
        for name, flags in (("no_flags", []), ("max_ram", ["--max-ram", args.max_ram])):
            out = Path(tmp) / name
            cmd = [sys.executable, "-m", "lowmoe", "-q", "prune", str(model), str(out), "--keep", "4", "--method", "c-prune",
                   "--calib", str(calib), "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len),
                   "--device", "cpu", *flags]
            runs[name] = measured_child(name, cmd, largest)
            if "error" in runs[name]:
                continue
            rep = json.loads((out / "lowmoe_report.json").read_text())
            runs[name].update(weights_sha256=weights_digest(out), plan=rep["plan"]["layers"],
                              group_sizes=(rep.get("budget") or {}).get("group_sizes"),
                              scoring_s=(rep.get("c_prune") or {}).get("scoring_s"), stages=rep.get("stages"))
            print(f"{'':10s} groups {runs[name]['group_sizes']}", flush=True)
            shutil.rmtree(out, ignore_errors=True)
    done = [r for r in runs.values() if "weights_sha256" in r]
    same = len(done) == 2 and done[0]["weights_sha256"] == done[1]["weights_sha256"]
    print(f"the same bytes with and without the budget: {'yes' if same else 'NO' if len(done) == 2 else 'not run'}")
    if args.json:
        save_result(args.json, {"command": command_line(), "machine": machine(),
                                "model": str(model), "model_bytes": ck.total_bytes(), "largest_layer_bytes": largest,
                                "n_samples": args.n_samples, "seq_len": args.seq_len, "max_ram": args.max_ram,
                                "runs": runs, "same_bytes": same})


if __name__ == "__main__":
    main()
