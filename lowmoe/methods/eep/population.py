"""Population-parallel streamed evaluation: a whole generation in one pass over the layers.

EEP's reference code loads the whole model and, per candidate, merges weights and regenerates
on the training subset. Here one generation is evaluated in **one pass over the decoder layers**:

    for layer L = 0 .. n-1:
        load layer L once (checkpoint shards, or the NF4/int8 cache of ``lowmoe.engine.quant``) into the
            layer's own module, all E experts, compute dtype (``LoadedLayer``)
        for every distinct plan of layer L among the streams that need it:
            build the candidate's MoE block from the loaded layer (kept experts by index, or
            W_EM merges; router rows W_RM through apply_layer) and swap it into the module
            for every stream with that plan: run its boundary-L chunks -> boundary L+1
    final norm + lm_head on the scored positions of each final stream -> teacher-forced fitness

MoE blocks are token-wise, so they run only on the positions fitness depends on (``TokenSubset``):
on the last layer the positions it scores (nothing after that layer reads the others), before it
every position up to each sequence's last scored one (right padding and each sequence's final
token are never attended to by a scored position). Everything else is bit-identical to building
each candidate's layer with ``apply_layer`` (tests); the trimmed blocks equal it up to float
rounding (``trim=False`` turns trimming off).

**Streams and prefix sharing.** Hidden states live on disk (``ActivationCache``), one *stream*
per distinct model prefix. A stream's name at boundary b is a hash of the candidate's plan on
layers 0..b-1, so candidates identical on layers 0..L share one hidden-state stream up to L+1
and the layer is computed once for all of them. Streams of the best candidates of the archive
(``retain``) are kept between generations: a child that differs from its parent only from layer
group g onward starts from its parent's cached boundary and skips every layer before g.

Memory: one layer in the compute dtype (kept in buffers reused from layer to layer) + one
candidate's MoE block + one activation chunk, whatever the population size; the streams are on disk.

**Budgets** (``--max-vram``/``--max-ram``, ``budget.plan_population``, planned before the search): a
MoE layer that does not fit whole beside a merged block keeps its experts in host memory in their
stored dtype; its resident part (attention, norms, router, shared experts) and each candidate's
router are on the device, and the candidate's E' experts -- selected or merged on the host exactly
as ``apply_layer`` does -- visit the device in groups through ``experts.ChunkedExperts``, the
layer's activation chunks in experts-major waves where the budget has room for them (each group goes
to the device once a wave). Under a --max-ram too small for a layer's experts, only its non-expert
weights are read and each candidate's experts come from the shards (``CandidateSource``): built whole
into host buffers, or, when --max-ram cannot hold a candidate's E' either, a group at a time as the
device runs them. Same fitness, bit for bit (tests). Between generations nothing is left on the device.

``WholeModelEvaluator`` is the reference and the benchmark baseline: the whole model in memory,
one candidate at a time, built with transformers from the same applied tensors.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import time

import torch

from ...engine import faults
from ...engine.apply import apply_layer, experts_for_plan
from ...engine.budget import BudgetPlan, Placement, build_layer, plan_population
from ...engine.cache import ActivationCache, FiniteChecks
from ...engine.checkpoint import Checkpoint
from ...engine.device import dtype_bytes
from ...engine.experts import ChunkedExperts, KeptExperts, run_wave
from ...engine.hf import (LayerInputsCache, ModelSkeleton, layer_config, whole_model, materialize, materialize_layer,
                          moe_modules, resolve_experts_impl, run_layer, split_experts)
from ...engine.lazy import LazyLayer, ShardFiles, StagingPool, read_lazy_layer
from ...engine.memory import Accountant, return_freed_memory
from ...engine.progress import progress as progress_bar
from ...engine.stream import memory_slack
from ...engine.prefetch import IOStats
from .fitness import Fitness, FitnessData, Head
from .space import Candidate, SearchSpace

log = logging.getLogger(__name__)

ROOT = "root"  # stream name of the (shared) token embeddings at boundary 0
_WHOLE = Placement(None)  # a layer the budget leaves whole (dense layers, no budget)


class TokenSubset(torch.nn.Module):
    """A MoE block run on chosen tokens only (``index`` into the flattened batch); the others get 0.

    MoE blocks are token-wise, so the chosen tokens' outputs are those of the whole batch up to float
    rounding (the experts' matrix products see fewer rows). Used where fitness never reads the
    other positions: padding and final tokens, and on the last layer everything but the scored
    positions."""

    def __init__(self, block: torch.nn.Module, index: torch.Tensor):
        super().__init__()
        self.block, self.index = block, index

    def forward(self, hidden_states, *args, **kwargs):
        flat = hidden_states.reshape(-1, hidden_states.shape[-1])
        out = self.block(flat[self.index].unsqueeze(0), *args, **kwargs)
        rest = None
        if isinstance(out, tuple):  # e.g. (hidden, router scores): the decoder layer keeps only the first
            out, rest = out[0], out[1:]
        full = torch.zeros_like(flat)
        full[self.index] = out.reshape(-1, flat.shape[-1]).to(full.dtype)
        full = full.view_as(hidden_states)
        return (full, *rest) if rest is not None else full


class CandidateSource:
    """A candidate's E' experts on a sourced layer (``LoadedLayer._load_sourced``), built from the
    layer's experts on disk (``lazy.ExpertSource``) a few output rows at a time -- the expert source
    ``ChunkedExperts`` reads when a candidate's experts are built one group at a time
    (``PopulationBudget.candidate_groups``), and what ``LoadedLayer._sourced_experts`` fills whole.

    ``load(a, z, out)`` builds rows ``a..z-1``: a kept expert's bytes straight into its row (a run of
    consecutive kept experts in one read), a merged output summed in float32 in expert order from one
    source at a time, each source with a nonzero coefficient in any of the rows read once
    (``merge_experts``' sums: the bits of ``experts_for_plan`` over the whole layer). A quantized
    layer's experts are decoded to the checkpoint's compute dtype, as ``Checkpoint.read_layer`` gives
    them. The rows come in their held dtype, so ``decode`` leaves them as they are."""

    def __init__(self, loaded: "LoadedLayer", lp, rows_at_once: int):
        """``rows_at_once``: the most rows one ``load`` builds (the float32 accumulators' rows)."""
        ev, src = loaded.ev, loaded.source
        self.ev, self.src, self.keep = ev, src, list(lp.keep)
        self.rows_at_once = max(1, int(rows_at_once))
        self.names = list(src.names)
        self.decode_to = ev.ck.compute_dtype if src.packed else None
        # the rows rounded as ``experts_for_plan`` rounds them
        self.rows = None if lp.merge is None else torch.tensor(lp.merge, dtype=torch.float32).tolist()

    @property
    def num_experts(self) -> int:
        return len(self.keep)

    def expert_numel(self) -> int:
        return self.src.expert_numel()

    def buffer_shapes(self, count: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        return {name: ((count,) + self.src.row_shape(name), self.decode_to or self.src.stored_dtype(name))
                for name in self.names}

    def decode(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return tensors

    def _read(self, i: int) -> dict[str, torch.Tensor]:
        self.ev.stats["source_reads"] += 1
        src = self.src
        return src.decode(src.load(i, i + 1), self.decode_to) if src.packed else src.load(i, i + 1)

    def load(self, a: int, z: int, out: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Rows ``a..z-1`` of the candidate's experts, into ``out`` (buffers of at least ``z - a`` rows)."""
        src, n = self.src, z - a
        if out is None:
            out = {name: torch.empty(shape, dtype=dtype) for name, (shape, dtype) in self.buffer_shapes(n).items()}
        bufs = {name: b[:n] for name, b in out.items()}
        if self.rows is None:
            keep, j = self.keep[a:z], 0
            while j < n:
                if src.packed:
                    for name, t in self._read(keep[j]).items():
                        bufs[name][j].copy_(t[0])
                    j += 1
                    continue
                k = j + 1  # a run of consecutive kept experts: one read into consecutive rows
                while k < n and keep[k] == keep[k - 1] + 1:
                    k += 1
                src.load(keep[j], keep[j] + k - j, {name: bufs[name][j:k] for name in self.names})
                self.ev.stats["source_reads"] += 1
                j = k
            return bufs
        ev = self.ev
        if n > self.rows_at_once:
            raise ValueError(f"{n} merged rows at once, the accumulators hold {self.rows_at_once}")
        # summed on the host and copied into the rows from there: not page-locked (as the plan counts them)
        accs = {name: ev.buffer("host:acc:" + name, (self.rows_at_once,) + src.row_shape(name), torch.float32,
                                host=True, pin=False)[:n] for name in self.names}
        for acc in accs.values():
            acc.zero_()
        block = self.rows[a:z]
        for i in range(len(block[0])):  # every output's sum runs over its sources in expert order
            terms = [(k, row[i]) for k, row in enumerate(block) if row[i] != 0.0]
            if not terms:
                continue
            for name, t in self._read(i).items():
                x = t[0].float()
                for k, c in terms:
                    accs[name][k].add_(x, alpha=c)
                del x
        for name in self.names:
            bufs[name].copy_(accs[name])
        return bufs


class LoadedLayer:
    """One decoder layer, loaded once per generation and shared by every candidate that runs it.

    ``module`` is the original layer (attention, norms, all E experts) in the compute dtype. A
    candidate's layer is that module with the candidate's MoE block swapped in (``use``); the block
    is built from the loaded weights instead of re-reading, re-stacking and re-casting the layer:

    * keep-list (pruning phase): the kept experts are the loaded ones behind an index map (``KeptExperts``);
    * merged experts: θ'_j = Σ_i W_EM[j, i] θ_i by ``apply.experts_for_plan``, the kernel ``apply_layer``
      uses (float32 accumulation in expert order, per-expert and fused layouts alike, cast to the
      stored dtype);
    * router rows (W_RM) through ``apply_layer`` itself; the block's other tensors (shared experts) are shared.

    Bit-identical to ``apply_layer`` + ``materialize_layer`` (tests). Where merging from the loaded copy
    could not be (a compute dtype narrower than the stored one), a merged block comes from
    ``apply_layer`` over the stored tensors, which are then kept for the layer's candidates."""

    def __init__(self, ev: PopulationEvaluator, layer_idx: int, tensors: dict[str, torch.Tensor]):
        """``tensors``: the layer's stored tensors (on-disk keys); this takes the dict over."""
        ad = ev.adapter
        self.ev, self.idx, self.is_moe = ev, layer_idx, layer_idx in ev.moe
        self.placement = ev.placement(layer_idx)  # under a budget: chunked = experts stay in host memory
        self.source = None  # sourced layers: the routed experts on disk (``lazy.ExpertSource``)
        if not self.is_moe:
            if isinstance(tensors, LazyLayer):
                tensors = dict(tensors.resident)  # a dense layer's tensors are all read
            state = ad.to_runtime(layer_idx, tensors, False)
            self.module = materialize_layer(ev.skel, layer_idx, state, ev.device, ev.dtype)
            ev.track(self.module, sum(v.numel() for v in state.values()) * ev.elem_bytes)
            return
        if isinstance(tensors, LazyLayer):  # the budget's sourced layers: experts read per candidate block
            self._load_sourced(tensors)
            return
        prefix = ad.layer_prefix(layer_idx)
        experts = {k: t for k, t in tensors.items() if ad.is_expert_key(k[len(prefix):])}
        if self.placement is not None and self.placement.chunked:
            self._load_host(tensors, experts)
            return
        # merging from the loaded copy equals merging the stored tensors iff the cast to the compute dtype was exact
        stored = {t.dtype for t in experts.values()}
        self.exact = len(stored) == 1 and (ev.dtype == torch.float32 or stored == {ev.dtype})
        self.stored_dtype = next(iter(stored)) if len(stored) == 1 else None
        # the stored expert tensors are only needed for the apply_layer fallback; otherwise they are
        # dropped from ``tensors`` (which this takes over) and freed one expert at a time as they are loaded
        self.tensors = tensors if not self.exact else None
        if self.exact:
            for k in experts:
                del tensors[k]
        self.router_tensors = {k: tensors[k] for k in ad.router_keys(layer_idx) if k in tensors}
        state = ad.to_runtime(layer_idx, {k: t for k, t in tensors.items() if k not in experts}, True)
        state.update(self._load_experts(experts))
        self.module = materialize_layer(ev.skel, layer_idx, state, ev.device, ev.dtype)
        ev.track(self.module, sum(v.numel() for v in state.values()) * ev.elem_bytes)
        self._set_base()

    def _set_base(self) -> None:
        ad = self.ev.adapter
        self.path = ad.runtime_moe_prefix.rstrip(".")
        self.base = self.module.get_submodule(self.path)
        self.shared = {k: v for k, v in self.base.state_dict().items()
                       if not k.startswith("experts.") and not k.startswith(ad.runtime_router + ".")}

    def _load_host(self, tensors: dict[str, torch.Tensor], experts: dict[str, torch.Tensor]) -> None:
        """Under a budget the layer's experts do not fit beside a candidate's: they stay in host memory
        in their stored dtype (runtime layout, pinned for a GPU), the rest is built on the device, and
        each candidate block gets its E' experts as ``ChunkedExperts`` (``block``). Merging from the
        stored tensors is what ``apply_layer`` does, so it is always exact."""
        ev, ad, L = self.ev, self.ev.adapter, self.idx
        self.exact, self.tensors, self.stored_dtype = True, None, None
        for k in experts:
            del tensors[k]
        self.router_tensors = {k: tensors[k] for k in ad.router_keys(L) if k in tensors}
        state = ad.to_runtime(L, tensors, True)
        host = self._load_experts(experts, host=True)
        self.host = split_experts(ad, host)[0]  # (E, ...) per runtime expert tensor
        # the original block (``use(None)``) streams all E experts in the run plan's groups; candidates never run it
        whole = ev.budget.plan.layers.get(L)
        group = whole.group_size if whole is not None and whole.chunked else ev.ck.num_experts
        self.module = build_layer(ev.skel, L, {**state, **host}, ev.device, ev.dtype, group_size=group,
                                  double_buffer=whole is None or whole.double_buffer, accountant=ev.accountant,
                                  stats=ev.io)
        self._set_base()

    def _load_sourced(self, layer: LazyLayer) -> None:
        """Under a --max-ram too small for a layer's experts (``budget.plan_sourced_population``): only
        the non-expert weights are read; the module is built without routed experts (candidates never
        run the original block), and each candidate block reads its experts from ``layer.experts``."""
        ev, ad, L = self.ev, self.ev.adapter, self.idx
        if layer.experts is None:
            raise RuntimeError(f"layer {L}: the EEP budget reads experts from the shards, but this layer's are not "
                               "located there")
        self.exact, self.tensors, self.stored_dtype = True, None, None
        self.source = layer.experts
        rest = dict(layer.resident)
        self.router_tensors = {k: rest[k] for k in ad.router_keys(L) if k in rest}
        state = ad.to_runtime(L, rest, True)
        del rest
        module = ev.skel.new_layer(L, layer_config(ev.skel, None, None))
        moe_modules(ad, module)[0].experts = torch.nn.Identity()
        self.module = materialize(module, state, ev.device, ev.dtype)
        ev.track(self.module, sum(v.numel() for v in state.values()) * ev.elem_bytes)
        self._set_base()

    def _load_experts(self, experts: dict[str, torch.Tensor], host: bool = False) -> dict[str, torch.Tensor]:
        """The runtime expert tensors (experts on dim 0) in the compute dtype, written expert by expert
        (``to_runtime`` of one expert at a time) into buffers the evaluator reuses from layer to layer:
        a fresh allocation of twice the layer per layer costs more in page faults than the copy.
        ``host``: in host memory and the stored dtype instead (a fused layout is used as read)."""
        ev, ad, L = self.ev, self.ev.adapter, self.idx
        E = ev.ck.num_experts
        base = ad.layer_prefix(L) + ad.moe_prefix + "experts."
        if host and ad.expert_layout == "fused":
            out = ad.to_runtime(L, experts, True)
            return {k: v.pin_memory() if ev.device.type == "cuda" else v for k, v in out.items()}

        def parts():
            if ad.expert_layout == "fused":
                yield None, experts
                return
            for e in range(E):  # expert e's tensors renamed to expert 0, so to_runtime stacks just that one
                own = f"{base}{e}."
                yield e, {base + "0." + k[len(own):]: experts.pop(k) for k in [k for k in experts if k.startswith(own)]}

        out: dict[str, torch.Tensor] = {}
        for e, part in parts():
            for k, v in ad.to_runtime(L, part, True).items():
                shape = tuple(v.shape) if e is None else (E,) + tuple(v.shape[1:])
                buf = ev.buffer("host:" + k, shape, v.dtype, host=True) if host else ev.buffer(k, shape, ev.dtype)
                (buf if e is None else buf[e]).copy_(v if e is None else v[0])
                out[k] = buf
        return out

    def block(self, lp) -> torch.nn.Module:
        """The candidate's MoE block for ``lp`` (a ``LayerPlan``)."""
        ev, ad, L = self.ev, self.ev.adapter, self.idx
        n = len(lp.keep)
        meta = ev.skel.new_layer(L, ev.candidate_config()).get_submodule(self.path)
        if lp.extra:
            raise ValueError(f"layer {L}: EEP candidates carry no plan extensions, got {sorted(lp.extra)}")
        if self.placement is not None and self.placement.chunked:
            return self._chunked_block(lp, meta)
        kept = lp.merge is None and lp.keep == sorted(lp.keep)
        if not kept and not self.exact:
            out = apply_layer(ad, L, self.tensors, lp, ev.ck.num_experts)
            state = self._block_state(ad.to_runtime(L, {k: v for k, v in out.items()
                                                        if k[len(ad.layer_prefix(L)):].startswith(ad.moe_prefix)}, True))
            return ev.track(materialize(meta, state, ev.device, ev.dtype), sum(v.numel() for v in state.values()) * ev.elem_bytes)
        state = self._block_state(ad.to_runtime(L, apply_layer(ad, L, self.router_tensors, lp, ev.ck.num_experts), True))
        state.update(self.shared)
        if kept:
            meta.experts = torch.nn.Identity()
            block = materialize(meta, state, ev.device, ev.dtype)
            block.experts = KeptExperts(self.base.experts, lp.keep).to(ev.device)
            return ev.track(block, self._state_bytes(state))
        for name, x in self.base.experts.named_parameters():  # runtime tensors, experts on dim 0
            out = acc = None
            if lp.merge is not None:  # merged into reused buffers: the stored dtype, a float32 accumulator
                out = ev.buffer("merged:" + name, (n,) + tuple(x.shape[1:]), self.stored_dtype)
                acc = ev.buffer("merged:acc", tuple(x.shape[1:]), torch.float32)
            # as apply_layer merges the stored tensors, rounded to the stored dtype
            y = experts_for_plan(x, lp, out, acc).to(self.stored_dtype)
            if y.dtype != ev.dtype:  # cast for compute into a reused buffer: a new one per candidate costs
                y = ev.buffer("merged:compute:" + name, tuple(y.shape), ev.dtype).copy_(y)  # page faults (CPU)
            state["experts." + name] = y
        # the merge's own buffers (the block's parameters are counted as its state)
        merge_buffers = sum(b.numel() * b.element_size() for k, b in ev._buffers.items()
                            if k.startswith("merged:") and not k.startswith("merged:compute:"))
        return ev.track(materialize(meta, state, ev.device, ev.dtype), self._state_bytes(state) + merge_buffers)

    def _chunked_block(self, lp, meta: torch.nn.Module) -> torch.nn.Module:
        """The candidate's block with its router (and the shared experts) on the device and its E'
        experts in host memory, visiting the device in the planned groups (``experts.ChunkedExperts``).
        The experts are selected or merged exactly as ``apply_layer`` does, rounded to the stored dtype:
        from the layer's stored-dtype host copy (``apply.experts_for_plan``), or on a sourced layer
        from the shards (``_sourced_experts``)."""
        ev, ad, L = self.ev, self.ev.adapter, self.idx
        E = ev.ck.num_experts
        state = self._block_state(ad.to_runtime(L, apply_layer(ad, L, self.router_tensors, lp, E), True))
        g = self.placement.group_size
        if self.source is not None and ev.budget.candidate_groups:
            # never all E' at once: each group is built from the shards when the device asks for it,
            # into the one staging buffer, and dropped before the next one is built
            meta.experts = ChunkedExperts(meta.experts, source=CandidateSource(self, lp, g), group_size=g,
                                          device=ev.device, dtype=ev.dtype, double_buffer=False,
                                          accountant=ev.accountant, stats=ev.io, pool=ev.staging_pool())
        else:
            experts = self._sourced_experts(lp) if self.source is not None else self._held_experts(lp)
            meta.experts = ChunkedExperts(meta.experts, experts, group_size=g, device=ev.device, dtype=ev.dtype,
                                          double_buffer=self.placement.double_buffer, accountant=ev.accountant,
                                          stats=ev.io)
        state.update(self.shared)
        ev.stats["chunked_blocks"] += 1
        return ev.track(materialize(meta, state, ev.device, ev.dtype), self._state_bytes(state))

    def _held_experts(self, lp) -> dict[str, torch.Tensor]:
        """A candidate's E' runtime expert tensors in reused host buffers, from the layer's host copy."""
        ev, n = self.ev, len(lp.keep)
        experts: dict[str, torch.Tensor] = {}
        for name, x in self.host.items():  # (E, ...) stored dtype
            y = ev.buffer("host:candidate:" + name, (n,) + tuple(x.shape[1:]), x.dtype, host=True)
            acc = None if lp.merge is None else ev.buffer("host:acc", tuple(x.shape[1:]), torch.float32, host=True)
            experts[name] = experts_for_plan(x, lp, y, acc)
        return experts

    def _sourced_experts(self, lp) -> dict[str, torch.Tensor]:
        """A candidate's E' runtime expert tensors in reused host buffers, read from the shards
        (``CandidateSource.load``): kept experts row by row, merged outputs ``merge_block`` at a time
        (each source read once per block, ``PopulationBudget.merge_block``)."""
        ev, n = self.ev, len(lp.keep)
        step = n if lp.merge is None else max(1, min(n, ev.budget.merge_block))
        cand = CandidateSource(self, lp, step)
        bufs = {name: ev.buffer("host:candidate:" + name, shape, dtype, host=True)
                for name, (shape, dtype) in cand.buffer_shapes(n).items()}
        for a in range(0, n, step):
            cand.load(a, min(n, a + step), {name: b[a:] for name, b in bufs.items()})
        return bufs

    def _state_bytes(self, state: dict[str, torch.Tensor]) -> int:
        """Device bytes a block adds to the loaded layer (its shared tensors are the layer's own)."""
        return sum(v.numel() for k, v in state.items() if k not in self.shared) * self.ev.elem_bytes

    def _block_state(self, runtime: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        p = self.ev.adapter.runtime_moe_prefix
        return {k[len(p):]: v for k, v in runtime.items() if k.startswith(p)}

    def use(self, block: torch.nn.Module | None) -> torch.nn.Module:
        """The layer module with ``block`` as its MoE block (None: the original block)."""
        if self.is_moe:
            parent, _, attr = self.path.rpartition(".")
            setattr(self.module.get_submodule(parent) if parent else self.module, attr, block if block is not None else self.base)
        return self.module


class PopulationEvaluator:
    def __init__(self, ck: Checkpoint, weights, space: SearchSpace, data: FitnessData, root, *, device, dtype,
                 top_k: int, batch_size: int = 8, progress: bool = False, trim: bool = True, budget=None,
                 memory_share: float = 1.0, experts: str = "auto"):
        """``budget``: the run's ``budget.BudgetPlan`` (``--max-vram``/``--max-ram``) or its
        ``budget.plan_population``; None: no budget (every layer whole on the device).
        ``memory_share``: the share of the memory left beside the planned peak (``stream.memory_slack``)
        this evaluator's hidden states may hold (two evaluators of one search, train and dev: half each).
        ``experts``: how the routed experts are computed (``hf.EXPERTS_IMPLS``, ``--experts-impl``)."""
        if isinstance(budget, BudgetPlan):
            budget = plan_population(ck, budget, num_experts=space.keep, batch_size=batch_size,
                                     seq_len=int(data.input_ids.shape[1]), quant=getattr(weights, "mode", "none"),
                                     num_chunks=-(-data.input_ids.shape[0] // batch_size))
        self.budget = budget
        self.elem_bytes = dtype_bytes(dtype)
        self.accountant = Accountant(budget.plan.activation_bytes if budget is not None and budget.plan.weights_budget
                                     is not None else 0)
        self.io = IOStats()  # where the evaluations' time goes (report "stages"), expert-group transfers included
        self.ck, self.weights, self.space, self.data = ck, weights, space, data
        self.adapter = ck.adapter
        self.device, self.dtype, self.top_k, self.batch_size = torch.device(device), dtype, top_k, batch_size
        self.progress = progress
        self.skel = ModelSkeleton(ck.config, ck.adapter, experts=resolve_experts_impl(experts, self.device))
        self.inputs_for = LayerInputsCache(self.skel, self.device)
        self.cache = ActivationCache(root)
        # the candidates' hidden states stay in memory (on the compute device) as far as the budget
        # leaves room beside the planned peak, the least recently used going to disk beyond that
        # (``ActivationCache.put``); a stream on disk from an earlier run is read from there
        held = max(0, int(memory_slack(self.device, budget.plan if budget is not None else None) * memory_share))
        self.cache.hold(held)
        if held and budget is not None and (self.device.type == "cuda" or budget.plan.device_budget is not None):
            self.accountant.add(held)  # device memory, for the whole search
        if budget is not None and self.device.type == "cuda":
            self.accountant.add(budget.plan.blas_workspace_bytes)  # the cuBLAS workspace of the evaluating thread
        self.num_chunks = (data.input_ids.shape[0] + batch_size - 1) // batch_size
        self.moe = set(ck.moe_layers())
        self._head: Head | None = None
        self._cand_cfg = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._pool: StagingPool | None = None
        self._positions: dict[int, torch.Tensor] = {}  # chunk -> flat indices of the positions fitness scores
        self._live: dict[int, torch.Tensor | None] = {}  # chunk -> flat indices of the positions it depends on
        self.trim = trim  # MoE blocks only on those positions (False: every position, bit-exact to the whole model)
        self._final: dict[str, Fitness] = {}  # final-stream key -> fitness (same function, same value)
        self.stats = {"layer_loads": 0, "layer_builds": 0, "layer_runs": 0, "layer_runs_saved": 0, "evaluations": 0}
        self.files = None  # the shards, where a sourced budget reads each candidate's experts
        if budget is not None:
            self.stats.update(chunked_blocks=0, chunked_layers=budget.chunked_layers, accounted_peak_bytes=0,
                              device_budget_bytes=budget.plan.device_budget)
            if budget.plan.max_ram is not None:  # freed buffers go back to the OS, as in a prune's pass
                self.stats["malloc_mmap_threshold"] = return_freed_memory()
            if budget.sourced and budget.quant != getattr(weights, "mode", "none"):
                raise ValueError(f"the population budget reads experts for --quant {budget.quant}, the weights are "
                                 f"--quant {getattr(weights, 'mode', 'none')}")
            if budget.sourced:  # the checkpoint's shards, or the --quant cache's files
                self.files = ShardFiles(ck.path if budget.quant == "none" else weights.root)
                self.stats.update(sourced=True, source_reads=0, planned_host_peak_bytes=budget.plan.host_peak_bytes)
        if not self.cache.has(0, self.num_chunks, ROOT):
            self._embed()

    def buffer(self, name: str, shape: tuple, dtype, host: bool = False, pin: bool = True) -> torch.Tensor:
        """A tensor kept for reuse under ``name`` (its contents are the caller's; one user at a time);
        ``host``: in host memory (pinned when the compute device is a GPU, for async copies, unless
        ``pin`` is False: a host buffer never copied to the device)."""
        b = self._buffers.get(name)
        if b is None or tuple(b.shape) != tuple(shape) or b.dtype != dtype:
            if host:
                b = torch.empty(shape, dtype=dtype, pin_memory=pin and self.device.type == "cuda")
            else:
                b = torch.empty(shape, dtype=dtype, device=self.device)
            self._buffers[name] = b
        return b

    def staging_pool(self) -> StagingPool:
        """The one host buffer a candidate's expert group is built into when its experts are built a
        group at a time (``PopulationBudget.candidate_groups``; page-locked for a GPU); dropped between
        generations."""
        if self._pool is None:
            self._pool = StagingPool(1, pin=self.device.type == "cuda", stats=self.io)
        return self._pool

    def placement(self, layer_idx: int):
        """Under a budget, how layer ``layer_idx`` is built (``budget.PopulationBudget``); else None."""
        return None if self.budget is None else self.budget.layers.get(layer_idx)

    def track(self, obj, nbytes: int):
        """Count ``nbytes`` of device memory against the budget while ``obj`` lives; returns ``obj``."""
        if self.budget is not None:
            self.accountant.track(obj, nbytes)
        return obj

    def candidate_config(self):
        """The transformers config of a candidate's layer: E' experts, top-k (made once)."""
        if self._cand_cfg is None:
            self._cand_cfg = layer_config(self.skel, self.space.keep, self.top_k)
        return self._cand_cfg

    # ---- keys ----------------------------------------------------------------------------
    def prefix_keys(self, cand: Candidate) -> list[str]:
        """Stream name at every boundary 0..n: a hash of the candidate's plan on the layers before it."""
        keys, key = [ROOT], ROOT
        for L in range(self.ck.num_layers):
            if L in self.moe:
                g = self.space.group_of(L)
                key = hashlib.sha1(key.encode() + f"|{L}|".encode() + cand.group_bytes(g)).hexdigest()[:20]
            keys.append(key)
        return keys

    # ---- compute -------------------------------------------------------------------------
    def _embed(self) -> None:
        key = "model.embed_tokens.weight"
        with self.io.stage("embed"):
            w = self.ck.read([key])[key].to(self.device, self.dtype)
            self.track(w, w.numel() * w.element_size())
            for c, sl in self.data.batches(self.batch_size):
                self.cache.put(0, c, torch.nn.functional.embedding(self.data.input_ids[sl].to(self.device), w), ROOT)

    @torch.no_grad()
    def _run(self, loaded: LoadedLayer, block, src: str, dst: str) -> None:
        """The stream ``src``'s chunks through layer ``loaded`` with ``block`` as its MoE block, into
        ``dst``. A block whose experts visit the device in several groups takes its chunks in waves of
        the plan's ``wave_chunks`` (``experts.run_wave``, experts-major): each group is brought to the
        device (or, ``PopulationBudget.candidate_groups``, built) once per wave, and every chunk's rows
        routed to it run there."""
        L = loaded.idx
        last = L == self.ck.num_layers - 1
        checks = FiniteChecks()  # read once the layer's chunks are queued: no wait per chunk
        io = self.io
        experts = getattr(block, "experts", None)
        wave = self.budget.wave_chunks if getattr(experts, "defers", False) else 1

        def compute(c: int, sl: slice, h: torch.Tensor) -> torch.Tensor:
            module = loaded.use(block)
            if self.trim and loaded.is_moe:
                # after the last layer only the scored positions are read; before it, every position up to them
                index = self._flat_positions(c, sl, h) if last else self._live_positions(c, sl, h)
                module = loaded.use(block if index is None else
                                    TokenSubset(block if block is not None else loaded.base, index))
            return run_layer(self.skel, module, L, h, self.inputs_for(h))

        written = 0.0  # seconds caching outputs (inside a wave, apart from its compute)

        def done(c: int, out: torch.Tensor) -> None:
            nonlocal written
            t0 = time.perf_counter()
            self.cache.put(L + 1, c, out, dst, checks=checks)
            spent = time.perf_counter() - t0
            io.add_stage("cache_write", spent)
            written += spent

        batches = list(self.data.batches(self.batch_size))
        for at in range(0, len(batches), wave):
            part = []
            for c, sl in batches[at:at + wave]:
                with io.stage("cache_read"):
                    part.append((c, sl, self.cache.read(L, c, src, device=self.device).to(self.dtype)))
            if len(part) == 1:
                (c, sl, h), = part
                del part
                with io.stage("compute"):
                    out = compute(c, sl, h)
                del h
                done(c, out)
                del out
                continue
            fns = [(lambda c=c, sl=sl, h=h: compute(c, sl, h)) for c, sl, h in part]
            order = [c for c, _, _ in part]
            del part
            held = self.accountant.add((len(order) - 1) * self.budget.plan.wave_chunk_bytes)  # the waiting chunks
            t0, before = time.perf_counter(), written
            try:
                run_wave(fns, on_done=lambda i, o: done(order[i], o))  # each output cached as its chunk ends
            finally:
                self.accountant.release(held)
                io.add_stage("compute", time.perf_counter() - t0 - (written - before))
            del fns
        with io.stage("compute"):  # the host's one wait for the layer's kernels (CUDA)
            checks.raise_first()
        self.stats["layer_runs"] += 1

    def _flat_positions(self, c: int, sl: slice, h: torch.Tensor) -> torch.Tensor:
        if c not in self._positions:
            b, t = self.data.positions(sl)
            self._positions[c] = (b * h.shape[1] + t).to(self.device)
        return self._positions[c]

    def _live_positions(self, c: int, sl: slice, h: torch.Tensor) -> torch.Tensor | None:
        """Flat indices of the chunk's positions fitness depends on; None when that is all of them."""
        if c not in self._live:
            b, t = self.data.live_positions(sl)
            self._live[c] = None if len(t) == h.shape[0] * h.shape[1] else (b * h.shape[1] + t).to(self.device)
        return self._live[c]

    def build_layer(self, layer_idx: int, tensors: dict[str, torch.Tensor], cand: Candidate | None):
        """Layer ``layer_idx`` as the written model will have it (``cand`` None: a dense layer), built
        from scratch with ``apply_layer``: the reference path (``evaluate`` uses ``LoadedLayer``)."""
        if cand is None or layer_idx not in self.moe:
            rt = self.adapter.to_runtime(layer_idx, tensors, layer_idx in self.moe)
            return materialize_layer(self.skel, layer_idx, rt, self.device, self.dtype)
        out = apply_layer(self.adapter, layer_idx, tensors, self.space.layer_plan(cand, layer_idx), self.ck.num_experts)
        self.stats["layer_builds"] += 1
        return materialize_layer(self.skel, layer_idx, self.adapter.to_runtime(layer_idx, out, True), self.device,
                                 self.dtype, num_experts=self.space.keep, top_k=self.top_k)

    @torch.no_grad()
    def _fitness(self, stream: str) -> Fitness:
        with self.io.stage("fitness"):
            return self._head_fitness(stream)

    def _head_fitness(self, stream: str) -> Fitness:
        if self._head is None:
            self._head = Head(self.ck, self.skel, self.device, self.dtype)
            self.track(self._head, self._head.weight.numel() * self.elem_bytes)
        rows = []
        n = self.ck.num_layers
        for c, sl in self.data.batches(self.batch_size):
            h = self.cache.read(n, c, stream, device=self.device).to(self.dtype)
            # the head on the scored positions only
            rows += self.data.score_positions(self._head(h.reshape(-1, h.shape[-1])[self._flat_positions(c, sl, h)]), sl)
        return self.data.aggregate(rows)

    def evaluate(self, cands: list[Candidate]) -> list[Fitness]:
        """Fitness of every candidate, in one pass over the layers."""
        n = self.ck.num_layers
        keys = [self.prefix_keys(c) for c in cands]
        todo = [i for i, k in enumerate(keys) if k[n] not in self._final]
        # where each candidate starts: the deepest boundary already on disk (its own prefix)
        start = {}
        for i in todo:
            start[i] = self._start(keys[i])
            self.stats["layer_runs_saved"] += start[i]
        first = min(start.values(), default=n)
        layers = progress_bar(range(first, n), n - first, f"evaluate {len(todo)}", self.progress and bool(todo))
        for L in layers:
            # distinct output streams needed at boundary L+1, with the input stream they read
            jobs: dict[str, tuple[str, int]] = {}
            for i in todo:
                if start[i] <= L and keys[i][L + 1] not in jobs and not self.cache.has(L + 1, self.num_chunks, keys[i][L + 1]):
                    jobs[keys[i][L + 1]] = (keys[i][L], i)
            if not jobs:
                continue
            # the previous layer's merge buffer is not needed while this one is read and loaded
            for name in [b for b in self._buffers if b.startswith("merged:")]:
                del self._buffers[name]
            if self.budget is not None:  # nor, under a budget, the buffers of the other kind of layer
                chunked = (self.placement(L) or _WHOLE).chunked
                for name in [b for b in self._buffers if b.startswith("host:") != chunked]:
                    del self._buffers[name]
            with self.io.stage("read"):
                if self.budget is not None and self.budget.sourced:  # experts located, not read
                    tensors = (read_lazy_layer(self.ck, self.files, L) if self.budget.quant == "none"
                               else self.weights.lazy_layer(L, self.files))
                else:
                    tensors = self.weights.layer(L)
            with self.io.stage("materialize"):
                loaded = LoadedLayer(self, L, tensors)
            del tensors
            self.stats["layer_loads"] += 1
            # jobs with the same plan for this layer (streams that differ only before it) share one built block
            by_plan: dict[bytes, list[tuple[str, str, int]]] = {}
            for dst, (src, i) in jobs.items():
                plan = cands[i].group_bytes(self.space.group_of(L)) if loaded.is_moe else b""
                by_plan.setdefault(plan, []).append((dst, src, i))
            for group in by_plan.values():
                block = None
                if loaded.is_moe:
                    with self.io.stage("build"):
                        block = loaded.block(self.space.layer_plan(cands[group[0][2]], L))
                    self.stats["layer_builds"] += 1
                for dst, src, _ in group:
                    self._run(loaded, block, src, dst)
                loaded.use(None)  # the module lets go of the block before the next one is built
                if isinstance(getattr(block, "experts", None), ChunkedExperts):
                    block.experts.release()  # its groups' device copies and staging buffer, now
                del block
            del loaded
            faults.point("eep-evaluate")
        for i in todo:
            k = keys[i][n]
            if k not in self._final:
                self._final[k] = self._fitness(k)
                self.stats["evaluations"] += 1
        if self.budget is not None:  # nothing stays on the device (or pinned) between generations
            self._head = None
            self._buffers.clear()
            self._pool = None
            self.stats["accounted_peak_bytes"] = self.accountant.peak
        c = self.cache
        self.stats["activations"] = {"memory_limit_bytes": c.memory_limit, "memory_peak_bytes": c.memory_peak,
                                     "disk_bytes_written": c.bytes_written, "spilled_bytes": c.spilled_bytes}
        return [self._final[k[n]] for k in keys]

    def _start(self, keys: list[str]) -> int:
        """The deepest boundary of a candidate's streams already on disk (0: the embeddings)."""
        b = self.ck.num_layers
        while b > 0 and not self.cache.has(b, self.num_chunks, keys[b]):
            b -= 1
        return b

    def needs(self, cands: list[Candidate]) -> list[list[str]]:
        """Per candidate, the streams ``evaluate`` would compute for it here ("boundary:name", those
        past its deepest cached boundary; none once its fitness is known): what a run on several
        processes weighs to send a child where its parent's streams are (``engine.dist.assign``)."""
        n = self.ck.num_layers
        out = []
        for c in cands:
            keys = self.prefix_keys(c)
            out.append([] if keys[n] in self._final else [f"{b}:{keys[b]}" for b in range(self._start(keys) + 1, n + 1)])
        return out

    def boundary_bytes(self) -> int:
        """Disk bytes of one stream at one boundary: every fitness token's hidden state."""
        n, s = self.data.input_ids.shape
        return n * s * int(self.ck.config["hidden_size"]) * torch.tensor([], dtype=self.dtype).element_size()

    def retain(self, cands: list[Candidate], max_bytes: int | None = None) -> int:
        """Keep only the streams of ``cands`` (best first), plus the embeddings, in memory and on
        disk, adding candidates while their streams fit in ``max_bytes``; returns the bytes kept."""
        keep = {(ROOT, 0)}
        per = self.boundary_bytes()
        for c in cands:
            more = {(k, b) for b, k in enumerate(self.prefix_keys(c))} - keep
            if max_bytes is not None and (len(keep) + len(more)) * per > max_bytes:
                break
            keep |= more
        total = 0
        for sdir in list(self.cache.root.iterdir()) if self.cache.root.exists() else []:
            for bdir in list(sdir.iterdir()):
                b = int(bdir.name[1:])
                if (sdir.name, b) in keep:
                    total += sum(f.stat().st_size for f in bdir.iterdir())
                else:
                    shutil.rmtree(bdir, ignore_errors=True)
            if not any(sdir.iterdir()):
                sdir.rmdir()
        self.cache.forget(lambda k: (k[0], k[1]) not in keep)
        return total + self.cache.memory_bytes


class WholeModelEvaluator:
    """Reference / baseline: every tensor of the model in memory, candidates one at a time.

    Per candidate: apply its plan to every MoE layer (the same ``apply_layer`` as the writer),
    build the ``*ForCausalLM`` with E' experts and top-k with transformers, run every fitness
    sequence through it, score the logits."""

    def __init__(self, ck: Checkpoint, space: SearchSpace, data: FitnessData, *, device="cpu", dtype=torch.float32,
                 top_k: int, batch_size: int = 8, experts: str = "auto"):
        self.ck, self.space, self.data = ck, space, data
        self.device, self.dtype, self.top_k, self.batch_size = torch.device(device), dtype, top_k, batch_size
        self.layers = {L: ck.read_layer(L) for L in range(ck.num_layers)}  # the whole model
        self.other = ck.read(ck.other_keys())
        self.moe = set(ck.moe_layers())
        self.skel = ModelSkeleton(ck.config, ck.adapter, experts=resolve_experts_impl(experts, self.device))

    def model(self, cand: Candidate):
        ad = self.ck.adapter
        state = dict(self.other)
        for L, tensors in self.layers.items():
            moe = L in self.moe
            t = apply_layer(ad, L, tensors, self.space.layer_plan(cand, L), self.ck.num_experts) if moe else tensors
            state.update({ad.layer_prefix(L) + k: v for k, v in ad.to_runtime(L, t, moe).items()})
        return whole_model(self.skel, state, self.device, self.dtype, num_experts=self.space.keep, top_k=self.top_k)

    @torch.no_grad()
    def evaluate_one(self, cand: Candidate) -> Fitness:
        model = self.model(cand)
        rows = []
        for _, sl in self.data.batches(self.batch_size):
            rows += self.data.score_logits(model(self.data.input_ids[sl].to(self.device), use_cache=False).logits, sl)
        return self.data.aggregate(rows)

    def evaluate(self, cands: list[Candidate]) -> list[Fitness]:
        return [self.evaluate_one(c) for c in cands]
