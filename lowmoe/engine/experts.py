"""Stand-ins for transformers' routed-experts module: one class, one routed-rows loop.

A MoE block calls ``experts(hidden (T, H), top_k_index (T, k), top_k_weights (T, k))``; transformers'
eager module loops over the experts hit, runs each one's rows (slot-major, then token) and
``index_add_``s the weighted outputs in ascending expert order. ``RoutedExperts`` is that loop, with
the expert weights coming from elsewhere; the variants differ only in where (``sources``):

* ``ChunkedExperts`` -- the weights stay in (pinned) host memory and visit the device ``group_size``
  experts at a time, the next group copied on a side CUDA stream while this one computes (a layer
  larger than ``--max-vram``, ``budget``);
* ``QuantExperts``   -- each expert's matrices held quantized (NF4/int8) and dequantized one expert
  at a time (``--quant``, ``quant``);
* ``KeptExperts``    -- a selection of another experts module's experts, nothing copied (the EEP
  evaluator's pruning-phase candidates).

Each expert's rows go through the *original* class's forward (``hf.experts_forward``) on a module
holding that expert, and the outputs are summed in ascending expert order, exactly as the original
loop accumulates them: every variant's output is bit-identical to transformers' own module holding
the same weights (tested). When every expert is on the device at once (a ``ChunkedExperts`` of one
group), the call is simply the original class's forward on that module (``RoutedExperts.whole``):
transformers' own loop, without a per-expert dispatch of ours. ``MoeProbe`` hooks and patches these modules like the original one.

When the original module computes its experts with a grouped GEMM (``--experts-impl grouped``,
``hf.experts_run_grouped``), its output is each (token, top-k slot)'s expert output, weighted, summed
over the slots. The variants then run one call per module of ``sources`` (a group of experts, not one
expert) over the slots routed to it, with unit weights, into a (tokens x k, hidden) buffer, and weight
and sum it the way the grouped forward does (``SlotOutputs``): the same experts hit, the same per-slot
arithmetic, and the original module's result to rounding. Not always to the bit: transformers' grouped
forward orders an expert's rows by an unstable sort of the whole call's routing, and on a CPU a GEMM's
bits depend on a row's position in it (so the module's own result for a token moves with the batch).
"""

from __future__ import annotations

import itertools
import logging
import threading
import time
from concurrent.futures import Executor, Future
from typing import Iterator

import torch
from torch import nn

from .device import dtype_bytes
from .hf import experts_forward, experts_run_grouped, experts_subset
from .lazy import StagingPool
from .memory import Accountant
from .prefetch import DeviceStager, IOStats

log = logging.getLogger(__name__)


def hit_experts(top_k_index: torch.Tensor, num_experts: int) -> list[int]:
    """The experts at least one row is routed to, ascending (``num_experts`` is transformers' "no expert" sentinel)."""
    with torch.no_grad():
        return [e for e in torch.unique(top_k_index).tolist() if 0 <= e < num_experts]


def run_routed_rows(forward, module: nn.Module, hidden_states: torch.Tensor, slot_major: torch.Tensor,
                    top_k_weights: torch.Tensor, expert: int, local: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The rows routed to ``expert``, in transformers' loop order (``slot_major`` is ``top_k_index`` (k, T):
    slot-major, then token), through the experts class's own ``forward`` on ``module``, which holds that
    expert at index ``local``. Returns (token rows, weighted f_e of those rows) for ``index_add_``."""
    pos, tok = torch.where(slot_major == expert)
    idx = torch.full((tok.shape[0], 1), local, dtype=slot_major.dtype, device=slot_major.device)
    w = top_k_weights[tok, pos].unsqueeze(-1)  # (n, 1)
    return tok, forward(module, hidden_states[tok], idx, w)  # (n, H)


class RoutedExperts(nn.Module):
    """Transformers' experts loop over weights held elsewhere (see the module docstring).

    ``template`` is the original experts module (usually on the meta device): its class gives the
    math, its config and activation come along in every per-expert module. Subclasses implement
    ``sources(hit)``: for the hit experts (ascending), the modules to run and which of them holds
    which expert, ``(module, [(expert, local index), ...])``, in the order to compute them."""

    def __init__(self, template: nn.Module, num_experts: int):
        super().__init__()
        # Not registered as a submodule: its (meta) parameters must not be seen by to_empty/state_dict.
        object.__setattr__(self, "_template", template)
        object.__setattr__(self, "_original_forward", experts_forward(template))
        self.num_experts = num_experts
        self.grouped = experts_run_grouped(template)  # per-slot outputs summed, not index_add_ per expert

    def sources(self, hit: list[int]) -> Iterator[tuple[nn.Module, list[tuple[int, int]]]]:
        raise NotImplementedError

    @property
    def defers(self) -> bool:
        """Whether a call made inside an experts-major wave (``run_wave``) waits to be run with the
        wave's other chunks (``run_calls``): a module whose experts visit the device in several groups."""
        return False

    def run_calls(self, calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
        """Several calls ``(hidden, top_k_index, top_k_weights)`` at once, each returning what
        ``forward`` would: one ``forward`` per call (``ChunkedExperts`` runs them experts-major)."""
        return [self.forward(*c) for c in calls]  # on the main thread: never deferred

    def whole(self) -> nn.Module | None:
        """A module of the original class holding every expert (on the device) now, if there is one:
        the call is then transformers' own loop on it, with no per-expert dispatch of ours."""
        return None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        task = getattr(_CURRENT, "task", None)
        if task is not None and self.defers:  # a chunk of an experts-major wave: the call is run by ``run_wave``
            return task.suspend((self, hidden_states, top_k_index, top_k_weights))
        whole = self.whole()
        if whole is not None:
            return self._original_forward(whole, hidden_states, top_k_index, top_k_weights)
        if self.grouped:
            slots = SlotOutputs(hidden_states, top_k_index, top_k_weights, self.num_experts)
            for module, experts in self.sources(slots.hit):
                slots.run(self._original_forward, module, experts)
            return slots.combine()
        hit = hit_experts(top_k_index, self.num_experts)
        slot_major = top_k_index.transpose(0, 1)  # (k, T): transformers' expert_mask[e] layout
        outputs: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for module, experts in self.sources(hit):
            for e, local in experts:
                outputs[e] = run_routed_rows(self._original_forward, module, hidden_states, slot_major, top_k_weights, e, local)
        final = torch.zeros_like(hidden_states)
        for e in sorted(outputs):  # ascending, as the original loop sums
            tok, y = outputs[e]
            final.index_add_(0, tok, y.to(final.dtype))
        return final


class SlotOutputs:
    """One call's routed rows for experts computed with a grouped GEMM: each module of ``sources`` runs
    once over every (token, slot) routed to the experts it holds, with unit weights (``run``), into
    a (T*k, H) buffer of unweighted slot outputs; ``combine`` weights and sums them over the k slots,
    as transformers' grouped forward does (``weighted.view(T, k, H).sum(1)``, in the experts' dtype,
    then the hidden states' dtype). The experts' weights are in the hidden states' dtype (lowmoe
    computes in one dtype), so a slot output is the grouped forward's own arithmetic on that row (its
    bits can differ by the row's position in the expert's GEMM: module docstring). Rows routed to no
    expert (transformers' ``num_experts`` sentinel) stay zero.

    The host reads the routing once per call: the rows are sorted by expert (stable) and the count of
    each expert's rows comes back in one copy (``hit``, and each module's slice of the sorted rows),
    instead of a ``unique`` for the hit experts and a ``nonzero`` per module, each a wait on a GPU.
    A module still gets its rows in ascending order, as a ``nonzero`` gave them."""

    def __init__(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor,
                 num_experts: int):
        self.hidden, self.weights = hidden_states, top_k_weights
        self.t, self.k = top_k_index.shape
        self.flat = top_k_index.reshape(-1).clamp(0, num_experts)  # (T*k,), token-major as the grouped forward
        self.num_experts = num_experts
        self.out = hidden_states.new_zeros((self.t * self.k, hidden_states.shape[-1]))
        self.order = torch.sort(self.flat, stable=True).indices  # (T*k,): rows by expert, ascending in each
        # rows per expert (bincount would also read its input's max, a second wait on CUDA)
        counts = torch.zeros(num_experts + 1, dtype=torch.long, device=self.flat.device)
        self.counts = counts.scatter_add_(0, self.flat, torch.ones_like(self.flat)).tolist()  # the one host read
        self.starts = [0, *itertools.accumulate(self.counts)]  # expert e's rows: order[starts[e]:starts[e + 1]]

    @property
    def hit(self) -> list[int]:
        """The experts at least one row is routed to, ascending (``hit_experts`` without another read)."""
        return [e for e in range(self.num_experts) if self.counts[e]]

    def run(self, forward, module: nn.Module, experts: list[tuple[int, int]]) -> None:
        """The slots routed to ``experts`` ((expert, index in ``module``) pairs) through ``module``."""
        pieces = [(self.order[self.starts[e]:self.starts[e + 1]], local) for e, local in experts if self.counts[e]]
        if not pieces:
            return
        dev = self.flat.device
        rows, perm = torch.cat([r for r, _ in pieces]).sort()  # ascending: the rows in call order
        local = torch.cat([torch.full((r.shape[0],), i, dtype=self.flat.dtype, device=dev) for r, i in pieces])[perm]
        ones = torch.ones((rows.shape[0], 1), dtype=self.weights.dtype, device=self.weights.device)
        y = forward(module, self.hidden[rows // self.k], local.unsqueeze(1), ones)
        self.out.index_copy_(0, rows, y.to(self.out.dtype))

    def combine(self) -> torch.Tensor:
        weighted = self.out * self.weights.reshape(-1, 1)
        return weighted.view(self.t, self.k, -1).sum(dim=1).to(self.hidden.dtype)


class HostExperts:
    """An expert source over tensors already in memory (experts-module parameter name -> (E, ...))."""

    def __init__(self, host: dict[str, torch.Tensor]):
        E = {v.shape[0] for v in host.values()}
        if len(E) != 1:
            raise RuntimeError(f"expert tensors disagree on the expert count: {sorted(E)}")
        self.num_experts = E.pop()
        self.names = list(host)
        self._host = host

    def expert_numel(self) -> int:
        return sum(v[0].numel() for v in self._host.values())

    def load(self, a: int, z: int, out=None) -> dict[str, torch.Tensor]:
        return {n: v[a:z] for n, v in self._host.items()}

    def decode(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        return tensors


def stage_group(stager: DeviceStager, host: dict[str, torch.Tensor], buf: int | None, pool: StagingPool | None,
                dtype: torch.dtype, *, check_finite: bool = False):
    """A group of experts read into host memory (``buf``: the staging-pool buffer holding it, or None)
    copied to the device and cast (``DeviceStager.stage``): ``(Staged, buf)``, ``buf`` None when the
    buffer is free again (a CPU cast made new tensors); the copy is read with ``Staged.wait``."""
    staged = stager.stage(host, dtype, check_finite=check_finite)
    if buf is not None and stager.device.type != "cuda" and not _aliases(staged.tensors, host):
        pool.release(buf)  # cast into new tensors: the buffer is free again
        buf = None
    return staged, buf


def stage_preloaded(source, a: int, z: int, stager: DeviceStager, dtype: torch.dtype, pool: StagingPool | None):
    """Experts ``a..z-1`` of ``source`` (``lazy.ExpertSource``), preloaded by the layer reader, staged for
    the device (``stage_group``); read now if the preload is gone. Runs on the expert loader thread."""
    pre = source.take_preloaded(a, z)
    if pre is None:
        return stage_group(stager, source.load(a, z), None, pool, dtype)
    buf, host = pre
    return stage_group(stager, host, buf, pool, dtype)  # checked for NaN/Inf as it was read


def _aliases(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(a[k].data_ptr() == b[k].data_ptr() for k in a if k in b and a[k].numel())


class ChunkedExperts(RoutedExperts):
    """The routed experts' weights in host memory (``host``: experts-module parameter name -> (E, ...)
    tensor, pinned on CUDA), moved to the device ``group_size`` experts at a time.

    The last group stays resident, and the group order "snakes" (starts from the resident one) so
    consecutive calls reuse it. With ``double_buffer`` the next group is staged while the current
    one computes (two groups on the device); without, one group at a time."""

    def __init__(self, template: nn.Module, host: dict[str, torch.Tensor] | None = None, *, group_size: int, device, dtype,
                 double_buffer: bool = True, accountant: Accountant | None = None, stats: IOStats | None = None,
                 source=None, pool: StagingPool | None = None, loader: Executor | None = None):
        names = list(template._parameters)
        if source is None:
            source = HostExperts(host)
        have = set(source.names)
        missing = [n for n in names if n not in have]
        if missing or have - set(names):
            raise RuntimeError(f"expert tensors do not fit {type(template).__name__}: missing {missing}, "
                               f"unexpected {sorted(have - set(names))}")
        super().__init__(template, source.num_experts)
        self.group_size = max(1, min(int(group_size), self.num_experts))
        self.double_buffer = double_buffer
        self.device, self.dtype = torch.device(device), dtype
        self._source = source
        self._pool = pool
        self._loader = loader  # where groups are read and staged (a background thread), else inline
        self._acct = accountant or Accountant()
        self._stats = stats if stats is not None else IOStats()
        self._stager = DeviceStager(self.device, self._stats, kind="experts")
        self._resident: tuple[int, nn.Module, int] | None = None  # (group id, module, accountant token)
        self._staged: dict[int, tuple[object, int]] = {}
        self._buffers: dict[int, int] = {}  # group -> staging-pool buffer it still uses
        self.group_loads = 0  # how many groups were moved to the device (for tests and the report)
        self._per_expert_bytes = source.expert_numel() * dtype_bytes(dtype)

    def extra_repr(self) -> str:
        return f"{type(self._template).__name__}, num_experts={self.num_experts}, group_size={self.group_size}"

    @property
    def num_groups(self) -> int:
        return -(-self.num_experts // self.group_size)

    def _range(self, g: int) -> tuple[int, int]:
        return g * self.group_size, min((g + 1) * self.group_size, self.num_experts)

    def _stage(self, g: int) -> None:
        """Start bringing group ``g`` to the device: read (or take the preloaded copy), then copy and
        cast -- on the loader thread when there is one, so it overlaps the group computing now."""
        if g in self._staged or (self._resident is not None and self._resident[0] == g):
            return
        a, z = self._range(g)
        pre = self._source.take_prestaged(a, z) if hasattr(self._source, "take_prestaged") else None
        if pre is not None:  # staged while the previous layer computed (``Placer.stage_next``), its bytes counted then
            self._staged[g] = pre
            self.group_loads += 1
            return
        token = self._acct.add((z - a) * self._per_expert_bytes)  # reserved before anything arrives
        if self._loader is not None:
            job = self._loader.submit(self._load, a, z)
        else:
            job = Future()
            job.set_result(self._load(a, z))
        self._staged[g] = (job, token)
        self.group_loads += 1

    def _load(self, a: int, z: int):
        """Experts ``a..z-1`` read into host memory and staged for the device: ``(Staged, pool buffer)``."""
        buf = None
        with self._stats.stage("expert_read"):
            pre = self._source.take_preloaded(a, z) if hasattr(self._source, "take_preloaded") else None
            if pre is not None:
                buf, host = pre
            elif self._pool is not None and hasattr(self._source, "buffer_shapes"):
                # read straight into a reused (pinned, on CUDA) staging buffer
                if not self._pool.has_free() and hasattr(self._source, "drop_preloaded"):
                    self._source.drop_preloaded()  # this layer's read-ahead group, not hit yet: read it later
                buf, views = self._pool.acquire(self._source.buffer_shapes(z - a))
                try:
                    host = self._load_host(a, z, views)
                except BaseException:
                    self._pool.release(buf)
                    raise
            else:
                host = self._load_host(a, z, None)
        return stage_group(self._stager, host, buf, self._pool, self.dtype, check_finite=self._checks_on_device)

    @property
    def _checks_on_device(self) -> bool:
        # On CUDA, NaN/Inf in the weights is looked for on the device, after the copy (a pass over the
        # group on the host would slow the thread reading the disk); on the CPU while reading.
        return self.device.type == "cuda" and hasattr(self._source, "check_finite")

    def _load_host(self, a: int, z: int, views) -> dict[str, torch.Tensor]:
        if self._checks_on_device:
            return self._source.load(a, z, views, check=False)
        return self._source.load(a, z) if views is None else self._source.load(a, z, views)

    def _take(self, g: int) -> nn.Module:
        if self._resident is not None and self._resident[0] == g:
            return self._resident[1]
        self._stage(g)
        job, token = self._staged.pop(g)
        t0 = time.perf_counter()
        try:
            staged, buf = job.result()  # re-raises the loader's error here
        except BaseException:
            self._acct.release(token)
            raise
        self._stats.add_wait("experts", time.perf_counter() - t0)
        if buf is not None:  # freed with the group (on CUDA once the copy out of it is done)
            self._buffers[g] = (buf, staged.event)
        a, z = self._range(g)
        tensors = staged.wait()
        finite = staged.finite
        if finite is not None and staged.finite_ready is not None:
            staged.finite_ready.synchronize()  # computed on the side stream: wait for that, not for the main stream
        if finite is not None and not bool(finite):
            self._acct.release(token)
            self._source.check_finite(a, z)  # raises, naming the tensor
        # a quantized source's group arrives as stored bytes and is dequantized here, on the device
        sub = experts_subset(self._template, self._source.decode(tensors, self.dtype), z - a)
        self._evict()
        self._resident = (g, sub, token)
        return sub

    def _evict(self) -> None:
        if self._resident is not None:
            g = self._resident[0]
            self._acct.release(self._resident[2])
            self._resident = None
            self._free_buffer(g)

    def _free_buffer(self, g: int) -> None:
        held = self._buffers.pop(g, None)
        if held is not None:
            buf, copied = held
            if copied is not None:
                copied.synchronize()  # the side-stream copy out of the buffer is done (nothing else waited for)
            self._pool.release(buf)

    def resident_whole(self) -> nn.Module | None:
        """The module holding every expert on the device now (one group, resident), else None: the
        pruned layer of a sequential pass then runs its kept experts from it (``KeptExperts``), without
        reading or copying them again."""
        if self.num_groups != 1 or self._resident is None:
            return None
        return self._resident[1]

    def release(self, wait: bool = True) -> None:
        """Free the device copies (also done when the module is garbage-collected). A group still
        arriving is waited for (``wait``), or freed by the loader when it lands."""
        self._evict()
        for g, (job, token) in list(self._staged.items()):
            self._acct.release(token)
            if wait or job.done():
                self._free_landed(job)
            else:
                job.add_done_callback(self._free_landed)
        self._staged.clear()
        pre = self._source.drop_prestaged() if hasattr(self._source, "drop_prestaged") else None
        if pre is not None:  # the first group staged ahead, never asked for
            self._acct.release(pre[1])
            pre[0].add_done_callback(self._free_landed)
        drop = getattr(self._source, "drop_preloaded", None)
        if drop is not None:
            drop()  # a group read ahead for this layer that no chunk asked for

    def _free_landed(self, job: Future) -> None:
        try:
            staged, buf = job.result()
        except BaseException:
            return
        if buf is not None:
            if staged.event is not None:
                staged.event.synchronize()
            self._pool.release(buf)

    def __del__(self):
        try:
            self.release(wait=False)  # never block a garbage collection (it may run on the loader thread)
        except Exception:
            pass

    def whole(self) -> nn.Module | None:
        return self._take(0) if self.num_groups == 1 else None

    @property
    def defers(self) -> bool:
        return self.num_groups > 1

    def run_calls(self, calls):
        """The calls of several activation chunks, experts-major: each hit group is brought to the device
        once and every chunk's rows routed to it run there, before the next group. Each chunk's output
        is summed in ascending expert order (groups ascending, experts ascending inside a group), the
        order of ``forward``'s ``index_add_`` -- bit-identical to calling ``forward`` once per chunk.
        Grouped experts: each group runs once per chunk over the chunk's slots routed to it (``SlotOutputs``)."""
        if self.grouped:
            waves = [(slots, set(slots.hit)) for slots in (SlotOutputs(hidden, idx, w, self.num_experts)
                                                           for hidden, idx, w in calls)]
            for sub, experts in self.sources(sorted(set().union(*(h for _, h in waves))), snake=False):
                for slots, chunk_hit in waves:
                    slots.run(self._original_forward, sub, [(e, local) for e, local in experts if e in chunk_hit])
            return [slots.combine() for slots, _ in waves]
        prepared = [(hidden, top_k_index.transpose(0, 1), top_k_weights, set(hit_experts(top_k_index, self.num_experts)),
                     torch.zeros_like(hidden)) for hidden, top_k_index, top_k_weights in calls]
        hit = sorted(set().union(*(p[3] for p in prepared)))
        for sub, experts in self.sources(hit, snake=False):  # groups ascending, experts ascending in each
            for e, local in experts:
                for hidden, slot_major, weights, chunk_hit, final in prepared:
                    if e in chunk_hit:
                        tok, y = run_routed_rows(self._original_forward, sub, hidden, slot_major, weights, e, local)
                        final.index_add_(0, tok, y.to(final.dtype))
        return [p[4] for p in prepared]

    def sources(self, hit, snake: bool = True):
        """The groups holding ``hit``, each brought to the device in turn: from the resident one on
        (``snake``: consecutive calls reuse it), else ascending."""
        G = self.group_size
        groups = sorted({e // G for e in hit})
        if snake and self._resident is not None and self._resident[0] in groups:
            i = groups.index(self._resident[0])
            groups = groups[i:] + groups[:i]
        for j, g in enumerate(groups):
            if not self.double_buffer and self._resident is not None and self._resident[0] != g:
                self._evict()  # room for one group only: free it before the next one arrives
            sub = self._take(g)
            if self.double_buffer and j + 1 < len(groups):
                self._stage(groups[j + 1])  # copies while this group computes
            a, z = self._range(g)
            yield sub, [(e, e - a) for e in hit if a <= e < z]


class LazyExperts(ChunkedExperts):
    """``ChunkedExperts`` whose groups are read from the checkpoint when needed (``lazy.ExpertSource``):
    a group is read into a ``lazy.StagingPool`` buffer in runtime layout, cast/copied to the compute
    device, and dropped when the next group replaces it -- the layer's experts are never all in host
    memory. ``source.subset(keep)`` builds a pruned layer's experts from the same shards."""

    def __init__(self, template: nn.Module, source, *, group_size: int, device, dtype, pool: StagingPool | None = None,
                 double_buffer: bool = True, accountant: Accountant | None = None, stats: IOStats | None = None,
                 loader: Executor | None = None):
        super().__init__(template, None, group_size=group_size, device=device, dtype=dtype, double_buffer=double_buffer,
                         accountant=accountant, stats=stats, source=source, pool=pool, loader=loader)


class QuantExperts(RoutedExperts):
    """The routed experts with their 3-D matrices held quantized (``quantized``: parameter name -> one
    ``quant.QTensor`` per expert), each hit expert dequantized on its own into a one-expert module
    right before its rows run, so only one expert is ever held in full precision. Parameters that are
    not 3-D (GPT-OSS's expert biases) stay exact, as parameters of this module."""

    def __init__(self, template: nn.Module, quantized: dict, dtype: torch.dtype):
        super().__init__(template, len(next(iter(quantized.values()))))
        self._q = quantized
        self.dtype = dtype
        for name, p in template._parameters.items():
            if name not in quantized:
                self.register_parameter(name, p)  # filled by hf.materialize

    def extra_repr(self) -> str:
        mode = next(iter(self._q.values()))[0].mode
        return f"{type(self._template).__name__}, num_experts={self.num_experts}, quant={mode}"

    @property
    def nbytes(self) -> int:
        return sum(q.nbytes for qs in self._q.values() for q in qs)

    def expert_module(self, e: int) -> nn.Module:
        """Expert ``e`` alone, dequantized, as a one-expert module of the original class."""
        params = {n: qs[e].dequantize(self.dtype).unsqueeze(0) for n, qs in self._q.items()}
        params.update({n: p[e:e + 1] for n, p in self._parameters.items()})
        return experts_subset(self._template, params, 1)

    def sources(self, hit):
        for e in hit:
            yield self.expert_module(e), [(e, 0)]


class KeptExperts(RoutedExperts):
    """A pruning-phase candidate's experts: slot j is expert ``keep[j]`` of ``inner`` (another experts
    module: the loaded layer's own, shared, nothing copied). With ``keep`` ascending the experts are
    visited and summed in the same order as a module holding only the kept experts: bit-identical.

    Then (and whatever the order, for grouped experts) a call is one call of ``inner``'s own forward
    with the routing's indices mapped to ``inner``'s (``keep[j]``; the "no expert" sentinel to
    ``inner``'s): transformers' loop or grouped GEMM over the kept experts, no dispatch of ours."""

    def __init__(self, inner: nn.Module, keep: list[int]):
        super().__init__(inner, len(keep))
        self.inner = inner
        self.keep = list(keep)
        inner_n = getattr(inner, "num_experts", None)
        direct = inner_n is not None and (self.grouped or self.keep == sorted(self.keep))
        self._index_map = torch.tensor(self.keep + [inner_n], dtype=torch.long) if direct else None

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        if self._index_map is None:
            return super().forward(hidden_states, top_k_index, top_k_weights)
        if self._index_map.device != top_k_index.device:
            self._index_map = self._index_map.to(top_k_index.device)
        index = self._index_map[top_k_index].to(top_k_index.dtype)
        return self._original_forward(self.inner, hidden_states, index, top_k_weights)

    def sources(self, hit):
        yield self.inner, [(e, self.keep[e]) for e in hit]


# ---- experts-major waves ------------------------------------------------------------------------

_CURRENT = threading.local()  # .task: the ``WaveTask`` the running thread belongs to


class WaveAborted(BaseException):
    """Raised inside a suspended wave chunk to unwind it when the wave stops early (an error elsewhere)."""


class WaveTask:
    """One activation chunk's pass through a layer, run on its own thread as a coroutine: it runs only
    while the main thread waits for it (``step``), and stops at its experts call (``suspend``) until the
    main thread has run that call together with the wave's other chunks (``run_wave``). So the rest of
    the layer (attention, router, shared experts) runs once per chunk, as without waves, and only one
    thread computes at any time."""

    def __init__(self, fn, name: str = "lowmoe-wave"):
        self._fn = fn
        self._go = threading.Event()
        self._paused = threading.Event()
        self.request = None  # (experts module, hidden, top_k_index, top_k_weights) while suspended
        self.reply = None
        self.result = None
        self.error: BaseException | None = None
        self.done = False
        # the CUDA device is per thread: the chunk computes where the caller does (cuda:LOCAL_RANK in a
        # distributed run), not on a new thread's default cuda:0
        self._cuda_device = torch.cuda.current_device() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        self.thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.thread.lowmoe_main = True  # its stages are the main thread's work (``IOStats``)
        self.thread.start()

    def _run(self) -> None:
        self._go.wait()
        self._go.clear()
        _CURRENT.task = self
        try:
            if self._cuda_device is not None:
                torch.cuda.set_device(self._cuda_device)
            if isinstance(self.reply, WaveAborted):
                return  # stopped before it started
            with torch.no_grad():
                self.result = self._fn()
        except BaseException as e:  # handed to the main thread by ``step``
            self.error = e
        finally:
            _CURRENT.task = None
            self.done = True
            self._paused.set()

    def step(self) -> None:
        """Main thread: let the chunk run until it suspends at its experts call or finishes."""
        self._paused.clear()
        self._go.set()
        self._paused.wait()

    def suspend(self, request):
        """Chunk thread: hand ``request`` to the main thread and wait for its reply."""
        self.request = request
        self._paused.set()
        self._go.wait()
        self._go.clear()
        reply, self.reply, self.request = self.reply, None, None
        if isinstance(reply, BaseException):
            raise reply
        return reply

    def abort(self) -> None:
        """Unwind the chunk (suspended or not started) and wait for its thread to end."""
        if not self.done:
            self.reply = WaveAborted()
            self.step()
        self.thread.join()


def run_wave(fns: list, on_done=None) -> None:
    """Run ``fns`` (one activation chunk's layer forward each) experts-major. Each runs until its experts
    call; the calls of every chunk are then run together by the experts module (``RoutedExperts.run_calls``:
    each expert group read and moved to the device once for the whole wave), and each chunk resumes, in
    order, to its end; ``on_done(i, result)`` is called on this thread as chunk ``i`` ends, in chunk order,
    before the next one resumes. A chunk's error is raised here, once the other chunks are unwound."""
    tasks = [WaveTask(fn, name=f"lowmoe-wave-{i}") for i, fn in enumerate(fns)]
    delivered = 0

    def step(t: WaveTask) -> None:
        nonlocal delivered
        t.step()
        if t.error is not None:
            raise t.error
        while delivered < len(tasks) and tasks[delivered].done:
            if on_done is not None:
                on_done(delivered, tasks[delivered].result)
            tasks[delivered].result = None
            delivered += 1

    try:
        for t in tasks:
            step(t)
        while delivered < len(tasks):
            waiting = [t for t in tasks if not t.done]
            by_module: dict[int, list[WaveTask]] = {}
            for t in waiting:
                by_module.setdefault(id(t.request[0]), []).append(t)
            for group in by_module.values():
                outs = group[0].request[0].run_calls([t.request[1:] for t in group])
                for t, out in zip(group, outs):
                    t.reply = out
                del outs
            for t in waiting:
                step(t)  # the rest of its layer (or up to its next experts call)
    finally:
        for t in tasks:
            t.abort()
