"""Benchmark of issue 15's "compute is not the arithmetic": what one MoE layer call asks of the device,
with transformers' per-expert loop (``--experts-impl eager``) and its grouped GEMM (``grouped``).

A GPU runs each operator torch dispatches as at least one kernel launched from the host, and each
operator that needs a device value on the host (``nonzero``, ``.item()``, ``bool(tensor)``, ``unique``
then ``.tolist()``) makes the host wait until the device has finished everything queued before it.
Both can be counted on the CPU: this script runs ``lowmoe.prune --method frequency`` (``--method``) on a synthetic
Mixtral-layout model with a ``TorchDispatchMode`` around every decoder-layer call and counts, per
layer call, the operators dispatched and those that synchronise the host with a CUDA device, boolean-mask
indexing (``x[mask]``) among them (copies from the device to the host, e.g. ``.cpu()``, also wait
there, but a CPU run makes none to count). It does
so for each experts implementation, with every layer whole on the device (no budget) and with the
experts in groups (``--max-vram``), then times the same prunes without the counter (wall, and the
report's ``compute`` stage) and checks that

  * each implementation writes the same bytes whole and in groups (the budget changes no number),
  * eager and grouped keep the same experts (their hidden states differ in the last bits).

On a CUDA device the same counts become launches and host waits; their cost there is what the next
GPU session measures (``scripts/gpu_next.sh``: the ``imported`` and ``imported-eager`` runs)."""

from __future__ import annotations

import argparse
import collections
import shutil
import sys
import time
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _bench import BENCH_DIR, command_line, machine, save_result, weights_digest  # noqa: E402

# operators whose result size or value the host needs: on CUDA each one waits for the device; and
# (counted as "d2h_copy", on CUDA only) a blocking copy from the device to the host; and (counted as
# "mask_index") indexing with a boolean mask, x[mask] or x[mask] = v, which torch turns into the mask's
# nonzero positions inside the index kernel, below the operators a dispatch mode sees
HOST_SYNCS = {"aten.nonzero.default", "aten._local_scalar_dense.default", "aten._unique2.default",
              "aten.unique_dim.default", "aten.unique_consecutive.default", "aten.masked_select.default",
              "aten.repeat_interleave.Tensor", "aten.is_nonzero.default", "aten.equal.default", "d2h_copy",
              "mask_index"}
MASK_INDEXING = {"aten.index.Tensor", "aten.index_put.default", "aten.index_put_.default",
                 "aten._index_put_impl_.default"}


def _indexes_with_a_mask(name: str, args) -> bool:
    if name not in MASK_INDEXING or len(args) < 2:
        return False
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in args[1] if i is not None)


def _blocking_device_to_host(name: str, args, kwargs) -> bool:
    if name == "aten._to_copy.default":
        src, dst, non_blocking = args[0], kwargs.get("device"), kwargs.get("non_blocking", False)
    elif name == "aten.copy_.default":
        src, dst = args[1], args[0].device
        non_blocking = args[2] if len(args) > 2 else kwargs.get("non_blocking", False)
    else:
        return False
    return (isinstance(src, torch.Tensor) and src.is_cuda and dst is not None and torch.device(dst).type == "cpu"
            and not non_blocking)


class OpCounter(TorchDispatchMode):
    """Counts the aten operators dispatched inside it (views and metadata calls included) into ``ops``."""

    def __init__(self, ops: collections.Counter):
        super().__init__()
        self.ops = ops

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        self.ops[name] += 1
        if _blocking_device_to_host(name, args, kwargs or {}):
            self.ops["d2h_copy"] += 1
        if _indexes_with_a_mask(name, args):
            self.ops["mask_index"] += 1
        return func(*args, **(kwargs or {}))


def counted_prune(model: Path, out: Path, opts: dict) -> dict:
    """``lowmoe.prune`` with every layer pass (``Stream.forward``: all activation chunks through one
    layer) counted, on the main thread and on the threads of an experts-major wave (a layer whose
    experts visit the device in groups runs each chunk on a thread of its own, one at a time, and its
    expert groups on the main thread): operators and host syncs per chunk and layer."""
    import lowmoe
    import lowmoe.engine.experts as experts_mod
    import lowmoe.engine.stream as stream_mod

    ops: collections.Counter = collections.Counter()
    calls = [0]
    originals = (stream_mod.Stream.forward, experts_mod.WaveTask._run, stream_mod.run_layer)

    def forward(self, *args, **kw):
        with OpCounter(ops):
            return originals[0](self, *args, **kw)

    def wave_run(self):
        with OpCounter(ops):
            return originals[1](self)

    def run_layer(*args, **kw):
        calls[0] += 1
        return originals[2](*args, **kw)

    stream_mod.Stream.forward, experts_mod.WaveTask._run, stream_mod.run_layer = forward, wave_run, run_layer
    try:
        lowmoe.prune(model, out, **opts)
    finally:
        stream_mod.Stream.forward, experts_mod.WaveTask._run, stream_mod.run_layer = originals
    syncs = collections.Counter({k: v for k, v in ops.items() if k in HOST_SYNCS})
    n = max(1, calls[0])
    dispatched = sum(v for k, v in ops.items() if k not in ("d2h_copy", "mask_index"))  # counted already as operators
    return {"layer_calls": calls[0], "ops_per_call": round(dispatched / n, 1),
            "host_syncs_per_call": round(sum(syncs.values()) / n, 2),
            "host_syncs_by_op": {k: round(v / n, 2) for k, v in syncs.most_common()}}


def experts_call_peak(model: Path, impl: str, tokens: int, dtype: torch.dtype, device: str = "cpu") -> dict:
    """Memory one call of a whole experts module takes, against what the budget planner books for it
    (``budget.activation_terms``: the expert terms of ``tokens`` tokens). On the CPU: host memory,
    peak RSS over the RSS before it (the peak reset through /proc/self/clear_refs); on CUDA: torch's
    peak allocated device memory over what was allocated before it."""
    import gc

    from bench_gpu import peak_rss  # VmHWM
    from lowmoe.engine.budget import activation_terms, build_layer
    from lowmoe.engine.memory import current_rss_bytes
    from lowmoe.engine.checkpoint import Checkpoint
    from lowmoe.engine.hf import ModelSkeleton, moe_modules

    dev = torch.device(device)
    ck = Checkpoint(model)
    L = ck.moe_layers()[0]
    skel = ModelSkeleton(ck.config, ck.adapter, experts=impl)
    layer = build_layer(skel, L, ck.adapter.to_runtime(L, ck.read_layer(L), True), dev, dtype)
    experts = moe_modules(ck.adapter, layer)[2]
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(tokens, ck.config["hidden_size"], generator=g).to(dev, dtype)
    index = torch.stack([torch.randperm(ck.num_experts, generator=g)[:ck.top_k] for _ in range(tokens)]).to(dev)
    weights = torch.rand(tokens, ck.top_k, generator=g).to(dev, dtype)
    with torch.no_grad():
        experts(hidden, index, weights)  # allocator and kernels warm
        gc.collect()
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
            before = torch.cuda.memory_allocated(dev)
            torch.cuda.reset_peak_memory_stats(dev)
            out = experts(hidden, index, weights)
            torch.cuda.synchronize(dev)
            peak = torch.cuda.max_memory_allocated(dev) - before
        else:
            before = current_rss_bytes()
            Path("/proc/self/clear_refs").write_text("5\n")  # VmHWM := VmRSS
            out = experts(hidden, index, weights)
            peak = peak_rss() - before
    del out, layer, experts
    b = torch.finfo(dtype).bits // 8
    terms = activation_terms(ck.config, batch_size=1, seq_len=tokens, dtype_bytes=b, top_k=ck.top_k,
                             num_experts=ck.num_experts, grouped=impl == "grouped")
    planned = terms["expert_intermediates"] + terms.get("grouped_expert_rows", 0)
    return {"tokens": tokens, "device": dev.type, "dtype": str(dtype).replace("torch.", ""), "measured_peak_bytes": peak,
            "planned_bytes": planned, "planned_terms": {k: v for k, v in terms.items() if k.startswith(("expert", "grouped"))}}


def timed_prune(model: Path, out: Path, opts: dict) -> dict:
    import lowmoe

    t0 = time.perf_counter()
    rep = lowmoe.prune(model, out, **opts)
    wall = time.perf_counter() - t0
    stages = rep.get("stages") or {}
    return {"wall_s": round(wall, 3), "compute_s": (stages.get("compute") or {}).get("s"),
            "compute_device_s": (stages.get("compute_device") or {}).get("s"),  # CUDA: the GPU busy
            "experts_impl": rep.get("experts_impl"), "plan": rep["plan"]["layers"],
            "group_sizes": (rep.get("budget") or {}).get("group_sizes"), "weights_sha256": weights_digest(out)}



def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="a Mixtral-layout checkpoint (default: synthesized)")
    ap.add_argument("--synth-layers", type=int, default=4)
    ap.add_argument("--synth-hidden", type=int, default=1024)
    ap.add_argument("--synth-intermediate", type=int, default=3584)
    ap.add_argument("--method", default="frequency",
                    help="the prune's --method (e.g. merge-freq, c-prune: the merging methods' statistics)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="fp32")
    ap.add_argument("--n-samples", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=128)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--max-vram", default="300MB", help="the budget of the grouped-experts runs")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeat", type=int, default=3, help="timed runs of each setting (the median is reported)")
    ap.add_argument("--peak-tokens", type=int, default=4096, help="tokens of the one experts call whose memory is measured")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from lowmoe.toy.synth import synth_model
    from bench_gpu import calib_file

    work = BENCH_DIR / "experts-impl"
    work.mkdir(parents=True, exist_ok=True)
    model = args.model
    if model is None:
        model = work / f"mix{args.synth_layers}l-{args.synth_hidden}-{args.synth_intermediate}"
        if not (model / "model.safetensors.index.json").is_file():
            synth_model(model, "mixtral", layers=args.synth_layers, hidden_size=args.synth_hidden,
                        intermediate_size=args.synth_intermediate, experts=8, top_k=2, dtype="bfloat16", shard_size="1GB")
    calib = calib_file(work / "calib.txt")
    base = dict(keep="half", method=args.method, calib=[str(calib)], n_samples=args.n_samples, seq_len=args.seq_len,
                batch_size=args.batch_size, device=args.device, dtype=args.dtype, progress=False, overwrite=True)
    settings = {f"{impl}-{where}": dict(base, experts_impl=impl, **({"max_vram": args.max_vram} if where == "groups" else {}))
                for impl in ("eager", "grouped") for where in ("whole", "groups")}
    from lowmoe.errors import ConfigError

    results = {}
    for name, opts in settings.items():
        out = work / f"out-{name}"
        try:
            counts = counted_prune(model, out, opts)
        except ConfigError as e:  # a --max-vram this device cannot hold: say so, go on with the others
            results[name] = {"error": str(e)}
            print(f"{name:15s} not run: {e}", flush=True)
            continue
        runs = [timed_prune(model, out, opts) for _ in range(max(1, args.repeat))]
        shutil.rmtree(out, ignore_errors=True)
        walls = sorted(r["wall_s"] for r in runs)
        mid = sorted(runs, key=lambda r: r["wall_s"])[len(runs) // 2]
        results[name] = {**counts, **mid, "walls_s": [r["wall_s"] for r in runs], "median_wall_s": walls[len(walls) // 2]}
        print(f"{name:15s} ops/call {counts['ops_per_call']:7.1f}  host syncs/call {counts['host_syncs_per_call']:6.2f}  "
              f"wall {results[name]['median_wall_s']:6.2f} s  "
              + (f"compute {mid['compute_s']:6.2f} s  " if mid.get("compute_s") is not None else "(no stage table)  ")
              + (f"(GPU busy {mid['compute_device_s']:.2f} s)  " if mid.get("compute_device_s") is not None else "")
              + f"({mid['experts_impl']}, groups {sorted(set((mid['group_sizes'] or {}).values()))})", flush=True)
    from lowmoe.engine.device import DTYPES, resolve_device

    dev = resolve_device(args.device)
    peak_dtype = DTYPES[args.dtype]
    peaks = {impl: experts_call_peak(model, impl, args.peak_tokens, peak_dtype, str(dev)) for impl in ("eager", "grouped")}
    for impl, pk in peaks.items():
        print(f"one {impl} experts call on {pk['tokens']} tokens ({pk['dtype']}): peak {pk['measured_peak_bytes'] / 1e6:.0f} MB "
              f"of {'device' if dev.type == 'cuda' else 'host'} memory; the budget books {pk['planned_bytes'] / 1e6:.0f} MB for it")
    sha = {k: v.get("weights_sha256") for k, v in results.items()}
    checks = {
        # None: the groups run did not happen (a budget too small for one chunk)
        "eager: whole == groups (bytes)": sha["eager-groups"] and sha["eager-whole"] == sha["eager-groups"],
        "grouped: whole == groups (bytes)": sha["grouped-groups"] and sha["grouped-whole"] == sha["grouped-groups"],
        "eager and grouped keep the same experts": results["eager-whole"]["plan"] == results["grouped-whole"]["plan"],
        "the budget books at least an experts call's peak": all(p["planned_bytes"] >= p["measured_peak_bytes"]
                                                               for p in peaks.values()),
    }
    for k, v in checks.items():
        print(f"{k}: {'not run' if v is None else 'yes' if v else 'NO'}")
    e, g = results["eager-whole"], results["grouped-whole"]
    ratios = {"ops_per_call eager/grouped (whole)": round(e["ops_per_call"] / g["ops_per_call"], 2),
              "host_syncs_per_call eager - grouped (whole)": round(e["host_syncs_per_call"] - g["host_syncs_per_call"], 2),
              "compute_s grouped/eager (whole)": round(g["compute_s"] / e["compute_s"], 3) if e["compute_s"] else None}
    for k, v in ratios.items():
        print(f"{k}: {v}")
    if args.json:
        save_result(args.json, {"command": command_line(), "machine": machine(),
                                "model": str(model), "settings": {k: {kk: vv for kk, vv in v.items() if kk != "calib"}
                                                                  for k, v in settings.items()},
                                "results": results, "experts_call_peak": peaks, "checks": checks, "ratios": ratios})


if __name__ == "__main__":
    main()
