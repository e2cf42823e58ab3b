"""Super-expert protection ("Super Experts" in MoE LLMs,
arXiv 2507.23279).

Super experts produce rare, extreme outliers in their down_proj output; those drive the massive
activations and attention sinks of the whole model, so pruning even a handful of them breaks it.
With m_{l,e} = max over tokens routed to expert e of layer l of |f_e(x)| (f_e = the expert's
down_proj output, unweighted), expert (l, e) is a super expert iff

    m_{l,e} > P99.5({m}) over all experts of all MoE layers   and   m_{l,e} > max({m}) / 10

(the paper's profiler thresholds, also REAP's ``--perserve_outliers``; here over every MoE layer).
Super experts are never dropped, whatever the method.

The thresholds are model-wide but lowmoe decides layer by layer, so a prune run profiles first:
``profile`` streams a few calibration sequences (default 4) through the *original* model, layer
by layer in memory, and records m for every expert. Its cost is one extra read of the checkpoint
plus the forward pass of those few sequences (≈ n_seqs / n_calibration of the scoring compute);
super experts are a property of the weights, independent of the data (the paper), so a few
sequences suffice. The profile is cached (``cached_profile``): a small JSON under the user cache
directory (``$LOWMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowmoe`` or ``~/.cache/lowmoe``), keyed by the
checkpoint (path, index, config, and each shard's size, mtime and first/last MiB), the profiled token ids, the compute dtype and device
type; ``lowmoe profile MODEL --calib ...`` writes it ahead, and every later prune of the same model
with the same calibration reuses it instead of reading the checkpoint a second time (the report's
``super_expert_profile`` says which happened and how many expert bytes the profile read).
``lowmoe score`` needs no pre-pass: it takes m from the scoring pass itself
and applies the thresholds after the last layer (``MaximaObserver``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ...engine.hf import MoeCall, MoeProbe, run_layer
from ...engine.progress import progress as progress_bar
from ...engine.stream import release_layer

log = logging.getLogger(__name__)

PERCENTILE = 99.5
GLOBAL_FRACTION = 0.1


def max_abs_per_expert(call: MoeCall, num_experts: int) -> torch.Tensor:
    """(E,) float64 on the call's device: max |f_e(x)| over this call's tokens routed to each expert (0 if none)."""
    out = call.expert_outputs  # (T, k, H)
    slot_max = out.detach().float().abs().amax(dim=-1)  # (T, k)
    m = torch.zeros(num_experts, dtype=torch.float32, device=slot_max.device)
    m.scatter_reduce_(0, call.top_k_index.reshape(-1).to(slot_max.device), slot_max.reshape(-1), reduce="amax")
    return m.double()


def find_super_experts(maxima: dict[int, torch.Tensor], percentile: float = PERCENTILE,
                       global_fraction: float = GLOBAL_FRACTION) -> tuple[dict[int, set[int]], dict]:
    """Apply the two thresholds to every expert's max |down_proj output|.
    Returns ({layer_idx: {expert_idx}}, summary for the report)."""
    if not maxima:
        return {}, {}
    layers = sorted(maxima)
    allm = torch.cat([maxima[L].double().reshape(-1) for L in layers])
    q = float(torch.quantile(allm, percentile / 100.0))
    g = float(allm.max())
    cut = max(q, g * global_fraction)
    found = {L: {int(e) for e in torch.nonzero(maxima[L] > cut).reshape(-1)} for L in layers}
    found = {L: s for L, s in found.items() if s}
    summary = {"percentile": percentile, "percentile_value": q, "global_max": g, "global_fraction": global_fraction,
               "threshold": cut,
               "super_experts": [{"layer": L, "expert": e, "max_abs_output": float(maxima[L][e])}
                                 for L in sorted(found) for e in sorted(found[L])]}
    return found, summary


@dataclass
class SuperExpertGuard:
    """Protection observer with precomputed super experts (from ``profile``)."""

    found: dict[int, set[int]]
    summary: dict = field(default_factory=dict)
    needs_expert_outputs: bool = False
    cache: dict = field(default_factory=dict)  # where the profile came from (``cached_profile``)

    def observe(self, call: MoeCall) -> None:
        pass

    def protected(self, layer_idx: int) -> set[int]:
        return set(self.found.get(layer_idx, ()))


class MaximaObserver:
    """Records m_{l,e} during a streamed pass; ``protected(l)`` applies the thresholds to the layers
    seen so far (exact once every layer has passed -- what ``lowmoe score`` uses -- and a running
    approximation when a decision is needed earlier)."""

    needs_expert_outputs = True

    def __init__(self, num_experts: int):
        self.num_experts = num_experts
        self.maxima: dict[int, torch.Tensor] = {}
        self._current: torch.Tensor | None = None  # (E,) this layer's maxima so far, on the calls' device

    def observe(self, call: MoeCall) -> None:
        m = max_abs_per_expert(call, self.num_experts)  # stays on the device until the layer is committed
        self._current = m if self._current is None else torch.maximum(self._current, m)

    __call__ = observe  # usable directly as a MoeProbe callback

    def commit(self, layer_idx: int) -> None:
        current, self._current = self._current, None
        self.maxima[layer_idx] = (current.cpu() if current is not None
                                  else torch.zeros(self.num_experts, dtype=torch.float64))

    def protected(self, layer_idx: int) -> set[int]:
        if layer_idx not in self.maxima:
            self.commit(layer_idx)
        found, _ = find_super_experts(self.maxima)
        return set(found.get(layer_idx, ()))

    def result(self) -> tuple[dict[int, set[int]], dict]:
        return find_super_experts(self.maxima)


@torch.no_grad()
def profile(stream, n_seqs: int = 4, progress: bool = True) -> SuperExpertGuard:
    """Stream the first ``n_seqs`` calibration sequences through the original model, one layer at
    a time (hidden states kept in memory: n_seqs × seq_len × hidden), recording every expert's
    max |down_proj output|; returns the guard holding the super experts."""
    ck, skel, adapter = stream.ck, stream.skel, stream.ck.adapter
    ids = stream.tokens.input_ids[:n_seqs]
    key = "model.embed_tokens.weight"
    w = ck.read([key])[key].to(stream.device, stream.dtype)
    h = torch.nn.functional.embedding(ids.to(stream.device), w)  # (n, S, H)
    del w
    inputs = stream.inputs_for(h)
    moe = set(ck.moe_layers())
    obs = MaximaObserver(ck.num_experts)
    # layer L+1 is read while L computes; routed experts read in groups (whole layers for --quant)
    reader = stream.layers(0, moe, lazy=stream.quant == "none")
    layers = progress_bar(reader, len(reader), "super-expert profile", progress)
    for layer_idx, data in layers:
        is_moe = layer_idx in moe
        module = stream.materialize(layer_idx, data.runtime, experts=data.experts)
        del data
        if is_moe:
            with MoeProbe(adapter, module, obs):
                h = run_layer(skel, module, layer_idx, h, inputs)
            obs.commit(layer_idx)
        else:
            h = run_layer(skel, module, layer_idx, h, inputs)
        release_layer(module)
        del module
    found, summary = obs.result()
    summary["profile_sequences"] = int(ids.shape[0])
    if found:
        log.info("super experts (never dropped): %s", ", ".join(f"layer {L} expert {e}" for L in sorted(found) for e in sorted(found[L])))
    else:
        log.info("no super experts found (threshold %.4g)", summary.get("threshold", float("nan")))
    return SuperExpertGuard(found, summary)


# ---- the profile, computed once per model and calibration -----------------------------------------

CACHE_VERSION = 1


def cache_dir() -> Path:
    """Where cached profiles live: ``$LOWMOE_CACHE_DIR``, else ``$XDG_CACHE_HOME/lowmoe``, else ``~/.cache/lowmoe``."""
    root = os.environ.get("LOWMOE_CACHE_DIR")
    if root:
        return Path(root) / "profiles"
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(xdg) / "lowmoe" / "profiles"


def profile_key(stream, n_seqs: int) -> str:
    """What a profile depends on: the checkpoint (index, config, shard sizes), the profiled token ids,
    the compute dtype and device type."""
    ck = stream.ck
    shards = sorted(set(ck.weight_map.values()))
    d = {"v": CACHE_VERSION, "path": str(ck.path.resolve()), "index": sorted(ck.weight_map.items()), "config": ck.config,
         "shards": [_shard_fingerprint(ck.path / s) for s in shards],
         "ids": stream.tokens.input_ids[:n_seqs].tolist(), "dtype": str(stream.dtype), "device": stream.device.type}
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:24]


def _shard_fingerprint(path: Path, sample: int = 1 << 20) -> list:
    """A shard's size, modification time and a hash of its first and last MiB (two models of the same
    shapes but other weights never share a key; the whole file is not read)."""
    st = os.stat(path)
    h = hashlib.sha256()
    with open(path, "rb") as f:
        h.update(f.read(sample))
        if st.st_size > sample:
            f.seek(max(sample, st.st_size - sample))
            h.update(f.read(sample))
    return [path.name, st.st_size, st.st_mtime_ns, h.hexdigest()]


def _load(path: Path, key: str) -> SuperExpertGuard | None:
    try:
        d = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None
    if d.get("key") != key or d.get("version") != CACHE_VERSION:
        return None
    found = {int(L): {int(e) for e in es} for L, es in d["found"].items()}
    return SuperExpertGuard(found, d["summary"])


def _save(path: Path, key: str, guard: SuperExpertGuard, model: str) -> bool:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "key": key, "model": model,
                                   "found": {str(L): sorted(es) for L, es in sorted(guard.found.items())},
                                   "summary": guard.summary}, indent=1) + "\n")
        os.replace(tmp, path)
        return True
    except OSError as e:  # a read-only home is no reason to fail a prune
        log.warning("cannot cache the super-expert profile in %s (%s)", path.parent, e)
        return False


def cached_profile(stream, n_seqs: int = 4, progress: bool = True, *, use_cache: bool = True) -> SuperExpertGuard:
    """``profile``, computed once per model and calibration: read from the cache when a profile with the
    same key is there, else computed (one extra pass over the layers: its cost is logged and put in
    ``guard.cache``) and saved for the next run."""
    key = profile_key(stream, n_seqs)
    path = cache_dir() / f"{key}.json"
    if use_cache:
        hit = _load(path, key)
        if hit is not None:
            log.info("super-expert profile reused from %s (no extra pass over the checkpoint)", path)
            hit.cache = {"hit": True, "path": str(path), "expert_bytes_read": 0}
            return hit
    before = stream.files.bytes_read
    guard = profile(stream, n_seqs=n_seqs, progress=progress)
    cost = stream.files.bytes_read - before
    saved = _save(path, key, guard, str(stream.ck.path)) if use_cache else False
    log.info("super-expert profile: an extra pass that read %.2f GB of expert weights%s", cost / 1e9,
             f"; cached in {path} (`lowmoe profile` writes it ahead)" if saved else "")
    guard.cache = {"hit": False, "path": str(path) if saved else None, "expert_bytes_read": int(cost)}
    return guard
