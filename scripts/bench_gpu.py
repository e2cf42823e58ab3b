#!/usr/bin/env python
"""Benchmark of issues 7 and 15: the streamed pass against the disk and against what a user would do instead.

On a synthetic Mixtral-layout model, time the streamed scoring pass (``lowmoe prune --method
frequency``: read, score, write, propagate, layer by layer) and compare:

  read        reading every shard once, nothing else (the disk's read floor)
  write       writing as many bytes as the pruned output's weights to a temp file, with fsync (the
              disk's write floor; run after the first prune run, whose output size it takes)
  overlap     the prune with prefetching on (layer L+1 and the next activation chunk read while L
              computes)
  serial      the same with ``--no-prefetch``
  resident    the same prune as ``overlap`` with the model's shard files read once just before the
              clock starts, so every read is served from the page cache (warm): what is left is the
              pass without the disk. (The cold runs drop the page cache first when this process may.)
  warm        the ``resident`` prune in a process that has already imported what the pass imports
              (transformers' tokenizer and the family's modeling code, loaded before the clock
              starts): a second prune in the same Python session, or the Python API in a notebook
  imported    the ``overlap`` prune, cold page cache, in a process that has already imported what the
              pass imports (as ``warm``): the disk's share without Python's imports, timed as the
              ``accelerate`` run is (its imports, too, come before its clock)
  imported-eager  the ``imported`` prune with ``--experts-impl eager`` (transformers' per-expert loop;
              ``auto`` is its grouped GEMM on CUDA, so on a GPU the two show what the grouped GEMM
              saves; on the CPU ``auto`` is eager and the two runs are the same)
  score       ``lowmoe.score.score(method="frequency")`` on the same tokens (no model written)
  accelerate  transformers + accelerate, what a user would do instead: ``from_pretrained(...,
              device_map="auto", max_memory=--accelerate-max-memory, offload_folder=<tmp>)``, then
              one forward over the same calibration tokens with forward hooks on every MoE router
              counting how often each expert is in the top-k (the ``frequency`` statistic); timed
              from before ``from_pretrained`` to the counts on the host
  budget      the overlapped prune under ``--max-vram`` (default: a third of the model's size); on a
              CPU run this budgets the compute copy, a rehearsal of the GPU plan
  ram         (``--max-ram``) the prune under a host RAM budget, with its peak RSS

Then the ratios of issue 15: score / read (target <= 1.3), overlap / (read + write) (<= 1.3),
accelerate / overlap (>= 3, at no more peak RSS; also against ``imported``, both with imports before
the clock), overlap / serial (prefetch never slower: <= 1),
and (resident - compute) / resident from the report's per-stage timings when it has them (< 10%),
also for the ``warm`` run (the same without Python's one-time imports).
The accelerate run's counts are checked against ``lowmoe score``'s (or the prune plan's) for the
first MoE layer.

Each run is its own process, so peak RSS (VmHWM: see peak_rss) and CUDA peaks are per run; the page cache is
dropped before each run when this process may (root), otherwise runs read from a warm cache and the
script says so.

    python scripts/bench_gpu.py [--model DIR] [--device auto] [--dtype bf16] [--max-vram 1GiB]
                                [--n-samples 16] [--seq-len 256] [--batch-size 8]
                                [--runs read,write,overlap,serial,resident,score,accelerate,budget]
                                [--accelerate-max-memory 0=2GiB,cpu=2GiB] [--json FILE]

With no --model it uses /tmp/lowmoe-bench/mix2g (made once with ``lowmoe synth``, ~2.9 GB with the
default --synth-* sizes). For the GPU figures make a model >= 3x the budget, e.g. ``--synth-layers 8
--synth-hidden 2048 --synth-intermediate 8192`` (6.65 GB) with ``--max-vram 2GiB``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import BENCH_DIR, command_line, drop_caches, ensure_model, machine, save_result  # noqa: E402

PRUNE_RUNS = ("overlap", "serial", "resident", "warm", "imported", "imported-eager", "budget", "ram")
ALL_RUNS = ("profile", "read", "write") + PRUNE_RUNS + ("score", "accelerate")


def calib_file(path: Path) -> Path:
    if not path.is_file():
        import random

        rng = random.Random(0)
        words = ["the", "model", "routes", "tokens", "to", "experts", "def f(x):", "return x + 1", "12 + 30 = 42",
                 "Question:", "Answer:", "sort [3, 1, 2]", "(())", "hello world"]
        path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(2000)) + "\n")
    return path


def parse_max_memory(text: str, cuda: bool) -> dict:
    """``0=2GiB,cpu=2GiB`` -> accelerate's ``max_memory`` ({0: "2GiB", "cpu": "2GiB"}); GPU entries
    are left out on a CPU run."""
    out: dict = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, val = part.partition("=")
        if not sep or not val.strip():
            raise SystemExit(f"--accelerate-max-memory {text!r}: expected DEVICE=SIZE pairs such as 0=2GiB,cpu=2GiB")
        key = key.strip()
        if key.isdigit():
            if cuda:
                out[int(key)] = val.strip()
        else:
            out[key] = val.strip()
    if "cpu" not in out:
        raise SystemExit(f"--accelerate-max-memory {text!r}: give a cpu=SIZE entry")
    return out


def read_all(model: Path) -> int:
    """Read every shard of ``model`` once (unbuffered, 64 MiB at a time); the bytes read."""
    n = 0
    for p in sorted(model.glob("*.safetensors")):
        with open(p, "rb", buffering=0) as f:
            while True:
                b = f.read(64 << 20)
                if not b:
                    break
                n += len(b)
    return n


# ---- one measurement, in a child process ----------------------------------------------------------

def peak_rss() -> int:
    """This process's peak RSS: ``VmHWM`` of its own address space. Not ``ru_maxrss``: Linux carries
    the parent's peak into a child across fork/vfork + exec, so every run would read at least the
    driver's own peak (torch imported: ~0.5 GB)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    from lowmoe.engine.memory import peak_rss_bytes

    return peak_rss_bytes()


def one(spec: dict) -> dict:
    import torch

    torch.set_num_threads(spec.get("threads") or torch.get_num_threads())
    run = spec["run"]
    if run == "read":
        t0 = time.perf_counter()
        n = read_all(Path(spec["model"]))
        return {"run": run, "wall_s": time.perf_counter() - t0, "bytes": n}
    if run == "write":
        return write_run(spec)
    if run == "accelerate":
        return accelerate_run(spec)
    if run == "score":
        return score_run(spec)
    if run == "profile":
        return profile_run(spec)
    return prune_run(spec)


def write_run(spec: dict) -> dict:
    """Write ``write_bytes`` to a new file next to where the prunes write, fsync included."""
    n = int(spec["write_bytes"])
    block = (bytes(range(256)) * (1 << 16)) * 4  # 64 MiB, not all zeros
    Path(spec["out"]).mkdir(parents=True, exist_ok=True)
    path = Path(spec["out"]) / "write-test.bin"
    t0 = time.perf_counter()
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        left = n
        while left > 0:
            left -= os.write(fd, block[:min(left, len(block))])
        os.fsync(fd)
    finally:
        os.close(fd)
    wall = time.perf_counter() - t0
    shutil.rmtree(spec["out"], ignore_errors=True)
    return {"run": "write", "wall_s": wall, "bytes": n, "write_bytes_per_s": n / wall}


def prune_run(spec: dict) -> dict:
    import torch

    import lowmoe
    model, run = Path(spec["model"]), spec["run"]
    out = {"run": run}
    opts = dict(keep="half", method="frequency", calib=[spec["calib"]], n_samples=spec["n_samples"],
                seq_len=spec["seq_len"], batch_size=spec["batch_size"], device=spec["device"], dtype=spec["dtype"],
                progress=False, overwrite=True, prefetch=run != "serial")
    if run == "budget":
        opts["max_vram"] = spec["max_vram"]
    if run == "ram":
        opts["max_ram"] = spec["max_ram"]
    if run in ("resident", "warm"):
        # the shards read once before the clock starts: the prune's reads then come from the page cache
        t0 = time.perf_counter()
        read_all(model)
        out["preload_s"] = time.perf_counter() - t0
    if run in ("warm", "imported", "imported-eager"):
        out["imports_s"] = warm_imports(model)
    if run == "imported-eager":
        opts["experts_impl"] = "eager"
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rep = lowmoe.prune(model, spec["out"], **opts)
    wall = time.perf_counter() - t0
    out_bytes = sum(p.stat().st_size for p in Path(spec["out"]).glob("*.safetensors"))
    out.update(wall_s=wall, peak_rss=peak_rss(), io=rep.get("io"), stages=rep.get("stages"), out_bytes=out_bytes,
               experts_impl=rep.get("experts_impl"),
               profile_s=rep.get("profile_s"), profile_hit=(rep.get("super_expert_profile") or {}).get("hit"),
               activations=rep.get("activations"),
               budget={k: v for k, v in (rep.get("budget") or {}).items() if k != "plan"},
               planned=(rep.get("budget") or {}).get("plan", {}), plan=rep["plan"]["layers"])
    if torch.cuda.is_available():
        out["cuda_peak"] = int(torch.cuda.max_memory_allocated())
    shutil.rmtree(spec["out"], ignore_errors=True)
    return out


def warm_imports(model: Path) -> float:
    """Import what a streamed pass imports on its first run in a process, untimed by the prune: the
    model's tokenizer (transformers' tokenization code) and its decoder layers' modeling code (the
    meta-device skeleton). Returns the seconds it took."""
    from lowmoe.engine.calibration import load_tokenizer
    from lowmoe.engine.checkpoint import Checkpoint
    from lowmoe.engine.hf import ModelSkeleton

    t0 = time.perf_counter()
    ck = Checkpoint(model)
    load_tokenizer(ck.path)
    ModelSkeleton(ck.config, ck.adapter)
    return time.perf_counter() - t0


def profile_run(spec: dict) -> dict:
    """The super-expert profile (``lowmoe profile``), computed cold into the bench's own profile cache
    ($LOWMOE_CACHE_DIR, set by the driver), which every later prune run then reuses: the prune runs
    time the pass itself, and this run what a first prune on a model and calibration adds to it."""
    import torch

    from lowmoe.pipeline import profile_model

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    info = profile_model(spec["model"], [spec["calib"]], seq_len=spec["seq_len"], n_samples=spec["n_samples"],
                         device=spec["device"], dtype=spec["dtype"], progress=False)
    out = {"run": "profile", "wall_s": time.perf_counter() - t0, "peak_rss": peak_rss(), "hit": bool(info.get("hit"))}
    if torch.cuda.is_available():
        out["cuda_peak"] = int(torch.cuda.max_memory_allocated())
    return out


def score_run(spec: dict) -> dict:
    import torch

    from lowmoe.score import score

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    rep = score(spec["model"], calib=[spec["calib"]], method="frequency", n_samples=spec["n_samples"],
                seq_len=spec["seq_len"], batch_size=spec["batch_size"], device=spec["device"], dtype=spec["dtype"],
                progress=False)
    wall = time.perf_counter() - t0
    out = {"run": "score", "wall_s": wall, "peak_rss": peak_rss(), "io": rep.get("io"), "stages": rep.get("stages"),
           "counts": {L: e["stats"]["frequency"]["routed_tokens"] for L, e in rep["layers"].items()}}
    if torch.cuda.is_available():
        out["cuda_peak"] = int(torch.cuda.max_memory_allocated())
    return out


def find_routers(model) -> list:
    """(layer index, router module) of every MoE block: a module with an ``experts`` submodule and a
    ``gate`` or ``router`` submodule (transformers' Mixtral, Qwen-MoE, DeepSeek, GPT-OSS blocks)."""
    import torch

    found = []
    for name, mod in model.named_modules():
        if not isinstance(getattr(mod, "experts", None), torch.nn.Module):
            continue
        gate = next((getattr(mod, a) for a in ("gate", "router") if isinstance(getattr(mod, a, None), torch.nn.Module)), None)
        m = re.search(r"(?:^|\.)layers\.(\d+)\.", name + ".")
        if gate is not None and m:
            found.append((int(m.group(1)), gate))
    return found


def router_indices(output, top_k: int):
    """The top-k expert ids a router chose, from its output: transformers 5.x routers return
    ``(logits, weights, indices)`` (the integer tensor), older ones (a Linear) only the logits."""
    import torch

    if isinstance(output, (tuple, list)):
        ints = [o for o in output if torch.is_tensor(o) and not o.is_floating_point() and o.shape[-1] == top_k]
        if ints:
            return ints[-1]
        output = output[0]
    return torch.topk(output, top_k, dim=-1).indices  # softmax is monotonic: the logits' top-k


def accelerate_run(spec: dict) -> dict:
    import inspect

    import torch
    from transformers import AutoModelForCausalLM

    from lowmoe.engine.checkpoint import Checkpoint
    from lowmoe.engine.device import DTYPES
    from lowmoe.engine.stream import calibration_tokens

    ck = Checkpoint(Path(spec["model"]))
    t0 = time.perf_counter()
    tokens = calibration_tokens(ck, [spec["calib"]], seq_len=spec["seq_len"], n_samples=spec["n_samples"])  # lowmoe's ids
    tokenize_s = time.perf_counter() - t0
    cuda = spec["device"].startswith("cuda") and torch.cuda.is_available()
    max_memory = parse_max_memory(spec["accelerate_max_memory"], cuda)
    offload = Path(spec["out"]) / "offload"
    offload.mkdir(parents=True, exist_ok=True)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(spec["model"], dtype=DTYPES[spec["dtype"]], device_map="auto",
                                                 max_memory=max_memory, offload_folder=str(offload))
    load_s = time.perf_counter() - t0
    model.eval()
    num_experts, top_k = ck.num_experts, ck.top_k
    routers = find_routers(model)
    if not routers:
        raise RuntimeError(f"no MoE router (a 'gate'/'router' next to 'experts') found in {type(model).__name__}")
    counts: dict[int, torch.Tensor] = {}
    current = {}

    def hook(layer_idx):
        def count(mod, args, output):
            idx = router_indices(output, top_k).reshape(-1, top_k)
            w = current["mask"].to(idx.device).repeat_interleave(top_k).long()  # pad / non-answer tokens add 0
            c = counts.get(layer_idx)
            if c is None:
                c = counts[layer_idx] = torch.zeros(num_experts, dtype=torch.long, device=idx.device)
            c.index_add_(0, idx.reshape(-1).to(c.device), w.to(c.device))  # no host sync per call
        return count

    handles = [gate.register_forward_hook(hook(L)) for L, gate in routers]
    in_dev = torch.device("cuda", 0) if cuda else torch.device("cpu")
    kw = {"use_cache": False}
    if "logits_to_keep" in inspect.signature(model.forward).parameters:
        kw["logits_to_keep"] = 1  # the counts need no vocabulary-wide logits
    with torch.no_grad():
        for _, sl in tokens.batches(spec["batch_size"]):
            current["mask"] = tokens.count_mask[sl].reshape(-1)
            model(input_ids=tokens.input_ids[sl].to(in_dev), **kw)
    host = {str(L): c.cpu().tolist() for L, c in sorted(counts.items())}
    wall = time.perf_counter() - t0
    for h in handles:
        h.remove()
    placement: dict[str, int] = {}
    for dev in (getattr(model, "hf_device_map", None) or {}).values():
        placement[str(dev)] = placement.get(str(dev), 0) + 1
    out = {"run": "accelerate", "wall_s": wall, "load_s": load_s, "tokenize_s": tokenize_s, "peak_rss": peak_rss(),
           "counts": host, "routers": len(routers), "max_memory": {str(k): v for k, v in max_memory.items()},
           "device_map_modules": placement,
           "offloaded_bytes": sum(p.stat().st_size for p in offload.rglob("*") if p.is_file())}
    if cuda:
        out["cuda_peak"] = int(torch.cuda.max_memory_allocated())
    shutil.rmtree(spec["out"], ignore_errors=True)
    return out


# ---- the driver ---------------------------------------------------------------------------------

def gb(n) -> str:
    return "-" if n is None else f"{n / 1e9:.2f} GB"


def top_half(counts: list) -> set:
    """The top half of the experts by count (ties -> lower id), as ``choose_keep`` takes them."""
    order = sorted(range(len(counts)), key=lambda e: (-counts[e], e))
    return set(order[:len(counts) // 2])


def run_order(runs: list[str]) -> list[str]:
    """``write`` needs the output size of a prune: a ``write`` with no prune before it moves to just
    after the first prune in the list (it stays where it is when there is none)."""
    order = list(runs)
    if "profile" in order:  # first: the prune runs then reuse the profile it computed
        order.remove("profile")
        order.insert(0, "profile")
    for i, r in enumerate(order):
        if r == "write" and not any(x in PRUNE_RUNS for x in order[:i]):
            later = [j for j in range(i + 1, len(order)) if order[j] in PRUNE_RUNS]
            if later:
                order.insert(later[0], order.pop(i))
            break
    return order


def stages_table(results: dict) -> list[str]:
    """Rows of the per-stage timings (report ``stages``: {stage: {"s", "count"}}) of every run that has them."""
    runs = [r for r, v in results.items() if isinstance(v.get("stages"), dict) and v["stages"]]
    if not runs:
        return []
    names: list[str] = []
    for r in runs:
        names += [s for s in results[r]["stages"] if s not in names]
    lines = ["per-stage seconds (count); * = on a background thread (overlaps the wall)",
             f"  {'stage':16s}" + "".join(f"{r:>18s}" for r in runs)]
    for s in names:
        bg = any(isinstance(results[r]["stages"].get(s), dict) and results[r]["stages"][s].get("thread") == "background"
                 for r in runs)
        cells = []
        for r in runs:
            v = results[r]["stages"].get(s)
            cells.append(f"{v.get('s', 0):10.2f} ({v.get('count', 0):>4})" if isinstance(v, dict) else "-")
        lines.append(f"  {s + ('*' if bg else ''):16s}" + "".join(f"{c:>18s}" for c in cells))
    lines.append(f"  {'wall':16s}" + "".join(f"{results[r]['wall_s']:10.2f}       " for r in runs))
    return lines


def ratios(results: dict, write_bytes: int | None) -> tuple[dict, list[str]]:
    """The ratios issue 15 asks for (only those whose runs were measured) and their printed lines."""
    R = {k: v["wall_s"] for k, v in results.items()}
    out: dict = {}
    lines: list[str] = []

    def put(key, value, target, ok, text):
        out[key] = {"value": round(value, 3), "target": target, "met": bool(ok)}
        lines.append(f"{text}  (target {target}: {'met' if ok else 'NOT met'})")

    if {"score", "read"} <= set(R):
        v = R["score"] / R["read"]
        put("score/read", v, "<= 1.3", v <= 1.3, f"score / read = {R['score']:.2f} / {R['read']:.2f} s = {v:.2f}")
    for run, clock in (("overlap", ""), ("imported", ", both with their imports before the clock")):
        if {run, "read", "write"} <= set(R):
            speed = results["write"]["write_bytes_per_s"]
            out_bytes = results[run].get("out_bytes") or write_bytes or 0
            w = out_bytes / speed
            v = R[run] / (R["read"] + w)
            put(f"{run}/(read+write)", v, "<= 1.3", v <= 1.3,
                f"prune({run}) / (read + write) = {R[run]:.2f} / ({R['read']:.2f} + {w:.2f} s to write "
                f"{gb(out_bytes)} at {speed / 1e9:.2f} GB/s) = {v:.2f}")
        if {"accelerate", run} <= set(R):
            v = R["accelerate"] / R[run]
            put(f"accelerate/{run}", v, ">= 3", v >= 3,
                f"accelerate / prune({run}){clock} = {R['accelerate']:.2f} / {R[run]:.2f} s = {v:.2f}x")
            ra, rp = results["accelerate"].get("peak_rss"), results[run].get("peak_rss")
            if ra and rp:
                put(f"rss_{run}/accelerate", rp / ra, "<= 1", rp <= ra,
                    f"peak RSS prune({run}) {gb(rp)} vs accelerate {gb(ra)} = {rp / ra:.2f}")
    if {"accelerate", "score"} <= set(R):
        v = R["accelerate"] / R["score"]
        put("accelerate/score", v, ">= 3", v >= 3, f"accelerate / score = {R['accelerate']:.2f} / {R['score']:.2f} s = {v:.2f}x")
    if {"imported", "imported-eager"} <= set(R):
        v = R["imported"] / R["imported-eager"]
        st = {r: ((results[r].get("stages") or {}).get("compute") or {}).get("s") for r in ("imported", "imported-eager")}
        put("imported/imported-eager", v, "<= 1", v <= 1.0,
            f"experts: {results['imported'].get('experts_impl')} {R['imported']:.2f} s (compute {st['imported'] or 0:.2f} s) vs "
            f"eager {R['imported-eager']:.2f} s (compute {st['imported-eager'] or 0:.2f} s) = {v:.2f}")
    if {"overlap", "serial"} <= set(R):
        v = R["overlap"] / R["serial"]
        put("overlap/serial", v, "<= 1", v <= 1.0,
            f"prefetch: overlap {R['overlap']:.2f} s vs serial (--no-prefetch) {R['serial']:.2f} s = {v:.2f}")
    for run, what in (("resident", "warm page cache"), ("warm", "warm page cache and imports")):
        st = (results.get(run) or {}).get("stages") or {}
        comp = st.get("compute", {}).get("s") if isinstance(st.get("compute"), dict) else None
        if run in R and comp is not None:
            v = (R[run] - comp) / R[run]
            put(f"({run}-compute)/{run}", v, "< 0.1", v < 0.1,
                f"{run} ({what}) {R[run]:.2f} s, compute stage {comp:.2f} s: "
                f"({run} - compute) / {run} = {100 * v:.1f}%")
    if {"read", "resident", "overlap"} <= set(R):
        floor = max(R["read"], R["resident"])
        v = R["overlap"] / floor
        put("overlap/max(read,resident)", v, "<= 1.3", v <= 1.3, f"overlap / max(read, resident) = {v:.2f}")
    return out, lines


def _stored_run(path: Path, flag: str) -> dict:
    """A results file this script wrote, or SystemExit naming the flag and what is wrong."""
    try:
        doc = json.loads(path.read_text())
    except OSError as e:
        raise SystemExit(f"{flag} {path}: cannot read it ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise SystemExit(f"{flag} {path}: not JSON ({e.msg} at line {e.lineno})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("results"), dict):
        raise SystemExit(f"{flag} {path}: expected a results file of scripts/bench_gpu.py (a 'results' object)")
    return doc


def summarize(path: Path, baseline: Path | None) -> None:
    """The summary of a stored run (``--from-json``): stage table, ratios and, with ``baseline``, each
    run's wall time against the same run on older code; the ratios are stored back in ``path``."""
    doc = _stored_run(path, "--from-json")
    results = doc["results"]
    for line in stages_table(results):
        print(line)
    doc["ratios"], lines = ratios(results, None)
    doc["ratios_note"] = "computed from the stored runs by scripts/bench_gpu.py --from-json"
    for line in lines:
        print(line)
    if baseline is not None:
        base = _stored_run(baseline, "--baseline")
        if (base.get("machine") or {}).get("gpu") != (doc.get("machine") or {}).get("gpu"):
            raise SystemExit(f"--baseline {baseline}: measured on another machine ({base.get('machine')})")
        vs = {}
        for run, r in results.items():
            b = base["results"].get(run)
            if b and b.get("wall_s") and r.get("wall_s"):
                vs[run] = {"before_s": round(b["wall_s"], 2), "now_s": round(r["wall_s"], 2),
                           "speedup": round(b["wall_s"] / r["wall_s"], 2)}
                print(f"{run:10s} before {b['wall_s']:7.2f} s  now {r['wall_s']:7.2f} s  ({vs[run]['speedup']:.2f}x)")
        doc["vs_baseline"] = {"file": baseline.name, "runs": vs}
    save_result(path, doc)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--one", help=argparse.SUPPRESS)
    ap.add_argument("--model", type=Path, default=None)
    ap.add_argument("--synth-layers", type=int, default=16)
    ap.add_argument("--synth-hidden", type=int, default=1024)
    ap.add_argument("--synth-intermediate", type=int, default=3584)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--dtype", default="bf16")
    ap.add_argument("--max-vram", default=None, help="default: a third of the model's size")
    ap.add_argument("--max-ram", default=None, help="also run under this host RAM budget")
    ap.add_argument("--accelerate-max-memory", default="0=2GiB,cpu=2GiB",
                    help="accelerate's max_memory for the accelerate run, DEVICE=SIZE pairs (GPU entries dropped on a "
                         "CPU run; the rest is offloaded to disk) [default: 0=2GiB,cpu=2GiB]")
    ap.add_argument("--n-samples", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--runs", default="profile,read,write,overlap,serial,resident,score,accelerate,budget")
    ap.add_argument("--run-timeout", type=float, default=None, help="seconds one run may take before it counts as failed")
    ap.add_argument("--repeat", type=int, default=1, help="run the list this many times (interleaved); report medians")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here (rewritten after every run)")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="print the stage table and ratios of runs stored in this file (e.g. a run cut short before "
                         "its summary) and store the ratios in it; nothing is run")
    ap.add_argument("--baseline", type=Path, default=None,
                    help="with --from-json: a stored run of the same benchmark on older code, on the same machine")
    args = ap.parse_args()
    if args.one:
        print("RESULT " + json.dumps(one(json.loads(args.one)), default=str))
        return
    if args.from_json:
        summarize(args.from_json, args.baseline)
        return

    from lowmoe.engine.checkpoint import Checkpoint
    from lowmoe.engine.device import describe_device, resolve_device

    requested = [r for r in args.runs.split(",") if r]
    bad = [r for r in requested if r not in ALL_RUNS]
    if bad:
        raise SystemExit(f"--runs: unknown run(s) {', '.join(bad)}; choose from {', '.join(ALL_RUNS)}")
    model = args.model or ensure_model(BENCH_DIR / "mix2g", args.synth_layers, args.synth_hidden, args.synth_intermediate)
    ck = Checkpoint(model)
    size = ck.total_bytes()
    device = resolve_device(args.device)
    parse_max_memory(args.accelerate_max_memory, device.type == "cuda")  # a bad flag fails before any run
    max_vram = args.max_vram or str(size // 3)
    work = Path(tempfile.mkdtemp(prefix="lowmoe-bench-gpu-", dir=BENCH_DIR if BENCH_DIR.is_dir() else None))
    calib = calib_file(work / "calib.txt")
    runs = run_order((requested + (["ram"] if args.max_ram else [])) * max(1, args.repeat))
    print(f"model   {model}: {gb(size)}, {ck.num_layers} layers, largest layer {gb(max(ck.layer_bytes(i) for i in range(ck.num_layers)))}")
    print(f"device  {describe_device(device)}; dtype {args.dtype}; calibration {args.n_samples} x {args.seq_len} tokens, "
          f"batch {args.batch_size}")
    print(f"runs    {', '.join(runs)}", flush=True)
    results: dict[str, dict] = {}
    walls: dict[str, list[float]] = {}
    failed: dict[str, str] = {}
    write_bytes: int | None = None
    doc = {"command": command_line(), "machine": machine(), "model": str(model), "model_bytes": size,
           "device": describe_device(device), "dtype": args.dtype, "n_samples": args.n_samples, "seq_len": args.seq_len,
           "batch_size": args.batch_size, "max_vram": max_vram, "accelerate_max_memory": args.accelerate_max_memory,
           "results": results, "failed": failed}

    def save():
        if args.json:
            save_result(args.json, json.loads(json.dumps(doc, default=str)))

    for run in runs:
        if run == "write":
            known = [r["out_bytes"] for k, r in results.items() if k in PRUNE_RUNS and r.get("out_bytes")]
            write_bytes = known[0] if known else size
            if not known:
                print("write     (no prune run before it: writing the model's size instead of the output's)")
        cold = drop_caches()
        spec = dict(run=run, model=str(model), calib=str(calib), out=str(work / f"out-{run}"), device=str(device),
                    dtype=args.dtype, n_samples=args.n_samples, seq_len=args.seq_len, batch_size=args.batch_size,
                    max_vram=max_vram, max_ram=args.max_ram, threads=args.threads, write_bytes=write_bytes,
                    accelerate_max_memory=args.accelerate_max_memory)
        try:
            env = dict(os.environ, LOWMOE_CACHE_DIR=str(work / "profile-cache"))  # shared by the runs of this bench
            p = subprocess.run([sys.executable, __file__, "--one", json.dumps(spec)], capture_output=True, text=True, env=env,
                               timeout=args.run_timeout)
        except subprocess.TimeoutExpired:
            print(f"{run:10s} FAILED: over --run-timeout {args.run_timeout:g} s", flush=True)
            failed[run] = f"timeout {args.run_timeout:g} s"
            save()
            continue
        line = [ln for ln in p.stdout.splitlines() if ln.startswith("RESULT ")]
        if p.returncode != 0 or not line:
            print(f"{run:10s} FAILED\n{p.stderr[-3000:]}", flush=True)
            failed[run] = p.stderr[-3000:]
            save()
            continue
        r = json.loads(line[0][7:])
        r["cold_cache"] = cold and run not in ("resident", "warm")
        walls.setdefault(run, []).append(r["wall_s"])
        r["walls_s"] = walls[run]
        r["wall_s"] = sorted(walls[run])[len(walls[run]) // 2]  # median so far
        results[run] = r
        extra = ""
        if r.get("preload_s") is not None:
            extra += f"  (shards read into the page cache first: {r['preload_s']:.2f} s, untimed)"
        if r.get("imports_s") is not None:
            extra += f"  (tokenizer and modeling code imported first: {r['imports_s']:.2f} s, untimed)"
        if run == "write":
            extra += f"  {gb(r['bytes'])} at {r['write_bytes_per_s'] / 1e9:.2f} GB/s (fsync)"
        if run == "read":
            extra += f"  {gb(r['bytes'])} at {r['bytes'] / walls[run][-1] / 1e9:.2f} GB/s"
        if run == "accelerate":
            extra += (f"  load {r['load_s']:.2f} s, {r['routers']} routers hooked, modules per device "
                      f"{r['device_map_modules']}, offload folder {r['offloaded_bytes'] / 1e6:.1f} MB, tokenize {r['tokenize_s']:.2f} s untimed")
        if r.get("profile_s") is not None:
            extra += f"  super-expert profile {'cached' if r.get('profile_hit') else 'computed'} ({r['profile_s']:.2f} s of the wall)"
        if (r.get("activations") or {}).get("where"):
            extra += f"  activations on {r['activations']['where']}"
        if r.get("experts_impl"):
            extra += f"  experts {r['experts_impl']}"
        st = r.get("stages") or {}
        if isinstance(st.get("compute_device"), dict) and isinstance(st.get("compute"), dict):
            # CUDA: the host's compute stage (queueing the kernels, one wait per layer) vs the GPU busy
            extra += f"  compute {st['compute']['s']:.2f} s, of which the GPU busy {st['compute_device']['s']:.2f} s"
        if r.get("io"):
            extra += f"  io wait {r['io']['total_wait_s']:.2f} s ({100 * r['io'].get('wait_fraction', 0):.1f}% of wall)"
            if (r["io"].get("device_warm_up") or {}).get("s") is not None:
                extra += f", device warm-up {r['io']['device_warm_up']['s']:.2f} s off the main thread"
        if r.get("budget", {}).get("chunked_layers"):
            extra += f"  chunked layers {len(r['budget']['chunked_layers'])}, accounted peak {gb(r['budget']['accounted_peak_bytes'])}"
        if r.get("cuda_peak") is not None:
            extra += f"  CUDA peak {gb(r['cuda_peak'])}"
        pinned = (r.get("budget") or {}).get("pinned") or {}
        if pinned.get("peak_bytes"):
            extra += (f"  pinned peak {gb(pinned['peak_bytes'])} in {pinned.get('blocks_made', '?')} blocks"
                      + (f", {pinned['alloc_s']:.2f} s page-locking" if pinned.get("alloc_s") is not None else ""))
        if r.get("peak_rss"):
            extra += f"  peak RSS {gb(r['peak_rss'])}"
        cache = "" if r["cold_cache"] else (" (warm page cache)" if run not in ("resident", "warm") else " (warm by design)")
        print(f"{run:14s} {walls[run][-1]:8.2f} s{cache}{extra}", flush=True)
        save()
    shutil.rmtree(work, ignore_errors=True)

    if args.repeat > 1:
        print("medians: " + ", ".join(f"{k} {v['wall_s']:.2f} s" for k, v in results.items()))
    for line in stages_table(results):
        print(line)
    doc["ratios"], lines = ratios(results, write_bytes)
    for line in lines:
        print(line)
    if "accelerate" in results:
        acc = results["accelerate"]["counts"]
        first = str(min(ck.moe_layers()))
        check: dict = {"layer": int(first)}
        if first in acc and "score" in results and first in results["score"]["counts"]:
            a, s = acc[first], [int(round(c)) for c in results["score"]["counts"][first]]
            check.update(accelerate=a, score=s, same_counts=a == s, same_top_half=top_half(a) == top_half(s),
                         max_abs_diff=max(abs(x - y) for x, y in zip(a, s)))
            print(f"frequency check, layer {first}: accelerate counts {a} vs lowmoe score {s}: "
                  f"{'identical' if a == s else 'max difference ' + str(check['max_abs_diff'])}; "
                  f"same top-half set: {check['same_top_half']}")
        for run in ("overlap", "serial", "resident"):
            if first in acc and run in results and first in results[run]["plan"]:
                keep = set(results[run]["plan"][first]["keep"])
                check[f"{run}_keep"] = sorted(keep)
                check["same_as_prune_keep"] = top_half(acc[first]) == keep
                print(f"frequency check, layer {first}: accelerate's top half {sorted(top_half(acc[first]))} vs "
                      f"prune({run}) keep {sorted(keep)}: {'same' if check['same_as_prune_keep'] else 'DIFFERENT'}")
                break
        doc["frequency_check"] = check
    if "budget" in results:
        r = results["budget"]
        from lowmoe.engine.budget import parse_budget

        b = parse_budget(max_vram, "--max-vram")
        peak = r.get("cuda_peak") if device.type == "cuda" else r["budget"].get("accounted_peak_bytes")
        what = "CUDA max_memory_allocated" if device.type == "cuda" else "accounted device peak (CPU rehearsal)"
        print(f"budget {gb(b)} ({gb(size)} model / {size / b:.1f}): {what} {gb(peak)} -> {'under' if peak <= b else 'OVER'}; "
              f"same plan as unbudgeted: {r['plan'] == results.get('overlap', r)['plan']}")
    if "ram" in results:
        r = results["ram"]
        from lowmoe.engine.budget import parse_budget

        b = parse_budget(args.max_ram, "--max-ram")
        print(f"--max-ram {gb(b)}: peak RSS {gb(r['peak_rss'])} ({'under' if r['peak_rss'] <= b else 'OVER'}); planned host peak "
              f"{gb(r['planned'].get('host_peak_bytes'))}; prefetch {'on' if r['planned'].get('prefetch_layers') else 'off'}")
    if failed:
        print(f"FAILED runs: {', '.join(failed)}")
    save()
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
