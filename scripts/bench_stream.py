#!/usr/bin/env python
"""Benchmark of the streaming engine (issues 2 and 13).

Default (issue 2): on a synthetic Mixtral-layout model of >= 2 GB (>= 16 layers), measure peak RSS and
wall time of ``lowmoe prune --keep half --method frequency`` against
  (a) loading the whole model with ``AutoModelForCausalLM.from_pretrained``, and
  (b) reading every input shard once and writing the output once (``cat`` > /dev/null, ``cp``).

``--geometry mixtral-8x7b|deepseek-v3`` (issue 13, expert-granular streaming): a checkpoint with one
real model's layer geometry (random weights, built here under /tmp, never in the repo), pruned with
and without ``--max-ram``; prints peak RSS, wall time and bytes read next to the largest layer and the
model size, checks that the outputs are byte-identical, and writes a JSON (``--json``).

* mixtral-8x7b: ``lowmoe synth --arch mixtral --layers 3 --hidden-size 4096 --intermediate-size 14336
  --experts 8 --top-k 2 --dtype bfloat16`` (8.2 GiB), ``prune --keep 4 --method frequency --n-samples 4
  --seq-len 128`` with no flags and with ``--max-ram 4GiB``. Targets: <= 2 x largest layer + 1 GB, <= 4 GiB.
* deepseek-v3: deepseek_v3 with hidden 7168, moe_intermediate_size 2048, 256 routed + 1 shared expert,
  top-8, n_group 8, topk_group 4, one dense layer then one MoE layer (~23 GB bf16, written expert by
  expert), pruned to 128 experts with ``--max-ram 8GiB``; then a reduced copy of the same geometry
  (hidden 256) is pruned the same way and loaded with transformers to check keys, shapes and config,
  and the big output's index and shapes are checked against it.

Each measurement runs in its own process; peak RSS is that process's ru_maxrss.

    python scripts/bench_stream.py [--model DIR] [--n-samples 16] [--seq-len 256] [--json OUT]
    OMP_NUM_THREADS=1 python scripts/bench_stream.py --geometry mixtral-8x7b --json docs/results/stream-mixtral-8x7b.json
    OMP_NUM_THREADS=1 python scripts/bench_stream.py --geometry deepseek-v3 --json docs/results/stream-deepseek-v3.json

``--json OUT`` stores the figures with the command line and the machine (docs/results/).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _bench import BENCH_DIR, drop_caches, ensure_model, machine, save_result  # noqa: E402


def timed(cmd: list[str], **kw) -> tuple[float, int]:
    """Wall seconds and the child's peak RSS (bytes)."""
    t0 = time.perf_counter()
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    subprocess.run(cmd, check=True, **kw)
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return wall, max(peak, before) * 1024


def child_peak(cmd: list[str]) -> tuple[float, int]:
    """Run ``cmd`` under /usr/bin/time-like accounting via a wrapper python that reports its own child."""
    code = ("import resource,subprocess,sys,time,json;t=time.perf_counter();subprocess.run(sys.argv[1:],check=True);"
            "print(json.dumps([time.perf_counter()-t, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss*1024]))")
    out = subprocess.run([sys.executable, "-c", code, *cmd], check=True, capture_output=True, text=True).stdout
    wall, peak = json.loads(out.strip().splitlines()[-1])
    return wall, peak


def geometry_model(workdir: str | Path):
    """The Mixtral-8x7B geometry model under ``workdir`` (built once, kept), its ``Checkpoint`` and the
    bytes of its largest layer."""
    from lowmoe.engine.checkpoint import Checkpoint

    model = build_mixtral_8x7b(Path(workdir) / "mixtral-8x7b-3l")
    ck = Checkpoint(model)
    return model, ck, max(ck.layer_bytes(i) for i in range(ck.num_layers))


def measured_child(name: str, cmd: list[str], largest: int) -> dict:
    """``cmd`` run as a child (``child_peak``): its wall and peak RSS (also against ``largest``), or,
    when it fails (a budget the pass refuses), its one-line error. Prints a line either way."""
    try:
        wall, peak = child_peak(cmd)
    except subprocess.CalledProcessError as e:
        lines = (e.stderr or "").strip().splitlines()
        said = [x for x in lines if x.startswith(("Error", "lowmoe: error"))] or lines[-1:] or [f"exit {e.returncode}"]
        print(f"{name:10s} failed: {said[0]}", flush=True)
        return {"error": said[0]}
    print(f"{name:10s} peak RSS {peak / GIB:5.2f} GiB ({peak / largest:.2f} x the largest layer, {largest / GIB:.2f} GiB)  "
          f"wall {wall:6.1f} s", flush=True)
    return {"wall_s": round(wall, 2), "peak_rss": peak, "peak_rss_over_largest_layer": round(peak / largest, 3)}


def gb(n: float) -> str:
    return f"{n / 1e9:.2f} GB"


GIB = 1 << 30


# ---- issue 13: one real model's layer geometry ------------------------------------------------------

def build_mixtral_8x7b(path: Path) -> Path:
    if not (path / "model.safetensors.index.json").is_file():
        subprocess.run([sys.executable, "-m", "lowmoe", "-q", "synth", str(path), "--arch", "mixtral", "--layers", "3",
                        "--hidden-size", "4096", "--intermediate-size", "14336", "--experts", "8", "--top-k", "2",
                        "--dtype", "bfloat16", "--overwrite"], check=True)
    return path


def deepseek_v3_config(hidden: int, moe_inter: int, dense_inter: int, experts: int = 256) -> dict:
    from lowmoe.toy.synth import family_config

    cfg = family_config("deepseek_v3", layers=2, hidden_size=hidden, intermediate_size=moe_inter, experts=experts,
                        top_k=8, dtype="bfloat16", heads=max(1, min(128, hidden // 64)))
    heads = cfg["num_attention_heads"]
    cfg.update(n_group=8, topk_group=4, num_experts_per_tok=8, intermediate_size=dense_inter, first_k_dense_replace=1,
               n_shared_experts=1, moe_intermediate_size=moe_inter, num_key_value_heads=heads,
               q_lora_rank=min(1536, hidden // 2), kv_lora_rank=min(512, hidden // 4), qk_nope_head_dim=128 if hidden >= 4096 else 16,
               qk_rope_head_dim=64 if hidden >= 4096 else 8, v_head_dim=128 if hidden >= 4096 else 16,
               topk_method="noaux_tc", routed_scaling_factor=2.5, scoring_func="sigmoid", norm_topk_prob=True)
    return cfg


def build_deepseek(path: Path, hidden: int, moe_inter: int, dense_inter: int, experts: int = 256,
                   shard_size: str = "5GB") -> Path:
    """A deepseek_v3 checkpoint written tensor by tensor (never a whole layer in memory): a few random
    expert tensors, each expert a rotation of one of them (cheap, distinct)."""
    if (path / "model.safetensors.index.json").is_file():
        return path
    import torch
    from transformers import GenerationConfig

    from lowmoe.engine.adapters import BY_FAMILY
    from lowmoe.engine.hf import ModelSkeleton
    from lowmoe.engine.writer import ShardWriter, parse_size
    from lowmoe.toy.tokenizer import BOS_ID, EOS_ID, PAD_ID, save_byte_tokenizer

    if path.exists():
        shutil.rmtree(path)
    path.mkdir(parents=True)
    cfg = deepseek_v3_config(hidden, moe_inter, dense_inter, experts)
    ad = BY_FAMILY["deepseek_v3"]
    skel = ModelSkeleton(cfg, ad)
    g = torch.Generator().manual_seed(0)
    w = ShardWriter(path, parse_size(shard_size))

    def rnd(shape, name):
        if len(shape) == 1:
            return torch.ones(shape, dtype=torch.bfloat16) if "norm" in name else torch.zeros(shape, dtype=torch.float32
                                                                                            if "correction" in name else torch.bfloat16)
        std = hidden ** -0.5 if name.endswith("gate.weight") else 0.02
        return torch.empty(shape, dtype=torch.bfloat16).normal_(0, std, generator=g)

    moe = set(ad.moe_layers(cfg))
    for L in range(cfg["num_hidden_layers"]):
        layer = skel.base.layers[L]
        pre = f"model.layers.{L}."
        for name, p in layer.named_parameters():
            if L in moe and name.startswith("mlp.experts."):
                continue
            key = pre + name
            w.add(key, rnd(tuple(p.shape), key))
        for name, b in layer.named_buffers():
            w.add(pre + name, rnd(tuple(b.shape), pre + name))
        if L in moe:
            ex = layer.mlp.experts
            E, two_i, H = ex.gate_up_proj.shape
            I = two_i // 2
            pool = [{k: rnd(s, "x") for k, s in (("g", (I, H)), ("u", (I, H)), ("d", (H, I)))} for _ in range(4)]
            for e in range(E):
                base = f"{pre}mlp.experts.{e}."
                src, shift = pool[e % 4], e // 4
                for proj, k in (("gate_proj", "g"), ("up_proj", "u"), ("down_proj", "d")):
                    w.add(base + proj + ".weight", torch.roll(src[k], shifts=shift, dims=0))
    for name, p in skel.model.named_parameters():
        if ".layers." not in name:
            w.add(name, rnd(tuple(p.shape), name))
    w.finalize()
    (path / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")
    save_byte_tokenizer(path)
    GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID).save_pretrained(str(path))
    return path


def shard_digest(out: Path) -> dict:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() if p.stat().st_size < (1 << 28) else _big_digest(p)
            for p in sorted(out.glob("*.safetensors"))} | {"index": hashlib.sha256(
                (out / "model.safetensors.index.json").read_bytes()).hexdigest()}


def _big_digest(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def prune_run(model: Path, out: Path, calib: Path, keep: int, flags: list[str], n_samples: int, seq_len: int) -> dict:
    cmd = [sys.executable, "-m", "lowmoe", "-q", "prune", str(model), str(out), "--keep", str(keep), "--method", "frequency",
           "--calib", str(calib), "--n-samples", str(n_samples), "--seq-len", str(seq_len), "--device", "cpu", "--overwrite",
           *flags]
    wall, rss = child_peak(cmd)
    rep = json.loads((out / "lowmoe_report.json").read_text())
    io = rep["io"]
    read = int(io.get("bytes", {}).get("layer", 0)) + int(io.get("expert_bytes_read", 0))
    return {"command": "lowmoe prune MODEL OUT --keep %d --method frequency --calib c.txt --n-samples %d --seq-len %d %s"
                       % (keep, n_samples, seq_len, " ".join(flags)),
            "flags": flags, "wall_s": round(wall, 1), "peak_rss_bytes": int(rss), "bytes_read": read,
            "expert_bytes_read": int(io.get("expert_bytes_read", 0)), "bytes_copied": int(io.get("bytes_copied", 0)),
            "planned_host_peak_bytes": rep["budget"].get("plan", {}).get("host_peak_bytes"),
            "group_sizes": rep["budget"].get("group_sizes"), "super_expert_profile": rep.get("super_expert_profile"),
            "output_bytes": rep["bytes"]["output"]}


def check_loadable(out: Path, expect_experts: int) -> dict:
    """Load a (small) output with transformers: no missing/unexpected keys, shapes and config as expected."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.from_pretrained(str(out))
    model, info = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32, output_loading_info=True)
    ids = torch.tensor([[1, 5, 9, 13, 17, 21]])
    with torch.no_grad():
        logits = model(ids).logits
    exp = model.model.layers[1].mlp.experts
    return {"n_routed_experts": cfg.n_routed_experts, "n_group": cfg.n_group, "topk_group": cfg.topk_group,
            "num_experts_per_tok": cfg.num_experts_per_tok, "missing_keys": sorted(info["missing_keys"]),
            "unexpected_keys": sorted(info["unexpected_keys"]), "mismatched_keys": [str(k) for k in info.get("mismatched_keys", [])],
            "gate_up_proj_shape": list(exp.gate_up_proj.shape), "router_shape": list(model.model.layers[1].mlp.gate.weight.shape),
            "logits_finite": bool(torch.isfinite(logits).all()),
            "ok": (cfg.n_routed_experts == expect_experts and not info["missing_keys"] and not info["unexpected_keys"]
                   and exp.gate_up_proj.shape[0] == expect_experts and bool(torch.isfinite(logits).all()))}


def index_matches(big: Path, small: Path) -> dict:
    """The big output's keys and per-key shapes follow the same pattern as the loadable small one."""
    from lowmoe.engine.checkpoint import Checkpoint

    b, s = Checkpoint(big), Checkpoint(small)
    same_keys = sorted(b.weight_map) == sorted(s.weight_map)
    cb, cs = b.config, s.config
    experts = cb["n_routed_experts"]
    shapes_ok = all(b.tensor_info(f"model.layers.1.mlp.experts.{e}.gate_proj.weight")[0] == (cb["moe_intermediate_size"], cb["hidden_size"])
                    for e in (0, experts - 1))
    router = b.tensor_info("model.layers.1.mlp.gate.weight")[0] == (experts, cb["hidden_size"])
    bias = b.tensor_info("model.layers.1.mlp.gate.e_score_correction_bias")[0] == (experts,)
    cfg_keys = {k: (cb.get(k), cs.get(k)) for k in ("n_routed_experts", "n_group", "topk_group", "num_experts_per_tok")}
    return {"same_keys_as_reduced_copy": same_keys, "expert_shapes_ok": shapes_ok, "router_shape_ok": router,
            "correction_bias_ok": bias, "config": cfg_keys,
            "ok": same_keys and shapes_ok and router and bias and all(a == c for a, c in cfg_keys.values())}


def geometry(args) -> None:
    from lowmoe.engine.checkpoint import Checkpoint

    root = Path(args.workdir)
    root.mkdir(parents=True, exist_ok=True)
    calib = root / "c.txt"
    calib.write_text("\n".join(f"line {i}: the quick brown fox jumps over {i * 7 % 13} lazy dogs; 12+{i}={12 + i}"
                               for i in range(400)))
    env_cache = root / "profile-cache"
    os.environ["LOWMOE_CACHE_DIR"] = str(env_cache)
    t0 = time.perf_counter()
    if args.geometry == "mixtral-8x7b":
        model = build_mixtral_8x7b(root / "mixtral-8x7b-3l")
        keep, runs = 4, [[], ["--max-ram", "4GiB"]]
    else:
        model = build_deepseek(root / "deepseek-v3-2l", 7168, 2048, 18432)
        keep, runs = 128, [["--max-ram", "8GiB"]] + ([[]] if args.unbudgeted else [])
    build_s = time.perf_counter() - t0
    ck = Checkpoint(model)
    largest = max(ck.layer_bytes(i) for i in range(ck.num_layers))
    total = ck.total_bytes()
    result = {"command": f"python scripts/bench_stream.py --geometry {args.geometry} --json {args.json}", "geometry": args.geometry, "model_bytes": total, "largest_layer_bytes": largest, "build_s": round(build_s, 1),
              "machine": {"cpus": os.cpu_count(), "ram_bytes": os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
                          "gpu": None, "python": platform.python_version()},
              "omp_num_threads": os.environ.get("OMP_NUM_THREADS"), "runs": []}
    digests = []
    for flags in runs:
        shutil.rmtree(env_cache, ignore_errors=True)  # every run profiles itself: the worst case
        out = root / ("out-" + ("-".join(f.strip("-") for f in flags) or "noflags"))
        r = prune_run(model, out, calib, keep, flags, args.n_samples, args.seq_len)
        digests.append(shard_digest(out))
        result["runs"].append(r)
        print(f"{r['command']}: wall {r['wall_s']} s, peak RSS {r['peak_rss_bytes'] / GIB:.2f} GiB, "
              f"read {r['bytes_read'] / GIB:.2f} GiB", flush=True)
        if args.geometry == "deepseek-v3":
            result["big_output_dir"] = str(out)
        elif len(runs) > 1 and flags != runs[-1]:
            pass
    result["outputs_identical"] = all(d == digests[0] for d in digests[1:]) if len(digests) > 1 else None
    if args.geometry == "mixtral-8x7b":
        t1 = 2 * largest + 1e9
        result["targets"] = {"no_flags_rss_le_2x_largest_plus_1GB": result["runs"][0]["peak_rss_bytes"] <= t1,
                             "max_ram_4GiB_rss_le_4GiB": result["runs"][1]["peak_rss_bytes"] <= 4 * GIB}
    else:
        small = build_deepseek(root / "deepseek-v3-reduced", 256, 64, 512)
        sout = root / "out-reduced"
        floor = json.loads(subprocess.run([sys.executable, "-m", "lowmoe", "inspect", str(small), "--json", "--seq-len",
                                           str(args.seq_len)], check=True, capture_output=True, text=True).stdout)
        prune_run(small, sout, calib, keep, ["--max-ram", str(floor["budget"]["min_max_ram_bytes"])], args.n_samples, args.seq_len)
        result["reduced_copy"] = {"load": check_loadable(sout, keep), "big_output_vs_reduced": index_matches(Path(result["big_output_dir"]), sout)}
        result["targets"] = {"max_ram_8GiB_rss_le_8GiB": result["runs"][0]["peak_rss_bytes"] <= 8 * GIB,
                             "output_loadable": result["reduced_copy"]["load"]["ok"] and result["reduced_copy"]["big_output_vs_reduced"]["ok"]}
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))
    if args.json:
        save_result(args.json, result)
    if not args.keep_models:
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=BENCH_DIR / "mix2g")
    ap.add_argument("--n-samples", type=int, default=None)
    ap.add_argument("--seq-len", type=int, default=None)
    ap.add_argument("--skip-full-load", action="store_true", help="skip (a), loading the whole model")
    ap.add_argument("--geometry", choices=["mixtral-8x7b", "deepseek-v3"], default=None,
                    help="issue 13: one real model's layer geometry, with and without --max-ram")
    ap.add_argument("--workdir", default="/tmp/lowmoe-bench-geometry", help="--geometry: where the models go (deleted after)")
    ap.add_argument("--keep-models", action="store_true", help="--geometry: do not delete the models and outputs")
    ap.add_argument("--unbudgeted", action="store_true", help="deepseek-v3: also run without --max-ram")
    ap.add_argument("--json", type=Path, help="store the figures, the command and the machine here")
    args = ap.parse_args()
    if args.geometry:
        args.n_samples = args.n_samples or 4
        args.seq_len = args.seq_len or 128
        return geometry(args)
    args.n_samples = args.n_samples or 16
    args.seq_len = args.seq_len or 256
    model = ensure_model(args.model)
    from lowmoe.engine.checkpoint import Checkpoint

    ck = Checkpoint(model)
    largest = max(ck.layer_bytes(i) for i in range(ck.num_layers))
    total = ck.total_bytes()
    shards = sorted(str(p) for p in model.glob("*.safetensors"))
    work = Path(tempfile.mkdtemp(prefix="lowmoe-bench-", dir=BENCH_DIR))
    calib = work / "calib.txt"
    calib.write_text("\n".join(f"line {i}: the quick brown fox jumps over {i * 7 % 13} lazy dogs; 12+{i}={12 + i}"
                               for i in range(4000)))
    cold = drop_caches()

    # (b) read every shard once + write the output once
    t_cat, _ = child_peak(["sh", "-c", "cat " + " ".join(shards) + " > /dev/null"])
    t_full = rss_full = None
    drop_caches()
    t_cp, _ = child_peak(["cp", "-r", str(model), str(work / "copy")])
    shutil.rmtree(work / "copy")
    io_time = t_cat + t_cp

    drop_caches()
    t_prune, rss_prune = child_peak([sys.executable, "-m", "lowmoe", "-q", "prune", str(model), str(work / "out"),
                                     "--keep", "half", "--method", "frequency", "--calib", str(calib),
                                     "--n-samples", str(args.n_samples), "--seq-len", str(args.seq_len)])
    report = json.loads((work / "out" / "lowmoe_report.json").read_text())
    shutil.rmtree(work / "out")

    rows = [("lowmoe prune --keep half --method frequency", t_prune, rss_prune)]
    if not args.skip_full_load:
        drop_caches()
        code = (f"import torch;from transformers import AutoModelForCausalLM as A;"
                f"A.from_pretrained({str(model)!r}, dtype=torch.bfloat16)")
        t_full, rss_full = child_peak([sys.executable, "-c", code])
        rows.append(("(a) AutoModelForCausalLM.from_pretrained (bf16)", t_full, rss_full))
    rows.append(("(b) cat shards > /dev/null + cp -r", io_time, None))
    shutil.rmtree(work, ignore_errors=True)

    print(f"\nmodel {model}: {gb(total)}, {ck.num_layers} layers, largest layer {gb(largest)}; "
          f"calibration {args.n_samples} x {args.seq_len} tokens; cpus {os.cpu_count()}; "
          f"page cache {'dropped before each run' if cold else 'NOT dropped (warm reads)'}")
    print(f"{'run':52s} {'wall s':>8s} {'peak RSS':>10s}")
    for name, wall, rss in rows:
        print(f"{name:52s} {wall:8.1f} {gb(rss) if rss else '-':>10s}")
    rss_target = 2 * largest + 1e9
    print(f"\npeak RSS target  <= 2 x largest layer + 1 GB = {gb(rss_target)}: "
          f"{'MET' if rss_prune <= rss_target else 'MISSED'} ({gb(rss_prune)})")
    print(f"wall time target <= 2 x (b) = {2 * io_time:.1f} s: {'MET' if t_prune <= 2 * io_time else 'MISSED'} ({t_prune:.1f} s)")
    lt = report["timings"]["layers"]
    print(f"prune breakdown: read {sum(v.get('read_s', 0) for v in lt.values()):.1f}s, "
          f"compute {sum(v.get('compute_s', 0) for v in lt.values()):.1f}s, write {sum(v.get('write_s', 0) for v in lt.values()):.1f}s")
    if args.json:
        res = {"command": "python scripts/bench_stream.py " + " ".join(sys.argv[1:]), "machine": machine(),
               "page_cache_dropped": cold,
               "model": {"bytes": total, "gb": round(total / 1e9, 2), "layers": ck.num_layers, "largest_layer_bytes": largest,
                         "largest_layer_gb": round(largest / 1e9, 2), "dtype": str(ck.config.get("torch_dtype", ck.config.get("dtype")))},
               "calibration": {"n_samples": args.n_samples, "seq_len": args.seq_len},
               "prune": {"wall_s": round(t_prune, 1), "peak_rss_gb": round(rss_prune / 1e9, 2),
                         "read_s": round(sum(v.get("read_s", 0) for v in lt.values()), 1),
                         "compute_s": round(sum(v.get("compute_s", 0) for v in lt.values()), 1),
                         "write_s": round(sum(v.get("write_s", 0) for v in lt.values()), 1),
                         "io": report.get("io"),
                         "layer_read_hidden_fraction": round(1 - report["io"]["wait_s"]["layer"] / report["io"]["read_s"]["layer"], 3)
                         if report.get("io", {}).get("read_s", {}).get("layer") else None},
               "full_load": None if t_full is None else {"wall_s": round(t_full, 1), "peak_rss_gb": round(rss_full / 1e9, 2)},
               "read_and_copy": {"cat_s": round(t_cat, 1), "cp_s": round(t_cp, 1), "total_s": round(io_time, 1)},
               "targets": {"peak_rss_gb": round(rss_target / 1e9, 2), "peak_rss_met": rss_prune <= rss_target,
                           "wall_s": round(2 * io_time, 1), "wall_met": t_prune <= 2 * io_time}}
        save_result(args.json, res)


if __name__ == "__main__":
    main()
