"""Prefetcher timing: how much of a simulated read is hidden behind simulated compute.

    python scripts/bench_prefetch.py [--read-s 0.05] [--compute-s 0.05] [--items 6] [--json OUT]

Prints wall time, read time and waited time with depth 0 (no overlap) and depth 1 (one item read
ahead on the reader thread). These are wall-clock figures: they belong here, not in the test suite
(tests/test_prefetch.py checks the behaviour: which thread reads, and that the read overlaps).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from _bench import machine, save_result  # noqa: E402

from lowmoe.engine.prefetch import IOStats, Prefetcher  # noqa: E402


def run(depth: int, items: int, read_s: float, compute_s: float) -> dict:
    def load(i):
        time.sleep(read_s)
        return i

    stats = IOStats()
    t0 = time.perf_counter()
    for _ in Prefetcher(load, range(items), depth=depth, stats=stats, kind="layer"):
        time.sleep(compute_s)
    return {"depth": depth, "wall_s": round(time.perf_counter() - t0, 4), "read_s": round(stats.read_s["layer"], 4),
            "wait_s": round(stats.wait_s["layer"], 4)}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--items", type=int, default=6)
    ap.add_argument("--read-s", type=float, default=0.05)
    ap.add_argument("--compute-s", type=float, default=0.05)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    rows = [run(d, a.items, a.read_s, a.compute_s) for d in (0, 1)]
    res = {"command": "python scripts/bench_prefetch.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()}, "machine": machine(), "runs": rows,
           "hidden_fraction": round(1 - rows[1]["wait_s"] / rows[1]["read_s"], 3),
           "wall_ratio": round(rows[1]["wall_s"] / rows[0]["wall_s"], 3)}
    for r in rows:
        print(f"depth {r['depth']}: wall {r['wall_s']:.3f} s  read {r['read_s']:.3f} s  waited {r['wait_s']:.3f} s")
    print(f"read time hidden: {res['hidden_fraction']:.0%}; wall depth1/depth0 {res['wall_ratio']:.2f}")
    if a.json:
        save_result(a.json, res)
    return res


if __name__ == "__main__":
    main()
