"""The README's demo figures: ``lowmoe demo`` (prune a shipped toy for one domain, evaluate every
domain before and after) with its result stored as JSON, with the command and the machine.

    python scripts/demo_figures.py --toy learned --method easy-ep --json docs/results/demo-learned-easy-ep.json
    python scripts/demo_figures.py --toy learned --method eep --json docs/results/demo-learned-eep.json

Same run as ``lowmoe demo --toy TOY --method METHOD --domain DOMAIN --n N``.
"""

from __future__ import annotations

import argparse
import json
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))

from _bench import machine, save_result  # noqa: E402

from lowmoe.evaluate import prune_and_compare  # noqa: E402
from lowmoe.toy import tasks  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--toy", choices=["specialised", "learned"], default="specialised")
    ap.add_argument("--method", default="easy-ep")
    ap.add_argument("--domain", default="sort")
    ap.add_argument("--keep", default="half")
    ap.add_argument("--n", type=int, default=100)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args(argv)
    model = tasks.TOY_MODEL if a.toy == "specialised" else tasks.TOY_MODEL_LEARNED
    t0, c0 = time.time(), time.process_time()
    with tempfile.TemporaryDirectory() as tmp:
        res = prune_and_compare(domain=a.domain, out=Path(tmp) / "out", model=model, method=a.method, keep=a.keep, n=a.n,
                                progress=False)
    wall, cpu = time.time() - t0, time.process_time() - c0

    def table(ev):
        return {d: {"exact": r["exact_match"], "ppl": round(r["perplexity"], 4)} for d, r in ev["tasks"].items()}

    out = {"command": "python scripts/demo_figures.py " + " ".join(argv if argv is not None else sys.argv[1:]),
           "same_as": f"lowmoe demo --toy {a.toy} --method {a.method} --domain {a.domain} --n {a.n}",
           "machine": machine(), "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
           "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9, 2),
           "keep": res["report"]["num_experts"], "before": table(res["before"]), "after": table(res["after"])}
    print(json.dumps({k: out[k] for k in ("wall_s", "cpu_s", "before", "after")}, indent=1))
    if a.json:
        save_result(a.json, out)
    return out


if __name__ == "__main__":
    main()
