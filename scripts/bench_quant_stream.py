"""Peak RSS of `lowmoe prune` on a quantized checkpoint with one real model's layer geometry (issue 14).

Quantized experts are read from the shards a group at a time as their stored bytes, decoded where the
layer computes, and kept experts are copied as bytes; this measures what that costs in host memory
against the size of one layer, with and without --max-ram. The model (random weights, 2 decoder
layers of the real geometry, the rest synth's) is built under --workdir and deleted afterwards.

    OMP_NUM_THREADS=1 python scripts/bench_quant_stream.py --geometry qwen3-30b-a3b-fp8 --json docs/results/quant-stream-qwen3-30b-a3b-fp8.json --max-ram 1GiB --max-ram 1.5GiB
    OMP_NUM_THREADS=1 python scripts/bench_quant_stream.py --geometry gpt-oss-20b --json docs/results/quant-stream-gpt-oss-20b.json

Each run is `/usr/bin/time -v lowmoe prune MODEL OUT --keep HALF --method frequency ...`; its
"Maximum resident set size" is the figure. Outputs of all runs are compared file by file.

--merge instead applies a plan that merges the experts in pairs (output j = 0.5 * expert 2j + 0.5 *
expert 2j+1, every output re-quantized), and --baseline-src DIR runs the same command a second time
with the lowmoe package found in DIR (e.g. `git archive COMMIT | tar -x -C DIR`: the code before a
change), so the two peaks compare on one machine and model:

    OMP_NUM_THREADS=1 python scripts/bench_quant_stream.py --geometry gpt-oss-20b --layers 1 --merge --baseline-src /tmp/base --json docs/results/quant-merge-gpt-oss-20b.json
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import machine, save_result  # noqa: E402

# layer geometry of the published models (config.json); attention is synth's (head_dim = hidden / heads)
GEOMETRIES = {
    "qwen3-30b-a3b-fp8": dict(arch="qwen3_moe", hidden_size=2048, intermediate_size=768, experts=128, top_k=8, heads=32,
                              quant="fp8", fp8_block=128),
    "gpt-oss-20b": dict(arch="gpt_oss", hidden_size=2880, intermediate_size=2880, experts=32, top_k=4, heads=40,
                        quant="mxfp4"),
}
GIB = 1 << 30


def time_v(cmd: list[str], env: dict | None = None, cwd: Path | None = None) -> tuple[float, int, str]:
    """Wall seconds, peak RSS (bytes, /usr/bin/time -v's "Maximum resident set size") and stderr."""
    t0 = time.perf_counter()
    p = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - t0
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    kb = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", p.stderr).group(1))
    return wall, kb * 1024, p.stderr


def digest(out: Path) -> dict[str, str]:
    skip = {"lowmoe_report.json", "README.md"}
    res = {}
    for f in sorted(out.iterdir()):
        if f.is_file() and f.name not in skip:
            h = hashlib.sha256()
            with open(f, "rb") as fh:
                for chunk in iter(lambda: fh.read(1 << 24), b""):
                    h.update(chunk)
            res[f.name] = h.hexdigest()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--geometry", choices=sorted(GEOMETRIES), required=True)
    ap.add_argument("--json", required=True)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--max-ram", action="append", default=None,
                    help="budgets to run besides the unbudgeted run (default: the planner's floor, rounded up to 0.25 GiB)")
    ap.add_argument("--workdir", default="/tmp/lowmoe-bench-quant")
    ap.add_argument("--keep-models", action="store_true")
    ap.add_argument("--method", default="frequency", help="the prune's --method (e.g. merge-freq: a merging method's "
                    "sequential pass runs its merged, re-quantized experts)")
    ap.add_argument("--merge", action="store_true", help="apply a plan merging the experts in pairs instead of pruning")
    ap.add_argument("--baseline-src", default=None,
                    help="also run each command with the lowmoe package from this folder (PYTHONPATH), for comparison")
    args = ap.parse_args()
    if args.merge:
        merge_bench(args)
        return

    import torch

    from lowmoe.engine.budget import plan_lazy_budget
    from lowmoe.engine.checkpoint import Checkpoint

    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    os.environ["LOWMOE_CACHE_DIR"] = str(root / "profile-cache")
    calib = root / "c.txt"
    calib.write_text("\n".join(f"line {i}: the quick brown fox jumps over {i * 7 % 13} lazy dogs; 12+{i}={12 + i}"
                               for i in range(400)))
    try:
        model, build_s = build(args, root)
        ck = Checkpoint(model)
        L = ck.moe_layers()[-1]
        ad = ck.adapter
        expert_keys = [k for k in ad.routed_expert_keys(L, ck.num_experts) if k in ck.parts]
        n_samples, seq_len, batch = 4, 64, 4
        floor = plan_lazy_budget(ck, device=torch.device("cpu"), dtype=torch.float32, batch_size=batch,
                                 seq_len=seq_len).min_max_ram
        budgets = args.max_ram or [f"{-(-floor * 4 // GIB) / 4:g}GiB"]
        keep = ck.num_experts // 2
        result = {
            "command": f"python scripts/bench_quant_stream.py --geometry {args.geometry} --json {args.json}"
                       + "".join(f" --max-ram {b}" for b in args.max_ram or [])
                       + ("" if args.method == "frequency" else f" --method {args.method}")
                       + (" --baseline-src DIR" if args.baseline_src else ""),
            "method": args.method,
            "geometry": args.geometry, "synth": {**GEOMETRIES[args.geometry], "layers": args.layers, "dtype": "bfloat16"},
            "machine": machine(),
            "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "build_s": round(build_s, 1),
            "model_bytes": ck.total_bytes(),
            "layer": {"index": L, "stored_bytes": ck.layer_bytes(L),
                      "experts_stored_bytes": sum(ck.tensor_bytes(k) for k in expert_keys),
                      "dequantized_bytes": ck.layer_read_bytes(L),
                      "fp32_bytes": 4 * sum(math.prod(ck.tensor_info(k)[0]) for k in ck.layer_keys(L)),
                      "expert_stored_bytes": sum(ck.tensor_bytes(k) for k in expert_keys) // ck.num_experts},
            "planned_min_max_ram": floor,
            "runs": [],
        }
        digests = {}
        runs = [(label, src, flags) for label, src in [("current", None)] + ([("baseline", args.baseline_src)]
                                                                           if args.baseline_src else [])
                for flags in [[]] + [["--max-ram", b] for b in budgets]]
        for label, src, flags in runs:
            out = root / ("out-" + ("-".join(flags).replace("--", "") or "free"))
            env, commit, where = code_under_test(src, root)
            cmd = [sys.executable, "-m", "lowmoe", "-q", "prune", str(model.resolve()), str(out.resolve()), "--keep",
                   str(keep), "--method", args.method, "--calib", str(calib.resolve()), "--n-samples", str(n_samples),
                   "--seq-len", str(seq_len), "--batch-size", str(batch), "--device", "cpu", "--overwrite", *flags]
            wall, rss, _ = time_v(cmd, env=env, cwd=root.resolve())
            rep = json.loads((out / "lowmoe_report.json").read_text())
            io = rep["io"]
            run = {"label": label, "lowmoe_commit": commit, "lowmoe_imported_from": where,
                   "command": f"/usr/bin/time -v lowmoe prune MODEL OUT --keep {keep} --method {args.method} --calib c.txt "
                              f"--n-samples {n_samples} --seq-len {seq_len} --batch-size {batch} --device cpu "
                              + " ".join(flags),
                   "flags": flags, "wall_s": round(wall, 1), "peak_rss_bytes": rss,
                   "peak_rss_over_layer_dequantized": round(rss / ck.layer_read_bytes(L), 3),
                   "expert_bytes_read": int(io.get("expert_bytes_read", 0)), "bytes_copied": int(io.get("bytes_copied", 0)),
                   "planned_host_peak_bytes": rep["budget"].get("plan", {}).get("host_peak_bytes"),
                   "staging_pool_bytes": rep["budget"].get("staging_pool_bytes"),
                   "group_sizes": rep["budget"].get("group_sizes"), "quantization": {
                       k: rep.get("quantization", {}).get(k) for k in ("method", "requantized_experts")},
                   "output_bytes": rep["bytes"]["output"]}
            result["runs"].append(run)
            digests[f"{label} {' '.join(flags) or 'none'}"] = digest(out)
            print(json.dumps(run), flush=True)
            if not args.keep_models:
                shutil.rmtree(out)
        save(args, result, digests)
    finally:
        if not args.keep_models:
            shutil.rmtree(root, ignore_errors=True)


def save(args, result: dict, digests: dict[str, dict[str, str]]) -> None:
    """Store ``result`` (with whether every run wrote the same files) and print its summary."""
    result["outputs_identical"] = len({json.dumps(d, sort_keys=True) for d in digests.values()}) == 1
    save_result(args.json, result)
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))


def build(args, root: Path) -> tuple[Path, float]:
    from lowmoe.toy.synth import synth_model

    geo = dict(GEOMETRIES[args.geometry])
    model = root / args.geometry
    t0 = time.perf_counter()
    if not (model / "model.safetensors.index.json").is_file():
        synth_model(model, geo.pop("arch"), layers=args.layers, dtype="bfloat16", shard_size="2GB", overwrite=True, **geo)
    return model, time.perf_counter() - t0


def source_commit(src: str | None) -> str | None:
    """The commit of this checkout (``+dirty`` when lowmoe/ has uncommitted changes), or of a
    --baseline-src export: the ``COMMIT`` file in it (``git archive`` writes none; write it yourself)."""
    if src is None:
        here = Path(__file__).resolve().parent
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=here).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--", "../lowmoe"], capture_output=True, text=True,
                               cwd=here).stdout.strip()
        return (head + ("+dirty" if dirty else "")) or None
    f = Path(src) / "COMMIT"
    return f.read_text().strip() if f.is_file() else None


def code_under_test(src: str | None, root: Path) -> tuple[dict, str | None, str]:
    """The environment that runs ``lowmoe`` from ``src`` (None: the installed one), that code's commit
    and where it is imported from. Commands run from ``root``: ``python -m`` puts the working directory
    first on sys.path, so from a checkout it would import that checkout's lowmoe whatever PYTHONPATH says."""
    env = dict(os.environ)
    if src is not None:
        env["PYTHONPATH"] = str(Path(src).resolve()) + os.pathsep + env.get("PYTHONPATH", "")
    where = subprocess.run([sys.executable, "-c", "import lowmoe; print(lowmoe.__file__)"], capture_output=True,
                           text=True, env=env, cwd=root.resolve()).stdout.strip()
    return env, source_commit(src), where


def merge_bench(args) -> None:
    """Peak RSS of a merge plan (every output expert re-quantized) on the current code and, with
    --baseline-src, on the code in that folder; the outputs must be identical."""
    from lowmoe.engine.checkpoint import Checkpoint

    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    try:
        model, build_s = build(args, root)
        ck = Checkpoint(model)
        L = ck.moe_layers()[-1]
        E = ck.num_experts
        merge = [[0.5 if i in (2 * j, 2 * j + 1) else 0.0 for i in range(E)] for j in range(E // 2)]
        plan = {"format": "lowmoe-plan/1", "num_experts_per_tok": min(ck.top_k, E // 2),
                "layers": {str(layer): {"keep": list(range(0, E, 2)), "merge": merge} for layer in ck.moe_layers()}}
        plan_file = root / "merge-plan.json"
        plan_file.write_text(json.dumps(plan))
        expert_keys = [k for k in ck.adapter.routed_expert_keys(L, E) if k in ck.parts]
        result = {
            "command": f"python scripts/bench_quant_stream.py --geometry {args.geometry} --layers {args.layers} --merge"
                       + (" --baseline-src DIR" if args.baseline_src else "") + f" --json {args.json}",
            "geometry": args.geometry, "synth": {**GEOMETRIES[args.geometry], "layers": args.layers, "dtype": "bfloat16"},
            "machine": machine(), "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "build_s": round(build_s, 1),
            "model_bytes": ck.total_bytes(),
            "plan": f"keep {E // 2} of {E}: output j = 0.5 * expert 2j + 0.5 * expert 2j+1 in every MoE layer",
            "layer": {"index": L, "stored_bytes": ck.layer_bytes(L),
                      "experts_stored_bytes": sum(ck.tensor_bytes(k) for k in expert_keys),
                      "dequantized_bytes": ck.layer_read_bytes(L),
                      "expert_dequantized_bytes": ck.layer_read_bytes(L) // E},
            "runs": [],
        }
        digests = {}
        for label, src in [("current", None)] + ([("baseline", args.baseline_src)] if args.baseline_src else []):
            out = root / f"out-{label}"
            env, commit, where = code_under_test(src, root)
            cmd = [sys.executable, "-m", "lowmoe", "-q", "prune", str(model.resolve()), str(out.resolve()), "--plan",
                   str(plan_file.resolve()), "--device", "cpu", "--overwrite"]
            wall, rss, _ = time_v(cmd, env=env, cwd=root.resolve())
            rep = json.loads((out / "lowmoe_report.json").read_text())
            q = rep.get("quantization", {})
            run = {"label": label, "lowmoe_commit": commit, "lowmoe_imported_from": where,
                   "command": "/usr/bin/time -v lowmoe prune MODEL OUT --plan merge-plan.json --device cpu",
                   "wall_s": round(wall, 1), "peak_rss_bytes": rss,
                   "peak_rss_over_layer_dequantized": round(rss / ck.layer_read_bytes(L), 3),
                   "expert_bytes_read": int(rep.get("io", {}).get("expert_bytes_read", 0)),
                   "requantized_experts": q.get("requantized_experts"),
                   "requant_fro_rel_max": q.get("requant_fro_rel_max"), "output_bytes": rep["bytes"]["output"]}
            result["runs"].append(run)
            digests[label] = digest(out)
            print(json.dumps(run), flush=True)
            shutil.rmtree(out)
        save(args, result, digests)
    finally:
        if not args.keep_models:
            shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
