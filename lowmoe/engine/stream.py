"""Hidden states of the calibration tokens, streamed through the model one decoder layer at a time.

Where it sits: every pass over the layers (``lowmoe prune``, ``lowmoe score``, streaming eval, the
EEP seed, C-Prune's scoring pass) goes through a ``Stream``:

    embed      -> token embeddings of every calibration chunk -> activation cache, boundary 0
    layers     -> (layer_idx, LayerData) from the checkpoint; layer L+1 is read while L computes
    materialize-> layer L built on the compute device, under --max-vram/--max-ram (experts chunked
                  when it does not fit) or with quantized weights (--quant)
    forward    -> every cached chunk of boundary L through layer L (its MoE block optionally hooked
                  by a probe) -> boundary L+1

``walk`` is the one layer loop of the one-shot passes: build each layer, run the cached chunks
through it with observers on its MoE block, let the caller decide the layer's plan, and propagate
either the original or the plan-applied layer's outputs to the next boundary.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .budget import SAFETY, Placer, parse_budget, plan_budget, plan_lazy_budget
from .cache import ActivationCache, FiniteChecks
from .calibration import CalibTokens, load_tokenizer, tokenize
from .checkpoint import Checkpoint
from .device import DeviceTimer, dtype_bytes, release_blas_workspaces, release_pinned_cache, synchronize
from .memory import return_freed_memory
from ..errors import ConfigError
from . import faults
from .experts import run_wave
from .hf import LayerInputsCache, ModelSkeleton, MoeProbe, moe_modules, resolve_experts_impl, run_layer
from .plan import LayerPlan
from .lazy import ExpertSource, HeldTensor, ShardFiles, decoded, read_lazy_layer, selection_only
from .prefetch import IOStats, LayerReader, Prefetcher, Readahead, WriteBehind
from .quant import build_quantized_layer


def plan_stream_budget(ck: Checkpoint, *, device: torch.device, dtype: torch.dtype, batch_size: int, seq_len: int,
                       max_vram=None, max_ram=None, prefetch: bool = True, lazy: bool = False, n_samples: int | None = None,
                       experts: str = "auto", merge=None):
    """The ``Stream`` budget of any streamed pass (prune, score, streaming eval): sizes as given on the
    command line (``"20GiB"``, bytes or None), planned from the index; ConfigError naming the flag.
    ``lazy``: a pass reading its layers with ``Stream.layers(lazy=True)`` (``plan_lazy_budget``);
    ``n_samples``: at most this many calibration sequences (layers run in groups then take their
    activation chunks in waves, experts-major; None: one chunk at a time); ``experts``: the pass's
    ``--experts-impl`` (the grouped GEMM holds more activations, ``budget.activation_terms``);
    ``merge``: what a merging method holds beside a lazy pass (``budget.MergeHold``)."""
    grouped = resolve_experts_impl(experts, device) == "grouped"
    if lazy:
        chunks = 1 if not n_samples else -(-int(n_samples) // max(1, int(batch_size)))
        return plan_lazy_budget(ck, device=device, dtype=dtype, batch_size=batch_size, seq_len=seq_len,
                                max_vram=parse_budget(max_vram, "--max-vram"), max_ram=parse_budget(max_ram, "--max-ram"),
                                prefetch=prefetch, num_chunks=chunks, grouped=grouped, merge=merge)
    return plan_budget(ck, device=device, dtype=dtype, batch_size=batch_size, seq_len=seq_len,
                       max_vram=parse_budget(max_vram, "--max-vram"), max_ram=parse_budget(max_ram, "--max-ram"),
                       prefetch=prefetch, grouped=grouped)


def calibration_tokens(ck: Checkpoint, calib, *, seq_len: int, n_samples: int, layout: str = "pack",
                       answer_only: bool = False) -> CalibTokens:
    """The calibration files tokenized with the model's own tokenizer (``calibration.tokenize``)."""
    return tokenize([str(c) for c in calib], load_tokenizer(ck.path), seq_len=seq_len, n_samples=n_samples,
                    layout=layout, answer_only=answer_only, max_positions=ck.config.get("max_position_embeddings"))


def activation_memory(ck: Checkpoint, tokens: CalibTokens, device: torch.device, dtype: torch.dtype, budget=None) -> dict:
    """How much of the activation cache ``Stream`` keeps in memory: both live boundaries (a layer's
    inputs and its outputs, every calibration token x hidden size in the compute dtype) when they fit,
    else nothing (the disk holds them, one chunk in memory at a time).

    They fit on a CUDA device when they fit beside the planned device peak: under ``--max-vram``, or
    in half of the memory free when the run starts. On the CPU (host memory): beside the planned host
    peak under ``--max-ram``; without it, when they take at most an eighth of the available memory
    and 1 GiB (a run without a budget should not grow by much more than the layer it computes)."""
    boundary = int(tokens.positions) * int(ck.config.get("hidden_size", 0)) * dtype_bytes(dtype)
    need = 2 * boundary
    held = need if 0 < need <= memory_slack(device, budget) else 0
    return {"boundary_bytes": boundary, "held_bytes": held, "where": (device.type if held else "disk")}


def memory_slack(device: torch.device, budget=None) -> int:
    """Bytes of hidden states a pass may keep in memory beside its planned peak (``budget``: a
    ``budget.BudgetPlan`` or None), where they are computed: under ``--max-vram`` (on CPU: its
    rehearsal) what the device budget leaves; on a CUDA device without it, half the memory free now
    less the planned device peak; on the CPU under ``--max-ram`` what the host budget leaves; else an
    eighth of the available memory, at most 1 GiB (a run without a budget should not grow by much)."""
    if budget is not None and budget.device_budget is not None:
        return int(budget.device_budget * (1 - SAFETY)) - budget.device_peak_bytes
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0] // 2 - (budget.device_peak_bytes if budget is not None else 0)
    if budget is not None and budget.max_ram is not None:
        return int(budget.max_ram * (1 - SAFETY)) - budget.host_peak_bytes
    return min(available_memory() // 8, 1 << 30)


def with_setup(stages: dict, setup: dict[str, float], wall_s: float) -> dict:
    """A pass's ``stages`` preceded by what came before it (``setup``: seconds by stage name, e.g.
    tokenizing the calibration data, building the stream, the super-expert profile), main thread."""
    head = {k: {"s": round(v, 4), "count": 1, "thread": "main", "share": round(v / wall_s, 4) if wall_s else None}
            for k, v in setup.items()}
    return {**head, **{k: v for k, v in stages.items() if k not in head}}


def readahead(ck: Checkpoint, enabled: bool = True) -> Readahead | None:
    """Start reading ``ck``'s shards into the page cache in the order a pass reads them
    (``prefetch.Readahead``), up to a quarter of the available memory; None when not ``enabled``
    (``--no-prefetch``: nothing is read before the pass asks for it)."""
    return Readahead(ck, min(ck.total_bytes(), available_memory() // 4)) if enabled else None


def available_memory() -> int:
    """Host memory available to this process now (MemAvailable), in bytes; 0 when unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class Stream:
    """Streams hidden states of the calibration tokens through the model, layer by layer."""

    def __init__(self, ck: Checkpoint, tokens: CalibTokens, cache: ActivationCache, device, dtype, batch_size: int,
                 budget=None, prefetch: bool = True, quant: str = "none", experts: str = "auto"):
        """``experts``: how the routed experts are computed (``hf.EXPERTS_IMPLS``, ``--experts-impl``)."""
        self.ck, self.tokens, self.cache = ck, tokens, cache
        self.device, self.dtype = device, dtype
        self.batch_size = batch_size
        self.io = IOStats()  # time waited for reads vs time the reads took (report "io")
        self.prefetch = prefetch
        self.prefetch_layers = prefetch if budget is None else budget.prefetch_layers
        self.placer = Placer(device, dtype, budget, self.io)  # builds layers under --max-vram/--max-ram
        # under --max-ram, freed tensors go back to the OS instead of staying resident as free heap
        self.malloc_mmap_threshold = return_freed_memory() if budget is not None and budget.max_ram is not None else None
        self.files = ShardFiles(ck.path)  # lazily read experts (Stream.layers(lazy=True)), copied kept experts
        self.quant = quant  # "nf4"/"int8": layers built with bitsandbytes-quantized weights (lowmoe.engine.quant)
        self.skel = ModelSkeleton(ck.config, ck.adapter, experts=resolve_experts_impl(experts, self.device))
        self.inputs_for = LayerInputsCache(self.skel, device)  # rotary embeddings and masks per token-block shape
        self.num_chunks = (tokens.input_ids.shape[0] + batch_size - 1) // batch_size
        self._labels = None  # ``token_labels``
        # two boundaries of hidden states (a layer's inputs and outputs) kept in memory when they fit
        self.activations = activation_memory(ck, tokens, self.device, dtype, budget)
        cache.hold(self.activations["held_bytes"])
        if self.activations["held_bytes"] and (self.device.type == "cuda" or self.placer.plan is not None
                                               and self.placer.plan.device_budget is not None):
            self.placer.accountant.add(self.activations["held_bytes"])  # device memory, for the whole pass
        # the cuBLAS workspaces torch keeps for the pass's computing threads, until ``close``
        if self.device.type == "cuda" and getattr(self.placer.plan, "blas_workspace_bytes", 0):
            self.placer.accountant.add(self.placer.plan.blas_workspace_bytes)

    def chunks(self):
        for c, sl in self.tokens.batches(self.batch_size):
            yield c, sl

    def token_labels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The calibration's (N, S) count mask and (N,) domains on the stream's device, for the scorers.
        They go to the device once per stream: a copy from pageable host memory per chunk and layer
        would wait for the device each time."""
        if self._labels is None:
            self._labels = (self.tokens.count_mask.to(self.device), self.tokens.domain.to(self.device))
        return self._labels

    def embed(self) -> None:
        with self.io.stage("embed"):
            key = "model.embed_tokens.weight"
            w = self.ck.read([key])[key].to(self.device, self.dtype)
            self.placer.accountant.track(w, w.numel() * w.element_size())  # counts against --max-vram while it lives
            checks = FiniteChecks()
            for c, sl in self.chunks():
                h = torch.nn.functional.embedding(self.token_ids(c, sl).to(self.device), w)
                faults.point("embed")
                if not self._keep(0, c, h, checks=checks):
                    self.cache.write(0, c, h)
            del w
            checks.raise_first()

    def activation_report(self) -> dict:
        """Where the activation cache lived: ``held_bytes`` in memory (``where``), the rest on disk."""
        return {**self.activations, "peak_in_memory_bytes": self.cache.memory_peak,
                "disk_bytes_written": self.cache.bytes_written}

    def close(self) -> None:
        """Stop the stream's background threads (the expert loader) and give back the cuBLAS
        workspaces of its threads and its page-locked staging buffers (a later pass or the caller's
        own code starts without them)."""
        self.placer.close()
        release_blas_workspaces(self.device)
        release_pinned_cache(self.device)

    def pass_report(self, t_begin: float, t_start: float, setup: dict[str, float], since=None) -> dict:
        """A streamed pass's report entries, now: ``io`` (reads and waits over the layers' wall, from
        ``t_start``, and the shard reads), ``stages`` (``setup`` first, then the pass's stages since
        ``since``; shares of the wall from ``t_begin``), ``activations``, ``experts_impl``, ``budget``."""
        now = time.perf_counter()
        return {"io": {**self.io.to_json(now - t_start), **self.files.to_json()},
                "stages": with_setup(self.stages(now - t_begin, since=since), setup, now - t_begin),
                "activations": self.activation_report(), "experts_impl": self.skel.experts_impl,
                "budget": {**self.placer.report(), "malloc_mmap_threshold": self.malloc_mmap_threshold}}

    def stages(self, wall_s: float | None = None, since=None) -> dict:
        """Where the pass's time went, per stage (``prefetch.STAGES``): the report's "stages"
        (``since``: an ``io.stage_snapshot()`` taken when the pass began)."""
        return self.io.stages_json(wall_s, since)

    def token_ids(self, chunk: int, sl: slice) -> torch.Tensor:
        """The token ids of cache chunk ``chunk`` (rows ``sl`` of the calibration tokens)."""
        return self.tokens.input_ids[sl]

    def materialize(self, layer_idx: int, runtime_state: dict, *, num_experts: int | None = None, top_k: int | None = None,
                    experts: ExpertSource | None = None, kept: tuple | None = None):
        """``hf.materialize_layer`` on this stream's device, under its budget (experts chunked if needed),
        or with quantized linear weights (``quant``; never chunked, see ``quant.check_quant_budget``).
        ``experts``: the routed experts are not in ``runtime_state`` but read from this source in groups;
        ``kept``: ``(module, keep)``, they are experts ``keep`` of another layer's module on the device."""
        if self.quant != "none":
            if experts is not None or kept is not None:
                raise ConfigError("--quant: quantized layers are built from whole layers (not with lazily read experts)")
            if num_experts is not None or top_k is not None:
                raise ConfigError("--quant: quantized layers are built with the model's own expert count and top-k")
            return build_quantized_layer(self.skel, layer_idx, runtime_state, self.device, self.dtype, self.quant,
                                         accountant=self.placer.accountant)
        with self.io.stage("materialize"):
            return self.placer.materialize(self.skel, layer_idx, runtime_state, num_experts=num_experts, top_k=top_k,
                                           experts=experts, kept=kept)

    def layers(self, start: int, moe: set[int], *, lazy: bool = False) -> LayerReader:
        """``(layer_idx, LayerData)`` from ``start`` on; layer L+1 is read while L computes.

        ``lazy``: a MoE layer's routed experts are not read with the layer: ``LayerData.tensors`` is a
        ``lazy.LazyLayer`` and ``LayerData.experts`` the source ``materialize`` reads them from, a
        group at a time (host memory: the layer's other weights + two groups)."""
        ad = self.ck.adapter
        read = (lambda L: read_lazy_layer(self.ck, self.files, L)) if lazy else None
        preload = self.placer.preload if lazy and self.prefetch_layers and self.quant == "none" else None
        return LayerReader(self.ck, range(start, self.ck.num_layers), prefetch=self.prefetch_layers,
                           pin_memory=self.device.type == "cuda", stats=self.io, read=read,
                           to_runtime=lambda L, t: ad.to_runtime(L, t, L in moe), preload=preload)

    def _read_chunk(self, boundary: int, chunk: int) -> torch.Tensor:
        if self.cache.in_memory(boundary, chunk):
            return self.cache.read(boundary, chunk)  # already where it is computed on
        h = self.cache.read(boundary, chunk)
        return h.pin_memory() if self.device.type == "cuda" else h

    def _keep(self, boundary: int, chunk: int, h: torch.Tensor, writer: "WriteBehind | None" = None,
              checks: FiniteChecks | None = None) -> bool:
        """Hold chunk ``chunk`` of ``boundary`` in memory if it fits (and, for a resumable run, write it
        to disk too: behind, through ``writer``). False: it must go to disk. ``checks``: its NaN/Inf
        check is read with the layer's others (``forward``); a copy written for a resumable run is
        checked on the host as it is written, so no chunk reaches the disk unchecked."""
        nbytes = h.numel() * h.element_size()
        if not self.cache.fits(nbytes):
            return False
        self.cache.keep(boundary, chunk, h, checks=checks)
        if self.cache.persist:
            host, copied = self._to_host(h)
            if writer is None:
                self._write_when(copied, boundary, chunk, host, checks is None)
            else:
                writer.submit(self._write_when, copied, boundary, chunk, host, checks is None, nbytes=nbytes)
        return True

    def _to_host(self, h: torch.Tensor):
        """``h`` copied to host memory: on CUDA into page-locked memory without waiting (the copy's event
        is returned; the writer waits for it), else ``h`` itself."""
        with self.io.stage("to_host"):
            if h.device.type != "cuda":
                return h.detach(), None
            host = torch.empty(h.shape, dtype=h.dtype, pin_memory=True)
            host.copy_(h.detach(), non_blocking=True)
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(h.device))
            return host, copied

    def _write_when(self, copied, boundary: int, chunk: int, host: torch.Tensor, checked: bool = True) -> None:
        if copied is not None:
            copied.synchronize()
        self.cache.write(boundary, chunk, host, checked=checked)

    @torch.no_grad()
    def forward(self, layer_idx: int, module, *, write: bool, probe=None, adapter=None, read_boundary: int | None = None,
                stage_next: bool = False):
        """Run every cached chunk of boundary ``layer_idx`` through ``module``; optionally hook its
        MoE block with ``probe(call)`` and write the outputs to boundary ``layer_idx + 1``.
        ``stage_next``: this is the layer's last pass: once its first chunk has run (its experts are
        on the device), the next layer's first expert group may be staged (``Placer.stage_next``).

        A layer whose routed experts visit the device in several groups runs its chunks in waves of
        ``wave_chunks`` (``experts.run_wave``): each group is brought to the device once per wave,
        not once per chunk, and every chunk's rows routed to it run there (experts-major).

        On CUDA the host does not wait for a chunk's kernels before it queues the next chunk's: the
        outputs' NaN/Inf checks are read together (``FiniteChecks``) and the host waits once, at the
        end (stage ``compute``); CUDA events around each chunk time the kernels themselves (stage
        ``compute_device``)."""
        b = layer_idx if read_boundary is None else read_boundary
        slices = dict(self.chunks())
        # chunk c+1 is read (and written back, for c-1) on background threads while c computes
        reader = Prefetcher(lambda c: self._read_chunk(b, c), list(slices), depth=1 if self.prefetch else 0,
                            stats=self.io, kind="cache", name="lowmoe-cache-reader")
        writer = WriteBehind(enabled=self.prefetch and write, stats=self.io)
        adapter = adapter if adapter is not None else self.ck.adapter
        wave = self.wave_size(adapter, module)
        io = self.io
        labels = self.token_labels() if probe is not None else None
        checks = FiniteChecks()
        timed = DeviceTimer(self.device)

        def compute(c: int, h: torch.Tensor, moe_probe) -> torch.Tensor:
            sl = slices[c]
            if moe_probe is not None:
                mask, dom = labels
                moe_probe.chunk_tokens(mask[sl], dom[sl][:, None].expand(-1, h.shape[1]))  # (B, S) each
            return run_layer(self.skel, module, layer_idx, h, self.inputs_for(h))

        def done(c: int, out: torch.Tensor) -> None:
            if probe is not None:
                faults.point("score")
            if write and not self._keep(layer_idx + 1, c, out, writer, checks):
                host, copied = self._to_host(out)
                writer.submit(self._write_when, copied, layer_idx + 1, c, host, False,
                              nbytes=host.numel() * host.element_size())

        try:
            batch: list[tuple[int, torch.Tensor]] = []
            for c, h in reader:
                with io.stage("to_device"):
                    h = h.to(self.device, non_blocking=True).to(self.dtype)
                batch.append((c, h))
                del h
                if len(batch) < wave and c != len(slices) - 1:
                    continue  # the wave's next chunk
                chunks, batch = batch, []
                moe_probe = (MoeProbe(adapter, module, probe, num_domains=len(self.tokens.domains))
                             if probe is not None else None)
                single = None
                with io.stage("compute"), timed:
                    if moe_probe is not None:
                        moe_probe.__enter__()
                    try:
                        if len(chunks) == 1:
                            (c1, h1), = chunks
                            del chunks
                            single = (c1, compute(c1, h1, moe_probe))
                            del h1
                        else:
                            order = [c_ for c_, _ in chunks]
                            fns = [(lambda c_=c_, h_=h_: compute(c_, h_, moe_probe)) for c_, h_ in chunks]
                            del chunks
                            # the chunks waiting at their experts call, as planned (``plan_lazy_budget``)
                            held = self.placer.accountant.add((len(order) - 1) * self.placer.plan.wave_chunk_bytes)
                            try:
                                # each chunk's output is cached (or written) as it ends, in chunk order
                                run_wave(fns, on_done=lambda i, o: done(order[i], o))
                            finally:
                                self.placer.accountant.release(held)
                            del fns
                    finally:
                        if moe_probe is not None:
                            moe_probe.__exit__(None, None, None)
                if single is not None:
                    done(*single)
                    del single
                if stage_next:
                    stage_next = False
                    self.placer.stage_next(layer_idx, _routed_experts(adapter, module))
            if self.device.type == "cuda":
                with io.stage("compute"):
                    synchronize(self.device)  # the one wait for the layer's kernels
                    checks.raise_first()
                io.add_stage("compute_device", timed.seconds(), thread="device")
            else:
                checks.raise_first()
        except BaseException:
            # the first error is the one to report: a write still queued may fail on the same chunk
            try:
                writer.close()
            except Exception:  # noqa: BLE001
                pass
            raise
        writer.close()

    def wave_size(self, adapter, module) -> int:
        """How many activation chunks go through ``module`` together (``forward``): the plan's
        ``wave_chunks`` when the layer's routed experts visit the device in several groups, else 1."""
        plan = self.placer.plan
        n = getattr(plan, "wave_chunks", 1) if plan is not None else 1
        if n <= 1 or not adapter.probes:
            return 1
        experts = _routed_experts(adapter, module)  # None: a dense layer
        return min(n, self.num_chunks) if getattr(experts, "defers", False) else 1


@dataclass
class LayerStep:
    """One layer of ``Stream.walk``, after its outputs were cached and its inputs dropped."""

    idx: int
    plan: LayerPlan | None  # None: a dense layer, or a MoE layer the caller decided later
    observers: list = field(default_factory=list)  # what watched the layer's MoE block (MoE layers)


def walk(stream: Stream, layers, *, observers_for: Callable[[int], list], decide: Callable[[int, dict, list], LayerPlan | None],
         apply: Callable[[int, dict, LayerPlan | None], dict | None], sequential: bool = False,
         num_experts: int | None = None, top_k: int | None = None) -> Iterator[LayerStep]:
    """The one-shot passes' layer loop, over ``(idx, LayerData)`` from ``layers`` (``Stream.layers``).

    Each layer is built on the stream's device and every cached chunk is run through it; on a MoE
    layer ``observers_for(idx)`` (objects with ``observe(MoeCall)`` and ``needs_expert_outputs``)
    watch its MoE block. Then ``decide(idx, tensors, observers)`` returns the layer's plan (None: no
    plan at this point) and ``apply(idx, tensors, plan)`` returns the layer's output tensors (on-disk
    keys; ``plan`` is None for a dense layer; it may write them). With ``sequential`` and a plan, the
    next layer reads the outputs of the layer *with the plan applied* (built with ``num_experts``
    experts and ``top_k``); otherwise the original layer's. Yields a ``LayerStep`` per layer once its
    outputs are cached; its inputs are dropped when the caller asks for the next one (after it has
    recorded this one, so a run killed in between can resume at this layer)."""
    ck, adapter = stream.ck, stream.ck.adapter
    moe = set(ck.moe_layers())
    for idx, data in layers:
        tensors, source = data.tensors, data.experts
        module = stream.materialize(idx, data.runtime, experts=source)
        del data
        if idx not in moe:
            stream.forward(idx, module, write=True, stage_next=True)
            del module
            with stream.io.stage("apply"):
                apply(idx, tensors, None)
            step = LayerStep(idx, None)
        else:
            observers = observers_for(idx)

            def probe(call, observers=observers):
                with stream.io.stage("observe"):
                    for o in observers:
                        o.observe(call)

            probe.needs_expert_outputs = any(getattr(o, "needs_expert_outputs", False) for o in observers)
            stream.forward(idx, module, write=not sequential, probe=probe, adapter=adapter, stage_next=not sequential)
            if not (sequential and source is not None):
                release_layer(module)
                module = None
            with stream.io.stage("decide"):
                lp = decide(idx, tensors, observers)
            with stream.io.stage("apply"):
                out = apply(idx, tensors, lp)
            if sequential:  # the next layer sees this one with its plan applied
                if lp is None:
                    raise ValueError(f"layer {idx}: a sequential pass needs a plan for every MoE layer")
                if source is not None and selection_only(lp):
                    # the kept experts: those of the layer on the device when all of it is there (its
                    # module stays until the pruned pass is done), else read from the same shards in
                    # groups; the rest as written
                    whole = resident_experts(adapter, module) if lp.keep == sorted(lp.keep) else None
                    if whole is None:
                        release_layer(module)
                        module = None
                    expert_keys = _expert_keys(adapter, idx, out)
                    rest = {k: v for k, v in out.items() if isinstance(v, torch.Tensor) and k not in expert_keys}
                    pruned = stream.materialize(idx, adapter.to_runtime(idx, rest, True), num_experts=num_experts,
                                                top_k=top_k, kept=(whole, lp.keep) if whole is not None else None,
                                                experts=source.subset(lp.keep) if whole is None else None)
                elif source is not None and (held := held_experts(ck, idx, out, len(lp.keep))) is not None:
                    # merged (or rewritten) experts are held for the writer: run them from there in
                    # groups, as the kept ones are read, not stacked into a whole layer next to them
                    if module is not None:
                        release_layer(module)
                        module = None
                    expert_keys = _expert_keys(adapter, idx, out)
                    rest = {k: v for k, v in out.items() if k not in expert_keys}
                    pruned = stream.materialize(idx, adapter.to_runtime(idx, _decoded(rest), True), num_experts=num_experts,
                                                top_k=top_k, experts=held)
                    del held
                else:
                    if module is not None:
                        release_layer(module)
                        module = None
                    pruned = stream.materialize(idx, adapter.to_runtime(idx, _decoded(out), True), num_experts=num_experts,
                                                top_k=top_k)
                stream.forward(idx, pruned, write=True, stage_next=True)
                release_layer(pruned)
                del pruned
                if module is not None:
                    release_layer(module)
                    module = None
            del out
            step = LayerStep(idx, lp, observers)
        del tensors, source
        yield step
        # dropped only once the caller has recorded the step: a run killed before that resumes at this
        # layer and needs its inputs
        stream.cache.drop(idx)


def held_experts(ck: Checkpoint, layer_idx: int, out: dict, num_experts: int) -> ExpertSource | None:
    """A layer's output experts (``out``: tensors a plan computed, or stored entries: copies, and a
    quantized layer's experts as written, ``PruneRun.write_layer``) as a source of groups
    (``lazy.HeldTensor``; a fused layout's rows, MXFP4's as written). The caller runs it where the
    input layer's own experts were a source (a layout read in groups)."""
    adapter = ck.adapter
    keys = _expert_keys(adapter, layer_idx, out)
    held = {k: HeldTensor(v, k) if isinstance(v, torch.Tensor) else v for k, v in out.items() if k in keys}
    return ExpertSource.from_layer(adapter, layer_idx, held, num_experts)


def _expert_keys(adapter, layer_idx: int, out: dict) -> set[str]:
    prefix = adapter.layer_prefix(layer_idx)
    return {k for k in out if adapter.is_expert_key(k[len(prefix):])}


def _decoded(out: dict) -> dict:
    """A layer's output tensors with any stored (byte-copied) entries read."""
    return {k: decoded(v) for k, v in out.items()}


def _routed_experts(adapter, module):
    """The routed-experts module of a decoder layer, None for a dense one."""
    try:
        return moe_modules(adapter, module)[2]
    except AttributeError:
        return None


def resident_experts(adapter, module):
    """The routed experts of ``module`` as one module on the device now, when all of them are there
    (``ChunkedExperts.resident_whole``); else None."""
    if module is None:
        return None
    pick = getattr(_routed_experts(adapter, module), "resident_whole", None)
    return pick() if callable(pick) else None


def release_layer(module) -> None:
    """Free the device copies and staging buffers of a layer's streamed experts now (not when the
    module is garbage-collected): call it when a layer built by ``Stream.materialize`` is done."""
    for m in module.modules():
        rel = getattr(m, "release", None)
        if callable(rel) and hasattr(m, "group_size"):
            rel()
