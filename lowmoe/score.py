"""Expert scores without writing a model (``lowmoe score``).

The same streamed pass as pruning -- calibration tokens embedded into the disk activation cache,
then one decoder layer at a time read (the next one prefetched while this one computes), built
under the ``--max-vram``/``--max-ram`` budget (experts streamed in groups when a layer does not
fit; see ``lowmoe.engine.budget``), run on the cached hidden states with hooks on its router and experts,
and dropped -- but nothing is written except ``scores.json``. Every layer is scored
on the *original* model's activations (one-shot: there is no keep count to prune with). Several
methods can share one pass (``method=["reap", "easy-ep"]``): the hooks feed every method's
observer from the same forward call.

Super experts come from the same pass: every expert's max |down_proj output| is recorded and the
model-wide thresholds are applied after the last layer (``scoring.super_experts``), so no
profiling pre-pass is needed here. With ``keep=`` each method's keep-set per layer (super experts
and DeepSeek groups respected) is added, i.e. the plan a one-shot prune would use.

    import lowmoe.score
    rep = lowmoe.score.score("model", calib=["math.jsonl"], method="easy-ep", out="scores.json")
    rep["layers"]["3"]["scores"]["easy-ep"]    # one float per expert
"""

from __future__ import annotations

import json
import logging
import shutil
import tempfile
import time
from pathlib import Path

import torch

from .engine.apply import keep_groups
from .engine.cache import ActivationCache
from .engine.calibration import check_sources
from .engine.checkpoint import Checkpoint
from .engine.device import dtype_name, resolve_device, resolve_dtype, warm_up
from .engine.hf import check_experts_impl
from .engine.memory import cuda_peak_bytes, fmt_bytes, out_of_memory_errors, peak_rss_bytes
from .engine.progress import progress as progress_bar
from .engine.quant import check_quant_budget, check_quant_mode
from .engine.stream import Stream, calibration_tokens, plan_stream_budget, readahead, walk, with_setup
from .errors import ConfigError
from .methods import ScoreThenKeep, check_options, make_layer_method, options_per_method, scoring_methods
from .methods.scoring import choose_keep
from .methods.scoring.super_experts import MaximaObserver
from .pipeline import PruneConfig
from .version import __version__

log = logging.getLogger(__name__)


def score(model: str | Path, calib, method: str | list[str] = "frequency", out: str | Path | None = None, *,
          keep: int | str | None = None, seq_len: int = 256, n_samples: int = 64, batch_size: int = 8,
          layout: str = "pack", answer_only: bool = False, protect_super_experts: bool = True,
          device: str = "auto", dtype: str = "fp32", max_vram: str | int | None = None,
          max_ram: str | int | None = None, prefetch: bool = True, quant: str = "none", seed: int = 0, progress: bool = True,
          method_options: dict | None = None, work_dir: str | Path | None = None, experts_impl: str = "auto") -> dict:
    """Score every MoE layer's experts with ``method`` (a name or a list of names) in one streamed
    pass; return the report and, with ``out``, write it as JSON.

    ``device``/``dtype``/``max_vram``/``max_ram``/``prefetch``/``experts_impl`` mean what they mean for ``prune``
    (``docs/gpu.md``); the budget is planned from the index before any work, and prefetching changes no
    score, nor does expert chunking with the eager experts loop (with the grouped GEMM: by rounding). ``quant`` (``nf4``/``int8``) builds each layer with its linear
    weights (experts, attention, shared experts) held as bitsandbytes codes and dequantized per use,
    router and norms exact (``lowmoe.engine.quant``): less device memory, scores moved by the rounding.

    ``method_options``: options for the methods, either flat (``{"renormalize": False}``, given to
    every method, as ``prune(method_options=...)``) or per method (``{"reap": {...}}``).
    ``work_dir``: where the temporary activation cache lives (default: the system temp dir)."""
    t_start = time.time()
    methods = [method] if isinstance(method, str) else list(method)
    if not methods:
        raise ConfigError("--method: give at least one scoring method")
    valid = scoring_methods()
    for m in methods:
        if m not in valid:
            raise ConfigError(f"--method {m!r} has no per-layer scores; choose from: {', '.join(valid)}")
    calib = [calib] if isinstance(calib, (str, Path)) else list(calib or [])
    if not calib:
        raise ConfigError("--calib is required: the calibration data to score experts on")
    for name in ("seq_len", "n_samples", "batch_size"):
        if int(locals()[name]) < 1:
            raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {locals()[name]}")
    dev = resolve_device(device)
    compute_dtype = resolve_dtype(dtype, dev)
    check_quant_mode(quant)
    check_experts_impl(experts_impl)
    if quant != "none" and "reconstruction" in methods:
        # reconstruction takes its device and dtype from the experts module's parameters, which a
        # quantized (or expert-chunked) layer does not have
        raise ConfigError(f"--quant {quant}: --method reconstruction cannot run on quantized experts; use --quant none")
    check_sources(calib)
    ck = Checkpoint(Path(model))
    ck.validate()
    per_method = options_per_method(methods, method_options or {})
    for m in methods:  # a bad --method-option fails here, before any work
        check_options(m, ck.num_experts, ck.top_k, seed, per_method[m])
    lazy = quant == "none"  # routed experts read from the shards a group at a time, as prune reads them
    budget = plan_stream_budget(ck, device=dev, dtype=compute_dtype, batch_size=batch_size, seq_len=seq_len,
                                max_vram=max_vram, max_ram=max_ram, prefetch=prefetch, lazy=lazy, n_samples=n_samples,
                                experts=experts_impl)  # fails here if it cannot hold
    check_quant_budget(budget, ck, quant, compute_dtype)
    keep_n = None
    if keep is not None:
        keep_n = PruneConfig(model=Path(model), out=Path("."), keep=keep).resolve_keep(ck.num_experts)
        if not ck.top_k <= keep_n <= ck.num_experts:
            raise ConfigError(f"--keep {keep}: must be between the experts per token ({ck.top_k}) and {ck.num_experts}")
    if out is not None and Path(out).is_dir():
        raise ConfigError(f"--out {out}: is a directory; give a file name such as scores.json")

    ahead = readahead(ck, enabled=prefetch)  # the disk reads the first layers while the pass imports and tokenizes
    warm = warm_up(dev, getattr(budget, "staging_buffer_bytes", 0), enabled=prefetch)  # CUDA: context, first pinned buffer
    stream = tmp = None
    with out_of_memory_errors(dev, budget):  # out of memory anyway: one line naming the flag
        try:
            t_begin = time.perf_counter()
            tokens = calibration_tokens(ck, calib, seq_len=seq_len, n_samples=n_samples, layout=layout, answer_only=answer_only)
            setup = {"tokenize": time.perf_counter() - t_begin}
            tmp = Path(tempfile.mkdtemp(prefix="lowmoe-score-", dir=str(work_dir) if work_dir else None))
            stream = Stream(ck, tokens, ActivationCache(tmp / "cache", persist=False), dev, compute_dtype, batch_size, budget=budget,
                            prefetch=prefetch, quant=quant, experts=experts_impl)
            t_pass = time.perf_counter()
            setup["setup"] = t_pass - t_begin - setup["tokenize"]  # the model skeleton (transformers' modeling code)
            stream.embed()
            layers = _score_layers(stream, ck, methods, keep_n, seed, per_method, protect_super_experts, progress)
            wall = time.perf_counter() - t_pass
            io = {**stream.io.to_json(wall), **stream.files.to_json(), **({"readahead_bytes": ahead.bytes} if ahead else {})}
            if warm is not None:
                io["device_warm_up"] = warm.report()
            stages = with_setup(stream.stages(time.perf_counter() - t_begin), setup, time.perf_counter() - t_begin)
            activations = stream.activation_report()
        finally:
            if ahead is not None:
                ahead.stop()
            if warm is not None:
                warm.join()
            if stream is not None:
                stream.close()
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)

    report = _report(ck, methods, tokens, calib, layers, keep_n, seq_len, protect_super_experts, t_start)
    report["options"] = {"layout": layout, "answer_only": answer_only, "dtype": dtype_name(compute_dtype),
                         "device": str(dev), "quant": quant, "batch_size": batch_size, "seed": seed, "prefetch": prefetch,
                         "experts_impl": stream.skel.experts_impl, "method_options": method_options or {}}
    report["io"], report["stages"], report["budget"] = io, stages, stream.placer.report()
    report["activations"] = activations
    if out is not None:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1) + "\n")
    log.info("scored %d MoE layers with %s in %.1fs; peak RSS %s", len(report["layers"]), ", ".join(methods),
             report["timings"]["total_s"], fmt_bytes(report["memory"]["peak_rss_bytes"]))
    return report


def _score_layers(stream: Stream, ck: Checkpoint, methods: list[str], keep_n: int | None, seed: int,
                  method_options: dict, protect: bool, progress: bool) -> dict:
    adapter = ck.adapter
    groups = keep_groups(ck, keep_n) if keep_n else 1
    maxima = MaximaObserver(ck.num_experts) if protect else None
    layers: dict[int, dict] = {}

    def observers_for(layer_idx: int) -> list:
        observers = [make_layer_method(m, ck.num_experts, ck.top_k, seed=seed, **method_options.get(m, {})) for m in methods]
        return observers + ([maxima] if maxima is not None else [])

    def record(layer_idx: int, tensors: dict, observers: list) -> None:
        """The layer's scores; a search (reconstruction) with ``keep`` decides here, while the layer is loaded,
        with super experts protected by the running thresholds (the layers seen so far)."""
        if maxima is not None:
            maxima.commit(layer_idx)
        entry: dict = {"scores": {}, "stats": {}, "keep": {}}
        for name, meth in zip(methods, observers):
            if keep_n is not None and not isinstance(meth, ScoreThenKeep):
                prot = maxima.protected(layer_idx) if maxima is not None else set()
                plan = meth.decide(layer_idx, keep_n, protected=prot, groups=groups, tensors=tensors, adapter=adapter)
                entry["keep"][name] = list(plan.keep)
            s = meth.scores()
            entry["scores"][name] = None if s is None else [float(v) for v in s]
            entry["stats"][name] = meth.state()
        # Which methods take the top-`keep` by score (decided once super experts are known).
        entry["_by_score"] = [isinstance(m, ScoreThenKeep) for m in observers[:len(methods)]]
        for meth in observers[:len(methods)]:
            getattr(meth, "release", lambda: None)()  # e.g. reconstruction's hold on the layer's experts
        layers[layer_idx] = entry
        return None

    # layer L+1 is read while L computes and, unless --quant, routed experts a group at a time: as in prune
    reader = stream.layers(0, set(ck.moe_layers()), lazy=stream.quant == "none")
    steps = walk(stream, reader, observers_for=observers_for, decide=record, apply=lambda idx, tensors, lp: None)
    t0 = time.perf_counter()
    for step in progress_bar(steps, len(reader), f"score ({', '.join(methods)})", progress):
        if step.idx in layers:
            layers[step.idx]["time_s"] = round(time.perf_counter() - t0, 4)
        t0 = time.perf_counter()

    found, summary = maxima.result() if maxima is not None else ({}, {})
    for layer_idx, entry in layers.items():
        entry["protected"] = sorted(found.get(layer_idx, ()))
        by_score = entry.pop("_by_score")
        if keep_n is None:
            entry.pop("keep")
        else:
            for name, scored in zip(methods, by_score):
                s = entry["scores"][name]
                if s is not None and scored:
                    entry["keep"][name] = choose_keep(torch.tensor(s), keep_n, set(entry["protected"]), groups)
    return {"layers": layers, "super_experts": summary}


def _report(ck, methods, tokens, calib, res, keep_n, seq_len, protect, t_start) -> dict:
    layers = res["layers"]
    domains = tokens.domains
    out_layers = {}
    for layer_idx, entry in sorted(layers.items()):
        e = dict(entry)
        # Usage per domain (share of top-k assignments), from the first method's routing counts.
        st = entry["stats"][methods[0]]
        if "domains" in st:
            e["usage"] = {domains[int(d)]: v["usage"] for d, v in st["domains"].items()}
        elif "routed_tokens" in st and st.get("tokens"):
            e["usage"] = {domains[0] if len(domains) == 1 else "all":
                          [c / (st["tokens"] * ck.top_k) for c in st["routed_tokens"]]}
        out_layers[str(layer_idx)] = e
    return {
        "lowmoe_version": __version__, "model": str(ck.path), "family": ck.adapter.family,
        "num_experts": ck.num_experts, "top_k": ck.top_k, "methods": methods, "keep": keep_n,
        "sequential": False,
        "calibration": {"sources": [str(c) for c in calib], "domains": domains,
                        "sequences": int(tokens.input_ids.shape[0]), "seq_len": int(tokens.input_ids.shape[1]),
                        "tokens_counted": tokens.num_tokens,
                        "sequences_per_domain": torch.bincount(tokens.domain, minlength=len(domains)).tolist()},
        "super_experts": res["super_experts"] if protect else {"disabled": True},
        "layers": out_layers,
        "timings": {"total_s": round(time.time() - t_start, 3)},
        "memory": {"peak_rss_bytes": peak_rss_bytes(), "cuda_peak_bytes": cuda_peak_bytes()},
    }


def format_scores(report: dict, top: int = 8) -> str:
    """Per-layer tables for the terminal: each method's highest-scoring experts, super experts,
    and (with keep) the kept set."""
    cal = report["calibration"]
    lines = [f"{report['model']}  ({report['family']}, {report['num_experts']} experts, top-{report['top_k']})",
             (f"calibration: {cal['sequences']} sequences x {cal['seq_len']} tokens, {cal['tokens_counted']} counted; "
              f"domains: {', '.join(cal['domains'])}")]
    se = report.get("super_experts", {})
    if se.get("super_experts"):
        lines.append("super experts (never dropped): " + ", ".join(f"L{s['layer']}/E{s['expert']} (max {s['max_abs_output']:.3g})"
                                                                 for s in se["super_experts"]))
    for m in report["methods"]:
        lines.append("")
        lines.append(f"method {m}: top {min(top, report['num_experts'])} experts per layer (expert:score)"
                     + ("   | kept" if report.get("keep") else ""))
        for layer, e in report["layers"].items():
            s = e["scores"].get(m)
            if s is None:
                continue
            order = sorted(range(len(s)), key=lambda i: -s[i])[:top]
            row = "  ".join(f"{i:>3}:{s[i]:.3g}" for i in order)
            kept = f"   | {e['keep'][m]}" if e.get("keep") and m in e["keep"] else ""
            prot = f"  protected {e['protected']}" if e.get("protected") else ""
            lines.append(f"  layer {int(layer):>3}  {row}{kept}{prot}")
    lines.append("")
    lines.append(f"wall {report['timings']['total_s']:.1f}s, peak RSS {fmt_bytes(report['memory']['peak_rss_bytes'])}")
    return "\n".join(lines)


__all__ = ["format_scores", "score", "scoring_methods"]
