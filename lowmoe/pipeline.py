"""The prune pipeline, one decoder layer at a time.

    check      -> open the checkpoint, validate the index and every option before heavy work
    calibrate  -> tokenize calibration files; embed them into the disk cache (boundary 0)
    for each decoder layer L:
        load layer L only                    (peak memory ~ one layer)
        score its experts on cached inputs   (hooks on router and experts)
        decide this layer's part of the plan
        apply the plan to L's on-disk tensors -> output shards
        compute L's outputs (pruned layer by default) -> cache boundary L+1; drop boundary L
    copy the rest (embeddings, norm, lm_head, MTP layers); patch config.json; copy tokenizer
    write the index LAST, then lowmoe_report.json

With ``plan=`` the calibration and scoring steps are skipped and the plan is applied as is.
A manifest (``lowmoe_progress.json``) is rewritten after every layer so ``resume=True`` continues
a killed run and produces the same bytes as a run that never stopped.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import __version__
from .apply import apply_layer, patch_config
from .cache import ActivationCache
from .calibration import CalibTokens, load_tokenizer, tokenize
from .checkpoint import Checkpoint
from .errors import ConfigError, OutputError, PlanError
from .layer import LayerInputs, ModelSkeleton, MoeProbe, run_layer
from .memory import cuda_peak_bytes, fmt_bytes, peak_rss_bytes
from .methods import make_layer_method
from .plan import LayerPlan, Plan
from .prefetch import IOStats, LayerReader, Prefetcher, WriteBehind
from .writer import ShardWriter, parse_size

log = logging.getLogger(__name__)

MANIFEST = "lowmoe_progress.json"
REPORT = "lowmoe_report.json"
WORK_DIR = ".lowmoe-work"
DTYPES = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
          "float16": torch.float16, "fp16": torch.float16}


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
    max_vram: str | int | None = None  # device budget, e.g. "20GiB" (lowmoe.budget)
    max_ram: str | int | None = None  # host RAM budget
    prefetch: bool = True  # read layer L+1 and the next activation chunk while L computes (lowmoe.prefetch)
    resume: bool = False
    overwrite: bool = False
    progress: bool = True
    method_options: dict = field(default_factory=dict)

    def check(self, ck: Checkpoint) -> None:
        if self.plan is None and not self.calib:
            raise ConfigError("--calib is required to score experts (or pass --plan FILE to apply a saved plan)")
        if self.plan is None and self.keep is None:
            raise ConfigError("--keep is required (experts to keep per layer, e.g. --keep 4 or --keep half)")
        if self.plan is None and self.method not in available_methods():
            raise ConfigError(f"--method {self.method!r} is not available; choose one of: {', '.join(available_methods())}")
        for name in ("seq_len", "n_samples", "batch_size"):
            if int(getattr(self, name)) < 1:
                raise ConfigError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"--dtype {self.dtype!r}: choose one of {', '.join(DTYPES)}")
        try:
            parse_size(self.max_shard_size)
        except ValueError as e:
            raise ConfigError(f"--max-shard-size: {e}") from None
        from .budget import parse_budget

        parse_budget(self.max_vram, "--max-vram"), parse_budget(self.max_ram, "--max-ram")
        from .calibration import check_sources

        check_sources(self.calib)
        if self.plan is None:
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
    from . import methods

    return methods.method_names()


# ---- output directory ------------------------------------------------------------------------


def _fingerprint(cfg: PruneConfig, ck: Checkpoint) -> str:
    d = {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(cfg).items()
         if k not in ("out", "resume", "overwrite", "progress", "device", "max_vram", "max_ram", "prefetch")}
    if isinstance(cfg.plan, (str, Path)):
        d["plan"] = Path(cfg.plan).read_text()
    d["index"] = sorted(ck.weight_map.items())
    d["config"] = ck.config
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_output(cfg: PruneConfig, ck: Checkpoint, fingerprint: str) -> dict | None:
    """Make ``cfg.out`` safe to write; return the resume manifest if resuming."""
    out, src = cfg.out.resolve(), ck.path.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise OutputError(f"{cfg.out}: output directory overlaps the input model {ck.path}; choose another directory")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{cfg.out}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        manifest = out / MANIFEST
        if cfg.resume:
            if not manifest.is_file():
                if (out / "model.safetensors.index.json").is_file() and (out / REPORT).is_file():
                    raise OutputError(f"{cfg.out}: already holds a finished lowmoe output; nothing to resume (use --overwrite to redo)")
                raise OutputError(f"{cfg.out}: no {MANIFEST} to resume from; use --overwrite to start over")
            state = json.loads(manifest.read_text())
            if state.get("fingerprint") != fingerprint:
                raise OutputError(f"{cfg.out}: was started with other inputs or options; resume needs the same ones (or use --overwrite)")
            return state
        if not cfg.overwrite:
            raise OutputError(f"{cfg.out}: directory exists and is not empty; pass --overwrite to replace it or --resume to continue")
        shutil.rmtree(out)
    elif cfg.resume:
        log.info("nothing to resume in %s; starting fresh", cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    return None


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


# ---- the streamed run ------------------------------------------------------------------------


def _device(name: str) -> torch.device:
    from .device import resolve_device

    return resolve_device(name)


def plan_run_budget(cfg: PruneConfig, ck: Checkpoint):
    """``--max-vram``/``--max-ram`` checked against the checkpoint's layer sizes before any work."""
    from .device import resolve_dtype

    device = _device(cfg.device)
    return plan_stream_budget(ck, device=device, dtype=resolve_dtype(DTYPES[cfg.dtype], device), batch_size=cfg.batch_size,
                              seq_len=cfg.seq_len, max_vram=cfg.max_vram, max_ram=cfg.max_ram, prefetch=cfg.prefetch)


def plan_stream_budget(ck: Checkpoint, *, device: torch.device, dtype: torch.dtype, batch_size: int, seq_len: int,
                       max_vram=None, max_ram=None, prefetch: bool = True):
    """The ``Stream`` budget of any streamed pass (prune, score, streaming eval): sizes as given on the
    command line (``"20GiB"``, bytes or None), planned from the index; ConfigError naming the flag."""
    from .budget import parse_budget, plan_budget

    return plan_budget(ck, device=device, dtype=dtype, batch_size=batch_size, seq_len=seq_len,
                       max_vram=parse_budget(max_vram, "--max-vram"), max_ram=parse_budget(max_ram, "--max-ram"),
                       prefetch=prefetch)


def _progress(iterable, total: int, desc: str, enabled: bool):
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, total=total, desc=desc, unit="layer", dynamic_ncols=True, leave=False)


class Stream:
    """Streams hidden states of the calibration tokens through the model, layer by layer."""

    def __init__(self, ck: Checkpoint, tokens: CalibTokens, cache: ActivationCache, device, dtype, batch_size: int,
                 budget=None, prefetch: bool = True, quant: str = "none"):
        from .budget import Placer

        self.ck, self.tokens, self.cache = ck, tokens, cache
        self.device, self.dtype = device, dtype
        self.batch_size = batch_size
        self.io = IOStats()  # time waited for reads vs time the reads took (report "io")
        self.prefetch = prefetch
        self.prefetch_layers = prefetch if budget is None else budget.prefetch_layers
        self.placer = Placer(device, dtype, budget, self.io)  # builds layers under --max-vram/--max-ram
        self.quant = quant  # "nf4"/"int8": layers built with bitsandbytes-quantized weights (lowmoe.quant)
        self.skel = ModelSkeleton(ck.config, ck.adapter)
        self.rotary = self.skel.rotary(device)
        self.num_chunks = (tokens.input_ids.shape[0] + batch_size - 1) // batch_size
        self._inputs: dict[tuple, LayerInputs] = {}

    def chunks(self):
        for c, sl in self.tokens.batches(self.batch_size):
            yield c, sl

    def embed(self) -> None:
        key = "model.embed_tokens.weight"
        w = self.ck.read([key])[key].to(self.device, self.dtype)
        self.placer.accountant.track(w, w.numel() * w.element_size())  # counts against --max-vram while it lives
        for c, sl in self.chunks():
            self.cache.write(0, c, torch.nn.functional.embedding(self.tokens.input_ids[sl].to(self.device), w))
        del w

    def materialize(self, layer_idx: int, runtime_state: dict, *, num_experts: int | None = None, top_k: int | None = None):
        """``layer.materialize_layer`` on this stream's device, under its budget (experts chunked if needed),
        or with quantized linear weights (``quant``; never chunked, see ``quant.check_quant_budget``)."""
        if self.quant != "none":
            from .quant import build_quantized_layer

            if num_experts is not None or top_k is not None:
                raise ConfigError("--quant: quantized layers are built with the model's own expert count and top-k")
            return build_quantized_layer(self.skel, layer_idx, runtime_state, self.device, self.dtype, self.quant,
                                         accountant=self.placer.accountant)
        return self.placer.materialize(self.skel, layer_idx, runtime_state, num_experts=num_experts, top_k=top_k)

    def layers(self, start: int, moe: set[int]) -> LayerReader:
        """``(layer_idx, LayerData)`` from ``start`` on; layer L+1 is read while L computes."""
        ad = self.ck.adapter
        return LayerReader(self.ck, range(start, self.ck.num_layers), prefetch=self.prefetch_layers,
                           pin_memory=self.device.type == "cuda", stats=self.io,
                           to_runtime=lambda L, t: ad.to_runtime(L, t, L in moe))

    def _read_chunk(self, boundary: int, chunk: int) -> torch.Tensor:
        h = self.cache.read(boundary, chunk)
        return h.pin_memory() if self.device.type == "cuda" else h

    def inputs_for(self, hidden: torch.Tensor) -> LayerInputs:
        key = tuple(hidden.shape[:2])
        if key not in self._inputs:
            self._inputs[key] = LayerInputs.build(self.skel, hidden, self.rotary)
        return self._inputs[key]

    @torch.no_grad()
    def forward(self, layer_idx: int, module, *, write: bool, probe=None, adapter=None, read_boundary: int | None = None):
        """Run every cached chunk of boundary ``layer_idx`` through ``module``; optionally hook its
        MoE block with ``probe(call)`` and write the outputs to boundary ``layer_idx + 1``."""
        b = layer_idx if read_boundary is None else read_boundary
        slices = dict(self.chunks())
        # chunk c+1 is read (and written back, for c-1) on background threads while c computes
        reader = Prefetcher(lambda c: self._read_chunk(b, c), list(slices), depth=1 if self.prefetch else 0,
                            stats=self.io, kind="cache", name="lowmoe-cache-reader")
        writer = WriteBehind(enabled=self.prefetch and write, stats=self.io)
        try:
            for c, h in reader:
                sl = slices[c]
                h = h.to(self.device, non_blocking=True).to(self.dtype)
                if probe is not None:
                    dom = self.tokens.domain[sl].to(self.device)[:, None].expand(-1, h.shape[1])  # (B, S)
                    with MoeProbe(adapter, module, probe, token_mask=self.tokens.count_mask[sl].to(self.device), token_domain=dom):
                        out = run_layer(self.skel, module, layer_idx, h, self.inputs_for(h))
                else:
                    out = run_layer(self.skel, module, layer_idx, h, self.inputs_for(h))
                if write:
                    out = out.detach().to("cpu")
                    writer.submit(self.cache.write, layer_idx + 1, c, out, nbytes=out.numel() * out.element_size())
        finally:
            writer.close()


@dataclass
class LayerTimes:
    read_s: float = 0.0
    compute_s: float = 0.0
    write_s: float = 0.0


class PruneRun:
    def __init__(self, cfg: PruneConfig, ck: Checkpoint, fingerprint: str, manifest: dict | None):
        self.cfg, self.ck = cfg, ck
        self.out = cfg.out
        self.fingerprint = fingerprint
        self.writer = ShardWriter(self.out, parse_size(cfg.max_shard_size))
        self.adapter = ck.adapter
        self.moe = set(ck.moe_layers())
        self.layers: dict[int, LayerPlan] = {}
        self.scores: dict[int, list[float]] = {}
        self.protected: dict[int, list[int]] = {}
        self.stats: dict[int, dict] = {}
        self.times: dict[int, dict] = {}
        self.notes: list[str] = []
        self.next_layer = 0
        self.started = time.time()
        self.resumed_from: int | None = None
        self.budget = None  # lowmoe.budget plan (--max-vram / --max-ram), set by prune()
        if manifest is not None:
            self._restore(manifest)

    # ---- manifest ------------------------------------------------------------------------
    def _save_manifest(self, extra: dict | None = None) -> None:
        _write_json_atomic(self.out / MANIFEST, {
            "fingerprint": self.fingerprint, "next_layer": self.next_layer,
            "layers": {str(k): v.to_json() for k, v in self.layers.items()},
            "scores": self.scores, "protected": self.protected, "stats": self.stats, "times": self.times,
            "notes": self.notes, "writer": self.writer.state(), **(extra or {})})

    def _restore(self, m: dict) -> None:
        self.next_layer = int(m["next_layer"])
        self.resumed_from = self.next_layer
        self.layers = {int(k): LayerPlan.from_json(v, f"{MANIFEST}: layers[{k}]") for k, v in m["layers"].items()}
        self.scores = {int(k): v for k, v in m.get("scores", {}).items()}
        self.protected = {int(k): v for k, v in m.get("protected", {}).items()}
        self.stats = {int(k): v for k, v in m.get("stats", {}).items()}
        self.times = {int(k): v for k, v in m.get("times", {}).items()}
        self.notes = list(m.get("notes", []))
        self.writer.restore(m["writer"])
        # Re-add the tensors that were buffered (not yet in a shard) when the manifest was saved:
        # they are a suffix of the add() sequence, so replaying the layers that produced them, in
        # order, rebuilds the same buffer and the same flush decisions.
        pending = m["writer"]["buffered_keys"]
        if pending:
            wanted = set(pending)
            for layer_idx in range(self.next_layer):
                tensors = self.layer_output(layer_idx)
                sub = {k: v for k, v in tensors.items() if k in wanted}
                if sub:
                    self.writer.add_all(sub)
            assert list(self.writer.buffer) == pending, "resume replay did not rebuild the writer buffer"
        log.info("resuming at layer %d of %d", self.next_layer, self.ck.num_layers)

    # ---- per layer -----------------------------------------------------------------------
    def layer_output(self, layer_idx: int, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """The output tensors of decoder layer ``layer_idx`` (plan applied for MoE layers)."""
        if tensors is None:
            tensors = self.ck.read_layer(layer_idx)
        if layer_idx in self.moe:
            return apply_layer(self.adapter, layer_idx, tensors, self.layers[layer_idx], self.ck.num_experts)
        return tensors

    def write_layer(self, layer_idx: int, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        t0 = time.perf_counter()
        out = self.layer_output(layer_idx, tensors)
        self.writer.add_all(out)
        self.times.setdefault(layer_idx, {})["write_s"] = round(time.perf_counter() - t0, 4)
        return out

    def finish_layer(self, layer_idx: int) -> None:
        self.next_layer = layer_idx + 1
        self._save_manifest()

    # ---- the end ---------------------------------------------------------------------------
    def plan(self, top_k: int, meta: dict) -> Plan:
        return Plan(dict(sorted(self.layers.items())), top_k, meta)

    def finalize(self, plan: Plan, report_extra: dict) -> dict:
        ck = self.ck
        for layer_idx in ck.extra_layers():
            self.writer.add_all(ck.read_layer(layer_idx))
            self.notes.append(f"layer {layer_idx} (beyond num_hidden_layers, e.g. an MTP layer) copied unchanged")
        rest = ck.other_keys()
        self.writer.add_all(ck.read(rest))
        cfg_out, notes = patch_config(ck.config, self.adapter, plan, ck.num_experts)
        self.notes += notes
        for p in ck.extra_files():
            shutil.copy2(p, self.out / p.name)
        _write_json_atomic(self.out / "config.json", cfg_out)
        self.writer.finalize()  # index written last: from here on the checkpoint is complete
        report = {
            "lowmoe_version": __version__,
            "input": str(ck.path), "output": str(self.out), "family": self.adapter.family,
            "plan": plan.to_json(),
            "num_experts": {"before": ck.num_experts, "after": plan.num_kept},
            "num_experts_per_tok": {"before": ck.top_k, "after": plan.num_experts_per_tok},
            "scores": {str(k): v for k, v in sorted(self.scores.items())},
            "protected_experts": {str(k): v for k, v in sorted(self.protected.items())},
            "layer_stats": {str(k): v for k, v in sorted(self.stats.items())},
            "timings": {"total_s": round(time.time() - self.started, 3),
                        "layers": {str(k): v for k, v in sorted(self.times.items())}},
            "memory": {"peak_rss_bytes": peak_rss_bytes(), "cuda_peak_bytes": cuda_peak_bytes(),
                       "largest_layer_bytes": max(ck.layer_bytes(i) for i in range(ck.num_layers)),
                       "model_bytes": ck.total_bytes()},
            "bytes": {"input": ck.total_bytes(), "output": self.writer.total_bytes},
            "notes": self.notes, "resumed_from_layer": self.resumed_from, **report_extra,
        }
        _write_json_atomic(self.out / REPORT, report)
        (self.out / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(self.out / WORK_DIR, ignore_errors=True)
        return report


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
    budget = plan_run_budget(cfg, ck) if plan_in is None else None  # fails here if a budget cannot hold
    fingerprint = _fingerprint(cfg, ck)
    manifest = prepare_output(cfg, ck, fingerprint)
    run = PruneRun(cfg, ck, fingerprint, manifest)
    run.budget = budget
    if manifest is None:
        run._save_manifest()  # from now on the directory is a resumable, unfinished lowmoe output
    t0 = time.time()
    if plan_in is not None:
        run.layers = dict(plan_in.layers)
        plan_meta = dict(plan_in.meta, applied_from=str(cfg.plan) if not isinstance(cfg.plan, dict) else "dict")
        for layer_idx in _progress(range(run.next_layer, ck.num_layers), ck.num_layers - run.next_layer, "apply plan", cfg.progress):
            run.write_layer(layer_idx)
            run.finish_layer(layer_idx)
        top_k = plan_in.num_experts_per_tok
        extra: dict = {"method": plan_in.meta.get("method", "plan")}
    else:
        from . import methods

        top_k = cfg.top_k or min(ck.top_k, cfg.resolve_keep(ck.num_experts))
        runner = methods.EXTRA_METHODS.get(cfg.method, score_and_write)
        extra = runner(run, cfg, top_k) or {}
        plan_meta = {"method": cfg.method, "keep": cfg.resolve_keep(ck.num_experts), "seed": cfg.seed,
                     "sequential": cfg.sequential, "calib": [str(c) for c in cfg.calib]}
        extra = {"method": cfg.method, **extra}
    plan = run.plan(top_k, plan_meta)
    report = run.finalize(plan, {**extra, "wall_s": round(time.time() - t0, 3)})
    log.info("wrote %s: %d -> %d experts per layer, top-%d; peak RSS %s", cfg.out, ck.num_experts, plan.num_kept,
             plan.num_experts_per_tok, fmt_bytes(report["memory"]["peak_rss_bytes"]))
    return report


def calibrate(cfg: PruneConfig, ck: Checkpoint) -> CalibTokens:
    tok = load_tokenizer(ck.path)
    return tokenize(list(cfg.calib), tok, seq_len=cfg.seq_len, n_samples=cfg.n_samples, layout=cfg.layout,
                    answer_only=cfg.answer_only, max_positions=ck.config.get("max_position_embeddings"))


def open_stream(run: PruneRun, cfg: PruneConfig, tokens: CalibTokens) -> Stream:
    cache = ActivationCache(run.out / WORK_DIR / "cache")
    stream = Stream(run.ck, tokens, cache, _device(cfg.device), DTYPES[cfg.dtype], cfg.batch_size,
                    budget=run.budget, prefetch=cfg.prefetch)
    if run.next_layer == 0:
        stream.embed()
    elif not cache.has(run.next_layer, stream.num_chunks):
        raise OutputError(f"{run.out}: the activation cache for layer {run.next_layer} is missing; cannot resume (use --overwrite)")
    return stream


@dataclass
class LayerDecision:
    """One layer of a one-shot scoring pass (``decide_layers``), after its outputs were propagated."""

    idx: int
    plan: LayerPlan | None  # None: a dense layer
    method: Any = None  # the layer's scoring method (scores, state), MoE layers only
    protected: set[int] = field(default_factory=set)


def decide_layers(stream: Stream, layers, cfg: PruneConfig, method: str, options: dict, keep_n: int, top_k: int,
                  guards: list, apply):
    """The one-shot prune's layer loop: for each ``(idx, LayerData)`` of ``layers`` (a
    ``Stream.layers`` reader), run the layer on its cached inputs with ``method`` observing each MoE
    layer (and the super-expert ``guards``), decide its keep-set, and propagate: ``apply(idx, tensors,
    plan)`` returns the layer's output tensors (``plan`` None for a dense layer), and with
    ``cfg.sequential`` the next layer reads this one's outputs *with the plan applied*; without it,
    the original layer's. Yields a ``LayerDecision`` per layer once its outputs are cached and its
    inputs dropped. ``score_and_write`` writes the applied tensors; the EEP search's ``--init`` seed
    only keeps the plans, so the seed is exactly the plan a one-shot prune writes."""
    ck, adapter = stream.ck, stream.ck.adapter
    moe = set(ck.moe_layers())
    groups = _keep_groups(ck, keep_n)
    for idx, data in layers:
        tensors = data.tensors
        module = stream.materialize(idx, data.runtime)
        del data
        if idx not in moe:
            stream.forward(idx, module, write=True)
            del module
            apply(idx, tensors, None)
            decision = LayerDecision(idx, None)
        else:
            m = make_layer_method(method, ck.num_experts, ck.top_k, seed=cfg.seed, **options)
            observers = [m] + guards

            def probe(call, observers=observers):
                for o in observers:
                    o.observe(call)

            probe.needs_expert_outputs = any(o.needs_expert_outputs for o in observers)
            stream.forward(idx, module, write=not cfg.sequential, probe=probe, adapter=adapter)
            protected = set().union(*(g.protected(idx) for g in guards))
            lp = m.decide(idx, keep_n, protected=protected, groups=groups, tensors=tensors, adapter=adapter)
            del module
            out = apply(idx, tensors, lp)
            if cfg.sequential:  # the next layer sees this one pruned
                pruned = stream.materialize(idx, adapter.to_runtime(idx, out, True), num_experts=keep_n, top_k=top_k)
                stream.forward(idx, pruned, write=True)
                del pruned
            del out
            decision = LayerDecision(idx, lp, m, protected)
        del tensors
        stream.cache.drop(idx)
        yield decision


def score_and_write(run: PruneRun, cfg: PruneConfig, top_k: int) -> dict:
    """One streamed pass: score each MoE layer, decide its keep-set, write it, propagate."""
    ck = run.ck
    keep_n = cfg.resolve_keep(ck.num_experts)
    tokens = calibrate(cfg, ck)
    stream = open_stream(run, cfg, tokens)
    guards = _protection_observers(cfg, ck, stream)  # built once: may profile the model (super experts)
    t_start = time.perf_counter()
    reader = stream.layers(run.next_layer, run.moe)  # layer L+1 is read while L computes

    def write(idx: int, tensors: dict, lp: LayerPlan | None) -> dict:
        if lp is not None:
            run.layers[idx] = lp
        return run.write_layer(idx, tensors)

    layers = _progress(reader, len(reader), f"prune ({cfg.method})", cfg.progress)
    t0 = time.perf_counter()
    for d in decide_layers(stream, layers, cfg, cfg.method, cfg.method_options, keep_n, top_k, guards, write):
        times = run.times.setdefault(d.idx, {})
        times["read_s"] = round(reader.last_wait_s, 4)  # time waited for the read (hidden by prefetch when ~0)
        # the time since the last layer finished, less the read wait and the write
        times["compute_s"] = round(max(0.0, time.perf_counter() - t0 - reader.last_wait_s - times.get("write_s", 0.0)), 4)
        if d.method is not None:
            scores = d.method.scores()
            if scores is not None:
                run.scores[d.idx] = [float(s) for s in scores]
            run.protected[d.idx] = sorted(d.protected)
            run.stats[d.idx] = d.method.state()
        run.finish_layer(d.idx)
        t0 = time.perf_counter()
    return {"calibration": {"sequences": int(tokens.input_ids.shape[0]), "seq_len": int(tokens.input_ids.shape[1]),
                            "tokens_counted": tokens.num_tokens, "files": [str(c) for c in cfg.calib]},
            "cache_bytes_written": stream.cache.bytes_written,
            "super_experts": next((g.summary for g in guards if getattr(g, "summary", None)), {}),
            "io": stream.io.to_json(time.perf_counter() - t_start), "budget": stream.placer.report()}


def _keep_groups(ck: Checkpoint, keep_n: int) -> int:
    """DeepSeek group-limited routing: keep an equal number per group when that yields a valid
    grouped model; otherwise 1 (grouping is disabled in config.json, with a note)."""
    if not ck.adapter.grouped_routing:
        return 1
    n_group = int(ck.config.get("n_group") or 1)
    if n_group > 1 and keep_n % n_group == 0 and keep_n // n_group >= 2:
        return n_group
    return 1


def _protection_observers(cfg: PruneConfig, ck: Checkpoint, stream: Stream | None = None) -> list:
    """Observers that mark experts which must never be dropped (super experts)."""
    if not cfg.protect_super_experts:
        return []
    from . import methods

    return methods.protection_observers(ck, stream=stream, progress=cfg.progress)


__all__ = ["PruneConfig", "prune", "available_methods", "PlanError"]
