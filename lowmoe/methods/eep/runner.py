"""``--method eep``: search with EEP, then write the chosen plan from the original weights.

A runner in ``methods.RUNNERS`` (it drives the whole run itself):

    options   <- cfg.method_options: dev, generations, population, init, quant, layer_groups
    weights   <- the checkpoint, or a per-layer NF4/int8 cache built once (``lowmoe.engine.quant``)
    seeds     <- one-shot scoring passes: ``--init auto`` (default) every scorer of ``methods.scoring``,
                 ``--init easy-ep`` (etc.) one, ``--init random`` none -> one-hot seeds, ranked on
                 ``--dev`` (else training fitness); all enter generation 0, the best is mutated
    search    <- ``evolve.Evolution``: one population-parallel streamed pass per generation on the
                 ``--calib`` examples (``population.PopulationEvaluator``); each ``--calib`` file is a
                 domain, fitness per domain combined by ``combine`` (mean / min / weighted by @W)
    pick      <- the top 20 by training fitness and every seed, re-scored on ``--dev``
    write     <- every layer from the ORIGINAL full-precision checkpoint via the plan (apply_layer):
                 LayerPlan(keep, merge=W_EM, router=W_RM); router rows W_RM·W_G (+ mapped biases)

The search state lives in ``OUT/.lowmoe-work/eep/state.json``; ``--resume`` continues a killed
search at its last finished generation (or the write at its last finished layer).

On several processes (``torchrun``, ``engine.dist``) every rank runs the same ``Evolution`` with the
same seed, so every rank draws the same candidates: each evaluates its share of every population
(and of the dev re-scoring) -- a child goes to the rank that holds its parent's hidden-state
streams, children sharing a prefix go together, the loads kept even (``engine.dist.assign`` over
``PopulationEvaluator.needs``) --, each computes a share of the seeds' one-shot scoring passes, the
fitness is gathered back into the population's order, and selection goes on identically everywhere. Rank 0
keeps the search state and writes the output; rank r > 0 works in ``OUT/.lowmoe-work/eep-rank{r}``
(its own quantized cache and hidden-state streams), starts from rank 0's state and removes its
directory when the search is done. The result is the one-process search's, bit for bit (tests).
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from pathlib import Path

from ...engine import dist, faults
from ...engine.apply import apply_layer
from ...engine.budget import plan_population
from ...engine.calibration import load_tokenizer
from ...engine.lazy import LazyLayer, selection_only
from ...engine.memory import return_freed_memory
from ...engine.quant import QUANT_MODES, layer_weights
from ...engine.rundir import WORK_DIR, write_json_atomic, write_layers
from ...errors import ConfigError
from ..base import ScoreThenKeep
from ..oneshot import decide_layers, guards
from ..scoring import SCORERS, make_scorer
from .evolve import EvolveOptions, Evolution
from .fitness import FitnessData, check_combine
from .population import PopulationEvaluator
from .space import Candidate, SearchSpace

log = logging.getLogger(__name__)

OPTION_NAMES = ("dev", "generations", "population", "init", "quant", "layer_groups", "prune_generations", "dev_num",
                "retain", "retain_gb", "combine", "prune_search", "swap_share", "prune_crossover_prob", "seed_cross_share", "pick_margin",
                "pick_se", "sigma", "sigma_rule", "sigma_factor")
INIT_AUTO = "auto"  # every one-shot scorer's plan seeds the search


def dev_paths(dev) -> list[str]:
    """``--dev``: one path, or a list (one file per ``--calib`` domain, in the same order)."""
    if dev is None or dev == "" or dev == [] or dev == ():
        return []
    return [str(d) for d in dev] if isinstance(dev, (list, tuple)) else [str(dev)]


def parse_options(opts: dict, seed: int) -> tuple[dict, EvolveOptions]:
    unknown = sorted(set(opts) - set(OPTION_NAMES))
    if unknown:
        raise ConfigError(f"--method eep: unknown option(s) {unknown}; known: {', '.join(OPTION_NAMES)}")
    quant = opts.get("quant") or "none"
    if quant not in QUANT_MODES:
        raise ConfigError(f"--quant {quant!r}: choose one of {', '.join(QUANT_MODES)}")
    init = opts.get("init") or INIT_AUTO
    if init not in ("random", INIT_AUTO) and init not in SCORERS:
        raise ConfigError(f"--init {init!r}: choose 'auto', 'random' or a scoring method: {', '.join(sorted(SCORERS))}")
    dev = dev_paths(opts.get("dev"))
    for d in dev:
        if not Path(d).is_file():
            raise ConfigError(f"--dev {d}: file not found (expected JSONL with prompt/answer records)")
    combine = check_combine(opts.get("combine"))  # one of COMBINE_RULES, else a one-line error
    def number(k: str, kind: type):
        try:
            return kind(opts[k])
        except (TypeError, ValueError):
            raise ConfigError(f"--method eep: option {k}={opts[k]!r}: expected {'an integer' if kind is int else 'a number'}") from None

    kw = {k: number(k, int) for k in ("generations", "population", "prune_generations", "dev_num") if opts.get(k) is not None}
    kw.update({k: number(k, float) for k in ("prune_crossover_prob", "swap_share", "seed_cross_share", "pick_margin", "sigma",
                                             "sigma_factor") if opts.get(k) is not None})
    for k in ("sigma_rule", "pick_se", "prune_search"):
        if opts.get(k) is not None:
            kw[k] = str(opts[k]).strip().lower()
    evo = EvolveOptions(seed=seed, **kw)
    evo.check()
    return {"quant": quant, "init": init, "dev": dev, "combine": combine, "layer_groups": opts.get("layer_groups"),
            "retain": None if opts.get("retain") is None else number("retain", int),
            "retain_bytes": int((number("retain_gb", float) if opts.get("retain_gb") else 10) * 1e9)}, evo


def run_eep(run, cfg, top_k: int) -> dict:
    ck = run.ck
    opts, evo = parse_options(dict(cfg.method_options), cfg.seed)
    if len(opts["dev"]) > 1 and len(opts["dev"]) != len(cfg.calib):
        raise ConfigError(f"--dev: {len(opts['dev'])} files for {len(cfg.calib)} --calib domains; give one --dev per "
                          "--calib file, in the same order (or a single --dev)")
    keep_n = cfg.resolve_keep(ck.num_experts)
    space = SearchSpace.build(ck.moe_layers(), ck.num_experts, keep_n, opts["layer_groups"])
    group = dist.current()
    work = run.out / WORK_DIR / ("eep" if group.is_main else f"eep-rank{group.rank}")
    work.mkdir(parents=True, exist_ok=True)
    device, dtype = cfg.compute_device(), cfg.compute_dtype()
    # --max-vram/--max-ram for the population evaluation, planned (and refused if too small) before any work
    budget = plan_population(ck, run.budget, num_experts=keep_n, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                             quant=opts["quant"], num_chunks=-(-cfg.n_samples // cfg.batch_size))
    final_path = work / "final.json"
    report: dict = {}
    # rank 0's search state (a resume), for every rank: they all continue from the same generation
    state_path = work / "state.json"
    shared = group.broadcast({"final": final_path.is_file(), "seeds": _cached_seeds(work),
                              "state": state_path.read_text() if state_path.is_file() else None}, "starting the search")
    if not group.is_main:
        if shared["final"]:
            return {}
        if shared["state"] is None:
            state_path.unlink(missing_ok=True)
        else:
            write_json_atomic(state_path, json.loads(shared["state"]))
    if shared["final"]:  # the search finished before a kill: only the write is left
        final = json.loads(final_path.read_text())
        best = Candidate.from_json(final["best"])
        report = final["report"]
    else:
        tok = load_tokenizer(ck.path)
        train = FitnessData.load(cfg.calib, tok, max_examples=cfg.n_samples, max_len=cfg.seq_len, combine=opts["combine"])
        if budget is not None and budget.candidate_groups:  # the waves for the chunks there are (planned for --n-samples)
            budget = plan_population(ck, run.budget, num_experts=keep_n, batch_size=cfg.batch_size, seq_len=cfg.seq_len,
                                     quant=opts["quant"], num_chunks=-(-train.num_examples // cfg.batch_size), quiet=True)
        dev = None
        if opts["dev"]:
            if len(opts["dev"]) == len(train.domains):  # dev domain i is calib domain i: same names and weights
                dev = FitnessData.load(opts["dev"], tok, max_len=cfg.seq_len, combine=opts["combine"], weights=train.weights)
                dev.domains = list(train.domains)
            else:  # one dev file for several training domains: one dev domain
                dev = FitnessData.load(opts["dev"], tok, max_len=cfg.seq_len)
        t0 = time.perf_counter()
        if budget is not None and budget.plan.max_ram is not None:  # the build's freed steps go back to the OS too
            return_freed_memory()
        weights = layer_weights(ck, opts["quant"], work / f"quant-{opts['quant']}", device=device, progress=cfg.progress)
        quant_s = time.perf_counter() - t0
        methods = [] if opts["init"] == "random" or not space.prunes else \
            sorted(SCORERS) if opts["init"] == INIT_AUTO else [opts["init"]]
        seeds = _seeds(run, cfg, space, methods, work, top_k, shared["seeds"], group)
        share = 0.5 if dev is not None else 1.0  # the memory for hidden states, split between the two evaluators
        evaluator = PopulationEvaluator(ck, weights, space, train, work / "acts-train", device=device, dtype=dtype,
                                        top_k=top_k, batch_size=cfg.batch_size, progress=False, budget=budget,
                                        memory_share=share, experts=cfg.experts_impl)
        dev_eval = None
        if dev is not None:
            dev_evaluator = PopulationEvaluator(ck, weights, space, dev, work / "acts-dev", device=device, dtype=dtype,
                                                top_k=top_k, batch_size=cfg.batch_size, budget=budget, memory_share=share,
                                                experts=cfg.experts_impl)
            dev_eval = group.split(dev_evaluator.evaluate, "evaluating candidates on --dev", needs=dev_evaluator.needs)
        evolution = Evolution(space, evo, group.split(evaluator.evaluate, "evaluating a generation", needs=evaluator.needs),
                              state_path=state_path, seeds=seeds,
                              rank_seeds=dev_eval,
                              fingerprint={"top_k": top_k, "quant": opts["quant"], "init": opts["init"],
                                           "train": train.input_ids.shape[0], "combine": opts["combine"],
                                           "domains": train.domain_counts(), "weights": train.weights},
                              progress=cfg.progress)
        # keep the hidden-state streams of every possible parent of the next generation (best first,
        # within the disk cap): a child starts at the first layer where it differs from its parent
        evolution.on_generation = lambda g: evaluator.retain([e.cand for e in evolution.parents()[:opts["retain"]]],
                                                             max_bytes=opts["retain_bytes"])
        log.info("EEP search: %d -> %d experts, top-%d, %d layer group(s), %d generations x %d, fitness on %d examples "
                 "(%d tokens; domains %s, combined by %s), weights %s, init %s", ck.num_experts, keep_n, top_k,
                 space.num_groups, evo.generations, evo.population, train.num_examples, train.num_tokens,
                 train.domain_counts(), opts["combine"], opts["quant"], opts["init"])
        cpu0 = time.process_time()
        state = evolution.run()
        search_cpu_s = time.process_time() - cpu0  # this process's CPU time in the generations (not the pick)
        chosen = evolution.pick(dev_eval, dev_examples=None if dev is None else dev.num_examples,
                                weights=None if dev is None else dev.weights, combine="mean" if dev is None else dev.combine)
        if not group.is_main:  # this rank's work is done (its directory is gone before rank 0 may remove OUT's work dir)
            shutil.rmtree(work, ignore_errors=True)
            for d in (work.parent, run.out):  # on a machine without rank 0's output: the folders made for it
                try:
                    d.rmdir()
                except OSError:  # not empty (rank 0's output on a shared filesystem): left alone
                    break
        # every rank has finished; rank 0 learns each one's CPU time (the search's cost with a core per process)
        ranks = group.all_gather({"search_cpu_s": round(search_cpu_s, 3), **evaluator.stats,
                                  "stages": evaluator.io.stages_json(state.elapsed_s)}, "finishing the search")
        if not group.is_main:  # rank 0 reports and writes
            return {}
        best = chosen.cand
        prune_best = next((e for e in state.ranked() if e.phase == "prune"), None)
        seed_entries = evolution.seed_entries()
        # the seed the search grew from: the best one on dev (else on training fitness)
        seed_entry = max((e for _, e in seed_entries), default=None,
                         key=lambda e: (e.dev.acc, e.dev.ll) if e.dev is not None else (e.fitness.acc, e.fitness.ll))
        seed_name = next(("+".join(n) for n, e in seed_entries if e is seed_entry), None)
        if seed_entry is not None:
            log.info("EEP best seed (%s): train %s%s; pick: train %s%s", seed_name, seed_entry.fitness.describe(),
                     "" if seed_entry.dev is None else f", dev {seed_entry.dev.describe()}", chosen.fitness.describe(),
                     "" if chosen.dev is None else f", dev {chosen.dev.describe()}")
        report = {
            "options": {**{k: v for k, v in opts.items()}, **{k: v for k, v in vars(evo).items()}},
            "space": space.describe(), "top_k": top_k,
            "fitness_data": {"train": {"source": train.source, "examples": train.num_examples, "tokens": train.num_tokens,
                                       "domains": train.domain_counts(), "weights": train.weights,
                                       "combine": opts["combine"]},
                             "dev": None if dev is None else {"source": dev.source, "examples": dev.num_examples,
                                                              "domains": dev.domain_counts()}},
            "curve": state.curve, "evaluations": state.evaluations, "search_s": round(state.elapsed_s, 3),
            "processes": group.world, "search_cpu_s": [r["search_cpu_s"] for r in ranks],
            "rank_stream_stats": ranks,
            "evaluations_per_hour": round(state.evaluations / max(state.elapsed_s, 1e-9) * 3600, 1),
            "quant": {"mode": opts["quant"], "build_s": round(quant_s, 3), "bytes_read": weights.bytes_read},
            "stream_stats": evaluator.stats,
            # --max-vram/--max-ram: how the population pass holds each layer (``budget.plan_population``)
            "population_budget": None if budget is None else budget.to_json(),
            "stages": ranks[0]["stages"],  # where this process's evaluations spent the search's wall
            "dev_stages": None if dev is None else dev_evaluator.io.stages_json(),  # --dev: seeds' and the pick's
            "best": {"fitness": chosen.fitness.to_json(), "dev": None if chosen.dev is None else chosen.dev.to_json(),
                     "generation": chosen.generation, "phase": chosen.phase,
                     "groups": [{"layers": list(layers), "W_EM": best.em[g].tolist(), "W_RM": best.rm[g].tolist()}
                                for g, layers in enumerate(space.groups)]},
            "seed": None if seed_entry is None else {
                "method": seed_name, "fitness": seed_entry.fitness.to_json(),
                "dev": None if seed_entry.dev is None else seed_entry.dev.to_json(),
                "keep": seed_entry.cand.keep_sets()},
            "seeds": [{"methods": names, "fitness": e.fitness.to_json(), "dev": None if e.dev is None else e.dev.to_json(),
                       "keep": e.cand.keep_sets()} for names, e in seed_entries],
            "pick": evolution.pick_info,  # the pick margin test (None: no dev, no seed, or the best on dev is a seed)
            "best_prune_phase": None if prune_best is None else {"fitness": prune_best.fitness.to_json(),
                                                                 "keep": prune_best.cand.keep_sets()},
        }
        faults.point("eep-final")
        write_json_atomic(final_path, {"best": best.to_json(), "report": report})
    # write every layer from the original weights (the checkpoint, never the quantized cache)
    run.layers = {L: space.layer_plan(best, L) for L in ck.moe_layers()}
    write_layers(run, "write", cfg.progress)
    png = plot_curve(report.get("curve", []), run.out / "eep_fitness.png")
    return {"eep": {**report, "fitness_png": png}}


def _cached_seeds(work: Path) -> dict[str, dict]:
    """The seed plans a killed run already computed (``seed-METHOD.json``), by method."""
    return {p.name[len("seed-"):-len(".json")]: json.loads(p.read_text()) for p in sorted(work.glob("seed-*.json"))}


def _seeds(run, cfg, space: SearchSpace, methods: list[str], work: Path, top_k: int, cached: dict[str, dict],
           group: dist.Group) -> list[tuple[str, Candidate]]:
    """(method, one-hot seed) for every ``--init`` method: rank 0's cached ones as they are, the others
    computed, each method on one rank (strided), gathered on every rank and cached by rank 0."""
    todo = [m for m in methods if m not in cached]
    mine = {m: _seed_keep(run, cfg, space, m, work, top_k) for m in group.share(todo)}
    keeps = dict(cached)
    for part in group.all_gather(mine, "scoring the seed plans"):
        keeps.update(part)
    if group.is_main:
        for m in todo:
            if m not in mine:  # computed by another rank: cached here for a resume
                write_json_atomic(work / f"seed-{m}.json", keeps[m])
    return [(m, space.from_keep({int(k): v for k, v in keeps[m].items()})) for m in methods]


def _seed_candidate(run, cfg, space: SearchSpace, method: str, work: Path, top_k: int | None = None) -> Candidate:
    """The plan ``lowmoe prune --method METHOD`` writes with the same options, as a one-hot seed for
    the search (``_seed_keep``)."""
    return space.from_keep(_seed_keep(run, cfg, space, method, work, top_k))


def _seed_keep(run, cfg, space: SearchSpace, method: str, work: Path, top_k: int | None = None) -> dict[int, list[int]]:
    """The keep lists ``lowmoe prune --method METHOD`` writes with the same options: ``method`` on the
    --calib text, layer L+1 scored on the pruned layer L's outputs (unless ``sequential`` is off: the
    original model's), super experts protected unless ``--no-protect-super-experts``. Cached in
    ``seed-METHOD.json`` for resumes."""
    path = work / f"seed-{method}.json"
    if path.is_file():
        return {int(k): v for k, v in json.loads(path.read_text()).items()}
    ck = run.ck
    # the same stream as a one-shot prune: layer L+1 read while L computes, under --max-vram/--max-ram
    stream = cfg.stream(ck, cfg.calibration(ck), work / "acts-seed", run.budget)
    try:
        stream.embed()
        guarding = guards(stream, enabled=cfg.protect_super_experts, progress=cfg.progress)  # super experts are never dropped

        def apply(idx: int, tensors: LazyLayer, lp) -> dict | None:
            # a seed only keeps experts: their entries stay stored (the pruned pass reads them in groups)
            return None if lp is None else apply_layer(ck.adapter, idx, tensors.for_plan(selection_only(lp)), lp,
                                                       ck.num_experts)

        def make_method():
            return ScoreThenKeep(make_scorer(method, ck.num_experts, ck.top_k, seed=cfg.seed))

        keep: dict[int, list[int]] = {}
        # routed experts read in groups as each layer computes (``methods.LAZY_RUNNERS``), as the prune reads them
        layers = stream.layers(0, set(ck.moe_layers()), lazy=True)
        for d in decide_layers(stream, layers, make_method=make_method, keep_n=space.keep,
                               top_k=top_k or ck.top_k, guards=guarding, apply=apply, sequential=cfg.sequential):
            if d.plan is not None:
                keep[d.idx] = list(d.plan.keep)
        stream.cache.clear()
    finally:
        stream.close()  # its loader thread, cuBLAS workspaces and page-locked buffers: the search has its own
    faults.point("eep-seed")
    write_json_atomic(path, keep)
    log.info("EEP seed from %s: %s", method, keep)
    return keep


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


