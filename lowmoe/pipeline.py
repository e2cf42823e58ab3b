"""The prune pipeline: options -> engine run -> method -> plan -> write.

    check      -> open the checkpoint, validate the index and every option before heavy work
    calibrate  -> tokenize calibration files; embed them into the disk cache (boundary 0)
    for each decoder layer L (methods.oneshot.decide_layers over the engine's Stream):
        load layer L only                    (peak memory ~ one layer)
        score its experts on cached inputs   (hooks on router and experts)
        decide this layer's part of the plan
        apply the plan to L's on-disk tensors -> output shards
        compute L's outputs (pruned layer by default) -> cache boundary L+1; drop boundary L
    copy the rest (embeddings, norm, lm_head, MTP layers); patch config.json; copy tokenizer
    write the index LAST, then lowmoe_report.json

With ``plan=`` the calibration and scoring steps are skipped and the plan is applied as is.
Methods that drive the run themselves (EEP, C-Prune) are ``methods.RUNNERS``. A manifest
(``lowmoe_progress.json``, ``engine.rundir``) is rewritten after every layer so ``resume=True``
continues a killed run and produces the same bytes as a run that never stopped.
"""

from __future__ import annotations

import logging
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from . import methods
from .engine import dist
from .engine.budget import parse_budget
from .engine.cache import ActivationCache
from .engine.calibration import CalibTokens, check_sources, check_tokenizer
from .engine.checkpoint import Checkpoint
from .engine.device import DTYPES, resolve_device, resolve_dtype, warm_up
from .engine.hf import check_experts_impl
from .engine.lazy import reads_lazily
from .engine.memory import fmt_bytes, out_of_memory_errors
from .engine.plan import LayerPlan, Plan
from .engine.progress import progress
from .engine.rundir import (MANIFEST, REPORT, WORK_DIR, OutputLock, PruneRun, check_output, fingerprint, output_os_error,
                            prepare_output, write_layers)
from .engine.stream import Stream, calibration_tokens, plan_stream_budget, readahead
from .engine.writer import parse_size
from .errors import ConfigError, DistributedError, LowmoeError, OutputError, PlanError, UnsupportedModelError
from .methods.oneshot import decide_layers, guards, protected_experts
from .methods.scoring.super_experts import cached_profile

log = logging.getLogger(__name__)


# ---- options ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class PruneConfig:
    """Every option of a prune run, validated once (``check``)."""

    model: Path
    out: Path
    keep: int | str | None = None  # experts kept per layer: an int, "half", "25%" or a fraction "0.5"
    method: str = "frequency"
    calib: tuple[str, ...] = ()
    plan: str | Path | dict | None = None
    top_k: int | None = None  # experts per token in the output (default: unchanged)
    seq_len: int = 256
    n_samples: int = 64
    batch_size: int = 8
    layout: str = "pack"
    answer_only: bool = False
    sequential: bool = True  # score layer L+1 on the pruned layer L's outputs
    protect_super_experts: bool = True
    seed: int = 0
    device: str = "cpu"
    dtype: str = "float32"
    max_shard_size: str | int = "5GB"
    max_vram: str | int | None = None  # device budget, e.g. "20GiB" (lowmoe.engine.budget)
    max_ram: str | int | None = None  # host RAM budget
    prefetch: bool = True  # read layer L+1 and the next activation chunk while L computes (lowmoe.engine.prefetch)
    experts_impl: str = "auto"  # how the routed experts are computed (lowmoe.engine.hf.EXPERTS_IMPLS)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    method_options: dict = field(default_factory=dict)

    def check(self, ck: Checkpoint) -> None:
        if self.plan is None and not self.calib:
            raise ConfigError("--calib is required to score experts (or pass --plan FILE to apply a saved plan)")
        if self.plan is None and self.keep is None:
            raise ConfigError("--keep is required (experts to keep per layer, e.g. --keep 4 or --keep half)")
        if self.plan is None and not ck.adapter.probes:
            raise UnsupportedModelError(f"{ck.path / 'config.json'}: {ck.adapter.family} experts cannot be scored on "
                                        "calibration data (transformers runs them densely); pass --plan FILE with keep lists")
        if self.plan is None and self.method not in available_methods():
            raise ConfigError(f"--method {self.method!r} is not available; choose one of: {', '.join(available_methods())}")
        for name in ("seq_len", "n_samples", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        check_experts_impl(self.experts_impl)
        try:
            parse_size(self.max_shard_size)
        except ValueError as e:
            raise ConfigError(f"--max-shard-size: {e}") from None
        parse_budget(self.max_vram, "--max-vram"), parse_budget(self.max_ram, "--max-ram")
        check_sources(self.calib)
        if self.plan is None:
            check_tokenizer(ck.path)
            k = self.resolve_keep(ck.num_experts)
            top_k = self.top_k or ck.top_k
            if k > ck.num_experts:
                raise ConfigError(f"--keep {self.keep}: the model has only {ck.num_experts} experts per layer")
            if k < top_k:
                raise ConfigError(f"--keep {self.keep}: must be >= the experts per token ({top_k}); "
                                  f"use --top-k to route to fewer experts")
            if k == ck.num_experts and (self.top_k is None or self.top_k == ck.top_k):
                raise ConfigError(f"--keep {self.keep}: must be < the model's {ck.num_experts} experts per layer "
                                  f"(or pass --top-k to only reduce the experts per token)")
        if self.top_k is not None and not 1 <= self.top_k:
            raise ConfigError(f"--top-k must be >= 1, got {self.top_k}")
        if self.plan is None:  # a bad --method-option fails here, before the output folder is made
            methods.check_options(self.method, ck.num_experts, self.top_k or ck.top_k, self.seed, self.method_options)

    # ---- what runners use (``methods.RUNNERS``: fn(run, cfg, top_k)) -----------------------------
    def compute_device(self) -> torch.device:
        return resolve_device(self.device)

    def compute_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    def calibration(self, ck: Checkpoint) -> CalibTokens:
        """``--calib`` tokenized with the model's tokenizer (``--seq-len``, ``--n-samples``, ...)."""
        return calibration_tokens(ck, self.calib, seq_len=self.seq_len, n_samples=self.n_samples, layout=self.layout,
                                  answer_only=self.answer_only)

    def stream(self, ck: Checkpoint, tokens: CalibTokens, cache_dir: Path, budget=None) -> Stream:
        """A ``Stream`` of ``tokens`` on this run's device and dtype, its activation cache in ``cache_dir``."""
        return Stream(ck, tokens, ActivationCache(cache_dir), self.compute_device(), self.compute_dtype(), self.batch_size,
                      budget=budget, prefetch=self.prefetch, experts=self.experts_impl)

    def resolve_keep(self, num_experts: int) -> int:
        k = self.keep
        if isinstance(k, int) and not isinstance(k, bool):
            return k
        s = str(k).strip().lower()
        try:
            if s == "half":
                return num_experts // 2
            if s == "quarter":
                return max(1, num_experts // 4)
            if s.endswith("%"):
                return max(1, round(num_experts * float(s[:-1]) / 100))
            if "." in s:
                return max(1, round(num_experts * float(s)))
            return int(s)
        except ValueError:
            raise ConfigError(f"--keep {k!r}: expected an expert count (4), 'half', a percentage (50%) or a fraction (0.5)") from None




def available_methods() -> list[str]:
    """Every ``--method`` name this install supports."""
    return methods.method_names()


def run_fingerprint(cfg: PruneConfig, ck: Checkpoint) -> str:
    """What a resume must match: every option that changes the output, the plan's text, the input."""
    d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
         if k not in ("out", "resume", "overwrite", "progress", "device", "max_vram", "max_ram", "prefetch")}
    if isinstance(cfg.plan, (str, Path)):
        d["plan"] = Path(cfg.plan).read_text()
    if d.get("experts_impl") == "auto":  # the default: fingerprints as before the option existed
        del d["experts_impl"]
    return fingerprint(d, ck)


def plan_run_budget(cfg: PruneConfig, ck: Checkpoint):
    """``--max-vram``/``--max-ram`` checked against the checkpoint's layer sizes before any work. The
    one-shot prune (``score_and_write``), C-Prune and EEP's seed passes (``methods.LAZY_RUNNERS``) read
    experts lazily, in groups (``plan_lazy_budget``); EEP's population pass is planned when the search
    starts (``budget.plan_population``)."""
    device = cfg.compute_device()
    # a merging method's merged experts (held until written) and one merge's temporaries
    merge = None if cfg.keep is None else methods.merge_hold(cfg.method, ck.num_experts, cfg.resolve_keep(ck.num_experts),
                                                             dict(cfg.method_options))
    return plan_stream_budget(ck, device=device, dtype=resolve_dtype(DTYPES[cfg.dtype], device), batch_size=cfg.batch_size,
                              seq_len=cfg.seq_len, max_vram=cfg.max_vram, max_ram=cfg.max_ram, prefetch=cfg.prefetch,
                              lazy=(cfg.method not in methods.RUNNERS or cfg.method in methods.LAZY_RUNNERS)
                              and reads_lazily(ck), n_samples=cfg.n_samples, experts=cfg.experts_impl, merge=merge)


def _plan_from_input(cfg: PruneConfig, ck: Checkpoint) -> Plan:
    if isinstance(cfg.plan, dict):
        plan = Plan.from_json(cfg.plan, "plan")
    else:
        plan = Plan.load(cfg.plan)
    plan.validate(ck.moe_layers(), ck.num_experts, str(cfg.plan) if not isinstance(cfg.plan, dict) else "plan")
    return plan


def prune(model: str | Path, out: str | Path, **options) -> dict:
    """Prune ``model`` into ``out``; returns the report (also written to ``out/lowmoe_report.json``).

    Options are ``PruneConfig``'s fields: ``keep``, ``method``, ``calib`` (list of files),
    ``plan`` (file or dict), ``top_k``, ``seq_len``, ``n_samples``, ``batch_size``, ``sequential``,
    ``seed``, ``device``, ``dtype``, ``max_shard_size``, ``resume``, ``overwrite``, ...
    """
    if "calib" in options and options["calib"] is not None:
        calib = options["calib"]
        options["calib"] = tuple([calib] if isinstance(calib, (str, Path)) else [str(c) for c in calib])
    cfg = PruneConfig(model=Path(model), out=Path(out), **options)
    ck = Checkpoint(cfg.model)  # check
    ck.validate()
    cfg.check(ck)
    plan_in = _plan_from_input(cfg, ck) if cfg.plan is not None else None
    group = dist.from_env()
    if group.distributed and (plan_in is not None or cfg.method not in methods.DISTRIBUTED):
        what = "--plan" if plan_in is not None else f"--method {cfg.method}"
        raise ConfigError(f"{what} runs in one process, but this is rank {group.rank} of WORLD_SIZE={group.world} "
                          f"(torchrun): only --method {', '.join(methods.DISTRIBUTED)} shares its work among "
                          "processes; launch it without torchrun")
    cfg = replace(cfg, device=dist.device_for(cfg.device, group))  # several processes: each on its own GPU
    group = dist.init(cfg.compute_device())
    try:
        report = _prune_on(group, cfg, ck, plan_in)
    except BaseException:
        dist.close(wait=False)  # a peer may be gone or hung: do not wait for it
        raise
    dist.close()  # every rank leaves the group together, once rank 0 has written the output
    return report


def _prune_on(group: dist.Group, cfg: PruneConfig, ck: Checkpoint, plan_in) -> dict:
    """This rank's part of ``prune``: rank 0 (or the only process) writes the output, the others search."""
    budget = plan_run_budget(cfg, ck) if plan_in is None else None  # fails here if a budget cannot hold
    fp = run_fingerprint(cfg, ck)
    if not group.is_main:
        return _search_worker(cfg, ck, budget, group)
    start = _Start(group)
    try:
        check_output(cfg.out, ck)
        with OutputLock(cfg.out):  # one lowmoe process per output directory
            try:
                # out of memory anyway (a shared card, less free RAM than the budget): one line, resumable
                with out_of_memory_errors(budget.device if budget is not None else cfg.device, budget, resume=True):
                    return _write(cfg, ck, plan_in, budget, fp, start)
            except OSError as e:  # disk full, read-only, ...: every step so far is resumable
                raise output_os_error(cfg.out, e) from None
    except BaseException as e:
        start.tell(error=str(e) if isinstance(e, LowmoeError) else f"{type(e).__name__}: {e}")
        raise


class _Start:
    """Rank 0 tells the other ranks once, after preparing the output, whether there is a search to
    share (or that it failed: they stop with its error instead of waiting for a collective)."""

    def __init__(self, group: dist.Group):
        self.group, self.told = group, False

    def tell(self, search: bool = False, error: str | None = None) -> None:
        if self.told or not self.group.distributed:
            return
        self.told = True
        try:
            self.group.broadcast({"search": search, "error": error}, "starting the search")
        except DistributedError:
            if error is None:
                raise  # rank 0's own error goes first otherwise


@dataclass
class SearchRun:
    """What a runner sees on a rank other than 0: the input and budget, no output (rank 0 writes it)."""

    out: Path
    ck: Checkpoint
    budget: object = None


def _search_worker(cfg: PruneConfig, ck: Checkpoint, budget, group: dist.Group) -> dict:
    """A rank other than 0: evaluate its share of the search, write nothing of the output."""
    msg = group.broadcast(None, "waiting for rank 0 to prepare the output")
    if msg["error"] is not None:
        raise DistributedError(f"rank {group.rank} of {group.world}: rank 0 stopped before the search: {msg['error']}")
    if msg["search"]:
        top_k = cfg.top_k or min(ck.top_k, cfg.resolve_keep(ck.num_experts))
        lm = logging.getLogger("lowmoe")  # rank 0 logs the search; the others only warnings and errors
        lm.setLevel(max(lm.getEffectiveLevel(), logging.WARNING))
        methods.RUNNERS[cfg.method](SearchRun(cfg.out, ck, budget), replace(cfg, progress=False), top_k)
    return {"distributed": {"rank": group.rank, "world_size": group.world}}


def _write(cfg: PruneConfig, ck: Checkpoint, plan_in: Plan | None, budget, fp: str, start: _Start) -> dict:
    manifest = prepare_output(cfg.out, ck, fp, resume=cfg.resume, overwrite=cfg.overwrite)
    # DERN's float32 blocks as the budget sized them (None: its default)
    fields = replace(methods.PLAN_FIELDS, scratch_bytes=getattr(budget, "merge_scratch_bytes", None))
    run = PruneRun(cfg.out, ck, fp, manifest, max_shard_size=cfg.max_shard_size, plan_fields=fields, budget=budget)
    if manifest is None:
        run.save_manifest()  # from now on the directory is a resumable, unfinished lowmoe output
    try:
        return _write_run(run, cfg, ck, plan_in, start)
    finally:
        run.close()  # the output writer thread


def _write_run(run: PruneRun, cfg: PruneConfig, ck: Checkpoint, plan_in: Plan | None, start: _Start) -> dict:
    start.tell(search=run.runner_extra is None and plan_in is None)
    t0 = time.time()
    if run.runner_extra is not None:  # killed while finishing: every layer is written
        top_k, plan_meta, extra = run.runner_extra["top_k"], run.runner_extra["plan_meta"], run.runner_extra["extra"]
    elif plan_in is not None:
        run.layers = dict(plan_in.layers)
        plan_meta = dict(plan_in.meta, applied_from=str(cfg.plan) if not isinstance(cfg.plan, dict) else "dict")
        write_layers(run, "apply plan", cfg.progress)  # kept experts copied as stored bytes
        top_k = plan_in.num_experts_per_tok
        extra: dict = {"method": plan_in.meta.get("method", "plan")}
    else:
        top_k = cfg.top_k or min(ck.top_k, cfg.resolve_keep(ck.num_experts))
        runner = methods.RUNNERS.get(cfg.method, score_and_write)
        # the disk reads the first layers, and a CUDA device makes its context and first page-locked
        # staging buffer, while the pass imports, tokenizes and builds its skeleton
        ahead = readahead(ck, enabled=cfg.prefetch and run.next_layer == 0)
        warm = warm_up(cfg.compute_device(), getattr(run.budget, "staging_buffer_bytes", 0), enabled=cfg.prefetch)
        try:
            extra = runner(run, cfg, top_k) or {}
        finally:
            if ahead is not None:
                ahead.stop()
            if warm is not None:
                warm.join()
        if isinstance(extra.get("io"), dict):
            if ahead is not None:
                extra["io"]["readahead_bytes"] = ahead.bytes
            if warm is not None:
                extra["io"]["device_warm_up"] = warm.report()
        plan_meta = {"method": cfg.method, "keep": cfg.resolve_keep(ck.num_experts), "seed": cfg.seed,
                     "sequential": cfg.sequential, "calib": [str(c) for c in cfg.calib]}
        extra = {"method": cfg.method, **extra}
    if run.runner_extra is None:
        run.finish_layers({"top_k": top_k, "plan_meta": plan_meta, "extra": extra})
    plan = run.plan(top_k, plan_meta)
    report = run.finalize(plan, {**extra, "wall_s": round(time.time() - t0, 3)})
    log.info("wrote %s: %d -> %d experts per layer, top-%d; peak RSS %s", cfg.out, ck.num_experts, plan.num_kept,
             plan.num_experts_per_tok, fmt_bytes(report["memory"]["peak_rss_bytes"]))
    return report


def open_stream(run: PruneRun, cfg: PruneConfig, tokens: CalibTokens) -> Stream:
    """The run's stream, its cache under ``OUT/.lowmoe-work``: embedded on a fresh run, reopened on a resume."""
    stream = cfg.stream(run.ck, tokens, run.out / WORK_DIR / "cache", run.budget)
    if run.next_layer == 0:
        stream.embed()
    elif not stream.cache.has(run.next_layer, stream.num_chunks):
        raise OutputError(f"{run.out}: the activation cache for layer {run.next_layer} is missing; cannot resume (use --overwrite)")
    return stream


def score_and_write(run: PruneRun, cfg: PruneConfig, top_k: int) -> dict:
    """One streamed pass: score each MoE layer, decide its keep-set, write it, propagate."""
    ck = run.ck
    keep_n = cfg.resolve_keep(ck.num_experts)
    t_begin = time.perf_counter()
    tokens = cfg.calibration(ck)
    t_tokens = time.perf_counter()
    stream = open_stream(run, cfg, tokens)  # builds transformers' model skeleton (imports its modeling code)
    setup = {"tokenize": t_tokens - t_begin, "setup": time.perf_counter() - t_tokens}
    try:
        return _score_and_write(run, cfg, top_k, keep_n, tokens, stream, t_begin, setup)
    finally:
        stream.close()


def _score_and_write(run: PruneRun, cfg: PruneConfig, top_k: int, keep_n: int, tokens: CalibTokens, stream: Stream,
                     t_begin: float, setup: dict[str, float]) -> dict:
    ck = run.ck
    t_profile = time.perf_counter()
    guarding = guards(stream, enabled=cfg.protect_super_experts, progress=cfg.progress)  # may profile the model
    t_start = time.perf_counter()
    setup["profile"] = t_start - t_profile
    run.io = stream.io  # the output writer's stages are the pass's
    before = stream.io.stage_snapshot()  # the stages of the pass itself, not of the profile's
    # layer L+1 is read while L computes; routed experts are read in groups as the layer computes
    reader = stream.layers(run.next_layer, run.moe, lazy=True)

    def write(idx: int, tensors: dict, lp: LayerPlan | None) -> dict:
        if lp is not None:
            run.layers[idx] = lp
        return run.write_layer(idx, tensors)

    layers = progress(reader, len(reader), f"prune ({cfg.method})", cfg.progress)

    def make_method():
        method = methods.make_layer_method(cfg.method, ck.num_experts, ck.top_k, seed=cfg.seed, **cfg.method_options)
        method.scratch_bytes = run.plan_fields.scratch_bytes  # its float32 blocks, as planned
        return method

    t0 = time.perf_counter()
    for d in decide_layers(stream, layers, make_method=make_method, keep_n=keep_n, top_k=top_k, guards=guarding,
                           apply=write, sequential=cfg.sequential):
        times = run.times.setdefault(d.idx, {})
        times["read_s"] = round(reader.last_wait_s, 4)  # time waited for the read (hidden by prefetch when ~0)
        # the time since the last layer finished, less the read wait and the write
        times["compute_s"] = round(max(0.0, time.perf_counter() - t0 - reader.last_wait_s - times.get("write_s", 0.0)), 4)
        if d.plan is not None:
            method = d.observers[0]
            scores = method.scores()
            if scores is not None:
                run.scores[d.idx] = [float(s) for s in scores]
            run.protected[d.idx] = sorted(protected_experts(guarding, d.idx))
            run.stats[d.idx] = method.state()
        run.finish_layer(d.idx)
        t0 = time.perf_counter()
    return {"calibration": {"sequences": int(tokens.input_ids.shape[0]), "seq_len": int(tokens.input_ids.shape[1]),
                            "tokens_counted": tokens.num_tokens, "files": [str(c) for c in cfg.calib]},
            "cache_bytes_written": stream.cache.bytes_written,
            "super_experts": next((g.summary for g in guarding if getattr(g, "summary", None)), {}),
            "super_expert_profile": next((g.cache for g in guarding if getattr(g, "cache", None)), {}),
            "profile_s": round(t_start - t_profile, 4),
            **stream.pass_report(t_begin, t_start, setup, since=before)}


def profile_model(model: str | Path, calib, *, seq_len: int = 256, n_samples: int = 64, layout: str = "pack",
                  answer_only: bool = False, device: str = "cpu", dtype: str = "float32", n_seqs: int = 4,
                  max_ram=None, max_vram=None, progress: bool = True) -> dict:
    """``lowmoe profile``: the super-expert profile of ``model`` on the first ``n_seqs`` calibration
    sequences, computed once and cached for every later prune with the same model, calibration options,
    dtype and device (``scoring.super_experts.cached_profile``). Returns the cache entry's description."""
    calib = tuple([calib] if isinstance(calib, (str, Path)) else [str(c) for c in calib])
    cfg = PruneConfig(model=Path(model), out=Path("."), keep=None, calib=calib, seq_len=seq_len, n_samples=n_samples,
                      layout=layout, answer_only=answer_only, device=device, dtype=dtype, max_ram=max_ram,
                      max_vram=max_vram, progress=progress)
    ck = Checkpoint(cfg.model)
    ck.validate()
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"--dtype {cfg.dtype!r}: choose one of {', '.join(DTYPES)}")
    check_sources(cfg.calib)
    budget = plan_run_budget(cfg, ck)
    tokens = cfg.calibration(ck)
    with tempfile.TemporaryDirectory(prefix="lowmoe-profile-") as tmp:
        stream = cfg.stream(ck, tokens, Path(tmp), budget)
        try:
            guard = cached_profile(stream, n_seqs=n_seqs, progress=progress)
        finally:
            stream.close()
    return {"model": str(ck.path), **guard.cache, "super_experts": guard.summary.get("super_experts", []),
            "threshold": guard.summary.get("threshold")}


__all__ = ["MANIFEST", "REPORT", "PlanError", "PruneConfig", "PruneRun", "available_methods", "profile_model", "prune"]
