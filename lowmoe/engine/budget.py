"""Memory budgets: ``--max-vram`` and ``--max-ram``, planned before the run and held during it.

Where it sits: ``pipeline.prune`` calls ``plan_budget`` right after the option checks, from the
checkpoint index alone (the per-layer sizes ``lowmoe inspect`` prints) and the calibration shape
(batch size x sequence length). A budget that cannot work fails there, in the first second, with
the number it would need. During the run every layer is built through ``Placer.materialize``:

* a layer that fits is built whole on the compute device, as before;
* a layer whose experts do not fit is built with its attention, norms, router and shared experts
  resident and its routed experts replaced by ``ChunkedExperts``: a module that keeps the expert
  weights in (pinned) host memory and, on every forward, moves them to the device in groups of
  ``group_size`` experts -- the next group is copied on a side CUDA stream while the current one
  computes -- and runs transformers' own experts math on each group. This is what a DeepSeek-V3
  layer (256 experts, ~22 GB in bf16) needs on a 24 GB card.

What counts against the device budget (bytes in the compute dtype):

    resident weights  (every tensor of the layer but the routed experts)
  + expert weights    (all of them, or 2 groups when chunked: the one computing + the one arriving)
  + activations       (``activation_bytes``: one chunk of B x S tokens through attention and the
                       experts, with the per-slot expert outputs the scorers use)

``Accountant`` keeps that bookkeeping while the run goes (weights are added when built and removed
when freed), so the report can show the planned and the held peak next to CUDA's own
``max_memory_allocated``. On CPU the compute copy lives in RAM; ``--max-vram`` on a CPU run limits
that copy as if it were a device (a rehearsal of the GPU run's plan: the same layers get chunked).

Host RAM (``--max-ram``) holds the layer as read (stored dtype), its runtime copy (per-expert
checkpoints are stacked into transformers' fused layout), the prefetched next layer, the output
copy of the layer being written, activation chunks in flight and the interpreter. When two layers do not fit, layer
prefetching is turned off; when one does not, the run is refused.

The EEP search's population evaluation plans its own pass with ``plan_population`` (no prefetch, a
candidate's E' experts counted in host RAM) and streams a candidate's experts the same way.

Expert chunking does not change a number: each expert sees the same token rows in the same order
as in transformers' loop, and the outputs are summed over experts in ascending order, exactly as
``index_add_`` in the original module does, so the results are bit-identical (tested).
"""

from __future__ import annotations

import logging
import math
import threading
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn

from ..errors import ConfigError
from .checkpoint import DTYPE_BYTES
from .device import blas_workspace_bytes, dtype_bytes, pinned_bytes, pinned_stats
from .experts import ChunkedExperts, KeptExperts, LazyExperts, stage_preloaded
from .formats import SCRATCH_BYTES
from .hf import layer_config, materialize, moe_modules, split_experts
from .lazy import StagingPool, reads_lazily
from .memory import Accountant, fmt_bytes
from .prefetch import DeviceStager, IOStats
from .quant import BLOCKSIZE, BYTES_PER_PARAM, MIN_NUMEL, QUANT_STEP, cache_rows
from .writer import parse_size

log = logging.getLogger(__name__)

# Python, torch and transformers before any tensor is loaded (as lowmoe.inspect assumes).
HOST_BASE_BYTES = 600 * 10**6
# Head-room for the caching allocator's rounding and small temporaries, as a fraction of the budget.
SAFETY = 0.05


def parse_budget(value, flag: str) -> int | None:
    """``'20GiB'``, ``'500MB'``, a byte count or None -> bytes (ConfigError naming ``flag``)."""
    if value is None or value == "":
        return None
    try:
        n = parse_size(value)
    except ValueError:
        raise ConfigError(f"{flag} {value!r}: expected a size such as 20GiB, 500MB or a byte count") from None
    if n <= 0:
        raise ConfigError(f"{flag} {value!r}: must be a positive size")
    return n


# ---- sizes from the index ------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerSize:
    """One decoder layer's weights, from the index (no tensor is read)."""

    layer_idx: int
    stored_bytes: int  # as read (on disk; a quantized checkpoint's layer: dequantized)
    resident_numel: int  # everything but the routed experts
    expert_numel: int  # one routed expert (0 for a dense layer)
    num_experts: int  # routed experts (0 for a dense layer)

    def resident_bytes(self, b: int) -> int:
        return self.resident_numel * b

    def expert_bytes(self, b: int) -> int:
        return self.expert_numel * b


def _numel(shape) -> int:
    return math.prod(shape) if shape else 1


def layer_sizes(ck) -> list[LayerSize]:
    """Per-layer weight counts: resident part and one routed expert (experts are equal in size)."""
    ad = ck.adapter
    moe = set(ck.moe_layers())
    out = []
    for L in range(ck.num_layers):
        keys = ck.layer_keys(L)
        numel = {k: _numel(ck.tensor_info(k)[0]) for k in keys}
        n_exp = ck.num_experts if L in moe else 0
        expert_keys = ad.routed_expert_keys(L, n_exp) if n_exp else []
        ex = set(expert_keys)
        ex_numel = sum(numel[k] for k in ex if k in numel)
        out.append(LayerSize(L, ck.layer_read_bytes(L), sum(v for k, v in numel.items() if k not in ex),
                             ex_numel // n_exp if n_exp else 0, n_exp))
    return out


def activation_terms(config: dict, *, batch_size: int, seq_len: int, dtype_bytes: int, top_k: int,
                     num_experts: int, grouped: bool = False) -> dict[str, int]:
    """Device bytes of one calibration chunk (B x S tokens) going through one decoder layer, term by term.

    Counted generously: hidden states in/out/residual/norm (~8 T x H), q/k/v/o, attention scores
    and their softmax (B x heads x S x S, twice, as eager/math attention materializes them), the
    float mask, router logits in fp32, one expert's gate/up/act intermediates for all T tokens,
    the per-slot expert outputs (T x k x H, in the compute dtype and fp32) that the scorers read,
    and the per-expert outputs ``ChunkedExperts`` collects before summing.

    ``grouped``: the experts run as transformers' grouped GEMM (``--experts-impl grouped``), which
    computes every (token, slot) row of the call at once: the gate/up projection, the activation and
    its product for T x k rows (4 T k I), and the rows sorted by expert, their down projection,
    weighted and gathered back (``grouped_expert_rows``, 4 T k H) -- where the eager loop holds one
    expert's rows at a time.
    """
    b, T = dtype_bytes, batch_size * seq_len
    H = int(config.get("hidden_size", 0))
    heads = int(config.get("num_attention_heads") or max(1, H // 64))
    head_dim = int(config.get("head_dim") or max(1, H // heads))
    inter = int(config.get("moe_intermediate_size") or config.get("intermediate_size") or 4 * H)
    dense_inter = int(config.get("intermediate_size") or inter)
    k = max(top_k, 1)
    grouped_terms = {"grouped_expert_rows": 4 * T * k * H * b} if grouped else {}
    return {"hidden_states": 8 * T * H * b,
            "attention_qkvo": 4 * T * heads * head_dim * b,
            "attention_scores": 2 * batch_size * heads * seq_len * seq_len * b,
            "attention_mask": batch_size * seq_len * seq_len * b,
            "routing": 2 * T * max(num_experts, 1) * 4,
            "expert_intermediates": max(3 * T * max(inter, dense_inter), 4 * T * k * inter if grouped else 0) * b,
            "expert_slot_outputs": T * k * H * (2 * b + 4), **grouped_terms}


def activation_bytes(config: dict, *, batch_size: int, seq_len: int, dtype_bytes: int, top_k: int, num_experts: int,
                     grouped: bool = False) -> int:
    """The sum of ``activation_terms``: one chunk's activations through one layer."""
    return int(sum(activation_terms(config, batch_size=batch_size, seq_len=seq_len, dtype_bytes=dtype_bytes,
                                    top_k=top_k, num_experts=num_experts, grouped=grouped).values()))


# CUDA's caching allocator rounds every block it hands out up to a multiple of 512 bytes, and
# ``torch.cuda.max_memory_allocated`` counts those rounded blocks (the segments it reserves around
# them are ``max_memory_reserved``, not budgeted here): at most 512 B per live tensor.
ALLOC_ROUND = 512


def allocator_rounding(n_weight_tensors: int, n_activation_tensors: int = 64) -> int:
    """Worst-case bytes lost to the caching allocator's rounding for a layer's live tensors."""
    return (n_weight_tensors + n_activation_tensors) * ALLOC_ROUND


# ---- the plan ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Placement:
    """How one layer is built: whole, or experts in groups of ``group_size``."""

    group_size: int | None  # None = all experts resident
    double_buffer: bool = True  # chunked: the next group arrives while this one computes
    device_bytes: int = 0  # planned peak: weights held + activations

    @property
    def chunked(self) -> bool:
        return self.group_size is not None


def choose_placement(*, resident: int, per_expert: int, num_experts: int, weights_budget: int | None,
                     act: int = 0) -> Placement | None:
    """The largest expert group that fits ``weights_budget`` (bytes for weights), or None if not even
    resident + one expert does. ``act`` only goes into the reported planned peak."""
    total = resident + per_expert * num_experts
    if weights_budget is None or total <= weights_budget or num_experts == 0:
        if weights_budget is not None and total > weights_budget:  # dense layer over budget
            return None
        return Placement(None, device_bytes=total + act)
    room = weights_budget - resident
    g = room // (2 * per_expert) if per_expert else num_experts
    if g >= 1:
        g = min(int(g), num_experts)
        return Placement(g, True, resident + 2 * g * per_expert + act)
    if room >= per_expert:
        return Placement(1, False, resident + per_expert + act)
    return None


@dataclass
class BudgetPlan:
    """The budget decisions of a run, made before it starts (``plan_budget``)."""

    device: str
    compute_dtype: str
    max_vram: int | None
    max_ram: int | None
    device_budget: int | None  # bytes the compute copy may use (VRAM, or RAM on a CPU run)
    activation_bytes: int
    weights_budget: int | None  # device_budget - activations - safety margin
    prefetch_layers: bool
    layers: dict[int, Placement] = field(default_factory=dict)
    host_peak_bytes: int = 0
    device_peak_bytes: int = 0
    host_layer_bytes: int = 0  # largest layer in host memory (as read + runtime layout)
    host_fixed_bytes: int = 0  # interpreter + activation chunks + the written copy of a layer
    notes: list[str] = field(default_factory=list)
    lazy_experts: bool = False  # experts read from the shards in groups (``plan_lazy_budget``)
    host_terms: dict[str, int] = field(default_factory=dict)  # the planned host peak, term by term
    device_terms: dict[str, int] = field(default_factory=dict)  # the planned device peak, term by term
    min_max_ram: int | None = None  # the smallest --max-ram that works (lazy plans)
    min_max_vram: int | None = None  # the smallest --max-vram that works (CUDA, lazy plans)
    staging_bytes: int = 0  # the host staging pool (two expert groups, a third with layer prefetch; stored dtype)
    staging_buffer_bytes: int = 0  # one staging buffer as the pool asks for it (the largest group's; before pinning)
    wave_chunks: int = 1  # activation chunks run through a chunked layer together (experts-major), lazy plans
    wave_chunk_bytes: int = 0  # what each chunk of a wave beyond the first holds while it waits (compute dtype)
    blas_workspace_bytes: int = 0  # the cuBLAS workspaces of the pass's computing threads (CUDA; ``device.blas_workspace_bytes``)
    grouped_experts: bool = False  # activations counted for transformers' grouped GEMM (``--experts-impl``)
    # float32 bytes a merging method may hold in blocks (DERN's slot sums and retained features,
    # ``MergeHold.blocks``); None: the method's own default (no --max-ram, or not such a method)
    merge_scratch_bytes: int | None = None

    @property
    def chunked_layers(self) -> list[int]:
        return sorted(L for L, p in self.layers.items() if p.chunked)

    def to_json(self) -> dict:
        d = asdict(self)
        d["layers"] = {str(L): asdict(p) for L, p in sorted(self.layers.items()) if p.chunked}
        d["chunked_layers"] = self.chunked_layers
        return d


def plan_budget(ck, *, device: torch.device, dtype: torch.dtype, batch_size: int, seq_len: int,
                max_vram: int | None = None, max_ram: int | None = None, prefetch: bool = True,
                extra_host: dict[str, int] | None = None, grouped: bool = False) -> BudgetPlan:
    """Decide, from the index alone, how every layer will be built under the budgets; raise
    ``ConfigError`` (naming the flag and the size needed) if a budget cannot be held.

    ``extra_host``: what else the pass holds in host memory beside one layer (name -> bytes; the EEP
    evaluator's candidate experts, ``plan_population``), counted like the interpreter's share.
    ``grouped``: the layers compute their experts with the grouped GEMM (``activation_terms``)."""
    b = dtype_bytes(dtype)
    sizes = layer_sizes(ck)
    cfg = ck.config
    act = activation_bytes(cfg, batch_size=batch_size, seq_len=seq_len, dtype_bytes=b, top_k=ck.top_k,
                           num_experts=ck.num_experts, grouped=grouped)
    on_cpu = device.type != "cuda"
    blas = blas_workspace_bytes(device)  # the main thread's (this plan's layers never run in waves)
    per_expert_layout = ck.adapter.expert_layout == "per_expert"
    stored_b = {L.layer_idx: L.stored_bytes for L in sizes}
    largest_stored = max(stored_b.values())

    def host_layer(L: LayerSize) -> int:
        # as read + the stacked runtime copy of the experts (per-expert checkpoints only); on CUDA the
        # runtime copy is page-locked instead, every tensor of it (``_pinned_runtime_layer``)
        if not on_cpu:
            return L.stored_bytes + _pinned_runtime_layer(ck, L, device)
        ratio = L.stored_bytes / max(1, L.resident_numel + L.expert_numel * L.num_experts)
        return L.stored_bytes + (int(L.expert_numel * L.num_experts * ratio) if per_expert_layout else 0)

    largest_host = max(host_layer(L) for L in sizes)
    chunk_host = 4 * batch_size * seq_len * int(cfg.get("hidden_size", 0)) * 4  # chunks in flight, fp32
    host_fixed = HOST_BASE_BYTES + chunk_host + largest_stored  # + the written (plan-applied) copy of a layer
    host_fixed += sum((extra_host or {}).values())
    extra_what = "".join(f" + {what}" for what in (extra_host or {}))

    notes: list[str] = []
    if max_ram is not None:
        need_one = host_fixed + largest_host
        if need_one > max_ram:
            raise ConfigError(
                f"--max-ram {fmt_bytes(max_ram)} is too small: one layer as read and in runtime layout "
                f"({fmt_bytes(largest_host)}) + its plan-applied copy{extra_what} + activation chunks + the interpreter need about "
                f"{fmt_bytes(need_one)}; raise --max-ram")
    embed_key = "model.embed_tokens.weight"
    embed = (ck.tensor_bytes(embed_key) // _stored_elem(ck, embed_key) * b) if embed_key in ck.weight_map else 0

    def place(do_prefetch: bool) -> BudgetPlan:
        host_layers = (2 if do_prefetch else 1) * largest_host
        device_budget, what = max_vram, f"--max-vram {fmt_bytes(max_vram)}" if max_vram is not None else ""
        flag = "--max-vram"
        if on_cpu and max_ram is not None:
            # The compute copy lives in RAM too: it gets what is left after the host's own needs.
            left = max_ram - host_fixed - host_layers
            if device_budget is None or left < device_budget:
                device_budget, flag = left, "--max-ram"
                what = (f"--max-ram {fmt_bytes(max_ram)} (leaves {fmt_bytes(left)} for the compute copy after "
                        f"{fmt_bytes(host_fixed + host_layers)} of host needs)")
        weights_budget = None
        if device_budget is not None:
            weights_budget = int(device_budget * (1 - SAFETY)) - act - blas
            if weights_budget <= 0:
                raise ConfigError(f"{what}: one activation chunk alone needs ~{fmt_bytes(act)}"
                                  f"{f' (+ {fmt_bytes(blas)} of cuBLAS workspace)' if blas else ''} "
                                  f"(--batch-size {batch_size} x --seq-len {seq_len}); lower them or raise {flag}")
            if embed > weights_budget:
                raise ConfigError(f"{what}: the embedding matrix needs {fmt_bytes(embed)} on the device; raise {flag}")
        layers: dict[int, Placement] = {}
        for L in sizes:
            p = choose_placement(resident=L.resident_bytes(b), per_expert=L.expert_bytes(b), num_experts=L.num_experts,
                                 weights_budget=weights_budget, act=act + blas)
            if p is None:
                need = int((L.resident_bytes(b) + L.expert_bytes(b) + act + blas) / (1 - SAFETY)) + 1
                raise ConfigError(
                    f"{what}: layer {L.layer_idx} cannot run even one expert at a time: attention + router + shared "
                    f"weights {fmt_bytes(L.resident_bytes(b))} + one expert {fmt_bytes(L.expert_bytes(b))} + activations "
                    f"{fmt_bytes(act)} need at least {fmt_bytes(need)}; raise {flag} or lower --batch-size/--seq-len")
            layers[L.layer_idx] = p
        chunked = sorted(L for L, p in layers.items() if p.chunked)
        plan_notes = []
        if chunked:
            plan_notes.append(f"{len(chunked)} layer(s) run with experts streamed in groups of "
                              f"{min(layers[L].group_size for L in chunked)}-{max(layers[L].group_size for L in chunked)} "
                              f"to stay under {fmt_bytes(device_budget)}")
        device_peak = max(p.device_bytes for p in layers.values()) if layers else act + blas
        host_peak = host_fixed + host_layers + (device_peak if on_cpu else 0)
        return BudgetPlan(device=str(device), compute_dtype=str(dtype).replace("torch.", ""), max_vram=max_vram,
                          max_ram=max_ram, device_budget=device_budget, activation_bytes=act, weights_budget=weights_budget,
                          prefetch_layers=do_prefetch, layers=layers, host_peak_bytes=int(host_peak),
                          device_peak_bytes=int(device_peak), host_layer_bytes=int(largest_host),
                          host_fixed_bytes=int(host_fixed), notes=plan_notes, blas_workspace_bytes=blas,
                          grouped_experts=grouped)

    if prefetch and max_ram is not None:
        need_two = host_fixed + 2 * largest_host
        why = None
        if need_two > max_ram:
            why = f"cannot hold two layers ({fmt_bytes(need_two)} needed)"
        else:
            try:
                return _with_notes(place(True), notes)
            except ConfigError:  # on a CPU run a second layer in RAM can starve the compute copy
                why = "leaves too little for the compute copy with two layers in RAM"
        notes.append(f"--max-ram {fmt_bytes(max_ram)} {why}; layer prefetching is off")
        return _with_notes(place(False), notes)
    return _with_notes(place(prefetch), notes)


def _with_notes(plan: BudgetPlan, notes: list[str]) -> BudgetPlan:
    plan.notes = notes + plan.notes
    return plan


def _stored_elem(ck, key: str) -> int:
    return DTYPE_BYTES.get(ck.tensor_info(key)[1], 4)


# ---- expert-granular streaming (the prune) ------------------------------------------------------

# Without --max-ram, an expert group holds at most this many bytes in the compute dtype (small models:
# every expert in one group, loaded once per layer).
DEFAULT_GROUP_BYTES = 1 << 30
# Without a budget, the chunks of an experts-major wave waiting at their experts call hold at most this.
DEFAULT_WAVE_BYTES = 1 << 30
# What a chunk waiting at its experts call holds (``activation_terms``): its hidden states (the layer's
# input, residual, normed input, the per-expert accumulator), routing, and the per-slot expert outputs.
WAVE_TERMS = ("hidden_states", "routing", "expert_slot_outputs")


def _resident_read_bytes(ck, layer_idx: int, num_experts: int) -> tuple[int, ...]:
    """Bytes of each of the layer's tensors other than its routed experts, as read (``Checkpoint.read_bytes``)."""
    ex = set(ck.adapter.routed_expert_keys(layer_idx, num_experts)) if num_experts else set()
    return tuple(ck.read_bytes(k) for k in ck.layer_keys(layer_idx) if k not in ex)


def _one_expert_keys(ck, layer_idx: int, num_experts: int) -> tuple[list[str], int]:
    """The stored tensors one routed expert's bytes are read from, and what to divide a tensor's bytes
    by for one expert: a per-expert checkpoint's expert-0 tensors (1), or the fused tensors (E)."""
    ad = ck.adapter
    if ad.expert_layout == "per_expert":
        return ad.expert_keys(layer_idx, 0), 1
    return ad.fused_keys(layer_idx), max(1, num_experts)


def _expert_read_bytes(ck, layer_idx: int, num_experts: int) -> tuple[int, ...]:
    """One routed expert's bytes in each of its tensors, as read: a per-expert checkpoint's expert-0
    tensors, or each fused tensor / E."""
    keys, per = _one_expert_keys(ck, layer_idx, num_experts)
    return tuple(ck.read_bytes(k) // per for k in keys if k in ck.parts)


def _pinned_runtime_layer(ck, L: LayerSize, device: torch.device) -> int:
    """Host bytes of layer ``L``'s page-locked runtime copy (the layer reader's, on CUDA): each tensor
    as read in its own block (``pinned_bytes``), the experts stacked per tensor (E x one expert's;
    gate and up stacked together take what the two would apart, being equal in size)."""
    total = sum(pinned_bytes(n, device) for n in _resident_read_bytes(ck, L.layer_idx, L.num_experts))
    if not L.num_experts:
        return total
    return total + sum(pinned_bytes(L.num_experts * n, device) for n in _expert_read_bytes(ck, L.layer_idx, L.num_experts))


@dataclass(frozen=True)
class _LazyLayerSize:
    idx: int
    res_stored: int  # non-expert bytes as stored
    res_numel: int
    exp_numel: int  # one routed expert
    exp_stored: int  # one routed expert, as stored
    num_experts: int
    res_keys: tuple[int, ...] = ()  # bytes of each non-expert tensor as read (pinned one by one on CUDA)
    exp_parts: tuple[int, ...] = ()  # one expert's bytes in each stored tensor of the experts (values, scales)
    mat_numel: int = 0  # one routed expert's largest tensor (a merge computes one at a time)

    def staging_buffer(self, g: int) -> int:
        """Bytes of a staging buffer holding a group of ``g`` experts: each tensor's slice 64-byte
        aligned (``lazy.StagingPool``), counted per stored tensor -- at least what the pool asks for."""
        if not self.exp_parts:
            return g * self.exp_stored
        return sum(-(-(g * n) // 64) * 64 for n in self.exp_parts)


def _expert_parts(ck, L: int, num_experts: int) -> tuple[int, ...]:
    """One expert's bytes in each stored tensor of layer ``L``'s routed experts (a quantized weight's
    values and scales apart): a per-expert checkpoint's expert-0 tensors, or the fused tensors / E."""
    keys, per = _one_expert_keys(ck, L, num_experts)
    return tuple(ck.tensor_bytes(part) // per for k in keys
                 for part in (ck.parts.get(k, (k,)) if ck.quant_format is not None else (k,)) if part in ck.weight_map)


def _expert_matrix_numel(ck, L: int, num_experts: int) -> int:
    """Values in one routed expert's largest tensor (a fused tensor's: / E), logical shapes."""
    keys, per = _one_expert_keys(ck, L, num_experts)
    return max((_numel(ck.tensor_info(k)[0]) // per for k in keys if k in ck.parts), default=0)


def _lazy_sizes(ck) -> list[_LazyLayerSize]:
    out = []
    ad = ck.adapter
    for L in layer_sizes(ck):
        res_keys = _resident_read_bytes(ck, L.layer_idx, L.num_experts)
        parts = _expert_parts(ck, L.layer_idx, L.num_experts) if L.num_experts else ()
        mat = _expert_matrix_numel(ck, L.layer_idx, L.num_experts) if L.num_experts else 0
        if ck.quant_format is not None and L.num_experts:
            # quantized experts are held as their stored bytes (``lazy.ExpertSource.packed``), the
            # layer's other weights as read (dequantized)
            keys = [k for k in ad.routed_expert_keys(L.layer_idx, L.num_experts) if k in ck.parts]
            exp_stored = sum(ck.tensor_bytes(k) for k in keys) // L.num_experts
            exp_read = L.expert_numel * L.num_experts * dtype_bytes(ck.compute_dtype)
            out.append(_LazyLayerSize(L.layer_idx, max(0, L.stored_bytes - exp_read), L.resident_numel,
                                      L.expert_numel, exp_stored, L.num_experts, res_keys, parts, mat))
            continue
        ratio = L.stored_bytes / max(1, L.resident_numel + L.expert_numel * L.num_experts)
        exp_stored = int(round(L.expert_numel * ratio))
        out.append(_LazyLayerSize(L.layer_idx, L.stored_bytes - exp_stored * L.num_experts, L.resident_numel,
                                  L.expert_numel, exp_stored, L.num_experts, res_keys, parts, mat))
    return out


@dataclass(frozen=True)
class MergeHold:
    """What a merging method holds on the host for a MoE layer beside the pass (``plan_lazy_budget``).

    ``rewritten``: output experts its plan may compute rather than copy (a group merge of E experts
    into k: at most min(k, E - k) groups have more than one member; DERN: the k slots), each held in
    the stored format until written -- the sequential pass runs the pruned layer from them; a fused
    layout holds every output row (``kept``: k) in its output tensors. A merge takes float32
    temporaries of one expert tensor (``merge_scratch``). ``blocks``: the method also holds float32
    copies of whole experts in blocks (DERN's slot sums and retained features) whose size the plan
    sets (``BudgetPlan.merge_scratch_bytes``): at least one, at most ``rewritten``. ``match_rows``:
    the method compares that many of an expert's neurons with all of another's at once (DERN's
    matching: a float32 (rows, I) similarity buffer). ``align``: before a layer's merge the method
    aligns each merged member's neurons to its leader's (``-O align=true``): two experts' neuron
    features and their (I, I) similarities, in float32 and float64 (``alignment_bytes``)."""

    rewritten: int
    kept: int
    blocks: bool = False
    match_rows: int = 0
    align: bool = False


# the similarity matmul's packing buffers (BLAS) and the assignment's own vectors, beside its matrices
ALIGN_SLACK = 64 << 20


def alignment_bytes(neurons: int, hidden: int) -> int:
    """Host bytes a merging method's ``-O align=true`` holds at once for one merged member (I neurons,
    hidden size H; ``merging.align.align_groups``): the leader's and the member's neuron features
    (I x 3H float32 each) with their (I, I) float32 similarities, then the leader's features, the
    similarities and their float64 copy (``align.assignment``); and ``ALIGN_SLACK`` (measured at the
    Mixtral-8x7B geometry: 29 MB above the rest, ``scripts/bench_align.py``)."""
    features, sim = neurons * 3 * hidden * 4, neurons * neurons * 4
    return max(2 * features + sim, features + sim + 2 * sim) + ALIGN_SLACK


def merge_scratch(L: "_LazyLayerSize", quant_method: str | None, compute_bytes: int, slots: int = 0,
                  match_bytes: int = 0) -> int:
    """Host bytes of one merge's temporaries in layer ``L`` beyond the output it makes: a float32
    accumulator, one decoded source and its float32 copy (``apply.merge_one``), for a quantized
    layer the merged tensor in the compute dtype and the re-quantization's scratch (FP8 and MXFP4
    encode and check their round trip in bands of ``SCRATCH_BYTES``); ``slots``: DERN's
    block of float32 experts (slot sums, or retained features while matching), plus two more: the
    slot's own weights and its merged ones as it finishes it (a dropped expert's weights and
    features, and ``match_bytes`` of similarities, while matching)."""
    n = L.mat_numel
    s = L.exp_stored / max(1, L.exp_numel) if quant_method is None else compute_bytes
    one = 4 * n + int(s * n) + (4 * n if s < 4 else 0)
    if quant_method is not None:
        one += compute_bytes * n + SCRATCH_BYTES
    if slots:
        one = max(one, (slots + 2) * 4 * L.exp_numel + match_bytes)
    return one


def largest(lo: int, hi: int, ok) -> int:
    """The largest n in [lo, hi] with ``ok(n)``, ``ok`` monotone and ``ok(lo)`` assumed (bisection)."""
    best = lo
    while lo <= hi:
        mid = (lo + hi) // 2
        if ok(mid):
            best, lo = mid, mid + 1
        else:
            hi = mid - 1
    return best


def plan_lazy_budget(ck, *, device: torch.device, dtype: torch.dtype, batch_size: int, seq_len: int,
                     max_vram: int | None = None, max_ram: int | None = None, prefetch: bool = True,
                     num_chunks: int = 1, grouped: bool = False, merge: MergeHold | None = None) -> BudgetPlan:
    """The budget of a pass whose routed experts are read from the shards in groups (``lazy``,
    ``Stream.layers(lazy=True)``), from the index alone. Per MoE layer with E experts, for a group of g
    experts (P params each; stored s bytes, compute b bytes a param):

        device = resident weights (b) + 2 groups (b: the one computing, the one arriving)
                 + activations (``activation_terms``) + allocator rounding (CUDA)
        host   = interpreter + activation chunks in flight + the layer's non-expert weights as read
                 + the staging pool (2 groups, s) + with layer prefetch: the next layer's non-expert
                 weights and its first group (a third staging buffer)
                 + on a CPU run, the device copy above (it lives in RAM)

    The largest g <= E that fits both budgets is used (without budgets: groups of at most
    ``DEFAULT_GROUP_BYTES``).

    A layer run in groups (g < E) runs its ``num_chunks`` activation chunks in waves of w chunks
    (``Stream.forward``, experts-major): each group is read once per wave, so a layer's experts are
    read ceil(num_chunks / w) times. The w - 1 chunks waiting at their experts call hold their hidden
    states, routing and per-expert outputs (``wave_chunk_bytes`` each, on the device; ``WAVE_TERMS``).
    Under a budget, the fewest reads come first: the smallest number of waves that fits with g = 1,
    then the largest g that keeps it; without budgets, waves of at most ``DEFAULT_WAVE_BYTES``. The smallest budgets that work (g = 1, no prefetch) are ``min_max_ram``
    and ``min_max_vram``; a budget below them is a ConfigError naming the flag and the floor.
    Kept experts are copied to the output as bytes, so the written layer holds no expert copy; a
    merging method (``merge``, ``MergeHold``) adds the experts it rewrites, held until written, and
    one merge's temporaries (``merge_scratch``). A method with ``blocks`` (DERN) gets the largest
    block of float32 experts that fits once the group size is set (at least one: the group size is
    chosen with one), ``merge_scratch_bytes``; without a budget, the layer's experts as stored."""
    b = dtype_bytes(dtype)
    cfg = ck.config
    on_cpu = device.type != "cuda"
    sizes = _lazy_sizes(ck)
    quantized = ck.quant_format
    fused = ck.adapter.expert_layout == "fused"
    b_host = dtype_bytes(ck.compute_dtype)  # a merge decodes its sources to the checkpoint's compute dtype
    hidden = max(1, int(cfg.get("hidden_size", 0) or 0))
    terms_act = activation_terms(cfg, batch_size=batch_size, seq_len=seq_len, dtype_bytes=b, top_k=ck.top_k,
                                 num_experts=ck.num_experts, grouped=grouped)
    act = sum(terms_act.values())
    chunk_host = 4 * batch_size * seq_len * int(cfg.get("hidden_size", 0)) * 4
    embed_key = "model.embed_tokens.weight"
    embed_s = ck.tensor_bytes(embed_key) if embed_key in ck.weight_map else 0
    embed_c = embed_s // _stored_elem(ck, embed_key) * b if embed_s else 0
    n_w = max(len(ck.layer_keys(L.idx)) for L in sizes)
    rounding = allocator_rounding(n_w) if not on_cpu else 0
    blas = blas_workspace_bytes(device)

    wave_chunk = sum(terms_act[k] for k in WAVE_TERMS)
    C = max(1, int(num_chunks))
    wave = {"w": 1}  # chunks per wave, as ``fits`` tries them

    def in_waves(L: _LazyLayerSize, g: int) -> bool:
        return wave["w"] > 1 and bool(L.num_experts) and g < L.num_experts

    def waiting(L: _LazyLayerSize, g: int) -> int:  # the chunks of a wave waiting at their experts call
        return (wave["w"] - 1) * wave_chunk if in_waves(L, g) else 0

    def workspaces(L: _LazyLayerSize, g: int) -> int:
        # the main thread's, and in waves one per chunk's thread (``experts.WaveTask``): torch keeps
        # each until the pass releases them (``device.release_blas_workspaces``)
        return blas * (1 + (wave["w"] if in_waves(L, g) else 0))

    def device_need(L: _LazyLayerSize, g: int) -> int:
        w = L.res_numel * b + (2 * min(g, L.num_experts) * L.exp_numel * b if L.num_experts else 0)
        return w + act + rounding + decode_need(L, g) + waiting(L, g) + workspaces(L, g)

    def decode_need(L: _LazyLayerSize, g: int) -> int:
        # a quantized group is decoded on the device: its stored bytes arrive there (two in flight;
        # on a CPU run they are the staging buffers themselves) and decoding takes bounded scratch
        if quantized is None or not L.num_experts:
            return 0
        return (0 if on_cpu else 2 * min(g, L.num_experts) * L.exp_stored) + SCRATCH_BYTES

    def buffer(L: _LazyLayerSize, g: int) -> int:
        # a staging buffer for a group of g: on CUDA page-locked, in torch's power-of-two block
        return pinned_bytes(L.staging_buffer(g), device) if not on_cpu else g * L.exp_stored

    def res_pinned(L: _LazyLayerSize) -> int:
        # on CUDA the layer reader keeps page-locked copies of the non-expert weights (one block each)
        # beside the tensors as read (which the output writer copies from)
        return 0 if on_cpu else sum(pinned_bytes(n, device) for n in L.res_keys)

    def default_slots(L: _LazyLayerSize) -> int:  # DERN's blocks without a budget: the layer's experts as stored
        return max(1, min(merge.rewritten, L.exp_stored * L.num_experts // max(1, 4 * L.exp_numel)))

    slots = {"n": None}  # DERN's block as ``fits`` tries it (None: its default)

    def merge_need(L: _LazyLayerSize, g: int) -> dict[str, int]:
        # The pruned pass holds every rewritten expert; the write before it, those written so far and
        # one merge's temporaries, once the pass's activations and arriving group (in the compute copy
        # of a CPU run) are gone. DERN's last block starts with k - blk slots written.
        if merge is None or not L.num_experts:
            return {}
        k = min(merge.rewritten, L.num_experts)
        blk = min(k, (slots["n"] or default_slots(L))) if merge.blocks else 0
        held = (merge.kept if fused else k) * L.exp_stored
        if fused and quantized and merge.blocks:  # DERN rewrites a fused layer's output rows decoded, then re-quantizes
            held = merge.kept * L.exp_numel * b_host
        before = (k - blk) * L.exp_stored if blk else held
        freed = act + g * L.exp_numel * b if on_cpu else 0
        neurons = L.mat_numel // hidden  # at most the experts' intermediate size (a fused gate-up: twice it)
        match = 4 * min(merge.match_rows, neurons) * neurons
        scratch = merge_scratch(L, quantized.method if quantized else None, b_host, blk, match)
        # the alignment comes before the merge (nothing merged held yet), after the pass's activations
        align = alignment_bytes(neurons // 2 if fused else neurons, hidden) if merge.align else 0
        return {"merged_experts_held": held, "merge_scratch": max(0, before + scratch - freed - held, align - freed)}

    def host_need(L: _LazyLayerSize, g: int, pre: bool) -> dict[str, int]:
        g = min(g, L.num_experts) if L.num_experts else 0
        t = {"interpreter": HOST_BASE_BYTES, "activation_chunks": chunk_host,
             "layer_non_expert_weights": L.res_stored, "next_layer_prefetched": L.res_stored if pre else 0,
             "staging_pool": 2 * buffer(L, g) if g else 0, **merge_need(L, g)}
        if on_cpu:
            t["compute_copy"] = device_need(L, g)
        else:
            t["layer_non_expert_pinned"] = res_pinned(L)
        return t

    largest_res = max(sizes, key=lambda L: L.res_stored + res_pinned(L))

    def next_layer(g: int) -> int:
        # the next layer prefetched: at most the largest non-expert part (and its pinned copy) + its
        # first expert group (read into the staging pool's third buffer)
        return largest_res.res_stored + res_pinned(largest_res) + max(
            (buffer(L, min(g, L.num_experts)) for L in sizes if L.num_experts), default=0)

    def host_total(g: int, pre: bool) -> int:
        worst = 0
        for L in sizes:
            t = host_need(L, g, False)
            worst = max(worst, sum(t.values()) + (next_layer(g) if pre else 0))
        embed_peak = HOST_BASE_BYTES + chunk_host + embed_s + (embed_c if on_cpu else 0)
        return max(worst, embed_peak)

    def device_total(g: int) -> int:
        return max(device_need(L, g) for L in sizes)

    E = max(L.num_experts for L in sizes)
    per_c = max(L.exp_numel for L in sizes) * b
    dev_budget = max_vram
    if on_cpu and max_ram is not None:
        dev_budget = None  # the compute copy is inside the host plan
    if merge is not None and merge.blocks:
        slots["n"] = 1  # the floor, and the group size under --max-ram, with one float32 expert a block
    floor_ram = int(host_total(1, False) / (1 - SAFETY)) + 1
    if max_ram is None:
        slots["n"] = None  # the block grows after the group size is chosen; without --max-ram, its default
    floor_vram = int(max(device_total(1), embed_c + act + blas) / (1 - SAFETY)) + 1

    def fits(g: int, pre: bool) -> bool:
        if max_ram is not None and host_total(g, pre) > max_ram * (1 - SAFETY):
            return False
        if dev_budget is not None and device_total(g) > dev_budget * (1 - SAFETY):
            return False
        return True

    notes: list[str] = []
    if max_ram is not None and not fits(1, False):
        raise ConfigError(
            f"--max-ram {fmt_bytes(max_ram)} is too small: the largest layer's non-expert weights "
            f"({fmt_bytes(largest_res.res_stored)}) + two single-expert groups + activation chunks + the interpreter"
            f"{' + the compute copy' if on_cpu else ''}"
            f"{' + the merged experts held until written and one merge' if merge is not None else ''} "
            f"need about {fmt_bytes(floor_ram)}; raise --max-ram")
    if dev_budget is not None and int(dev_budget * (1 - SAFETY)) - act - rounding - blas <= 0:
        raise ConfigError(f"--max-vram {fmt_bytes(max_vram)}: one activation chunk alone needs ~{fmt_bytes(act + rounding)}"
                          f"{f' (+ {fmt_bytes(blas)} of cuBLAS workspace)' if blas else ''} "
                          f"(--batch-size {batch_size} x --seq-len {seq_len}); lower them or raise --max-vram")
    if dev_budget is not None and embed_c + act + blas > dev_budget * (1 - SAFETY):
        raise ConfigError(f"--max-vram {fmt_bytes(max_vram)}: the embedding matrix needs {fmt_bytes(embed_c)} on the "
                          f"device; raise --max-vram")
    if dev_budget is not None and not fits(1, False) and (max_ram is None or host_total(1, False) <= max_ram * (1 - SAFETY)):
        worst = max(sizes, key=lambda L: device_need(L, 1))
        raise ConfigError(
            f"--max-vram {fmt_bytes(max_vram)}: layer {worst.idx} cannot run even one expert at a time: attention + "
            f"router + shared weights {fmt_bytes(worst.res_numel * b)} + two single-expert groups "
            f"{fmt_bytes(2 * worst.exp_numel * b)} + activations {fmt_bytes(act)} (--batch-size {batch_size} x --seq-len "
            f"{seq_len}){f' + a cuBLAS workspace {fmt_bytes(blas)}' if blas else ''} need at least {fmt_bytes(floor_vram)}; "
            "raise --max-vram or lower --batch-size/--seq-len")
    pre = bool(prefetch)
    if pre and not fits(1, True):
        pre = False
        notes.append(f"--max-ram {fmt_bytes(max_ram)} cannot hold the next layer's non-expert weights too; "
                     f"layer prefetching is off")

    def fits_wave(g: int, w: int) -> bool:
        wave["w"] = w
        try:
            return fits(g, pre)
        finally:
            wave["w"] = 1

    if max_ram is None and dev_budget is None:
        g = max(1, min(E, DEFAULT_GROUP_BYTES // max(1, per_c))) if E else 1
        w = min(C, max(1, DEFAULT_WAVE_BYTES // max(1, wave_chunk)))
    else:
        g = largest(1, max(1, E), lambda n: fits(n, pre))  # the largest group that fits
        w = 1
        if E and g < E and C > 1:
            # fewest reads of each layer's experts first (most chunks per wave, with groups of one),
            # then the largest group that still reads them as few times
            waves = -(-C // largest(1, C, lambda n: fits_wave(1, n)))
            need = -(-C // waves)
            g = largest(1, g, lambda n: fits_wave(n, need))
            w = largest(need, C, lambda n: fits_wave(g, n))
    if not (E and any(L.num_experts and min(g, L.num_experts) < L.num_experts for L in sizes)):
        w = 1  # no layer runs in groups: nothing to gather
    wave["w"] = w
    scratch_bytes = None
    if slots["n"] is not None:  # DERN's block under --max-ram: the most float32 experts that still fit

        def fits_slots(n: int) -> bool:
            slots["n"] = n
            return fits(g, pre)

        slots["n"] = largest(1, max(1, merge.rewritten), fits_slots)
        scratch_bytes = slots["n"] * 4 * max(L.exp_numel for L in sizes)
        notes.append(f"merged slots are summed {slots['n']} at a time in float32 (--max-ram)")
    layers: dict[int, Placement] = {}
    for L in sizes:
        if L.num_experts:
            gl = min(g, L.num_experts)
            layers[L.idx] = Placement(gl, True, device_need(L, gl))
        else:
            layers[L.idx] = Placement(None, device_bytes=device_need(L, 0))  # a dense layer is built whole
    big = max(sizes, key=lambda L: device_need(L, g))
    gb = min(g, big.num_experts) if big.num_experts else 0
    device_terms = {"resident_weights": big.res_numel * b, "expert_groups": 2 * gb * big.exp_numel * b,
                    **terms_act, "allocator_rounding": rounding}
    if quantized is not None:
        device_terms["packed_groups_and_decode"] = decode_need(big, g)
    host_terms = host_need(max(sizes, key=lambda L: sum(host_need(L, g, False).values())), g, False)
    host_terms["next_layer_prefetched"] = next_layer(g) if pre else 0
    host_peak = host_total(g, pre)
    device_peak = device_total(g)
    if w > 1:
        device_terms["wave_chunks_waiting"] = (w - 1) * wave_chunk
    if blas:
        device_terms["blas_workspaces"] = workspaces(big, gb)
    if E:
        notes.append(f"routed experts read from the shards in groups of {g} (of {E}); kept experts copied as stored bytes")
    if w > 1 or (E and g < E and C > 1):
        notes.append(f"a layer run in groups takes its activation chunks {w} at a time: its experts are read "
                     f"{-(-C // w)} time(s) for {C} chunks")
    return BudgetPlan(device=str(device), compute_dtype=str(dtype).replace("torch.", ""), max_vram=max_vram, max_ram=max_ram,
                      device_budget=dev_budget, activation_bytes=act,
                      weights_budget=None if dev_budget is None else int(dev_budget * (1 - SAFETY)) - act - rounding,
                      prefetch_layers=pre, layers=layers, host_peak_bytes=int(host_peak), device_peak_bytes=int(device_peak),
                      host_layer_bytes=int(largest_res.res_stored), host_fixed_bytes=HOST_BASE_BYTES + chunk_host,
                      notes=notes, lazy_experts=True, host_terms=host_terms, device_terms=device_terms,
                      min_max_ram=floor_ram, min_max_vram=floor_vram if not on_cpu else None,
                      staging_bytes=(3 if pre else 2) * max((buffer(L, min(g, L.num_experts)) for L in sizes
                                                              if L.num_experts), default=0),
                      staging_buffer_bytes=max((L.staging_buffer(min(g, L.num_experts)) for L in sizes if L.num_experts),
                                               default=0),
                      wave_chunks=w, wave_chunk_bytes=wave_chunk if w > 1 else 0,
                      blas_workspace_bytes=max(workspaces(L, min(g, L.num_experts) if L.num_experts else 0) for L in sizes),
                      grouped_experts=grouped, merge_scratch_bytes=scratch_bytes)


# ---- the EEP population evaluator --------------------------------------------------------------


@dataclass
class PopulationBudget:
    """How ``eep.population.PopulationEvaluator`` builds each MoE layer under the budgets.

    ``layers[L].group_size`` None: the loaded layer fits whole on the device with a merged candidate
    block beside it (the unbudgeted fast path). Otherwise the layer's routed experts stay in host
    memory in their stored dtype, its resident part and the candidate's router are on the device, and
    the candidate's ``num_experts`` (E') selected or merged experts visit it ``group_size`` at a time
    through ``ChunkedExperts`` (one group of E' when they fit)."""

    plan: BudgetPlan  # planned for this pass: no layer prefetch, the candidate's host experts counted
    num_experts: int
    layers: dict[int, Placement] = field(default_factory=dict)
    candidate_host_bytes: int = 0
    # the layers' routed experts are not read with the layer: each candidate's E' experts are selected
    # or merged from the shards, one source expert at a time (``plan_sourced_population``)
    sourced: bool = False
    merge_block: int = 1  # sourced: merged outputs summed together (each source read once per block)
    quant: str = "none"  # sourced: experts read from the checkpoint's shards, or from the --quant cache
    # sourced, and --max-ram cannot hold a candidate's E' experts either: each group of ``group_size`` is
    # built from the shards when the device asks for it (``eep.population.CandidateSource``), and the
    # activation chunks run in waves of ``plan.wave_chunks`` (experts-major): a group is built once per wave
    candidate_groups: bool = False
    # host bytes of building the --quant cache before the search (``quant_build_bytes``; None: no cache,
    # or no --max-ram to check it against)
    quant_build_bytes: int | None = None

    @property
    def chunked_layers(self) -> list[int]:
        return sorted(L for L, p in self.layers.items() if p.chunked)

    @property
    def wave_chunks(self) -> int:
        return self.plan.wave_chunks

    def to_json(self) -> dict:
        return {"sourced": self.sourced, "merge_block": self.merge_block, "quant": self.quant, "num_experts": self.num_experts,
                "candidate_groups": self.candidate_groups, "quant_build_bytes": self.quant_build_bytes,
                "candidate_host_bytes": self.candidate_host_bytes, **self.plan.to_json()}


# bytes a value of one CPU quantization step holds (``quant.quantize_cpu``: its absolute value, the
# scaled and clamped float32 copies, the binary search's int64 indices and distances), counted generously
QUANT_STEP_BYTES = 64


def quant_build_bytes(ck, mode: str) -> tuple[int, dict[str, int]]:
    """Host bytes of building the ``--quant`` cache (``quant.QuantizedWeights._build``) at its largest
    layer, and that layer's terms. From the index alone.

    A layer is built from ``lazy.read_lazy_layer``: its non-expert tensors read (decoded), its routed
    experts read one tensor at a time (a fused layout's: ``quant.cache_rows`` rows at a time, the
    whole tensor's absmax kept until written, twice when joined); the tensor being quantized is held
    decoded with its stored bytes (a quantized checkpoint's), its codes and absmax, and a step's scratch
    (``QUANT_STEP`` values). A checkpoint not read lazily holds its whole layer as read."""
    if mode not in BLOCKSIZE:
        return 0, {}
    bs, lazily = BLOCKSIZE[mode], reads_lazily(ck)
    ad, moe = ck.adapter, set(ck.moe_layers())
    best: tuple[int, dict[str, int]] = (0, {})
    for L in range(ck.num_layers):
        keys = ck.layer_keys(L)
        experts = set(ad.routed_expert_keys(L, ck.num_experts)) if L in moe and lazily else set()
        fused = set(ad.fused_keys(L)) if ad.expert_layout == "fused" else set()
        held = sum(ck.read_bytes(k) for k in keys if k not in experts)
        one, absmax_held, largest = 0, 0, 0  # bytes of a routed expert's tensor (or rows) as quantized
        for k in keys:
            shape = ck.tensor_info(k)[0]
            n = _numel(shape)
            if len(shape) < 2 or n < MIN_NUMEL or ad.is_router_key(k[len(ad.layer_prefix(L)):]):
                continue
            if k not in experts:  # read with the layer: only its codes are new
                largest = max(largest, n)
                continue
            # a fused tensor's rows quantized at once, else the whole tensor (one expert's, or a fused bias)
            part = n * min(shape[0], cache_rows(shape, mode)) // shape[0] if k in fused and len(shape) >= 3 else n
            stored = sum(ck.tensor_bytes(p) for p in ck.parts.get(k, (k,)) if p in ck.weight_map) * part // n \
                if ck.quant_format is not None and ck.is_quantized(k) else 0
            decode = min(SCRATCH_BYTES, 8 * part) if stored else 0  # ``formats``' float32 bands
            one = max(one, ck.read_bytes(k) * part // n + stored + decode)
            largest = max(largest, part)
            if k in fused and len(shape) >= 3:
                absmax_held = max(absmax_held, 2 * 4 * -(-n // bs))
        terms = {"interpreter": HOST_BASE_BYTES, "layer_non_expert_weights": held, "expert_tensor_read": one,
                 "codes_and_absmax": int(largest * BYTES_PER_PARAM[mode]) + absmax_held,
                 "quantize_step": QUANT_STEP * QUANT_STEP_BYTES}
        if sum(terms.values()) > best[0]:
            best = (sum(terms.values()), {"layer": L, **terms})
    return best


def check_quant_build(ck, plan: "BudgetPlan | None", mode: str) -> int | None:
    """The host bytes of building the ``--quant`` cache (``quant_build_bytes``) when --max-ram is
    given; ConfigError naming --max-ram when they are more than it holds."""
    if plan is None or plan.max_ram is None or mode not in BLOCKSIZE:
        return None
    need, terms = quant_build_bytes(ck, mode)
    if need > plan.max_ram * (1 - SAFETY):
        parts = ", ".join(f"{k} {fmt_bytes(v)}" for k, v in terms.items() if k != "layer" and v)
        raise ConfigError(f"--max-ram {fmt_bytes(plan.max_ram)}: building the --quant {mode} cache needs "
                          f"{fmt_bytes(int(need / (1 - SAFETY)) + 1)} at layer {terms['layer']} ({parts}); "
                          f"raise --max-ram or use --quant none")
    return need


def _budget_flag(plan: BudgetPlan) -> str:
    """The flag whose size became the device budget."""
    return "--max-vram" if plan.max_vram is not None and plan.device_budget == plan.max_vram else "--max-ram"


def plan_population(ck, plan: BudgetPlan | None, *, num_experts: int, batch_size: int, seq_len: int,
                    quant: str = "none", num_chunks: int = 1, quiet: bool = False) -> PopulationBudget | None:
    """The budget of the EEP search's streamed population evaluation, from the run's plan (the run's
    flags; None or no flag given: None, no budget). From the index alone, before the search.

    A layer as read is held in host memory while its candidates run (``_plan_held_population``) where
    --max-ram leaves room for it; where it does not, and the weights are the checkpoint's (``quant``
    "none"), each candidate's experts are read from the shards instead (``plan_sourced_population``;
    ``num_chunks``: the fitness data's activation chunks, at most, for the waves of a candidate built a
    group at a time). ``quiet``: the plan's notes are not logged (a plan made again). With ``quant``
    nf4/int8 and --max-ram, building the cache must fit it too (``check_quant_build``).

    Host: one layer as read + its runtime copy (no prefetch: the evaluator reads layer by layer) + a
    candidate's E' experts in the stored dtype + the float32 merge accumulator (one expert's tensor,
    ``apply.merge_experts``, whatever the layout). Device, per MoE layer with E experts of P params,
    in the compute dtype (b bytes): whole when

        resident + E*P*b + E' router rows + E'*P*(4 + b)  <=  weights budget

    (the loaded layer plus a merged block and its float32 buffer), else resident + E' router rows + 1
    or 2 groups of the candidate's experts (``choose_placement`` over E'). ConfigError naming the
    flag when not even one expert fits."""
    if plan is None or (plan.max_vram is None and plan.max_ram is None):
        return None
    build = check_quant_build(ck, plan, quant)  # the cache is built before the first candidate runs
    out = _choose_population(ck, plan, num_experts=num_experts, batch_size=batch_size, seq_len=seq_len, quant=quant,
                             num_chunks=num_chunks)
    out.quant_build_bytes = build
    for note in [] if quiet else out.plan.notes:  # the chosen plan's, once (the planners are tried quietly)
        log.info(note)
    return out


def _choose_population(ck, plan: BudgetPlan, *, num_experts: int, batch_size: int, seq_len: int,
                       quant: str, num_chunks: int = 1) -> PopulationBudget:
    try:
        return _plan_held_population(ck, plan, num_experts=num_experts, batch_size=batch_size, seq_len=seq_len,
                                     num_chunks=num_chunks)
    except ConfigError as held_error:
        # a layer as read does not fit --max-ram: read each candidate's experts from the shards (or the
        # quantized cache) instead
        if plan.max_ram is None or not str(held_error).startswith("--max-ram"):
            raise
        if not sourced_ok(ck, quant):
            raise
        return plan_sourced_population(ck, plan, num_experts=num_experts, batch_size=batch_size, seq_len=seq_len,
                                       quant=quant, num_chunks=num_chunks)


def population_floors(ck, plan: BudgetPlan, *, num_experts: int, batch_size: int, seq_len: int,
                      quant: str = "none") -> dict[str, int | None]:
    """The smallest --max-ram each way of holding the population pass's layers works at (``plan``: the
    run's, for its device, dtype and --max-vram; its --max-ram is ignored): ``layer_held`` (a layer as
    read in host memory, ``_plan_held_population``), ``sourced`` (experts read from the shards per
    candidate, the candidate's E' held, ``plan_sourced_population``) and ``sourced_groups`` (built
    a group at a time); None where the checkpoint's experts cannot be read so. From the index alone,
    for ``lowmoe inspect --method eep``."""

    def works(ram: int, how: str) -> bool:
        trial = replace(plan, max_ram=ram)
        try:
            if how == "layer_held":
                _plan_held_population(ck, trial, num_experts=num_experts, batch_size=batch_size, seq_len=seq_len)
            else:
                plan_sourced_population(ck, trial, num_experts=num_experts, batch_size=batch_size, seq_len=seq_len,
                                        quant=quant, groups=how == "sourced_groups")
            return True
        except ConfigError:
            return False

    def floor(how: str) -> int | None:
        hi = 4 * (ck.total_bytes() + HOST_BASE_BYTES) + 2**30
        if not works(hi, how):
            return None
        return largest(0, hi, lambda ram: not works(ram, how)) + 1  # the byte above the largest refused

    sourced = sourced_ok(ck, quant)
    return {"layer_held": floor("layer_held"), "sourced": floor("sourced") if sourced else None,
            "sourced_groups": floor("sourced_groups") if sourced else None}


def sourced_ok(ck, quant: str = "none") -> bool:
    """Whether the EEP evaluator can read this checkpoint's routed experts one at a time: from the
    shards, a format read lazily (``lazy.reads_lazily``); for a fused layout, from the shards or the
    ``--quant`` cache (``quant.CachedTensor`` rows), every MoE layer's fused tensors kept under their
    runtime names (what ``lazy.ExpertSource`` reads row by row)."""
    ad = ck.adapter
    if quant == "none" and not reads_lazily(ck):
        return False
    if ad.expert_layout != "fused":
        return True
    return all(ad.layer_prefix(L) + ad.moe_prefix + "experts." + t in ck.parts
               for L in ck.moe_layers() for t in ad.fused_tensors)


def _plan_held_population(ck, plan: BudgetPlan, *, num_experts: int, batch_size: int, seq_len: int,
                          num_chunks: int = 1) -> PopulationBudget:
    device, dtype = torch.device(plan.device), getattr(torch, plan.compute_dtype)
    b = dtype_bytes(dtype)
    E, n = ck.num_experts, int(num_experts)
    sizes = [s for s in layer_sizes(ck) if s.num_experts]

    def stored_elem(s: LayerSize) -> float:
        return s.stored_bytes / max(1, s.resident_numel + s.expert_numel * s.num_experts)

    def candidate_host(s: LayerSize) -> int:
        merge = 4 * s.expert_numel  # float32: the accumulator (at most one expert)
        if device.type != "cuda":
            return int(n * s.expert_numel * stored_elem(s)) + merge
        # page-locked (``PopulationEvaluator.buffer(host=True)``): the E' experts as read, stacked per
        # tensor, and the accumulator, each in torch's power-of-two block
        stacked = sum(pinned_bytes(n * x, device) for x in _expert_read_bytes(ck, s.layer_idx, E))
        return stacked + pinned_bytes(merge, device)

    cand_host = max((candidate_host(s) for s in sizes), default=0)
    pop = plan_budget(ck, device=device, dtype=dtype, batch_size=batch_size, seq_len=seq_len, max_vram=plan.max_vram,
                      max_ram=plan.max_ram, prefetch=False, grouped=plan.grouped_experts,
                      extra_host={f"a candidate's {n} experts and their merge buffers": cand_host})
    wb, act = pop.weights_budget, pop.activation_bytes + pop.blas_workspace_bytes  # the evaluator's one thread's
    flag = _budget_flag(pop)
    layers: dict[int, Placement] = {}
    for s in sizes:
        router = sum(_numel(ck.tensor_info(k)[0]) for k in ck.adapter.router_keys(s.layer_idx)) * n // E * 4
        res, pe = s.resident_bytes(b), s.expert_bytes(b)
        whole = res + E * pe + router + n * s.expert_numel * (4 + b)
        if wb is None or whole <= wb:
            layers[s.layer_idx] = Placement(None, device_bytes=whole + act)
            continue
        p = choose_placement(resident=res + router, per_expert=pe, num_experts=n, weights_budget=wb, act=act)
        if p is None:
            need = int((res + router + pe + act) / (1 - SAFETY)) + 1
            raise ConfigError(
                f"{flag} {fmt_bytes(pop.device_budget)}: EEP search, layer {s.layer_idx}: attention + router + shared "
                f"weights {fmt_bytes(res)} + a candidate's router {fmt_bytes(router)} + one expert {fmt_bytes(pe)} + "
                f"activations {fmt_bytes(pop.activation_bytes)}"
                f"{f' + a cuBLAS workspace {fmt_bytes(pop.blas_workspace_bytes)}' if pop.blas_workspace_bytes else ''} "
                f"need at least {fmt_bytes(need)}; raise {flag} or lower --batch-size/--seq-len")
        if not p.chunked:  # the E' experts fit: one group, loaded once per candidate block
            p = Placement(n, False, p.device_bytes)
        layers[s.layer_idx] = p
    pop.device_peak_bytes = max([pop.device_peak_bytes] + [p.device_bytes for p in layers.values()])
    pop.host_peak_bytes = (pop.host_fixed_bytes + pop.host_layer_bytes
                           + (pop.device_peak_bytes if device.type != "cuda" else 0))
    out = PopulationBudget(pop, n, layers, cand_host)
    grouped = [layers[L] for L in out.chunked_layers if layers[L].group_size < n]  # a single group never waits
    if grouped:
        _held_waves(ck, pop, grouped, batch_size=batch_size, seq_len=seq_len, num_chunks=num_chunks)
    if out.chunked_layers:
        pop.notes.append(f"EEP search: {len(out.chunked_layers)} layer(s) keep their experts in host memory and run a "
                         f"candidate's {n} experts in groups of "
                         f"{min(layers[L].group_size for L in out.chunked_layers)}-"
                         f"{max(layers[L].group_size for L in out.chunked_layers)}"
                         f"{f', {pop.wave_chunks} activation chunks a wave' if pop.wave_chunks > 1 else ''}")
    return out


def _held_waves(ck, pop: BudgetPlan, chunked: list[Placement], *, batch_size: int, seq_len: int, num_chunks: int) -> None:
    """The activation chunks a layer held in host memory runs together through a candidate block whose
    experts visit the device in groups (``eep.population.PopulationEvaluator._run``, experts-major
    waves): each group then goes to the device once per wave instead of once per chunk. The most
    chunks (up to ``num_chunks``) whose waiting hidden states, routing and per-expert outputs (and on
    CUDA a cuBLAS workspace per chunk's thread) fit in the device budget beside the chunked layers'
    planned peak (on a CPU run that budget is what --max-ram leaves the compute copy); sets
    ``pop.wave_chunks`` and adds them to its peaks."""
    device = torch.device(pop.device)
    terms = activation_terms(ck.config, batch_size=batch_size, seq_len=seq_len,
                             dtype_bytes=dtype_bytes(getattr(torch, pop.compute_dtype)), top_k=ck.top_k,
                             num_experts=ck.num_experts, grouped=pop.grouped_experts)
    per = sum(terms[k] for k in WAVE_TERMS)
    blas = blas_workspace_bytes(device)
    worst = max(p.device_bytes for p in chunked)

    def extra(w: int) -> int:
        return 0 if w <= 1 else (w - 1) * per + w * blas

    def fits(w: int) -> bool:  # as ``plan_budget`` places a layer (on a CPU run the device budget is --max-ram's rest)
        return pop.device_budget is None or worst + extra(w) <= pop.device_budget * (1 - SAFETY)

    C = max(1, int(num_chunks))
    w = largest(1, C, fits) if C > 1 and fits(2) else 1
    if w > 1:
        pop.wave_chunks, pop.wave_chunk_bytes = w, per
        pop.device_terms = {**pop.device_terms, "wave_chunks_waiting": (w - 1) * per}
        pop.device_peak_bytes = max(pop.device_peak_bytes, worst + extra(w))
        if device.type != "cuda":
            pop.host_peak_bytes += extra(w)


def plan_sourced_population(ck, plan: BudgetPlan, *, num_experts: int, batch_size: int, seq_len: int,
                            quant: str = "none", num_chunks: int = 1, groups: bool | None = None) -> PopulationBudget:
    """The population evaluation's budget when a layer's routed experts are never held whole: the
    layer's non-expert weights are read (``lazy.read_lazy_layer``), and each candidate block's E'
    experts are selected or merged reading one source expert at a time from the shards
    (``eep.population.CandidateSource``), then visit the device in groups (``ChunkedExperts``).
    Two ways, for groups of g of the candidate's E' experts (P params each, compute dtype b bytes,
    held in h bytes a param: the stored dtype, a quantized checkpoint's compute dtype):

    * **the candidate held** (``candidate_groups`` False): its E' experts are built into host buffers
      once per candidate block (``LoadedLayer._sourced_experts``), merged outputs m at a time;
    * **built a group at a time** (``candidate_groups`` True, where --max-ram cannot hold E' experts):
      a group is built when the device asks for it into the one staging buffer, its merged outputs
      summed together (m = g), and dropped before the next; the activation chunks run in waves of w
      (experts-major, ``experts.run_wave``), so each group is built once per wave.

        device = resident weights (b) + a candidate's router + 2 groups (g P b; built a group at a
                 time: 1) + activations + the w - 1 chunks of a wave waiting at their experts
        host   = interpreter + activation chunks in flight + the non-expert weights as read
                 + the candidate's E' experts (E' P h; built a group at a time: g P h) + one merge's
                 temporaries (float32 accumulators for a block of m outputs, one source as read and
                 decoded, its float32 copy) + on a CPU run, the device copy above (it lives in RAM)

    Reads: every candidate block reads its sources, not the layer once per generation: a kept expert
    once (per wave), and for merged outputs each source with a nonzero coefficient once per block of m
    outputs summed together (``merge_block``; a dense W_EM reads the layer ceil(E'/m) times). So the
    fewest reads come first: with the candidate held, the largest m that fits with g = 1, then the
    largest g; built a group at a time, the fewest waves that fit with g = 1 (``num_chunks``
    activation chunks), then the largest g that keeps them. ``groups`` None: the candidate held where
    it fits, else built a group at a time; True/False: that way only. ConfigError naming the flag and
    the floor (built a group at a time, g = w = 1) when neither fits. ``quant`` nf4/int8: the sources
    are the quantized cache's (``quant.CachedTensor`` entries): an expert read is its codes, then
    dequantized one tensor at a time."""
    device, dtype = torch.device(plan.device), getattr(torch, plan.compute_dtype)
    on_cpu = device.type != "cuda"
    b = dtype_bytes(dtype)
    n = int(num_experts)
    C = max(1, int(num_chunks))
    cfg = ck.config
    quantized = ck.quant_format
    sizes = _lazy_sizes(ck)
    terms_act = activation_terms(cfg, batch_size=batch_size, seq_len=seq_len, dtype_bytes=b, top_k=ck.top_k,
                                 num_experts=ck.num_experts, grouped=plan.grouped_experts)
    act = sum(terms_act.values())
    wave_chunk = sum(terms_act[k] for k in WAVE_TERMS)
    blas = blas_workspace_bytes(device)
    rounding = allocator_rounding(max(len(ck.layer_keys(L.idx)) for L in sizes)) if not on_cpu else 0
    chunk_host = 4 * batch_size * seq_len * int(cfg.get("hidden_size", 0)) * 4
    max_ram, max_vram = plan.max_ram, plan.max_vram
    dev_budget = None if on_cpu else max_vram
    # as ``fits`` tries them: built a group at a time, merged outputs summed together (held: the
    # block; built in groups: the group), chunks per wave
    mode = {"groups": False, "blk": 1, "w": 1}

    def held_elem(L: _LazyLayerSize) -> float:  # bytes a param of a candidate's held expert
        return dtype_bytes(ck.compute_dtype) if quantized is not None else L.exp_stored / max(1, L.exp_numel)

    def router(L: _LazyLayerSize) -> int:
        return sum(_numel(ck.tensor_info(k)[0]) for k in ck.adapter.router_keys(L.idx)) * n // ck.num_experts * 4

    def waves_on(L: _LazyLayerSize, g: int) -> bool:
        return mode["groups"] and mode["w"] > 1 and bool(L.num_experts) and g < n

    def device_need(L: _LazyLayerSize, g: int) -> dict[str, int]:
        t = {"resident_weights": L.res_numel * b, **terms_act, "blas_workspaces": blas, "allocator_rounding": rounding}
        if L.num_experts:
            on_device = 1 if mode["groups"] else 2  # built a group at a time: the one computing only
            t.update(candidate_router=router(L), expert_groups=on_device * min(g, n) * L.exp_numel * b)
        if waves_on(L, g):
            t["wave_chunks_waiting"] = (mode["w"] - 1) * wave_chunk
            t["blas_workspaces"] = blas * (1 + mode["w"])  # and one per chunk's thread (``experts.WaveTask``)
        return t

    def candidate_experts(L: _LazyLayerSize, g: int) -> int:
        one = int(L.exp_numel * held_elem(L))
        rows = min(g, n) if mode["groups"] else n  # built a group at a time: one group's staging buffer
        return pinned_bytes(rows * one, device) if not on_cpu else rows * one

    def merge_temporaries(L: _LazyLayerSize, g: int) -> int:
        # float32 accumulators (a block of outputs), the source as read, decoded (quantized) and one tensor's float32 copy
        blk = min(g, n) if mode["groups"] else mode["blk"]
        t = 4 * L.exp_numel * blk + 4 * L.mat_numel
        if quant != "none":
            # the expert dequantized, and for one tensor its codes, bitsandbytes' float32 output and its
            # copy in the stored dtype before it is placed
            return t + int(L.exp_numel * held_elem(L)) + int(L.mat_numel * (BYTES_PER_PARAM[quant] + 4 + held_elem(L)))
        t += L.exp_stored
        if quantized is not None:
            t += int(L.exp_numel * held_elem(L)) + SCRATCH_BYTES
        return t

    def host_need(L: _LazyLayerSize, g: int) -> dict[str, int]:
        t = {"interpreter": HOST_BASE_BYTES, "activation_chunks": chunk_host, "layer_non_expert_weights": L.res_stored}
        if L.num_experts:
            key = "candidate_expert_group" if mode["groups"] else "candidate_experts"
            t.update({key: candidate_experts(L, g), "merge_temporaries": merge_temporaries(L, g)})
        if on_cpu:
            t["compute_copy"] = sum(device_need(L, g).values())
        return t

    head_keys = [k for k in ck.other_keys() if k.startswith("model.norm.")]
    head_keys.append("lm_head.weight" if "lm_head.weight" in ck.weight_map else "model.embed_tokens.weight")
    head_s = sum(ck.read_bytes(k) for k in head_keys if k in ck.weight_map)
    head_c = sum(_numel(ck.tensor_info(k)[0]) for k in head_keys if k in ck.weight_map) * b
    embed_key = "model.embed_tokens.weight"
    embed_s = ck.read_bytes(embed_key) if embed_key in ck.weight_map else 0
    embed_c = _numel(ck.tensor_info(embed_key)[0]) * b if embed_s else 0
    # embedding the tokens, and the final norm + lm_head: phases of their own, with no layer held
    other_host = HOST_BASE_BYTES + chunk_host + max(embed_s + (embed_c if on_cpu else 0), head_s + (head_c if on_cpu else 0))
    other_device = max(embed_c, head_c) + act + blas

    def host_total(g: int) -> int:
        return max([other_host] + [sum(host_need(L, g).values()) for L in sizes])

    def device_total(g: int) -> int:
        return max([other_device] + [sum(device_need(L, g).values()) for L in sizes])

    def fits(g: int, **trial) -> bool:
        saved = dict(mode)
        mode.update(trial)
        try:
            if max_ram is not None and host_total(g) > max_ram * (1 - SAFETY):
                return False
            return dev_budget is None or device_total(g) <= dev_budget * (1 - SAFETY)
        finally:
            mode.update(saved)

    mode["groups"] = True  # the floor: built a group at a time, g = w = 1
    floor_ram = int(host_total(1) / (1 - SAFETY)) + 1
    mode["groups"] = False
    if groups is None:
        groups = not fits(1)  # the candidate held where it fits
    mode["groups"] = bool(groups)
    if max_ram is not None and host_total(1) > max_ram * (1 - SAFETY):
        held = "" if groups else f" (holding a candidate's {n} experts: about {fmt_bytes(int(host_total(1) / (1 - SAFETY)) + 1)})"
        raise ConfigError(
            f"--max-ram {fmt_bytes(max_ram)} is too small for the EEP search even building a candidate's experts "
            f"from the shards one at a time: the non-expert weights + one expert + one merge + activations + the "
            f"interpreter need about {fmt_bytes(floor_ram)}{held}; raise --max-ram")
    if not fits(1):
        floor_vram = int(device_total(1) / (1 - SAFETY)) + 1
        raise ConfigError(
            f"--max-vram {fmt_bytes(max_vram)}: EEP search: the resident weights + a candidate's router + "
            f"{'one single-expert group' if groups else 'two single-expert groups'} + activations need at least "
            f"{fmt_bytes(floor_vram)}; raise --max-vram or lower --batch-size/--seq-len")

    if not groups:
        # fewer reads first: a merged candidate reads each source once per block of outputs summed
        # together, so the block takes the room before the device groups do
        mode["blk"] = largest(1, max(1, n), lambda m: fits(1, blk=m))
        g = largest(1, max(1, n), fits)
    else:
        # fewer builds first: a group is built once per wave of chunks, so the most chunks per wave
        # (with groups of one), then the largest group that still builds each group as few times
        g = largest(1, max(1, n), fits)
        if g < n and C > 1:
            waves = -(-C // largest(1, C, lambda w: fits(1, w=w)))
            need = -(-C // waves)
            g = largest(1, g, lambda x: fits(x, w=need))
            mode["w"] = largest(need, C, lambda w: fits(g, w=w))
        mode["blk"] = min(g, n)
    g_n = min(g, n)
    layers = {L.idx: Placement(g_n, g < n, sum(device_need(L, g).values())) for L in sizes if L.num_experts}
    worst = max(sizes, key=lambda L: sum(host_need(L, g).values()))
    host_terms = host_need(worst, g)
    big = max(sizes, key=lambda L: sum(device_need(L, g).values()))
    w = mode["w"] if groups and g < n else 1
    pop = BudgetPlan(device=str(device), compute_dtype=plan.compute_dtype, max_vram=max_vram, max_ram=max_ram,
                     device_budget=dev_budget, activation_bytes=act,
                     weights_budget=None if dev_budget is None else int(dev_budget * (1 - SAFETY)) - act - blas - rounding,
                     prefetch_layers=False, layers=dict(layers), host_peak_bytes=int(host_total(g)),
                     device_peak_bytes=int(device_total(g)), host_layer_bytes=int(worst.res_stored),
                     host_fixed_bytes=HOST_BASE_BYTES + chunk_host, lazy_experts=True, host_terms=host_terms,
                     device_terms=device_need(big, g), min_max_ram=floor_ram, blas_workspace_bytes=blas,
                     grouped_experts=plan.grouped_experts, wave_chunks=w, wave_chunk_bytes=wave_chunk if w > 1 else 0)
    if groups:
        pop.notes.append(f"EEP search: --max-ram {fmt_bytes(max_ram)} cannot hold a layer's experts nor a candidate's "
                         f"{n}; each candidate's experts are built from the shards {g_n} at a time, when the device "
                         f"runs them, for {w} of {C} activation chunks at a time")
    else:
        pop.notes.append(f"EEP search: --max-ram {fmt_bytes(max_ram)} cannot hold a layer's experts; each candidate's "
                         f"{n} experts are read from the shards one source at a time (merged ones {mode['blk']} at a "
                         f"time) and run in groups of {g_n}")
    return PopulationBudget(pop, n, layers, candidate_experts(worst, g), sourced=True, merge_block=mode["blk"],
                            quant=quant, candidate_groups=bool(groups))


# ---- bookkeeping -------------------------------------------------------------------------------


def _state_bytes(state: dict[str, torch.Tensor], dtype: torch.dtype) -> int:
    b = dtype_bytes(dtype)
    return sum(v.numel() * (v.element_size() if not v.is_floating_point() or k.endswith("e_score_correction_bias") else b)
               for k, v in state.items())


# ---- building layers under the budget ---------------------------------------------------------


class Placer:
    """Builds each decoder layer on the compute device, whole or with chunked experts."""

    def __init__(self, device, dtype, plan: BudgetPlan | None = None, stats: IOStats | None = None):
        self.device, self.dtype = torch.device(device), dtype
        self.plan = plan
        self.stats = stats or IOStats()
        self.accountant = Accountant(plan.activation_bytes if plan is not None and plan.device_budget is not None else 0)
        self.chunked_builds: dict[int, int] = {}  # layer -> group size used
        # expert groups read lazily from the shards land in these reused buffers (pinned on CUDA): two
        # for the layer computing, a third for the next layer's first group when layers are prefetched
        prefetching = plan is None or plan.prefetch_layers
        self.pool = StagingPool(3 if prefetching else 2, pin=self.device.type == "cuda", stats=self.stats)
        # the first staging buffer is made now, while the pass builds its skeleton and embeds the tokens,
        # not when the first layer's first group is read (page-locking a GiB is not instant); not with
        # --no-prefetch, whose pass does its work on the main thread, in order
        self._warm = None
        first = getattr(plan, "staging_buffer_bytes", 0) if plan is not None else 0
        if first and prefetching:
            self._warm = threading.Thread(target=self.pool.warm, args=(first,), name="lowmoe-staging-warm", daemon=True)
            self._warm.start()
        # expert groups are read and copied to the device on this thread while the previous group computes
        self.loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lowmoe-experts") if prefetching else None
        # the next layer's first group, staged for the device while this layer computes (``stage_next``)
        self._stager = DeviceStager(self.device, self.stats, kind="experts") if prefetching else None
        self._next_lock = threading.Lock()
        self._offered = None  # (layer, source, group size): the next layer's first group, preloaded
        self._room_after: int | None = None  # the layer whose last pass leaves room for it
        self.staged_ahead = 0  # how many first groups were staged ahead (for tests and the report)

    @property
    def weights_budget(self) -> int | None:
        return None if self.plan is None else self.plan.weights_budget

    def preload(self, layer_idx: int, source) -> None:
        """Read the first expert group of ``layer_idx`` now (the layer reader calls it off the main
        thread), into the pool's third buffer; skipped when that is busy. Once the layer computing
        has room on the device for it (``stage_next``), it is staged there too."""
        group = self.lazy_group_size(layer_idx, source)
        if not source.preload(0, group, self.pool) or self._stager is None:
            return
        with self._next_lock:
            self._offered = (layer_idx, source, group)
            ready = self._room_after is not None and self._room_after < layer_idx
        if ready:
            self._stage_offered()

    def stage_next(self, layer_idx: int, experts) -> None:
        """Layer ``layer_idx`` runs its last pass with ``experts`` (its routed-experts module; None for
        a dense layer). When they are one group (or kept experts of one), with a second group's room
        planned on the device (``double_buffer``), that room is free for the rest of the layer: the next layer's first group,
        preloaded by the layer reader, is copied and cast for the device now (on the expert loader
        thread), so the next layer starts with its experts on the device instead of waiting for them.
        Skipped when the accountant's bytes + the group would pass the planned device peak."""
        if self._stager is None:
            return
        one_group = isinstance(experts, KeptExperts) or (isinstance(experts, ChunkedExperts) and experts.num_groups == 1
                                                         and experts.double_buffer)
        if experts is not None and not one_group:
            return
        with self._next_lock:
            self._room_after = layer_idx
            ready = self._offered is not None and self._offered[0] > layer_idx
        if ready:
            self._stage_offered()

    def _stage_offered(self) -> None:
        with self._next_lock:
            offered, self._offered, self._room_after = self._offered, None, None
        if offered is None:
            return
        layer_idx, source, group = offered
        need = group * source.expert_numel() * dtype_bytes(self.dtype)
        acct = self.accountant
        if self.plan is not None and acct.current + acct.activation_bytes + need > self.plan.device_peak_bytes:
            log.debug("layer %d: first expert group not staged ahead (%s over the planned device peak)", layer_idx,
                      fmt_bytes(acct.current + acct.activation_bytes + need - self.plan.device_peak_bytes))
            return
        token = acct.add(need)
        source.prestage(0, group, self.loader.submit(stage_preloaded, source, 0, group, self._stager, self.dtype,
                                                     self.pool), token)
        self.staged_ahead += 1

    def close(self) -> None:
        if self.loader is not None:
            self.loader.shutdown(wait=True)
            self.loader = None
        if self._warm is not None:
            self._warm.join()
            self._warm = None
        self.pool.close()

    def lazy_group_size(self, layer_idx: int, source) -> int:
        """Experts per group for a layer whose experts are read from ``source`` (``lazy.ExpertSource``):
        the plan's (``plan_lazy_budget``), else groups of at most ``DEFAULT_GROUP_BYTES``."""
        p = self.plan.layers.get(layer_idx) if self.plan is not None else None
        if p is not None and p.group_size is not None:
            return max(1, min(p.group_size, source.num_experts))
        per = source.expert_numel() * dtype_bytes(self.dtype)
        return max(1, min(source.num_experts, DEFAULT_GROUP_BYTES // max(1, per)))

    def materialize(self, skel, layer_idx: int, runtime_state: dict[str, torch.Tensor], *,
                    num_experts: int | None = None, top_k: int | None = None, experts=None, kept=None) -> nn.Module:
        """``hf.materialize_layer`` under the budget (same arguments, same module and numbers).
        ``experts``: a ``lazy.ExpertSource`` the routed experts are read from in groups (``LazyExperts``);
        ``kept``: ``(module, keep)``, experts ``keep`` of a module already on the device (``KeptExperts``)."""
        with self._next_lock:  # a room left by an earlier layer is not this one's to fill
            if self._room_after is not None and self._room_after < layer_idx:
                self._room_after = None
            if self._offered is not None and self._offered[0] <= layer_idx:
                self._offered = None
        if kept is not None:
            return build_layer(skel, layer_idx, runtime_state, self.device, self.dtype, accountant=self.accountant,
                               stats=self.stats, num_experts=num_experts, top_k=top_k, kept=kept)
        if experts is not None:
            group = self.lazy_group_size(layer_idx, experts)
            self.chunked_builds[layer_idx] = group
            return build_layer(skel, layer_idx, runtime_state, self.device, self.dtype, group_size=group,
                               accountant=self.accountant, stats=self.stats, num_experts=num_experts, top_k=top_k,
                               source=experts, pool=self.pool, loader=self.loader)
        placement = None
        if self.weights_budget is not None and layer_idx in skel.moe_layers:
            experts, rest = split_experts(skel.adapter, runtime_state)
            if experts:
                n_exp = next(iter(experts.values())).shape[0]
                per_expert = sum(v[0].numel() for v in experts.values()) * dtype_bytes(self.dtype)
                placement = choose_placement(resident=_state_bytes(rest, self.dtype), per_expert=per_expert,
                                             num_experts=n_exp, weights_budget=self.weights_budget)
                if placement is None:
                    raise ConfigError(f"layer {layer_idx} does not fit the device budget even one expert at a time "
                                      f"({fmt_bytes(self.plan.device_budget)}); raise --max-vram")
        group = placement.group_size if placement is not None else None
        built = build_layer(skel, layer_idx, runtime_state, self.device, self.dtype, group_size=group,
                            double_buffer=placement.double_buffer if placement is not None else True,
                            accountant=self.accountant, stats=self.stats, num_experts=num_experts, top_k=top_k,
                            loader=self.loader)
        if group is not None:
            self.chunked_builds[layer_idx] = group
            log.debug("layer %d: experts streamed in groups of %d", layer_idx, group)
        return built

    def report(self) -> dict:
        d = {"accounted_peak_bytes": self.accountant.peak, "chunked_layers": sorted(self.chunked_builds),
             "first_groups_staged_ahead": self.staged_ahead,
             "staging_pool_bytes": self.pool.peak_bytes,
             "staging_buffers_made": self.pool.buffers_made, "staging_buffers_made_ahead": self.pool.made_ahead,
             "group_sizes": {str(k): v for k, v in sorted(self.chunked_builds.items())}}
        if self.plan is not None:
            d["plan"] = self.plan.to_json()
        if self.device.type == "cuda":
            d["cuda_max_memory_allocated"] = int(torch.cuda.max_memory_allocated(self.device))
            d["pinned"] = pinned_stats(self.device)
        return d


def build_layer(skel, layer_idx: int, runtime_state: dict[str, torch.Tensor], device, dtype, *,
                group_size: int | None = None, double_buffer: bool = True, accountant: Accountant | None = None,
                stats: IOStats | None = None, num_experts: int | None = None, top_k: int | None = None,
                source=None, pool: StagingPool | None = None, loader: Executor | None = None, kept=None) -> nn.Module:
    """One decoder layer on ``device``: whole (``group_size=None``, exactly ``materialize_layer``) or
    with its routed experts wrapped in ``ChunkedExperts`` streaming ``group_size`` at a time
    (``source``: read lazily from the checkpoint through ``pool``, ``LazyExperts``), or (``kept``:
    ``(module, keep)``) experts ``keep`` of an experts module already on the device, shared
    (``KeptExperts``: its bytes stay counted with that module's layer)."""
    device = torch.device(device)
    accountant = accountant if accountant is not None else Accountant()
    module = skel.new_layer(layer_idx, layer_config(skel, num_experts, top_k))
    if kept is not None:
        inner, keep = kept
        moe_modules(skel.adapter, module)[0].experts = nn.Identity()  # no weights of its own to fill
        built = materialize(module, runtime_state, device, dtype)
        moe_modules(skel.adapter, built)[0].experts = KeptExperts(inner, keep)
        accountant.track(built, _state_bytes(runtime_state, dtype))
        return built
    if source is not None:
        block = moe_modules(skel.adapter, module)[0]
        block.experts = LazyExperts(block.experts, source, group_size=group_size, device=device, dtype=dtype, pool=pool,
                                    double_buffer=double_buffer, accountant=accountant, stats=stats, loader=loader)
        built = materialize(module, runtime_state, device, dtype)
        accountant.track(built, _state_bytes(runtime_state, dtype))
        return built
    if group_size is None:
        built = materialize(module, runtime_state, device, dtype)
        accountant.track(built, _state_bytes(runtime_state, dtype))
        return built
    experts, rest = split_experts(skel.adapter, runtime_state)
    if device.type == "cuda":  # async host->device copies need page-locked sources
        experts = {k: (v if v.is_pinned() else v.pin_memory()) for k, v in experts.items()}
    block = moe_modules(skel.adapter, module)[0]
    block.experts = ChunkedExperts(block.experts, experts, group_size=group_size, device=device, dtype=dtype,
                                   double_buffer=double_buffer, accountant=accountant, stats=stats,
                                   loader=loader if double_buffer else None)
    built = materialize(module, rest, device, dtype)
    accountant.track(built, _state_bytes(rest, dtype))
    return built
