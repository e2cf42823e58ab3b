#!/usr/bin/env python
"""Benchmark: host memory and time of ``lowmoe eval --streaming`` on one real model's layer geometry.

The streaming evaluation reads its decoder layers from the shards one at a time; since session 14 it
reads the routed experts of a MoE layer in groups, as ``prune`` and ``score`` do, instead of whole
layers. This runs it in a child process (peak RSS is that process's ru_maxrss) on the Mixtral-8x7B
geometry of ``bench_stream.py --geometry mixtral-8x7b`` (3 layers of hidden 4096, intermediate 14336,
8 experts, bf16: 8.2 GiB, 2.8 GiB a layer; built once under ``--workdir`` and kept for the next run)
on a few prompt/answer lines, without flags and with ``--max-ram``, and prints peak RSS against the
largest layer, the wall time, and the bytes read.

    OMP_NUM_THREADS=1 python scripts/bench_eval_stream.py --json docs/results/eval-stream-mixtral-8x7b.json
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from _bench import command_line, machine, save_result  # noqa: E402
from bench_stream import geometry_model, measured_child


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/lowmoe-bench-geometry", help="where the model is built (kept)")
    ap.add_argument("--n", type=int, default=8, help="prompt/answer lines scored")
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-ram", default="4GiB", help="the budgeted run's --max-ram")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()

    model, ck, largest = geometry_model(args.workdir)
    runs = {}
    with tempfile.TemporaryDirectory(prefix="bench-eval-stream-") as tmp:
        qa = Path(tmp) / "qa.jsonl"
        qa.write_text("".join(json.dumps({"prompt": f"{i} plus {i} is", "answer": f" {2 * i}"}) + "\n"
                              for i in range(args.n)))
        for name, flags in (("no_flags", []), ("max_ram", ["--max-ram", args.max_ram])):
            out = Path(tmp) / "result.json"
            cmd = [sys.executable, "-m", "lowmoe", "-q", "eval", str(model), "--jsonl", str(qa), "--n", str(args.n),
                   "--streaming", "--batch-size", str(args.batch_size), "--device", "cpu", "--json", str(out), *flags]
            runs[name] = measured_child(name, cmd, largest)
            if "error" in runs[name]:
                continue
            res = json.loads(out.read_text())["result"]
            io = res.get("io") or {}
            runs[name].update(bytes_read=sum((io.get("bytes") or {}).values()), perplexity=res["tasks"]["qa"]["perplexity"],
                              group_sizes=(res.get("budget") or {}).get("group_sizes"), stages=res.get("stages"))
            print(f"{'':10s} groups {runs[name]['group_sizes']}  perplexity {runs[name]['perplexity']:.4f}", flush=True)
    same = len({r["perplexity"] for r in runs.values() if "perplexity" in r}) == 1
    print(f"same perplexity with and without the budget: {'yes' if same else 'NO'}")
    if args.json:
        save_result(args.json, {"command": command_line(), "machine": machine(),
                                "model": str(model), "model_bytes": ck.total_bytes(), "largest_layer_bytes": largest,
                                "n": args.n, "batch_size": args.batch_size, "max_ram": args.max_ram, "runs": runs,
                                "same_perplexity": same})


if __name__ == "__main__":
    main()
