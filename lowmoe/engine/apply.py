"""Apply a plan to one layer's on-disk tensors, and patch config.json to match.

``apply_layer`` works on the checkpoint's own key names and layout, so its output is written to
the new shards as is. Experts are renumbered 0..E'-1; router rows and every per-expert router
tensor (router bias, ``e_score_correction_bias``) are sliced or mapped in step; every other tensor
of the layer is passed through untouched (same storage, so a keep-everything plan is bit-exact).

Merges (``LayerPlan.merge``) are computed in float32 and cast back to the stored dtype. For the
router mapping of a real-valued W_RM, router weight rows (and a router bias) are mapped linearly
(row_j = Σ_i W_RM[j,i]·W_G[i]); ``e_score_correction_bias`` is a routing offset, not a linear
quantity, so output slot j takes the bias of its dominant source expert (largest |W_RM[j, i]|).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Callable

import torch

from .adapters import ALL_EXPERT_COUNT_KEYS, Adapter
from .formats import RoundTrip
from .lazy import QuantizedStored, decoded, entry, entry_dtype, entry_rows
from .plan import LayerPlan, Plan

log = logging.getLogger(__name__)

@dataclass(frozen=True)
class PlanFields:
    """How to apply per-layer plan fields beyond keep/merge/router (e.g. DERN's ``neurons``).

    ``pre``: fields applied to the layer's *input* tensors before keep/merge (e.g. ``align``: neuron
    permutations that leave each expert's function unchanged): name -> fn(adapter, layer_idx,
    tensors, value) -> tensors. ``post``: fields applied to the kept/merged experts: name ->
    fn(adapter, layer_idx, experts_out, originals, value) -> experts_out, where both mappings may
    hold stored entries (``lazy.StoredTensor``...; read on use) and ``originals`` may be a
    ``lazy.LazyLayer``. ``view``: a ``pre`` field applied on access instead, for a per-expert layout
    read lazily: name -> fn(adapter, layer_idx, tensors, value) -> a mapping over the same keys that
    computes an expert tensor when it is asked for (and whose ``stored(key)`` gives the entries it
    leaves alone). The methods that make such plans supply them (``lowmoe.methods.PLAN_FIELDS``); a
    field nobody knows is left alone. ``scratch_bytes``: the float32 bytes a post field may hold in
    blocks (``budget.BudgetPlan.merge_scratch_bytes``), passed to it as ``scratch_bytes=``; None: its
    own default."""

    pre: dict[str, Callable] = field(default_factory=dict)
    post: dict[str, Callable] = field(default_factory=dict)
    view: dict[str, Callable] = field(default_factory=dict)
    scratch_bytes: int | None = None

    def from_sources(self, adapter: Adapter, lp: LayerPlan | None) -> bool:
        """Whether ``apply_layer_from_sources`` applies ``lp``: a per-expert layout whose plan fields
        are all views, post fields or unknown (a ``pre`` field without a view needs the whole layer);
        a fused layout's selection with post fields only (DERN's ``neurons``: the kept rows, then the
        rows each field reads)."""
        if lp is None:
            return False
        if adapter.expert_layout == "per_expert":
            return all(n in self.view or n not in self.pre for n in lp.extra)
        return lp.merge is None and all(n not in self.pre for n in lp.extra)

    def fused_rows(self, adapter: Adapter, lp: LayerPlan | None) -> bool:
        """Whether a plan over a fused layout is computed a row (output expert) at a time from its
        sources' rows (``apply_layer_fused_rows``, ``_merged_fused``): its fields, if any, are all
        views (``align``: the rows permuted as read, ``viewed``)."""
        return (lp is not None and adapter.expert_layout == "fused"
                and all(n in self.view for n in lp.extra))

    def viewed(self, adapter: Adapter, layer_idx: int, tensors, lp: LayerPlan):
        """``tensors`` seen through the views of ``lp``'s fields (``view``), in the plan's order."""
        for name, value in lp.extra.items():
            if name in self.view:
                tensors = self.view[name](adapter, layer_idx, tensors, value)
        return tensors


NO_FIELDS = PlanFields()


def _matrix(m, n_out: int, n_in: int) -> torch.Tensor:
    t = torch.tensor(m, dtype=torch.float32)
    assert t.shape == (n_out, n_in)
    return t


def merge_experts(experts, merge: torch.Tensor, out=None, acc: torch.Tensor | None = None):
    """The one merge kernel of a per-expert layout: ``out[j] = Σ_i merge[j, i] · experts[i]``,
    accumulated in float32 in expert order (zero terms skipped), then rounded to ``out[j]``'s dtype.

    ``experts``: the E source tensors (a list, or a stacked (E, ...) tensor); ``merge``: (E', E);
    ``out``: E' destinations (a list, or rows of an (E', ...) buffer; default: new tensors in the
    experts' dtype); ``acc``: a float32 scratch tensor of one expert's shape. The writer and the EEP
    evaluator both call this, so their merged experts are bit-identical."""
    first = experts[0]
    acc = torch.empty(first.shape, dtype=torch.float32, device=first.device) if acc is None else acc
    rows = merge.tolist()
    if out is None:
        out = [torch.empty(first.shape, dtype=first.dtype, device=first.device) for _ in rows]
    for j, coeffs in enumerate(rows):
        accumulate(acc, ((c, t) for c, t in zip(coeffs, experts) if c != 0.0))
        out[j].copy_(acc)
    return out


def accumulate(acc: torch.Tensor, terms) -> torch.Tensor:
    """``acc = Σ c · t`` over ``terms`` ((coefficient, tensor) pairs, in order) in float32: the sums of
    ``merge_experts``, so the same bits. ``terms`` may be a generator that reads each tensor when it
    is asked for: each is let go once added, so one source is decoded at a time."""
    acc.zero_()
    for c, t in terms:
        acc.add_(t.float(), alpha=c)
        del t
    return acc


def merge_one(read, coeffs: dict[int, float]) -> torch.Tensor:
    """One merged expert tensor ``Σ_i coeffs[i] · read(i)`` (sources in id order; the caller leaves
    zero coefficients out), in the first source's dtype, with ``merge_experts``' bits. Each source is
    read when it is added: a merge of m experts holds one decoded source and a float32 accumulator,
    not the m sources."""
    ids = sorted(coeffs)
    head = [read(ids[0])]
    acc = torch.empty(head[0].shape, dtype=torch.float32, device=head[0].device)
    dtype = head[0].dtype

    def terms():
        yield coeffs[ids[0]], head.pop()
        for i in ids[1:]:
            yield coeffs[i], read(i)

    return accumulate(acc, terms()).to(dtype)


def map_rows(t: torch.Tensor, keep: list[int], mat: torch.Tensor | None) -> torch.Tensor:
    """Router rows (dim 0): select ``keep`` or map with ``mat`` (E' x E) as one float32 matrix product,
    in ``t``'s dtype. (Expert weights merge by ``merge_experts``, whatever their layout.)"""
    if mat is None:
        return t[keep].clone()
    flat = t.float().reshape(t.shape[0], -1)
    return (mat @ flat).reshape((mat.shape[0],) + tuple(t.shape[1:])).to(t.dtype)


def experts_for_plan(x: torch.Tensor, lp: LayerPlan, out: torch.Tensor | None = None,
                     acc: torch.Tensor | None = None) -> torch.Tensor:
    """One stacked expert tensor (experts on dim 0: a fused tensor, or per-expert ones stacked) with
    ``lp`` applied: the kept rows, or merged as ``apply_layer`` merges them (``merge_experts``), in
    ``x``'s dtype (or into ``out``, whose dtype rounds the result)."""
    if lp.merge is None:
        keep = torch.tensor(lp.keep, dtype=torch.long, device=x.device)
        return torch.index_select(x, 0, keep) if out is None else torch.index_select(x, 0, keep, out=out)
    merge = torch.tensor(lp.merge, dtype=torch.float32)
    if out is None:
        out = torch.empty((merge.shape[0],) + tuple(x.shape[1:]), dtype=x.dtype, device=x.device)
    merge_experts(x, merge, out, acc)
    return out


def apply_layer(adapter: Adapter, layer_idx: int, tensors: dict[str, torch.Tensor], lp: LayerPlan,
                num_experts: int, fields: PlanFields | None = None) -> dict[str, torch.Tensor]:
    """Return the layer's output tensors (on-disk keys) with ``lp`` applied (its extra fields
    through ``fields``)."""
    fields = fields or NO_FIELDS
    for name, value in lp.extra.items():
        pre = fields.pre.get(name)
        if pre is not None:
            tensors = pre(adapter, layer_idx, tensors, value)
    prefix = adapter.layer_prefix(layer_idx)
    n_out = len(lp.keep)
    merge = _matrix(lp.merge, n_out, num_experts) if lp.merge is not None else None
    router = _matrix(lp.router, n_out, num_experts) if lp.router is not None else merge
    router_keys = set(adapter.router_keys(layer_idx))
    out: dict[str, torch.Tensor] = {}
    experts_out: dict[str, torch.Tensor] = {}
    originals: dict[str, torch.Tensor] = {}
    per_expert: dict[str, list[torch.Tensor | None]] = {}  # projection suffix -> per-expert tensors
    for key, t in tensors.items():
        rel = key[len(prefix):]
        if key in router_keys:
            if key.endswith("e_score_correction_bias") or adapter.is_router_extra(rel):
                # per-expert bias (experts on the last dim): a merged expert takes its dominant member's
                dom = lp.keep if router is None else router.abs().argmax(dim=1).tolist()
                out[key] = t[..., dom].clone()
            else:
                out[key] = map_rows(t, lp.keep, router)
        elif adapter.is_expert_key(rel):
            originals[key] = t
            if adapter.expert_layout == "fused" and merge is None and not isinstance(t, torch.Tensor):
                experts_out[key] = t.rows(lp.keep)  # a stored entry (lazy.StoredTensor): kept rows copied as bytes
            elif adapter.expert_layout == "fused":  # rows merged by the per-expert kernel (merge_experts)
                experts_out[key] = experts_for_plan(t, lp)
            else:
                _, e, suffix = rel[len(adapter.moe_prefix):].split(".", 2)
                per_expert.setdefault(suffix, [None] * num_experts)[int(e)] = t
        else:
            out[key] = t
    base = prefix + adapter.moe_prefix + "experts."
    for suffix, ts in per_expert.items():
        merged = None if merge is None else merge_experts(ts, merge)
        for j in range(n_out):
            experts_out[f"{base}{j}.{suffix}"] = ts[lp.keep[j]] if merged is None else merged[j]
    for name, value in lp.extra.items():
        fn = fields.post.get(name)
        if fn is not None:
            experts_out = fn(adapter, layer_idx, experts_out, originals, value, scratch_bytes=fields.scratch_bytes)
    out.update(experts_out)
    return out


# ---- quantized checkpoints (FP8 block, MXFP4) ------------------------------------------------


def _expert_template(adapter: Adapter, layer_idx: int, key: str) -> str:
    """``key`` with a per-expert index replaced by ``*`` (``...experts.3.w1.weight`` -> ``...experts.*.w1.weight``)."""
    prefix = adapter.layer_prefix(layer_idx)
    head = prefix + adapter.moe_prefix + "experts."
    if adapter.expert_layout != "per_expert" or not key.startswith(head) or not adapter.is_expert_key(key[len(prefix):]):
        return key
    _, rest = key[len(head):].split(".", 1)
    return f"{head}*.{rest}"


def _copy_source(lp: LayerPlan, j: int, fields: PlanFields) -> int | None:
    """The source expert whose stored bytes output expert ``j`` can copy: plain selection, or a
    merge row that is exactly one source with coefficient 1 (merged from itself alone: the same
    bits); None when ``j`` must be computed (a real merge, or, with ``fields``, a plan field that
    may rewrite experts: ``_from_sources`` passes no fields, since there a view's rewritten expert
    has no stored entry and a post field rewrites what it reads)."""
    if any(n in fields.pre or n in fields.post for n in lp.extra):
        return None
    if lp.merge is None:
        return lp.keep[j]
    nz = [(i, c) for i, c in enumerate(lp.merge[j]) if c != 0.0]
    return nz[0][0] if len(nz) == 1 and nz[0][1] == 1.0 else None


def apply_layer_quantized(adapter: Adapter, layer_idx: int, fmt, stored: dict[str, torch.Tensor],
                          tensors: dict[str, torch.Tensor], lp: LayerPlan, num_experts: int,
                          fields: PlanFields | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """``apply_layer`` for a quantized checkpoint (``formats.QuantFormat`` ``fmt``): the output in the
    stored format, and stats for the report.

    ``stored``: the layer's stored tensors (stored keys); ``tensors``: the same layer dequantized
    (logical keys). Kept experts and every tensor the plan leaves alone are the input's stored
    bytes (values and scales, renumbered); merged experts (and experts rewritten by a plan field)
    are computed on the dequantized weights as ``apply_layer`` does, then re-quantized to the same
    format. Stats: ``requantized`` (how many output experts were re-quantized) and the worst relative
    round-trip error of those re-quantizations, per tensor (``requant_fro_rel``: ||err|| / ||w||;
    ``requant_max_abs_rel``: max |err| / max |w|)."""
    fields = fields or NO_FIELDS
    stats = {"requantized": 0, "requant_fro_rel": 0.0, "requant_max_abs_rel": 0.0}
    sources = [_copy_source(lp, j, fields) for j in range(len(lp.keep))]
    if all(s is not None for s in sources) and lp.merge is None:
        # selection only: the stored tensors themselves, rows picked and renumbered (bytes unchanged)
        return apply_layer(adapter, layer_idx, stored, lp, num_experts), stats
    groups = fmt.group_keys(stored)
    quantized = {_expert_template(adapter, layer_idx, k) for k, ps in groups.items() if len(ps) > 1}
    router_keys = set(adapter.router_keys(layer_idx))
    prefix = adapter.layer_prefix(layer_idx)
    out: dict[str, torch.Tensor] = {}
    requantized: set[int] = set()  # output experts
    fused_rows = fields.fused_rows(adapter, lp)
    if fields.from_sources(adapter, lp):
        # rows that are one source with coefficient 1 come as that source's stored entry where the plan's
        # fields leave it as it is (copied below), else computed
        items = _from_sources(adapter, layer_idx, tensors, lp, num_experts, fields)
    elif fused_rows:  # (an ``align`` view permutes each source row as it is read)
        items = _merged_fused(adapter, layer_idx, fields.viewed(adapter, layer_idx, tensors, lp), lp, num_experts,
                              sources, quantized)
    else:
        items = apply_layer(adapter, layer_idx, tensors, lp, num_experts, fields=fields).items()
    for key, t in items:
        template = _expert_template(adapter, layer_idx, key)
        if template not in quantized:
            out[key] = t() if callable(t) else t
            continue
        rel = key[len(prefix):]
        if not adapter.is_expert_key(rel) and key not in router_keys:
            out.update({p: stored[p] for p in groups[key]})  # passed through: the stored bytes
            continue
        sample = fmt.parts(template.replace(".*.", ".0.", 1))  # a stored weight of the same kind
        scale_dtype = entry_dtype(stored[sample[1]])
        if adapter.expert_layout == "per_expert" and key not in router_keys:
            j = int(rel[len(adapter.moe_prefix + "experts."):].split(".", 1)[0])
            src = sources[j]
            if src is not None:  # one source, coefficient 1: its stored bytes
                for p_out, p_in in zip(fmt.parts(key), fmt.parts(template.replace(".*.", f".{src}.", 1))):
                    out[p_out] = stored[p_in]
                continue
            if isinstance(t, QuantizedStored):  # an expert a plan field left as it was: its stored bytes
                out[fmt.parts(key)[0]], out[fmt.parts(key)[1]] = t.main, t.scale
                continue
        if fused_rows and key not in router_keys:
            # the rows (output experts) that are one source with coefficient 1 take that source's
            # stored rows; the others come from ``_merged_fused`` one at a time, each re-quantized
            # (per expert: the same codes as the whole tensor at once) before the next is computed
            parts = {p_out: _copied_rows(None, stored[p_out], sources) for p_out in fmt.parts(key)}
            error = RoundTrip()  # over the re-quantized rows, each checked a band at a time
            for j, w in t():
                q = fmt.quantize(key, w, scale_dtype=scale_dtype)
                for p_out, v in q.items():
                    parts[p_out][j] = v[0]
                error = error.add(fmt.roundtrip_sums(q, key, w))
                requantized.add(j)
                del q, w
            max_abs_rel, fro_rel = error.rel()
            stats["requant_max_abs_rel"] = max(stats["requant_max_abs_rel"], max_abs_rel)
            stats["requant_fro_rel"] = max(stats["requant_fro_rel"], fro_rel)
            out.update(parts)
            continue
        t = decoded(t() if callable(t) else t)
        parts = fmt.quantize(key, t, scale_dtype=scale_dtype)
        if adapter.expert_layout == "fused" and key not in router_keys:
            # rows (experts) that are one source with coefficient 1 take that source's stored rows
            for p in parts:
                _copied_rows(parts[p], stored[p], sources)
            rows = [j for j, src in enumerate(sources) if src is None]
            err = fmt.roundtrip_of({p: v[rows] for p, v in parts.items()}, key, t[rows]) if rows else {}
            requantized.update(rows)
        else:
            err = fmt.roundtrip_of(parts, key, t)
            if key not in router_keys:
                requantized.add(int(rel[len(adapter.moe_prefix + "experts."):].split(".", 1)[0]))
        stats["requant_fro_rel"] = max(stats["requant_fro_rel"], err.get("fro_rel", 0.0))
        stats["requant_max_abs_rel"] = max(stats["requant_max_abs_rel"], err.get("max_abs_rel", 0.0))
        out.update(parts)
    stats["requantized"] = len(requantized)
    return out, stats


def _copied_rows(dst: torch.Tensor | None, stored, sources: list[int | None]) -> torch.Tensor:
    """Output rows (experts on dim 0) of a fused tensor that are one source with coefficient 1
    (``sources[j]`` not None) filled with that source's stored rows, read at once, into ``dst``
    (None: a new tensor of ``len(sources)`` rows in ``stored``'s dtype, the other rows unset)."""
    if dst is None:
        dst = torch.empty((len(sources),) + tuple(stored.shape[1:]), dtype=entry_dtype(stored))
    copies = [(j, src) for j, src in enumerate(sources) if src is not None]
    if copies:
        dst[[j for j, _ in copies]] = entry_rows(stored, [src for _, src in copies])
    return dst


def _merged_per_expert(adapter: Adapter, layer_idx: int, tensors, lp: LayerPlan, num_experts: int,
                       sources: list[int | None]):
    """``apply_layer(...).items()`` of a merge plan over a per-expert layout, in the same order, with
    each output expert a thunk: only an expert that must be re-quantized is computed, and it reads
    (``tensors[key]``: a ``lazy.LazyLayer`` decodes on access) only its sources with a nonzero
    coefficient -- the same sums as ``merge_experts`` over all of them, which skips zero terms, so
    the same bits. A layer read lazily is thus never dequantized whole: one output expert's sources
    at a time, and copied experts not at all."""
    prefix = adapter.layer_prefix(layer_idx)
    head = adapter.moe_prefix + "experts."
    resident, suffixes = {}, {}
    for key in tensors:
        rel = key[len(prefix):]
        if adapter.is_expert_key(rel) and rel.startswith(head):
            _, e, suffix = rel[len(adapter.moe_prefix):].split(".", 2)
            suffixes.setdefault(suffix, {})[int(e)] = key
        else:
            resident[key] = tensors[key]
    yield from apply_layer(adapter, layer_idx, resident, lp, num_experts).items()
    base = prefix + head
    merge = lp.merge if lp.merge is not None else [[1.0 if i == k else 0.0 for i in range(num_experts)] for k in lp.keep]

    def merged(row: list[float], keys: dict[int, str]) -> torch.Tensor:
        coeffs = {i: c for i, c in enumerate(row) if c != 0.0}
        if not coeffs:  # no source: zeros, as the full merge gives
            return torch.zeros_like(tensors[keys[0]])
        return merge_one(lambda i: tensors[keys[i]], coeffs)

    for suffix, keys in suffixes.items():
        for j in range(len(lp.keep)):
            src = sources[j]
            if src is not None:  # one source, coefficient 1: its stored entry (bytes copied), or the tensor
                yield f"{base}{j}.{suffix}", entry(tensors, keys[src])
            else:
                yield f"{base}{j}.{suffix}", (lambda row=merge[j], keys=keys: merged(row, keys))


def _from_sources(adapter: Adapter, layer_idx: int, tensors, lp: LayerPlan, num_experts: int, fields: PlanFields):
    """``apply_layer(...).items()`` for a per-expert layout, computed from each output expert's sources
    (``fields.from_sources(adapter, lp)``): plan fields with a view are applied on access
    (``PlanFields.view``); a merge decodes, per output expert, only its sources
    (``_merged_per_expert``); a selection passes the kept experts' stored entries through, renamed;
    then post fields rewrite the output experts, reading what they use. Values may be thunks (call
    them) or stored entries (``read()`` them, or let the writer copy their bytes): a merge row that is
    one source with coefficient 1 is that source's entry where no view rewrites it."""
    tensors = fields.viewed(adapter, layer_idx, tensors, lp)
    posts = [(fields.post[n], v) for n, v in lp.extra.items() if n in fields.post]
    if lp.merge is not None:
        sources = [_copy_source(lp, j, NO_FIELDS) for j in range(len(lp.keep))]
        items = _merged_per_expert(adapter, layer_idx, tensors, lp, num_experts, sources)
    else:
        entries = {k: entry(tensors, k) for k in tensors}
        items = apply_layer(adapter, layer_idx, entries, LayerPlan(lp.keep, router=lp.router), num_experts).items()
    if not posts:
        yield from items
        return
    prefix = adapter.layer_prefix(layer_idx)
    out, experts_out = {}, {}
    for key, t in items:
        (experts_out if adapter.is_expert_key(key[len(prefix):]) else out)[key] = t() if callable(t) else t
    for fn, value in posts:
        experts_out = fn(adapter, layer_idx, experts_out, tensors, value, scratch_bytes=fields.scratch_bytes)
    out.update(experts_out)
    yield from out.items()


def apply_layer_from_sources(adapter: Adapter, layer_idx: int, tensors, lp: LayerPlan, num_experts: int,
                             fields: PlanFields | None = None) -> dict:
    """``apply_layer``'s output for a plan whose experts are read on access (``tensors``: a
    ``lazy.LazyLayer``; ``fields.from_sources(adapter, lp)``: a per-expert layout, or a fused one's
    selection with post fields, its kept rows a stored entry until a field reads them): each merged expert
    decodes only its sources with a nonzero coefficient, one output expert at a time
    (``_merged_per_expert``), plan fields apply through views and post fields (``_from_sources``), and
    experts the plan leaves as they are stay stored entries, so the layer is never decoded whole --
    only its rewritten experts are held, as the writer needs them. The same bits as ``apply_layer``
    over the decoded layer (its float32 sums skip zero terms; a view permutes the stored values)."""
    items = _from_sources(adapter, layer_idx, tensors, lp, num_experts, fields or NO_FIELDS)
    return {key: (t() if callable(t) else t) for key, t in items}


def _merged_fused(adapter: Adapter, layer_idx: int, tensors, lp: LayerPlan, num_experts: int,
                  sources: list[int | None], by_row: set[str]):
    """``apply_layer(...).items()`` of a merge plan over a fused expert layout (experts on dim 0 of
    each fused tensor, e.g. GPT-OSS's ``gate_up_proj``), in the same order. A fused tensor in
    ``by_row`` (MXFP4's quantized ones for ``apply_layer_quantized``, every one for
    ``apply_layer_fused_rows``) is a thunk iterating over the output rows whose ``sources`` entry is
    None, as (row, (1, ...) tensor), each computed from its sources with a nonzero coefficient alone
    (``tensors`` may be a ``lazy.LazyLayer``: those sources' rows are decoded one at a time, never the
    whole tensor) by ``merge_one``: ``merge_experts``' bits whichever rows are decoded. Other fused
    tensors (MXFP4's biases) are read and mapped as ``apply_layer`` maps them."""
    prefix = adapter.layer_prefix(layer_idx)
    resident, fused = {}, []
    for key in tensors:
        if adapter.is_expert_key(key[len(prefix):]):
            fused.append(key)
        else:
            resident[key] = tensors[key]
    yield from apply_layer(adapter, layer_idx, resident, lp, num_experts).items()
    merge = lp.merge if lp.merge is not None else [[1.0 if i == k else 0.0 for i in range(num_experts)] for k in lp.keep]
    rows = [j for j, src in enumerate(sources) if src is None]

    def merged_rows(key: str):
        fused_t = entry(tensors, key)
        for j in rows:
            coeffs = {i: c for i, c in enumerate(merge[j]) if c != 0.0}
            if coeffs:  # each source row read when it is added
                yield j, merge_one(lambda i: entry_rows(fused_t, [i]), coeffs)
            else:  # a row without sources stays zero
                yield j, torch.zeros((1,) + tuple(fused_t.shape[1:]), dtype=entry_dtype(fused_t))

    for key in fused:
        if key in by_row:
            yield key, (lambda k=key: merged_rows(k))
        else:
            t = tensors[key]
            yield from apply_layer(adapter, layer_idx, {key: t}, lp, num_experts).items()


def apply_layer_fused_rows(adapter: Adapter, layer_idx: int, tensors, lp: LayerPlan, num_experts: int,
                           fields: PlanFields = NO_FIELDS) -> dict:
    """``apply_layer``'s output for a merge plan over an unquantized fused layout read lazily
    (``tensors``: a ``lazy.LazyLayer``; ``fields.fused_rows(adapter, lp)``: its plan fields, if any, are
    views, applied here, ``PlanFields.viewed``): each output row of a fused expert tensor is computed
    from its sources' rows alone, read one at a time (``_merged_fused``, ``merge_one``); a row that is
    one source with coefficient 1 is that source's row as stored. The fused tensors are never decoded
    whole: the layer's output (E' rows) and one merge are held."""
    tensors = fields.viewed(adapter, layer_idx, tensors, lp)  # (an ``align`` view permutes each source row as read)
    sources = [_copy_source(lp, j, NO_FIELDS) for j in range(len(lp.keep))]
    prefix = adapter.layer_prefix(layer_idx)
    fused = {k for k in tensors if adapter.is_expert_key(k[len(prefix):])}
    out = {}
    for key, t in _merged_fused(adapter, layer_idx, tensors, lp, num_experts, sources, fused):
        if key not in fused:
            out[key] = t
            continue
        y = _copied_rows(None, entry(tensors, key), sources)
        for j, row in t():
            y[j] = row[0]
        out[key] = y
    return out


# ---- config.json -----------------------------------------------------------------------------


def keep_groups(ck, keep_n: int) -> int:
    """DeepSeek group-limited routing: keep an equal number per group when that yields a valid
    grouped model; otherwise 1 (grouping is disabled in config.json, with a note)."""
    if not ck.adapter.grouped_routing:
        return 1
    n_group = int(ck.config.get(group_key(ck.config)) or 1)
    if n_group > 1 and keep_n % n_group == 0 and keep_n // n_group >= 2:
        return n_group
    return 1


def group_key(cfg: dict) -> str:
    """The config key of DeepSeek-style expert groups: ``n_group``, or Kimi's ``num_expert_group``."""
    return "num_expert_group" if "num_expert_group" in cfg and "n_group" not in cfg else "n_group"


def group_sizes_ok(keep: list[int], num_experts: int, n_group: int) -> bool:
    per = num_experts // n_group
    counts = [0] * n_group
    for e in keep:
        counts[e // per] += 1
    return len(set(counts)) == 1


def patch_config(raw: dict, adapter: Adapter, plan: Plan, num_experts: int) -> tuple[dict, list[str]]:
    """config.json for the output model, and notes for the report (e.g. grouping disabled)."""
    cfg = dict(raw)
    notes: list[str] = []
    k = plan.num_kept
    for key in set(ALL_EXPERT_COUNT_KEYS) | set(adapter.expert_count_keys):
        if key in cfg or key == adapter.expert_count_keys[0]:
            cfg[key] = k
    cfg[adapter.top_k_key] = plan.num_experts_per_tok
    gk = group_key(cfg)
    if adapter.grouped_routing and int(cfg.get(gk) or 1) > 1:
        n_group, topk_group = int(cfg[gk]), int(cfg.get("topk_group") or 1)
        selection = all(lp.merge is None for lp in plan.layers.values())
        valid = (k % n_group == 0 and k // n_group >= 2 and topk_group <= n_group
                 and plan.num_experts_per_tok <= topk_group * (k // n_group)
                 and selection and all(group_sizes_ok(lp.keep, num_experts, n_group) for lp in plan.layers.values()))
        if not valid:
            cfg[gk], cfg["topk_group"] = 1, 1
            if cfg.get("topk_method") == "group_limited_greedy":
                cfg["topk_method"] = "greedy"
            notes.append(f"group-limited routing disabled (n_group {n_group} -> 1): {k} kept experts cannot form "
                         f"{n_group} equal groups of >= 2 that still hold every token's top-{plan.num_experts_per_tok}")
            log.warning(notes[-1])
    return cfg, notes
