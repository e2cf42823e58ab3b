"""``--method eep``: search with EEP, then write the chosen plan from the original weights.

A runner in ``methods.RUNNERS`` (it drives the whole run itself):

    options   <- cfg.method_options: dev, generations, population, init, quant, layer_groups
    weights   <- the checkpoint, or a per-layer NF4/int8 cache built once (``lowmoe.engine.quant``)
    seed      <- optional one-shot scoring pass (``--init frequency|easy-ep|...``) -> a one-hot seed
    search    <- ``evolve.Evolution``: one population-parallel streamed pass per generation on the
                 ``--calib`` examples (``population.PopulationEvaluator``)
    pick      <- the top 20 by training fitness re-scored on ``--dev``
    write     <- every layer from the ORIGINAL full-precision checkpoint via the plan (apply_layer):
                 LayerPlan(keep, merge=W_EM, router=W_RM); router rows W_RM·W_G (+ mapped biases)

The search state lives in ``OUT/.lowmoe-work/eep/state.json``; ``--resume`` continues a killed
search at its last finished generation (or the write at its last finished layer).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

from ...engine import faults
from ...engine.apply import apply_layer
from ...engine.budget import plan_population
from ...engine.calibration import load_tokenizer
from ...engine.progress import progress
from ...engine.quant import QUANT_MODES, layer_weights
from ...engine.rundir import WORK_DIR, write_json_atomic
from ...errors import ConfigError
from ..base import ScoreThenKeep
from ..oneshot import decide_layers, guards
from ..scoring import SCORERS, make_scorer
from .evolve import EvolveOptions, Evolution
from .fitness import FitnessData
from .population import PopulationEvaluator
from .space import Candidate, SearchSpace

log = logging.getLogger(__name__)

OPTION_NAMES = ("dev", "generations", "population", "init", "quant", "layer_groups", "prune_generations", "dev_num",
                "retain", "retain_gb")


def parse_options(opts: dict, seed: int) -> tuple[dict, EvolveOptions]:
    unknown = sorted(set(opts) - set(OPTION_NAMES))
    if unknown:
        raise ConfigError(f"--method eep: unknown option(s) {unknown}; known: {', '.join(OPTION_NAMES)}")
    quant = opts.get("quant") or "none"
    if quant not in QUANT_MODES:
        raise ConfigError(f"--quant {quant!r}: choose one of {', '.join(QUANT_MODES)}")
    init = opts.get("init") or "random"
    if init != "random":
        if init not in SCORERS:
            raise ConfigError(f"--init {init!r}: choose 'random' or a scoring method: {', '.join(sorted(SCORERS))}")
    dev = opts.get("dev")
    if dev is not None and not Path(dev).is_file():
        raise ConfigError(f"--dev {dev}: file not found (expected JSONL with prompt/answer records)")
    kw = {k: int(opts[k]) for k in ("generations", "population", "prune_generations", "dev_num") if opts.get(k) is not None}
    evo = EvolveOptions(seed=seed, **kw)
    evo.check()
    return {"quant": quant, "init": init, "dev": dev, "layer_groups": opts.get("layer_groups"),
            "retain": None if opts.get("retain") is None else int(opts["retain"]),
            "retain_bytes": int(float(opts.get("retain_gb") or 10) * 1e9)}, evo


def run_eep(run, cfg, top_k: int) -> dict:
    ck = run.ck
    opts, evo = parse_options(dict(cfg.method_options), cfg.seed)
    keep_n = cfg.resolve_keep(ck.num_experts)
    space = SearchSpace.build(ck.moe_layers(), ck.num_experts, keep_n, opts["layer_groups"])
    work = run.out / WORK_DIR / "eep"
    work.mkdir(parents=True, exist_ok=True)
    device, dtype = cfg.compute_device(), cfg.compute_dtype()
    # --max-vram/--max-ram for the population evaluation, planned (and refused if too small) before any work
    budget = plan_population(ck, run.budget, num_experts=keep_n, batch_size=cfg.batch_size, seq_len=cfg.seq_len)
    final_path = work / "final.json"
    report: dict = {}
    if final_path.is_file():  # the search finished before a kill: only the write is left
        final = json.loads(final_path.read_text())
        best = Candidate.from_json(final["best"])
        report = final["report"]
    else:
        tok = load_tokenizer(ck.path)
        train = FitnessData.load(cfg.calib, tok, max_examples=cfg.n_samples, max_len=cfg.seq_len)
        dev = FitnessData.load([opts["dev"]], tok, max_len=cfg.seq_len) if opts["dev"] else None
        t0 = time.perf_counter()
        weights = layer_weights(ck, opts["quant"], work / f"quant-{opts['quant']}", device=device, progress=cfg.progress)
        quant_s = time.perf_counter() - t0
        seed_cand = _seed_candidate(run, cfg, space, opts["init"], work, top_k) if opts["init"] != "random" else None
        evaluator = PopulationEvaluator(ck, weights, space, train, work / "acts-train", device=device, dtype=dtype,
                                        top_k=top_k, batch_size=cfg.batch_size, progress=False, budget=budget)
        evolution = Evolution(space, evo, evaluator.evaluate, state_path=work / "state.json", seed_cand=seed_cand,
                              fingerprint={"top_k": top_k, "quant": opts["quant"], "init": opts["init"],
                                           "train": train.input_ids.shape[0]},
                              progress=cfg.progress)
        # keep the hidden-state streams of every possible parent of the next generation (best first,
        # within the disk cap): a child starts at the first layer where it differs from its parent
        evolution.on_generation = lambda g: evaluator.retain([e.cand for e in evolution.parents()[:opts["retain"]]],
                                                             max_bytes=opts["retain_bytes"])
        log.info("EEP search: %d -> %d experts, top-%d, %d layer group(s), %d generations x %d, fitness on %d examples "
                 "(%d tokens), weights %s", ck.num_experts, keep_n, top_k, space.num_groups, evo.generations, evo.population,
                 train.num_examples, train.num_tokens, opts["quant"])
        state = evolution.run()
        dev_eval = None
        if dev is not None:
            dev_evaluator = PopulationEvaluator(ck, weights, space, dev, work / "acts-dev", device=device, dtype=dtype,
                                                top_k=top_k, batch_size=cfg.batch_size, budget=budget)
            dev_eval = dev_evaluator.evaluate
        chosen = evolution.pick(dev_eval)
        best = chosen.cand
        prune_best = next((e for e in state.ranked() if e.phase == "prune"), None)
        seed_entry = evolution.seed_entry()
        if seed_entry is not None:
            log.info("EEP seed (%s): train %.4f%s; pick: train %.4f%s", opts["init"], seed_entry.fitness.acc,
                     "" if seed_entry.dev is None else f", dev {seed_entry.dev.acc:.4f}", chosen.fitness.acc,
                     "" if chosen.dev is None else f", dev {chosen.dev.acc:.4f}")
        report = {
            "options": {**{k: v for k, v in opts.items()}, **{k: v for k, v in vars(evo).items()}},
            "space": space.describe(), "top_k": top_k,
            "fitness_data": {"train": {"source": train.source, "examples": train.num_examples, "tokens": train.num_tokens},
                             "dev": None if dev is None else {"source": dev.source, "examples": dev.num_examples}},
            "curve": state.curve, "evaluations": state.evaluations, "search_s": round(state.elapsed_s, 3),
            "evaluations_per_hour": round(state.evaluations / max(state.elapsed_s, 1e-9) * 3600, 1),
            "quant": {"mode": opts["quant"], "build_s": round(quant_s, 3), "bytes_read": weights.bytes_read},
            "stream_stats": evaluator.stats,
            "best": {"fitness": chosen.fitness.to_json(), "dev": None if chosen.dev is None else chosen.dev.to_json(),
                     "generation": chosen.generation, "phase": chosen.phase,
                     "groups": [{"layers": list(layers), "W_EM": best.em[g].tolist(), "W_RM": best.rm[g].tolist()}
                                for g, layers in enumerate(space.groups)]},
            "seed": None if seed_entry is None else {
                "method": opts["init"], "fitness": seed_entry.fitness.to_json(),
                "dev": None if seed_entry.dev is None else seed_entry.dev.to_json(),
                "keep": seed_entry.cand.keep_sets()},
            "best_prune_phase": None if prune_best is None else {"fitness": prune_best.fitness.to_json(),
                                                                 "keep": prune_best.cand.keep_sets()},
        }
        faults.point("eep-final")
        write_json_atomic(final_path, {"best": best.to_json(), "report": report})
    # write every layer from the original weights (the checkpoint, never the quantized cache)
    run.layers = {L: space.layer_plan(best, L) for L in ck.moe_layers()}
    for layer_idx in progress(range(run.next_layer, ck.num_layers), ck.num_layers - run.next_layer, "write", cfg.progress):
        run.write_layer(layer_idx)
        run.finish_layer(layer_idx)
    png = plot_curve(report.get("curve", []), run.out / "eep_fitness.png")
    return {"eep": {**report, "fitness_png": png}}


def _seed_candidate(run, cfg, space: SearchSpace, method: str, work: Path, top_k: int | None = None) -> Candidate:
    """The plan ``lowmoe prune --method METHOD`` writes with the same options, as a one-hot seed for
    the search: ``method`` on the --calib text, layer L+1 scored on the pruned layer L's outputs
    (unless ``sequential`` is off: the original model's), super experts protected unless
    ``--no-protect-super-experts``. Cached in ``seed-METHOD.json`` for resumes."""
    path = work / f"seed-{method}.json"
    if path.is_file():
        keep = {int(k): v for k, v in json.loads(path.read_text()).items()}
        return space.from_keep(keep)
    ck = run.ck
    # the same stream as a one-shot prune: layer L+1 read while L computes, under --max-vram/--max-ram
    stream = cfg.stream(ck, cfg.calibration(ck), work / "acts-seed", run.budget)
    stream.embed()
    guarding = guards(stream, enabled=cfg.protect_super_experts, progress=cfg.progress)  # super experts are never dropped

    def apply(idx: int, tensors: dict, lp) -> dict | None:
        return None if lp is None else apply_layer(ck.adapter, idx, tensors, lp, ck.num_experts)

    def make_method():
        return ScoreThenKeep(make_scorer(method, ck.num_experts, ck.top_k, seed=cfg.seed))

    keep: dict[int, list[int]] = {}
    for d in decide_layers(stream, stream.layers(0, set(ck.moe_layers())), make_method=make_method, keep_n=space.keep,
                           top_k=top_k or ck.top_k, guards=guarding, apply=apply, sequential=cfg.sequential):
        if d.plan is not None:
            keep[d.idx] = list(d.plan.keep)
    stream.cache.clear()
    faults.point("eep-seed")
    write_json_atomic(path, keep)
    log.info("EEP seed from %s: %s", method, keep)
    return space.from_keep(keep)


def plot_curve(curve: list[dict], path: Path) -> str | None:
    """Best / generation-median training accuracy per generation, as a PNG (needs matplotlib)."""
    if not curve:
        return None
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        log.info("matplotlib is not installed: no fitness PNG (the curve is in the report)")
        return None
    fig, ax = plt.subplots(figsize=(6, 3.5))
    gens = [c["generation"] for c in curve]
    ax.plot(gens, [c["best_acc"] for c in curve], label="archive best")
    ax.plot(gens, [c["gen_median_acc"] for c in curve], label="generation median", alpha=0.7)
    ax.plot(gens, [c["gen_best_acc"] for c in curve], label="generation best", alpha=0.7, linestyle=":")
    switch = next((c["generation"] for c in curve if c["phase"] == "merge"), None)
    if switch is not None and switch > gens[0]:
        ax.axvline(switch - 0.5, color="grey", linestyle="--", linewidth=0.8)
    ax.set_xlabel("generation")
    ax.set_ylabel("training accuracy (teacher-forced)")
    ax.set_title("EEP search")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return str(path)


