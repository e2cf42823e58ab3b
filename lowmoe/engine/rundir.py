"""The output directory of a run: made safe, written layer by layer, resumable, finished last.

    prepare_output -> refuse an output that overlaps the input, or a non-empty one without
                      --overwrite/--resume; on --resume, the manifest of the killed run (same
                      fingerprint: same inputs and options)
    PruneRun       -> the shard writer and the manifest (``lowmoe_progress.json``), rewritten after
                      every layer, so a killed run resumes at its next layer with the same bytes
    finalize       -> extra layers (MTP), embeddings/norm/lm_head, patched config.json, tokenizer and
                      other files, the index LAST (from then on the checkpoint is complete), the report

Work files (activation cache, search state) live under ``OUT/.lowmoe-work`` and are removed at the end.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import torch

from ..errors import OutputError
from ..version import __version__
from .apply import PlanFields, apply_layer, apply_layer_quantized, patch_config
from .card import invocation, write_model_card
from .checkpoint import Checkpoint
from .lazy import LazyLayer, selection_only
from .memory import cuda_peak_bytes, peak_rss_bytes
from .plan import LayerPlan, Plan
from .writer import ShardWriter, parse_size

log = logging.getLogger(__name__)

MANIFEST = "lowmoe_progress.json"
REPORT = "lowmoe_report.json"
WORK_DIR = ".lowmoe-work"


def fingerprint(options: dict, ck: Checkpoint) -> str:
    """A short hash of a run's options and the input's index and config: a resume needs the same."""
    d = dict(options)
    d["index"] = sorted(ck.weight_map.items())
    d["config"] = ck.config
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def prepare_output(out_dir: Path, ck: Checkpoint, fingerprint: str, *, resume: bool = False,
                   overwrite: bool = False) -> dict | None:
    """Make ``out_dir`` safe to write; return the resume manifest if resuming."""
    out_dir = Path(out_dir)
    out, src = out_dir.resolve(), ck.path.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise OutputError(f"{out_dir}: output directory overlaps the input model {ck.path}; choose another directory")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")
    if out.exists() and any(out.iterdir()):
        manifest = out / MANIFEST
        if resume:
            if not manifest.is_file():
                if (out / "model.safetensors.index.json").is_file() and (out / REPORT).is_file():
                    raise OutputError(f"{out_dir}: already holds a finished lowmoe output; nothing to resume (use --overwrite to redo)")
                raise OutputError(f"{out_dir}: no {MANIFEST} to resume from; use --overwrite to start over")
            state = json.loads(manifest.read_text())
            if state.get("fingerprint") != fingerprint:
                raise OutputError(f"{out_dir}: was started with other inputs or options; resume needs the same ones (or use --overwrite)")
            return state
        if not overwrite:
            raise OutputError(f"{out_dir}: directory exists and is not empty; pass --overwrite to replace it or --resume to continue")
        shutil.rmtree(out)
    elif resume:
        log.info("nothing to resume in %s; starting fresh", out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return None


def write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    os.replace(tmp, path)


def _json_default(o):
    if isinstance(o, torch.Tensor):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(type(o).__name__)


class PruneRun:
    """One output directory being written: the plan so far, the shard writer, the manifest.

    Methods fill ``layers`` (and ``scores``/``protected``/``stats`` for the report) and call
    ``write_layer`` + ``finish_layer`` per decoder layer in order; ``finalize`` writes what is left
    and the index last. ``plan_fields``: per-layer plan fields beyond keep/merge/router that
    ``apply_layer`` must apply (``apply.PlanFields``, from the method registry)."""

    def __init__(self, out: Path, ck: Checkpoint, fingerprint: str, manifest: dict | None, *,
                 max_shard_size: str | int = "5GB", plan_fields: PlanFields | None = None, budget=None):
        self.ck = ck
        self.out = Path(out)
        self.fingerprint = fingerprint
        self.plan_fields = plan_fields
        self.writer = ShardWriter(self.out, parse_size(max_shard_size))
        self.adapter = ck.adapter
        self.moe = set(ck.moe_layers())
        self.layers: dict[int, LayerPlan] = {}
        self.scores: dict[int, list[float]] = {}
        self.protected: dict[int, list[int]] = {}
        self.stats: dict[int, dict] = {}
        self.times: dict[int, dict] = {}
        self.notes: list[str] = []
        self.requantized: dict[int, dict] = {}  # quantized checkpoints: merged experts re-quantized, per layer
        self.next_layer = 0
        self.started = time.time()
        self.resumed_from: int | None = None
        self.budget = budget  # lowmoe.engine.budget plan (--max-vram / --max-ram)
        if manifest is not None:
            self._restore(manifest)

    # ---- manifest ------------------------------------------------------------------------
    def save_manifest(self, extra: dict | None = None) -> None:
        write_json_atomic(self.out / MANIFEST, {
            "fingerprint": self.fingerprint, "next_layer": self.next_layer,
            "layers": {str(k): v.to_json() for k, v in self.layers.items()},
            "scores": self.scores, "protected": self.protected, "stats": self.stats, "times": self.times,
            "notes": self.notes, "requantized": self.requantized, "writer": self.writer.state(), **(extra or {})})

    def _restore(self, m: dict) -> None:
        self.next_layer = int(m["next_layer"])
        self.resumed_from = self.next_layer
        self.layers = {int(k): LayerPlan.from_json(v, f"{MANIFEST}: layers[{k}]") for k, v in m["layers"].items()}
        self.scores = {int(k): v for k, v in m.get("scores", {}).items()}
        self.protected = {int(k): v for k, v in m.get("protected", {}).items()}
        self.stats = {int(k): v for k, v in m.get("stats", {}).items()}
        self.times = {int(k): v for k, v in m.get("times", {}).items()}
        self.notes = list(m.get("notes", []))
        self.requantized = {int(k): v for k, v in m.get("requantized", {}).items()}
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
        """The output tensors of decoder layer ``layer_idx`` (plan applied for MoE layers), in the
        checkpoint's stored format. ``tensors``: the layer as read (``Checkpoint.read_layer``:
        dequantized where the checkpoint is quantized)."""
        if self.ck.quant_format is not None:
            return self._quantized_layer_output(layer_idx, tensors)
        if tensors is None:
            tensors = self.ck.read_layer(layer_idx)
        if isinstance(tensors, LazyLayer):
            # kept experts of a selection plan stay stored entries: the writer copies their bytes
            lp = self.layers.get(layer_idx) if layer_idx in self.moe else None
            tensors = tensors.for_plan(selection_only(lp) and self.adapter.expert_layout == "per_expert")
        if layer_idx in self.moe:
            return apply_layer(self.adapter, layer_idx, tensors, self.layers[layer_idx], self.ck.num_experts,
                               fields=self.plan_fields)
        return tensors

    def _quantized_layer_output(self, layer_idx: int, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """A quantized checkpoint's layer: the stored bytes of everything kept (read again, as
        stored), merged experts re-quantized (``apply.apply_layer_quantized``)."""
        ck = self.ck
        stored = ck.read_layer_stored(layer_idx)
        if layer_idx not in self.moe:
            return stored
        if isinstance(tensors, LazyLayer):  # read whole for a quantized checkpoint (lazy.read_lazy_layer)
            tensors = dict(tensors)
        lp = self.layers[layer_idx]
        if tensors is None and (lp.merge is not None or lp.extra):
            tensors = ck.dequantize(stored)
        out, stats = apply_layer_quantized(self.adapter, layer_idx, ck.quant_format, stored, tensors, lp,
                                           ck.num_experts, fields=self.plan_fields)
        if stats["requantized"]:
            self.requantized[layer_idx] = stats
        return out

    def write_layer(self, layer_idx: int, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Write the layer's output; return it as the engine computes with it (logical keys,
        dequantized: what the written layer holds, re-quantized merges included)."""
        t0 = time.perf_counter()
        out = self.layer_output(layer_idx, tensors)
        self.writer.add_all(out)
        self.times.setdefault(layer_idx, {})["write_s"] = round(time.perf_counter() - t0, 4)
        return self.ck.dequantize(out)

    def finish_layer(self, layer_idx: int) -> None:
        self.next_layer = layer_idx + 1
        self.save_manifest()

    # ---- the end ---------------------------------------------------------------------------
    def plan(self, top_k: int, meta: dict) -> Plan:
        return Plan(dict(sorted(self.layers.items())), top_k, meta)

    def _quant_report(self) -> dict | None:
        """A quantized input: its format, and the round-trip error of the experts re-quantized."""
        fmt = self.ck.quant_format
        if fmt is None:
            return None
        layers = {str(k): v for k, v in sorted(self.requantized.items())}
        worst = max((v["requant_fro_rel"] for v in self.requantized.values()), default=0.0)
        return {"method": fmt.method, "weight_block_size": list(fmt.block) if fmt.method == "fp8" else None,
                "kept_experts": "stored bytes copied unchanged",
                "requantized_experts": sum(v["requantized"] for v in self.requantized.values()),
                "requant_fro_rel_max": worst, "layers": layers}

    def finalize(self, plan: Plan, report_extra: dict) -> dict:
        ck = self.ck
        for layer_idx in ck.extra_layers():
            self.writer.add_all(ck.read_layer_stored(layer_idx))
            self.notes.append(f"layer {layer_idx} (beyond num_hidden_layers, e.g. an MTP layer) copied unchanged")
        for layer_idx in ck.missing_extra_layers():
            self.notes.append(f"layer {layer_idx}: config.json's {self.adapter.extra_layers_key} declares it but the "
                              "input's index holds no tensors for it (transformers' save_pretrained writes no MTP "
                              "layer); skipped")
        rest = ck.other_keys()
        self.writer.add_all(ck.read_stored(rest))
        cfg_out, notes = patch_config(ck.config, self.adapter, plan, ck.num_experts)
        self.notes += notes
        for p in ck.extra_files():  # tokenizer, chat template, generation_config.json, ...
            shutil.copy2(p, self.out / p.name)
        write_json_atomic(self.out / "config.json", cfg_out)
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
            "quantization": self._quant_report(),
            "notes": self.notes, "resumed_from_layer": self.resumed_from, "command": invocation(), **report_extra,
        }
        write_model_card(self.out, report, ck.config, ck.path)  # README.md: replaces the base model's card
        write_json_atomic(self.out / REPORT, report)
        (self.out / MANIFEST).unlink(missing_ok=True)
        shutil.rmtree(self.out / WORK_DIR, ignore_errors=True)
        return report
