#!/usr/bin/env python3
"""Produce a fixed set of lowmoe outputs and hash them (refactor identity check).

Usage:  python make_outputs.py OUTDIR            (OUTDIR must not exist or be empty)
        python compare.py reference-hashes.json OUTDIR/hashes.json

Uses ONLY the public API (``lowmoe.synth_model``, ``lowmoe.prune``) and the CLI
(``python -m lowmoe ...`` and the ``lowmoe`` console script), so it runs unchanged against the
package before and after its modules move into subpackages.

Everything runs with the working directory set to OUTDIR and with relative paths, so paths that
end up inside outputs (plan meta "calib", demo stdout, ...) do not depend on where OUTDIR is.

hashes.json maps
  * every file under OUTDIR (relative path) -> sha256, except each ``lowmoe_report.json``
    (timings, memory, absolute paths), ``hashes.json`` itself, and ``_logs/``;
  * ``<run>/lowmoe_report.json#plan`` -> sha256 of the report's "plan" as canonical JSON;
  * ``<run>/lowmoe_report.json#stable`` -> sha256 of the report's deterministic, path-free fields
    (family, method, num_experts, num_experts_per_tok, scores, protected_experts, layer_stats, notes,
    calibration, super_experts, cache_bytes_written, bytes.output and, for C-Prune/EEP, their method
    sections), canonicalised like scores.json below;
  * ``score/scores.json`` is hashed after canonicalisation (timings, memory, io, budget, time_s and
    model keys dropped; absolute paths replaced), under ``score/scores.json#canonical``; the raw
    file is not hashed;
  * demo stdout tables (``demo*/stdout.txt``) are written with the "done in Ns" line removed.
"""

from __future__ import annotations

import os

# determinism: one intra-op thread, set before torch is imported (also inherited by CLI subprocesses)
for _v in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
    os.environ[_v] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("PYTHONHASHSEED", "0")

import argparse  # noqa: E402
import hashlib  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

REPORT = "lowmoe_report.json"
LOGS = "_logs"
TIMINGS: dict[str, float] = {}


# ---- deterministic calibration data (pure Python, no lowmoe internals) -------------------------


class LCG:
    """A tiny fixed pseudo-random generator (independent of Python's random module's algorithm)."""

    def __init__(self, seed: int):
        self.s = seed & 0xFFFFFFFF

    def next(self) -> int:
        self.s = (1103515245 * self.s + 12345) & 0x7FFFFFFF
        return self.s

    def below(self, n: int) -> int:
        return self.next() % n


WORDS = ("the expert router sends each token to two of eight experts while the shared weights stay "
         "dense and the calibration text only needs to be varied enough to reach every expert at least "
         "once so that frequency and reap scores differ between layers of the small synthetic model").split()


def write_text(path: Path, seed: int, n_words: int = 1500) -> Path:
    r = LCG(seed)
    lines, line = [], []
    for _ in range(n_words):
        line.append(WORDS[r.below(len(WORDS))])
        if len(line) >= 12:
            lines.append(" ".join(line) + ".")
            line = []
    path.write_text("\n".join(lines) + "\n")
    return path


def arith_records(seed: int, n: int) -> list[dict]:
    r = LCG(seed)
    recs = []
    for _ in range(n):
        a, b = r.below(50), r.below(50)
        op = "+-"[r.below(2)]
        ans = a + b if op == "+" else a - b
        recs.append({"prompt": f"Q: {a} {op} {b} = ?\nA:", "answer": f" {ans}"})
    return recs


def sort_records(seed: int, n: int) -> list[dict]:
    r = LCG(seed)
    recs = []
    for _ in range(n):
        xs = [r.below(10) for _ in range(4)]
        recs.append({"prompt": f"sort {' '.join(map(str, xs))} ->", "answer": " " + " ".join(map(str, sorted(xs)))})
    return recs


def write_jsonl(path: Path, recs: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in recs))
    return path


# ---- running ------------------------------------------------------------------------------------


def timed(name: str):
    def deco(fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            print(f"[make_outputs] {name} ...", flush=True)
            res = fn(*a, **k)
            TIMINGS[name] = round(time.perf_counter() - t0, 2)
            print(f"[make_outputs] {name} done in {TIMINGS[name]:.1f}s", flush=True)
            return res
        return wrapper
    return deco


def cli(args: list[str], log_name: str, *, console_script: bool = False) -> str:
    """Run the lowmoe CLI (``python -m lowmoe`` or the ``lowmoe`` console script); return stdout."""
    if console_script:
        exe = Path(sys.executable).parent / "lowmoe"
        cmd = [str(exe)] if exe.is_file() else [shutil.which("lowmoe") or "lowmoe"]
    else:
        cmd = [sys.executable, "-m", "lowmoe"]
    cmd += ["-q"] + args
    p = subprocess.run(cmd, capture_output=True, text=True)
    (Path(LOGS) / f"{log_name}.stdout").write_text(p.stdout)
    (Path(LOGS) / f"{log_name}.stderr").write_text(p.stderr)
    if p.returncode != 0:
        raise SystemExit(f"command failed ({p.returncode}): {' '.join(cmd)}\n{p.stderr[-3000:]}")
    return p.stdout


COMMON = dict(seq_len=64, n_samples=16, batch_size=4, seed=0, device="cpu", progress=False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("outdir", type=Path)
    args = ap.parse_args()
    out = args.outdir.resolve()
    if out.exists() and any(out.iterdir()):
        raise SystemExit(f"{out}: exists and is not empty")
    out.mkdir(parents=True, exist_ok=True)
    os.chdir(out)  # every path below is relative to OUTDIR
    Path(LOGS).mkdir()

    import torch

    torch.set_num_threads(1)
    torch.manual_seed(0)
    import lowmoe

    t_all = time.perf_counter()

    # -- inputs ---------------------------------------------------------------------------------
    Path("inputs").mkdir()
    text = write_text(Path("inputs/text.txt"), 1)
    arith = write_jsonl(Path("inputs/arith.jsonl"), arith_records(2, 48))
    sort_train = write_jsonl(Path("inputs/sort-train.jsonl"), sort_records(3, 16))
    sort_dev = write_jsonl(Path("inputs/sort-dev.jsonl"), sort_records(4, 8))
    Path("models").mkdir()
    Path("runs").mkdir()

    # -- synthetic models ---------------------------------------------------------------------------
    @timed("synth models")
    def synth():
        lowmoe.synth_model("models/mixtral", "mixtral", layers=3, hidden_size=64, intermediate_size=64, experts=8, top_k=2, seed=0)
        lowmoe.synth_model("models/qwen2_moe", "qwen2_moe", layers=3, hidden_size=64, intermediate_size=32, experts=8, top_k=2, seed=1)
        lowmoe.synth_model("models/deepseek_v3", "deepseek_v3", layers=3, hidden_size=64, intermediate_size=32, experts=8, top_k=2,
                           seed=2, mtp_layers=1)
        # gpt_oss through the CLI (fused expert layout)
        cli(["synth", "models/gpt_oss", "--arch", "gpt_oss", "--layers", "2", "--hidden-size", "64",
             "--intermediate-size", "64", "--experts", "8", "--top-k", "2", "--seed", "3"], "synth_gpt_oss")
    synth()

    # -- a. keep-all plan on mixtral ---------------------------------------------------------------
    @timed("a keepall plan (mixtral)")
    def run_a():
        cfg = json.loads(Path("models/mixtral/config.json").read_text())
        E = cfg["num_local_experts"]
        plan = {"format": "lowmoe-plan/1", "num_experts_per_tok": cfg["num_experts_per_tok"],
                "layers": {str(i): {"keep": list(range(E))} for i in range(cfg["num_hidden_layers"])}}
        # the plan is also saved, so the file-plan path (via the CLI) is covered too
        Path("inputs/keepall-plan.json").write_text(json.dumps(plan, indent=1) + "\n")
        lowmoe.prune("models/mixtral", "runs/a-mixtral-keepall", plan=plan, progress=False)
        cli(["prune", "models/mixtral", "runs/a-mixtral-keepall-cli", "--plan", "inputs/keepall-plan.json"], "a_cli")
    run_a()

    # -- b. one-shot scorers on qwen2_moe -------------------------------------------------------
    @timed("b qwen2_moe frequency/reap")
    def run_b():
        lowmoe.prune("models/qwen2_moe", "runs/b-qwen2_moe-frequency", keep=4, method="frequency",
                     calib=[str(text), str(arith)], **COMMON)
        lowmoe.prune("models/qwen2_moe", "runs/b-qwen2_moe-reap", keep=4, method="reap", calib=[str(arith)],
                     layout="per-sample", answer_only=True, **COMMON)
        # deepseek_v3 (grouped sigmoid routing, MTP layer copied) with frequency, one-shot, via the CLI
        cli(["prune", "models/deepseek_v3", "runs/b-deepseek_v3-frequency", "--keep", "4", "--method", "frequency",
             "--calib", str(text), "--seq-len", "64", "--n-samples", "16", "--batch-size", "4", "--one-shot",
             "--device", "cpu", "--save-plan", "runs/b-deepseek_v3-frequency.plan.json"], "b_deepseek_cli")
    run_b()

    # -- c. merging methods -----------------------------------------------------------------------
    @timed("c merging (merge-freq, dern, c-prune)")
    def run_c():
        lowmoe.prune("models/mixtral", "runs/c-mixtral-merge-freq", keep=4, method="merge-freq", calib=[str(arith)], **COMMON)
        lowmoe.prune("models/qwen2_moe", "runs/c-qwen2_moe-dern", keep=4, method="dern", calib=[str(text)], **COMMON)
        lowmoe.prune("models/mixtral", "runs/c-mixtral-c-prune", keep=4, method="c-prune", calib=[str(text)],
                     method_options={"overflow": "merge"}, **COMMON)
        cli(["prune", "models/deepseek_v3", "runs/c-deepseek_v3-merge-freq-align", "--keep", "4", "--method", "merge-freq",
             "--calib", str(arith), "--seq-len", "64", "--n-samples", "16", "--batch-size", "4", "--device", "cpu",
             "-O", "align=true", "-O", "router=mean"], "c_deepseek_cli")
        # re-apply a saved merge plan (plan with merge/router matrices)
        rep = json.loads(Path("runs/c-mixtral-merge-freq", REPORT).read_text())
        lowmoe.prune("models/mixtral", "runs/c-mixtral-merge-freq-replan", plan=rep["plan"], progress=False)
    run_c()

    # -- d. EEP ------------------------------------------------------------------------------------
    @timed("d eep (mixtral)")
    def run_d():
        lowmoe.prune("models/mixtral", "runs/d-mixtral-eep", keep=4, method="eep", calib=[str(sort_train)],
                     seq_len=64, n_samples=16, batch_size=8, seed=0, device="cpu", progress=False,
                     method_options={"generations": 4, "population": 6, "dev": str(sort_dev), "init": "frequency",
                                     "layer_groups": 2})
    run_d()

    # -- e. gpt_oss (fused experts) with frequency ----------------------------------------------------
    @timed("e gpt_oss frequency")
    def run_e():
        lowmoe.prune("models/gpt_oss", "runs/e-gpt_oss-frequency", keep=4, method="frequency", calib=[str(text)], **COMMON)
    run_e()

    # -- f. the README demo -----------------------------------------------------------------------
    @timed("f demo")
    def run_f():
        for name, extra in (("demo", []), ("demo-learned", ["--toy", "learned", "--method", "frequency", "--n", "50"])):
            Path(name).mkdir()
            stdout = cli(["demo", "--out", f"{name}/toy-pruned"] + extra, name.replace("-", "_"), console_script=True)
            table = "".join(ln + "\n" for ln in stdout.splitlines() if not ln.startswith("done in "))
            Path(name, "stdout.txt").write_text(table)
    run_f()

    # -- g. lowmoe score ----------------------------------------------------------------------------
    @timed("g score (qwen2_moe)")
    def run_g():
        Path("score").mkdir()
        cli(["score", "models/qwen2_moe", "--calib", str(text), "--calib", f"{arith}@2", "--method", "frequency",
             "--method", "reap", "--method", "easy-ep", "--keep", "half", "--seq-len", "64", "--n-samples", "16",
             "--batch-size", "4", "--device", "cpu", "--out", "score/scores.json"], "g_score")
    run_g()


    # -- x. extras: the other families, scorers and merges, dtype, top-k, shards, budgets ------------
    @timed("x extras")
    def run_x():
        lowmoe.synth_model("models/phimoe", "phimoe", layers=2, hidden_size=64, intermediate_size=32, experts=8, top_k=2, seed=4)
        lowmoe.synth_model("models/olmoe", "olmoe", layers=2, hidden_size=64, intermediate_size=32, experts=8, top_k=2, seed=5)
        lowmoe.synth_model("models/qwen3_moe", "qwen3_moe", layers=2, hidden_size=64, intermediate_size=32, experts=8, top_k=2, seed=6)
        lowmoe.synth_model("models/deepseek_v2", "deepseek_v2", layers=3, hidden_size=64, intermediate_size=32, experts=8, top_k=2,
                           seed=7)
        lowmoe.synth_model("models/mixtral-bf16", "mixtral", layers=2, hidden_size=64, intermediate_size=64, experts=8, top_k=2,
                           seed=8, dtype="bfloat16")
        lowmoe.prune("models/phimoe", "runs/x-phimoe-easy-ep", keep=4, method="easy-ep", calib=[str(arith)], **COMMON)
        lowmoe.prune("models/olmoe", "runs/x-olmoe-gate-mass", keep=4, method="gate-mass", calib=[str(text)], **COMMON)
        lowmoe.prune("models/qwen3_moe", "runs/x-qwen3_moe-tcess", keep=4, method="tcess", calib=[str(text)], **COMMON)
        lowmoe.prune("models/deepseek_v2", "runs/x-deepseek_v2-hc-merge", keep=4, method="hc-merge", calib=[str(arith)], **COMMON)
        lowmoe.prune("models/mixtral", "runs/x-mixtral-diverse-group", keep=4, method="diverse-group", calib=[str(text)],
                     method_options={"representation": "output"}, **COMMON)
        lowmoe.prune("models/mixtral", "runs/x-mixtral-reconstruction", keep=4, method="reconstruction", calib=[str(text)], **COMMON)
        lowmoe.prune("models/mixtral", "runs/x-mixtral-topk1", keep=6, top_k=1, method="frequency", calib=[str(text)], **COMMON)
        lowmoe.prune("models/mixtral-bf16", "runs/x-mixtral-bf16", keep=4, method="reap", calib=[str(text)], dtype="bf16",
                     **COMMON)
        lowmoe.prune("models/mixtral", "runs/x-mixtral-shards-chunked", keep=4, method="frequency", calib=[str(text)],
                     max_shard_size="400KB", max_vram="2.5MB", prefetch=False, **COMMON)
    run_x()

    TIMINGS["total"] = round(time.perf_counter() - t_all, 2)
    hashes = collect_hashes(Path("."))
    Path("hashes.json").write_text(json.dumps(hashes, indent=1, sort_keys=True) + "\n")
    Path(LOGS, "timings.json").write_text(json.dumps(TIMINGS, indent=1) + "\n")
    print(f"[make_outputs] {len(hashes)} hashes written to {out / 'hashes.json'}; total {TIMINGS['total']:.1f}s")


# ---- hashing -------------------------------------------------------------------------------------


def sha256_bytes(b: bytes) -> str:
    return hashlib.sha256(b).hexdigest()


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


# "stages" are timings; "activations" says where the activation cache lived, which depends on the memory
# free on the machine (issue 15): neither is an output of the method
DROP_KEYS = {"timings", "memory", "io", "budget", "time_s", "model", "wall_s", "search_s", "evaluations_per_hour",
             "build_s", "stream_stats", "fitness_png", "input", "output", "stages", "dev_stages", "activations"}


def canonicalize(obj, root: str):
    """Drop timing / memory / path keys (recursively; every key ending in ``_s`` is a duration in
    seconds: elapsed_s, scoring_s, ...); make paths under OUTDIR relative, other absolute paths a
    placeholder."""
    if isinstance(obj, dict):
        return {k: canonicalize(v, root) for k, v in obj.items() if k not in DROP_KEYS and not k.endswith("_s")}
    if isinstance(obj, list):
        return [canonicalize(v, root) for v in obj]
    if isinstance(obj, str) and obj.startswith("/"):
        return "<OUT>/" + os.path.relpath(obj, root) if obj.startswith(root + "/") or obj == root else "<ABS>"
    return obj


STABLE_REPORT_KEYS = ("family", "method", "num_experts", "num_experts_per_tok", "scores", "protected_experts",
                      "layer_stats", "notes", "calibration", "super_experts", "cache_bytes_written", "c_prune", "eep")


def collect_hashes(root: Path) -> dict[str, str]:
    root_abs = str(Path.cwd().resolve())
    hashes: dict[str, str] = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if not p.is_file() or rel == "hashes.json" or rel.startswith(LOGS + "/"):
            continue
        if p.name == REPORT:
            rep = json.loads(p.read_text())
            hashes[rel + "#plan"] = sha256_bytes(canonical_json(rep["plan"]))
            stable = {k: rep[k] for k in STABLE_REPORT_KEYS if k in rep}
            stable["bytes_output"] = rep.get("bytes", {}).get("output")
            hashes[rel + "#stable"] = sha256_bytes(canonical_json(canonicalize(stable, root_abs)))
            continue
        if rel == "score/scores.json":
            hashes[rel + "#canonical"] = sha256_bytes(canonical_json(canonicalize(json.loads(p.read_text()), root_abs)))
            continue
        hashes[rel] = sha256_file(p)
    return hashes


if __name__ == "__main__":
    main()
