"""Benchmark: the host memory and time of one neuron alignment (``-O align=true``) at a real geometry.

    cd scripts && OMP_NUM_THREADS=1 python bench_align.py --neurons 14336 --hidden 4096 \\
        [--baseline-src DIR] --json ../docs/results/align-memory-mixtral-8x7b.json

Each run is its own process: two random bf16 experts of a Mixtral-layout layer (gate and up (I, H),
down (H, I)) are made, then ``merging.align.align_groups`` aligns expert 1 to expert 0 -- what a
merging method does for each merged member. Reported: the process's resident memory before the
alignment, its peak during it (``ru_maxrss``; the experts were made with less), the alignment's
wall, the permutation's digest, and the plan's figure for it (``budget.alignment_bytes``).
``--baseline-src DIR`` runs the same with the lowmoe package in DIR (a ``git archive`` export with a
``COMMIT`` file); the two permutations must be the same (``same_permutation``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

from _bench import machine, save_result
from bench_quant_stream import code_under_test

CHILD = """
import hashlib, json, resource, sys, time
import torch
from lowmoe.engine.adapters.families import MIXTRAL
from lowmoe.engine.memory import current_rss_bytes
from lowmoe.methods.merging.align import align_groups
try:
    from lowmoe.engine.budget import alignment_bytes
except ImportError:  # code from before the alignment was planned
    alignment_bytes = None
n, h = int(sys.argv[1]), int(sys.argv[2])
gen = torch.Generator().manual_seed(0)
tensors = {}
for e in (0, 1):
    for key, shape in zip(MIXTRAL.expert_keys(0, e), ((n, h), (n, h), (h, n))):
        t = torch.empty(shape, dtype=torch.bfloat16)
        for r in range(0, shape[0], 256):  # a band at a time: no float32 copy of the whole matrix
            t[r:r + 256] = torch.randn((min(256, shape[0] - r), shape[1]), generator=gen) * 0.02
        tensors[key] = t
before = current_rss_bytes()
t0 = time.perf_counter()
perms = align_groups(MIXTRAL, 0, tensors, [[0, 1]])
wall = time.perf_counter() - t0
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
perm = perms.get("1", list(range(n)))
print("RESULT" + json.dumps({"rss_before_bytes": before, "peak_rss_bytes": peak, "held_bytes": peak - before,
                             "align_s": round(wall, 1), "perm_sha256": hashlib.sha256(json.dumps(perm).encode()).hexdigest(),
                             "planned_bytes": alignment_bytes(n, h) if alignment_bytes else None}))
"""


def run(neurons: int, hidden: int, src: str | None, root: Path) -> dict:
    env, commit, where = code_under_test(src, root)
    p = subprocess.run([sys.executable, "-c", CHILD, str(neurons), str(hidden)], capture_output=True, text=True,
                       env=env, cwd=root)
    out = {"label": "baseline" if src else "current", "lowmoe_commit": commit, "lowmoe_imported_from": where,
           "rc": p.returncode}
    if p.returncode != 0:
        out["error"] = p.stderr.strip().splitlines()[-1] if p.stderr.strip() else "no output"
        return out
    line = next(x for x in p.stdout.splitlines() if x.startswith("RESULT"))
    return {**out, **json.loads(line[len("RESULT"):])}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--neurons", type=int, default=14336, help="the experts' intermediate size I")
    ap.add_argument("--hidden", type=int, default=4096, help="the hidden size H")
    ap.add_argument("--baseline-src", default=None)
    ap.add_argument("--json", required=True)
    args = ap.parse_args()
    result = {"command": "python " + " ".join(sys.argv), "machine": machine(),
              "neurons": args.neurons, "hidden": args.hidden, "runs": []}
    with tempfile.TemporaryDirectory(prefix="lowmoe-align-") as root:
        for src in [None] + ([args.baseline_src] if args.baseline_src else []):
            r = run(args.neurons, args.hidden, src, Path(root))
            result["runs"].append(r)
            print(json.dumps(r), flush=True)
    runs = result["runs"]
    if len(runs) == 2 and all(r["rc"] == 0 for r in runs):
        runs[0]["same_permutation"] = runs[0]["perm_sha256"] == runs[1]["perm_sha256"]
    save_result(args.json, result)


if __name__ == "__main__":
    main()
