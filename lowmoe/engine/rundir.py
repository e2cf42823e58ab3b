"""The output directory of a run: made safe, written layer by layer, resumable, finished last.

    prepare_output -> refuse an output that overlaps the input, or a non-empty one without
                      --overwrite/--resume; on --resume, the manifest of the killed run (same
                      fingerprint: same inputs and options)
    PruneRun       -> the shard writer and the manifest (``lowmoe_progress.json``), rewritten after
                      every layer, so a killed run resumes at its next layer with the same bytes
    finalize       -> extra layers (MTP), embeddings/norm/lm_head, patched config.json, tokenizer and
                      other files, the index LAST (from then on the checkpoint is complete), the report

Work files (activation cache, search state) live under ``OUT/.lowmoe-work`` and are removed at the end.

One writer per output: ``OutputLock`` holds an exclusive ``flock`` on ``OUT/.lowmoe-lock`` (which
records the holder's pid) for the whole run, so a second lowmoe process on the same OUT (and so on
its ``.lowmoe-work``: activation cache, EEP search state) stops with a one-line error before it
changes anything. The kernel drops the lock when its process dies, however it dies, so the lock
file a killed run leaves behind is simply taken over.

Every step that writes calls ``faults.point`` (``LOWMOE_FAULT``); ``finalize`` can be stopped at any
of them and run again by ``--resume``: shards already renamed, files already copied are recognised.
"""

from __future__ import annotations

import errno
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
from . import faults
from .apply import (NO_FIELDS, PlanFields, apply_layer, apply_layer_from_sources, apply_layer_fused_rows, apply_layer_quantized,
                    patch_config)
from .card import invocation, write_model_card
from .checkpoint import Checkpoint
from .lazy import HeldTensor, LazyLayer, QuantizedStored, ShardFiles, decoded, read_lazy_layer, selection_only
from .memory import cuda_peak_bytes, peak_rss_bytes
from .plan import LayerPlan, Plan
from .prefetch import IOStats, WriteBehind
from .progress import progress
from .writer import ShardWriter, parse_size, tensor_nbytes

log = logging.getLogger(__name__)

MANIFEST = "lowmoe_progress.json"
REPORT = "lowmoe_report.json"
WORK_DIR = ".lowmoe-work"
LOCK = ".lowmoe-lock"


def input_stamps(ck: Checkpoint) -> dict[str, str]:
    """Per input shard: size, modification time and a hash of its safetensors header. A shard that
    is rewritten, truncated or replaced between a killed run and its resume changes its stamp."""
    out = {}
    for shard in sorted(set(ck.weight_map.values())):
        p = ck.path / shard
        st = p.stat()
        with open(p, "rb") as f:
            head = f.read(8)
            n = int.from_bytes(head, "little") if len(head) == 8 else 0
            header = f.read(min(n, 100_000_000))
        out[shard] = f"{st.st_size}:{st.st_mtime_ns}:{hashlib.sha256(head + header).hexdigest()[:16]}"
    return out


def fingerprint(options: dict, ck: Checkpoint) -> str:
    """A short hash of a run's options, the input's index and config and its shards' stamps: a
    resume needs the same."""
    d = dict(options)
    d["index"] = sorted(ck.weight_map.items())
    d["config"] = ck.config
    d["shards"] = input_stamps(ck)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def check_output(out_dir: Path, ck: Checkpoint) -> None:
    """Refuse an output that overlaps the input or is a file (nothing is written)."""
    out_dir = Path(out_dir)
    out, src = out_dir.resolve(), ck.path.resolve()
    if out == src or src in out.parents or out in src.parents:
        raise OutputError(f"{out_dir}: output directory overlaps the input model {ck.path}; choose another directory")
    if out.exists() and not out.is_dir():
        raise OutputError(f"{out_dir}: exists and is not a directory")


def _contents(out: Path) -> list[Path]:
    return [p for p in out.iterdir() if p.name != LOCK] if out.is_dir() else []


def prepare_output(out_dir: Path, ck: Checkpoint, fingerprint: str, *, resume: bool = False,
                   overwrite: bool = False) -> dict | None:
    """Make ``out_dir`` safe to write; return the resume manifest if resuming. Call it holding
    ``OutputLock(out_dir)`` (the lock file is the one entry that does not make OUT "not empty")."""
    out_dir = Path(out_dir)
    check_output(out_dir, ck)
    out = out_dir.resolve()
    if resume and {p.name for p in _contents(out)} == {MANIFEST + ".tmp"}:
        (out / (MANIFEST + ".tmp")).unlink()  # killed while saving the very first manifest: nothing to keep
    if _contents(out):
        manifest = out / MANIFEST
        if resume:
            if not manifest.is_file():
                if (out / "model.safetensors.index.json").is_file() and (out / REPORT).is_file():
                    raise OutputError(f"{out_dir}: already holds a finished lowmoe output; nothing to resume (use --overwrite to redo)")
                raise OutputError(f"{out_dir}: no {MANIFEST} to resume from; use --overwrite to start over")
            try:
                state = json.loads(manifest.read_text())
                if not isinstance(state, dict):
                    raise ValueError("not an object")
            except (ValueError, UnicodeDecodeError) as e:
                raise OutputError(f"{manifest}: resume manifest is not valid JSON ({e}); use --overwrite to start over") from None
            stamps = input_stamps(ck)
            for shard, stamp in sorted((state.get("inputs") or {}).items()):
                if stamps.get(shard) != stamp:
                    raise OutputError(f"{ck.path / shard}: input shard changed since the run in {out_dir} was started "
                                      f"(size, time or header differ); resume needs the same input (or use --overwrite)")
            if state.get("fingerprint") != fingerprint:
                raise OutputError(f"{out_dir}: was started with other inputs or options; resume needs the same ones (or use --overwrite)")
            return state
        if not overwrite:
            raise OutputError(f"{out_dir}: directory exists and is not empty; pass --overwrite to replace it or --resume to continue")
        for p in _contents(out):  # the lock file stays: this process holds it
            shutil.rmtree(p) if p.is_dir() and not p.is_symlink() else p.unlink()
    elif resume:
        log.info("nothing to resume in %s; starting fresh", out_dir)
    out.mkdir(parents=True, exist_ok=True)
    return None


class OutputLock:
    """An exclusive lock on an output directory for the life of a run (``with OutputLock(out):``).

    ``flock`` on ``OUT/.lowmoe-lock``, which holds the owner's pid. A second process gets
    ``OutputError`` naming that pid and changes nothing (a directory this lock created is removed
    again). The kernel releases a flock when its process dies, so a stale file is just reused; the
    inode check after locking makes the unlink on release safe against a process that opened the
    old file just before it was removed."""

    def __init__(self, out: Path):
        self.out = Path(out)
        self.path = self.out / LOCK
        self.fd: int | None = None
        self.created_dir = False

    def __enter__(self) -> "OutputLock":
        try:
            import fcntl
        except ImportError:  # not POSIX: no lock (documented)
            log.warning("no flock on this platform: nothing stops two lowmoe processes writing %s at once", self.out)
            return self
        try:
            if not self.out.exists():
                self.out.mkdir(parents=True)
                self.created_dir = True
            while True:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except BlockingIOError:
                    pid = _read_pid(fd)
                    os.close(fd)
                    self._undo_dir()
                    raise OutputError(f"{self.out} is being written by another lowmoe process (pid {pid}); "
                                      "wait for it or choose another OUT") from None
                try:
                    same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
                except FileNotFoundError:
                    same = False
                if same:
                    break
                os.close(fd)  # the holder removed the file between our open and our lock: try again
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            os.fsync(fd)
            self.fd = fd
        except OSError as e:
            self._undo_dir()
            raise output_os_error(self.out, e) from None
        return self

    def _undo_dir(self) -> None:
        if self.created_dir:
            shutil.rmtree(self.out, ignore_errors=True)
            self.created_dir = False

    def __exit__(self, *exc) -> None:
        if self.fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)  # while still holding the lock (see the class docstring)
        except OSError:
            pass
        os.close(self.fd)
        self.fd = None
        if self.created_dir and self.out.is_dir() and not any(self.out.iterdir()):
            self.out.rmdir()  # a run that failed before writing anything leaves no empty OUT behind


def _read_pid(fd: int) -> str:
    for _ in range(20):  # the holder writes its pid right after locking
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 64).decode(errors="replace").strip()
        if text:
            return text
        time.sleep(0.05)
    return "unknown"


def output_os_error(out: Path, e: OSError) -> Exception:
    """An OSError met while writing ``out`` -> an ``OutputError`` a person can act on (the run is
    resumable: every write is either finished and recorded, or redone by ``--resume``)."""
    where = e.filename or out
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return OutputError(f"{out}: disk full while writing {where}; free space and rerun the same command with --resume")
    if e.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OutputError(f"{out}: cannot write {where} ({e.strerror}); make the directory writable and rerun "
                           "the same command with --resume")
    return OutputError(f"{out}: cannot write {where} ({e.strerror or e}); fix it and rerun the same command with --resume")


def write_json_atomic(path: Path, data: Any, step: str | None = None) -> None:
    """Write ``path`` through a temporary file and a rename; ``step``: the fault point in between."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, default=_json_default) + "\n")
    if step is not None:
        faults.point(step, path)
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
        self.plan_fields = plan_fields or NO_FIELDS
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
        self.inputs = input_stamps(ck)
        # what the method's pass returned for the report, saved once every layer is written: a run
        # killed while finishing resumes straight into ``finalize``
        self.runner_extra: dict | None = None
        self.command = invocation()  # the command that started the run (a resume keeps the first one's)
        # a layer's output tensors are written into the shards on this thread while the run goes on
        # (a sequential prune: the pruned layer's pass); ``finish_layer`` waits for them
        self.io = IOStats()  # the stream's, when a pass sets it: the report's "output_write"/"wait_output"
        self._writes: WriteBehind | None = None
        if manifest is not None:
            self._restore(manifest)

    # ---- manifest ------------------------------------------------------------------------
    def save_manifest(self, extra: dict | None = None) -> None:
        self.wait_writes()  # the writer's state below is the shards as written
        write_json_atomic(self.out / MANIFEST, {
            "fingerprint": self.fingerprint, "inputs": self.inputs, "next_layer": self.next_layer,
            "layers": {str(k): v.to_json() for k, v in self.layers.items()},
            "scores": self.scores, "protected": self.protected, "stats": self.stats, "times": self.times,
            "notes": self.notes, "requantized": self.requantized, "writer": self.writer.state(), "runner": self.runner_extra,
            "command": self.command, **(extra or {})}, "manifest")

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
        self.runner_extra = m.get("runner")
        self.command = m.get("command", self.command)
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
            lp = self.layers.get(layer_idx) if layer_idx in self.moe else None
            if lp is not None and not selection_only(lp) and tensors.experts is not None:
                # a merge or plan fields: each rewritten expert decodes only its sources, never the whole layer
                if self.plan_fields.from_sources(self.adapter, lp):
                    return apply_layer_from_sources(self.adapter, layer_idx, tensors, lp, self.ck.num_experts,
                                                    fields=self.plan_fields)
                if self.plan_fields.fused_rows(self.adapter, lp):  # the merged rows, from their sources' rows
                    return apply_layer_fused_rows(self.adapter, layer_idx, tensors, lp, self.ck.num_experts,
                                                  fields=self.plan_fields)
            # kept experts of a selection plan stay stored entries: the writer copies their bytes
            tensors = tensors.for_plan(selection_only(lp))
        if layer_idx in self.moe:
            return apply_layer(self.adapter, layer_idx, tensors, self.layers[layer_idx], self.ck.num_experts,
                               fields=self.plan_fields)
        return tensors

    def _quantized_layer_output(self, layer_idx: int, tensors: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        """A quantized checkpoint's layer: the stored bytes of everything kept (read again, as
        stored), merged experts re-quantized (``apply.apply_layer_quantized``). A selection plan over a
        lazily read layer (FP8 experts located, not read) copies the kept experts' values and scales
        from the input shards without reading them."""
        ck = self.ck
        lp = self.layers.get(layer_idx) if layer_idx in self.moe else None
        if isinstance(tensors, LazyLayer) and tensors.experts is not None and selection_only(lp):
            stored = self._lazy_stored(layer_idx, tensors)
            out, _ = apply_layer_quantized(self.adapter, layer_idx, ck.quant_format, stored, None, lp, ck.num_experts,
                                           fields=self.plan_fields)
            return out
        if (isinstance(tensors, LazyLayer) and tensors.experts is not None and lp is not None
                and (not lp.extra or self.plan_fields.from_sources(self.adapter, lp)
                     or self.plan_fields.fused_rows(self.adapter, lp))):
            # a merge over experts read lazily (per expert, or rows of MXFP4's fused tensors, ``align``
            # permuting them as read), or plan fields over per-expert ones: copied experts stay stored
            # entries, and each rewritten one decodes only its sources (apply_layer_quantized), never
            # the whole layer
            out, stats = apply_layer_quantized(self.adapter, layer_idx, ck.quant_format,
                                               self._lazy_stored(layer_idx, tensors), tensors, lp,
                                               ck.num_experts, fields=self.plan_fields)
            if stats["requantized"]:
                self.requantized[layer_idx] = stats
            return out
        stored = ck.read_layer_stored(layer_idx)
        if layer_idx not in self.moe:
            return stored
        if isinstance(tensors, LazyLayer):  # merged experts are computed on the dequantized layer
            tensors = dict(tensors)
        if tensors is None and (lp.merge is not None or lp.extra):
            tensors = ck.dequantize(stored)
        out, stats = apply_layer_quantized(self.adapter, layer_idx, ck.quant_format, stored, tensors, lp,
                                           ck.num_experts, fields=self.plan_fields)
        if stats["requantized"]:
            self.requantized[layer_idx] = stats
        return out

    def _lazy_stored(self, layer_idx: int, tensors: LazyLayer) -> dict:
        """A lazily read quantized layer as stored: its non-expert tensors read again as stored, its
        routed experts' stored entries (located, not read), in the order ``read_layer_stored`` gives
        (so the same output bytes)."""
        ck = self.ck
        keys = ck.layer_keys(layer_idx)
        read = ck.read_stored([k for k in keys if k in tensors.resident])
        stored = {}
        for k in keys:
            stored.update({p: read[p] for p in ck.parts[k]} if k in tensors.resident else tensors.stored_parts([k]))
        return stored

    def write_layer(self, layer_idx: int, tensors: dict[str, torch.Tensor] | None = None,
                    returned: bool = True) -> dict[str, torch.Tensor] | None:
        """Write the layer's output; return it as the engine computes with it (logical keys,
        dequantized: what the written layer holds, re-quantized merges included), or None when not
        ``returned`` (a plan applied layer by layer computes nothing with it: a quantized layer is then
        never dequantized whole)."""
        t0 = time.perf_counter()
        out = self.layer_output(layer_idx, tensors)
        if self._writes is None:
            self._writes = WriteBehind(stats=self.io, kind="output", max_pending=1)
        # on the writer thread, in order; its error is raised here or in ``finish_layer``, as it was
        self._writes.submit(self.writer.add_all, dict(out), nbytes=sum(tensor_nbytes(v) for v in out.values()))
        self.times.setdefault(layer_idx, {})["write_s"] = round(time.perf_counter() - t0, 4)
        if self.ck.quant_format is None or not returned:
            return out if returned else None
        lp = self.layers.get(layer_idx) if layer_idx in self.moe else None
        if lp is not None and not selection_only(lp):
            # a merge: the next layer's sequential pass builds this one from what is returned; its routed
            # experts stay as written (re-quantized tensors, copied entries), decoded a group at a time
            return self._held_quantized(layer_idx, out)
        # copied experts (stored entries) are not decoded: a sequential pass reads them from the input
        return self.ck.dequantize({k: v for k, v in out.items() if isinstance(v, torch.Tensor)})

    def _held_quantized(self, layer_idx: int, out: dict) -> dict:
        """A quantized layer's output (stored keys) as the engine computes with it: logical keys, the
        routed experts as ``QuantizedStored`` entries over their stored parts (``HeldTensor`` for the
        re-quantized ones, the input's entries for copies: nothing decoded here), every other tensor
        dequantized."""
        ck, fmt = self.ck, self.ck.quant_format
        prefix = self.adapter.layer_prefix(layer_idx)
        held, rest = {}, {}
        for logical, parts in fmt.group_keys(out).items():
            if len(parts) > 1 and self.adapter.is_expert_key(logical[len(prefix):]):
                main, scale = (out[p] if not isinstance(out[p], torch.Tensor) else HeldTensor(out[p], p)
                               for p in fmt.parts(logical))
                held[logical] = QuantizedStored(main, scale, fmt, ck.compute_dtype, logical)
            else:
                rest.update({p: decoded(out[p]) for p in parts})
        return {**ck.dequantize(rest), **held}

    def wait_writes(self) -> None:
        """Wait until every output tensor handed to ``write_layer`` is in the shards (re-raising a
        write's error here, on the caller's thread)."""
        if self._writes is not None:
            self._writes.flush()

    def close(self) -> None:
        """Stop the output writer thread once the writes queued so far are done; a run stopped by an
        error keeps that error (a write's own error was raised on the main thread already, or the
        output is unfinished anyway and ``--resume`` redoes the layer)."""
        if self._writes is not None:
            w, self._writes = self._writes, None
            try:
                w.close()
            except Exception:
                log.debug("output write failed while the run was stopping", exc_info=True)

    def finish_layer(self, layer_idx: int) -> None:
        self.wait_writes()  # the manifest records the shards as written: every queued write first
        faults.point("layer-written")
        self.next_layer = layer_idx + 1
        self.save_manifest()

    # ---- the end ---------------------------------------------------------------------------
    def plan(self, top_k: int, meta: dict) -> Plan:
        return Plan(dict(sorted(self.layers.items())), top_k, meta)

    def finish_layers(self, runner_extra: dict) -> None:
        """Every decoder layer is written: record what the method returned, so that a run killed
        from here on resumes in ``finalize`` without redoing (or needing the work files of) the pass."""
        self.runner_extra = runner_extra
        self.save_manifest()

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
        """Write everything after the decoder layers; safe to run again after a kill anywhere in it
        (the manifest is removed last, so ``--resume`` comes back here)."""
        ck = self.ck
        self.close()  # every layer's writes are done (``finish_layers`` waited for them)
        notes = list(self.notes)  # not saved: a rerun of finalize must not add them twice
        for layer_idx in ck.extra_layers():
            self.writer.add_all(ck.read_layer_stored(layer_idx))
            notes.append(f"layer {layer_idx} (beyond num_hidden_layers, e.g. an MTP layer) copied unchanged")
        for layer_idx in ck.missing_extra_layers():
            notes.append(f"layer {layer_idx}: config.json's {self.adapter.extra_layers_key} declares it but the "
                         "input's index holds no tensors for it (transformers' save_pretrained writes no MTP "
                         "layer); skipped")
        rest = ck.other_keys()
        self.writer.add_all(ck.read_stored(rest))
        cfg_out, cfg_notes = patch_config(ck.config, self.adapter, plan, ck.num_experts)
        notes += cfg_notes
        for p in ck.extra_files():  # tokenizer, chat template, generation_config.json, ...
            tmp = self.out / (p.name + ".tmp")
            shutil.copy2(p, tmp)
            os.replace(tmp, self.out / p.name)
        faults.point("files")
        write_json_atomic(self.out / "config.json", cfg_out, "config")
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
            "notes": notes, "resumed_from_layer": self.resumed_from, "command": self.command, **report_extra,
        }
        write_model_card(self.out, report, ck.config, ck.path)  # README.md: replaces the base model's card
        write_json_atomic(self.out / REPORT, report, "report")
        shutil.rmtree(self.out / WORK_DIR, ignore_errors=True)
        faults.point("cleanup")
        (self.out / MANIFEST).unlink(missing_ok=True)  # last: until here, --resume finishes the run
        return report


def write_layers(run: PruneRun, label: str, show_progress: bool) -> None:
    """Write the rest of ``run``'s decoder layers (``run.next_layer`` on) with their plans
    (``run.layers``), each read from the input as ``write_layer`` needs it: kept experts copied as
    stored bytes, a merged expert decoding only its sources (``lazy.read_lazy_layer``), never a whole
    layer decoded where the layout allows it. Each layer is recorded as done once written."""
    ck = run.ck
    files = ShardFiles(ck.path)
    try:
        for layer_idx in progress(range(run.next_layer, ck.num_layers), ck.num_layers - run.next_layer, label, show_progress):
            run.write_layer(layer_idx, read_lazy_layer(ck, files, layer_idx), returned=False)
            run.finish_layer(layer_idx)
    finally:
        files.close()
