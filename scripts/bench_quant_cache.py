"""Benchmark: building the EEP search's NF4/int8 layer cache (``--quant``), wall and peak RSS.

    cd scripts && OMP_NUM_THREADS=1 python bench_quant_cache.py --model /tmp/lowmoe-bench/mix1l \\
        --modes nf4 int8 [--baseline-src DIR] --json ../docs/results/quant-cache-build.json

Each build is its own process (``/usr/bin/time -v``): ``quant.layer_weights(Checkpoint(MODEL), MODE, DIR)``
into an empty folder, then every cached layer read back once (``QuantizedWeights.layer``; the read's
seconds are printed by the child). ``peak_rss_bytes`` is the whole child's, read-back included;
``build_peak_rss_bytes`` the peak when the build ended (``--no-read-back``: the only one) (freed memory given back to the OS,
``memory.return_freed_memory``, as the EEP runner sets it under ``--max-ram``), beside the plan's figure for it
(``budget.quant_build_bytes``, what ``--max-ram`` is checked against; None for code without it). ``--baseline-src DIR`` builds again with the code in DIR (a
``git archive`` export with a ``COMMIT`` file); the two caches' files must be byte-identical
(``identical_to_baseline``).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import machine, save_result
from bench_quant_stream import code_under_test

CHILD = """
import resource, sys, time, warnings
warnings.filterwarnings("ignore")
from lowmoe.engine.checkpoint import Checkpoint
from lowmoe.engine.memory import return_freed_memory
from lowmoe.engine.quant import layer_weights
return_freed_memory()  # as the EEP runner does before the build under --max-ram
try:
    from lowmoe.engine.budget import quant_build_bytes
except ImportError:  # code from before the build was planned
    quant_build_bytes = None
ck = Checkpoint(sys.argv[1])
if quant_build_bytes is not None:
    print("PLANNED", quant_build_bytes(ck, sys.argv[2])[0])
t0 = time.perf_counter()
w = layer_weights(ck, sys.argv[2], sys.argv[3])
t1 = time.perf_counter()
print("BUILD_PEAK", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
for layer in range(w.ck.num_layers) if sys.argv[4] == "read" else ():
    w.layer(layer)
print("BUILD_S", t1 - t0, "READ_S", time.perf_counter() - t1)
"""


def digest(folder: Path) -> str:
    h = hashlib.sha256()
    for f in sorted(folder.glob("layer*.safetensors")):
        h.update(f.name.encode())
        with open(f, "rb") as fh:  # a chunk at a time: a layer's cache can be GBs
            for chunk in iter(lambda: fh.read(1 << 24), b""):
                h.update(chunk)
    return h.hexdigest()


def build(model: Path, mode: str, src: str | None, root: Path, read: bool = True) -> dict:
    env, commit, where = code_under_test(src, root)
    out = root / f"cache-{mode}-{'baseline' if src else 'current'}"
    shutil.rmtree(out, ignore_errors=True)
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-c", CHILD, str(model), mode, str(out), "read" if read else "skip"],
                       capture_output=True, text=True, env=env, cwd=root)
    wall = time.perf_counter() - t0
    run = {"mode": mode, "label": "baseline" if src else "current", "lowmoe_commit": commit, "lowmoe_imported_from": where,
           "rc": p.returncode, "wall_s": round(wall, 1),
           "peak_rss_bytes": int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1)) * 1024}
    if p.returncode != 0:
        run["error"] = p.stderr.strip().splitlines()[-1]
        return run
    m = re.search(r"BUILD_S (\S+) READ_S (\S+)", p.stdout)
    planned = re.search(r"PLANNED (\d+)", p.stdout)
    run.update(build_peak_rss_bytes=int(re.search(r"BUILD_PEAK (\d+)", p.stdout).group(1)),
               planned_build_bytes=int(planned.group(1)) if planned else None)
    run.update(build_s=round(float(m.group(1)), 2), read_s=round(float(m.group(2)), 2), cache_sha256=digest(out),
               cache_bytes=sum(f.stat().st_size for f in out.glob("layer*.safetensors")))
    shutil.rmtree(out, ignore_errors=True)
    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--modes", nargs="+", default=["nf4", "int8"])
    ap.add_argument("--baseline-src", default=None)
    ap.add_argument("--json", required=True)
    ap.add_argument("--no-read-back", action="store_true",
                    help="skip reading every cached layer back whole (a large layer's read-back can hold more than the build)")
    args = ap.parse_args()
    from lowmoe.engine.checkpoint import Checkpoint

    model = Path(args.model).resolve()
    ck = Checkpoint(model)
    result = {"command": "python " + " ".join(sys.argv), "machine": machine(),
              "model": {"path": str(model), "layers": ck.num_layers, "bytes": ck.total_bytes(),
                        "dtype": ck.config.get("torch_dtype") or ck.config.get("dtype")}, "runs": []}
    root = Path(tempfile.mkdtemp(prefix="lowmoe-quant-cache-"))
    try:
        for mode in args.modes:
            for src in [None] + ([args.baseline_src] if args.baseline_src else []):
                run = build(model, mode, src, root, read=not args.no_read_back)
                result["runs"].append(run)
                print(json.dumps(run), flush=True)
        for r in result["runs"]:
            base = next((b for b in result["runs"] if b["label"] == "baseline" and b["mode"] == r["mode"]), None)
            if r["label"] == "current" and base is not None and r["rc"] == base["rc"] == 0:
                r["identical_to_baseline"] = r["cache_sha256"] == base["cache_sha256"]
        save_result(args.json, result)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
