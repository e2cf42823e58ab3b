"""Expert weights read lazily from the shards, in groups; kept experts copied to the output as bytes.

Where it sits: ``Stream.layers(..., lazy=True)`` (the prune and its super-expert profile) yields for
every decoder layer a ``LazyLayer`` instead of the layer's tensors: its non-expert tensors are read
(attention, norms, router, shared experts: small), its routed experts are ``StoredTensor``s -- where
the bytes are in which shard, nothing read. Then

* ``ExpertSource.load(ids)`` reads the experts ``ids`` straight into a runtime-layout buffer
  (transformers' fused ``gate_up_proj`` (g, 2I, H) / ``down_proj`` (g, H, I), or rows of a fused
  on-disk tensor) with ``os.preadv`` into the buffer's memory: one copy, no mmap (mapped pages of a
  read shard would stay in this process's RSS), no stacking of a whole layer.
  ``experts.ChunkedExperts`` calls it per group of experts while the layer computes (``LazyExperts``).
* ``LazyLayer.for_plan(lp)`` gives the layer's on-disk tensors for ``apply.apply_layer``: when the plan
  only selects experts (no merge, no extra fields) the expert entries stay ``StoredTensor``s, which
  ``apply_layer`` passes through unchanged (renamed; a fused tensor's kept rows as ``StoredRows``) and
  ``writer.ShardWriter`` copies byte for byte (``os.copy_file_range``) from the input shard into the
  output shard: never decoded, never in RAM. Any other plan gets the decoded tensors (the whole
  layer, once), except merges over quantized per-expert weights, which decode each merged expert's
  sources only (``apply.apply_layer_quantized``).

Output bytes are the same as through ``Checkpoint.read_layer``: a tensor's stored bytes are what
``safe_open`` would decode, and the writer writes them unchanged (tested).

Quantized experts (FP8 block, MXFP4: ``formats``) are ``QuantizedStored`` (values + scales). A group
of them is loaded as its stored bytes (``ExpertSource.packed``: uint8 buffers, which no host->device
copy casts) and dequantized by ``ExpertSource.decode`` on the device the bytes were moved to, so a CUDA
run never holds a float copy of a group on the host. MXFP4's experts are fused on dim 0 of
``_blocks``/``_scales``: a run of consecutive experts is one contiguous byte range, one read.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .checkpoint import ST_TORCH, nonfinite_error, read_header
from .device import all_finite

log = logging.getLogger(__name__)


class ShardFiles:
    """Open file descriptors and parsed headers of a checkpoint's shards (opened once, kept open)."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self._fds: dict[str, int] = {}
        self._headers: dict[str, tuple[dict, int]] = {}
        self._lock = threading.Lock()
        self.bytes_read = 0  # bytes read into memory (expert groups, decoded tensors)
        self.bytes_copied = 0  # bytes copied shard to shard without being decoded (kept experts)

    def fd(self, shard: str) -> int:
        with self._lock:
            fd = self._fds.get(shard)
            if fd is None:
                try:
                    fd = self._fds[shard] = os.open(self.root / shard, os.O_RDONLY)
                except OSError as e:
                    raise CheckpointError(f"{self.root / shard}: cannot open shard ({e})") from None
            return fd

    def header(self, shard: str) -> tuple[dict, int]:
        """(the shard's JSON header, file offset where its data starts)."""
        h = self._headers.get(shard)
        if h is None:
            h = self._headers[shard] = read_header(self.root / shard)
        return h

    def stored(self, key: str, shard: str) -> "StoredTensor":
        hd, start = self.header(shard)
        e = hd.get(key)
        if e is None:
            raise CheckpointError(f"{self.root / shard}: index names tensor {key!r} but the shard does not contain it")
        a, z = e["data_offsets"]
        return StoredTensor(self, shard, start + int(a), int(z) - int(a), e["dtype"], tuple(e["shape"]), key)

    def read_into(self, shard: str, offset: int, out: torch.Tensor) -> None:
        """Fill ``out`` (contiguous, CPU) with the bytes at ``offset`` of ``shard``."""
        view = memoryview(out.view(torch.uint8).reshape(-1).numpy()) if out.numel() else memoryview(b"")
        fd, done, n = self.fd(shard), 0, len(view)
        while done < n:
            got = os.preadv(fd, [view[done:]], offset + done)
            if got <= 0:
                raise CheckpointError(f"{self.root / shard}: unexpected end of file at byte {offset + done}; the shard may be truncated")
            done += got
        with self._lock:
            self.bytes_read += n

    def to_json(self) -> dict:
        return {"expert_bytes_read": self.bytes_read, "bytes_copied": self.bytes_copied}

    def close(self) -> None:
        with self._lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()

    def __del__(self):
        try:
            self.close()
        except Exception:
            pass


@dataclass(frozen=True)
class StoredTensor:
    """One tensor as stored in an input shard: where its bytes are, its dtype code and shape."""

    files: ShardFiles
    shard: str
    offset: int  # absolute file offset of the data
    nbytes: int
    dtype: str  # safetensors code, e.g. "BF16"
    shape: tuple[int, ...]
    key: str = ""  # its name in the checkpoint

    @property
    def torch_dtype(self) -> torch.dtype:
        try:
            return ST_TORCH[self.dtype]
        except KeyError:
            raise CheckpointError(f"{self.files.root / self.shard}: dtype {self.dtype} cannot be decoded") from None

    def read(self) -> torch.Tensor:
        """The tensor, decoded (one read of its bytes)."""
        t = torch.empty(self.shape, dtype=self.torch_dtype)
        self.files.read_into(self.shard, self.offset, t)
        return t

    def read_into(self, out: torch.Tensor) -> None:
        """The whole tensor into ``out`` (its shape, the stored dtype)."""
        self.files.read_into(self.shard, self.offset, out)

    def parts(self) -> dict[str, "StoredTensor"]:
        """Its stored tensors by key, as the writer copies them: itself."""
        return {self.key: self}

    def read_rows(self, row: int, out: torch.Tensor) -> None:
        """Rows ``row``, ``row + 1``, ... of dim 0, as many as ``out`` holds (stored dtype, or its bytes
        as uint8): one contiguous byte range -- a fused expert tensor's experts ``row..``."""
        self.files.read_into(self.shard, self.offset + row * self.row_bytes, out)

    def copy_to(self, f) -> None:
        """Append the stored bytes to the open binary file ``f`` (kernel copy where the OS has one)."""
        copy_range(self.files, self.shard, self.offset, self.nbytes, f)

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of dim 0 (one expert of a fused expert tensor)."""
        return self.nbytes // self.shape[0]

    def rows(self, keep) -> "StoredRows":
        """Rows ``keep`` of dim 0, as a stored entry (copied to the output without being decoded)."""
        return StoredRows(self, tuple(int(r) for r in keep))


def row_runs(rows) -> list[tuple[int, int, int]]:
    """``rows`` (indices, in output order) as runs of consecutive indices: (first output slot, first
    row, length). A run is one contiguous byte range of a row-major tensor."""
    runs: list[tuple[int, int, int]] = []
    for j, r in enumerate(rows):
        if runs and runs[-1][1] + runs[-1][2] == r:
            a, r0, n = runs[-1]
            runs[-1] = (a, r0, n + 1)
        else:
            runs.append((j, int(r), 1))
    return runs


def copy_range(files: ShardFiles, shard: str, pos: int, left: int, f) -> None:
    """Append ``left`` bytes at ``pos`` of ``shard`` to the open binary file ``f`` (``os.copy_file_range``
    where the OS has it, else reads and writes): shard to shard, never decoded."""
    f.flush()
    src, out, total = files.fd(shard), f.fileno(), left
    dst = os.lseek(out, 0, os.SEEK_CUR)
    copy = getattr(os, "copy_file_range", None)
    while left > 0 and copy is not None:
        try:
            n = copy(src, out, min(left, 1 << 30), pos, dst)
        except OSError:
            copy = None  # e.g. across file systems on old kernels: fall back to reads
            break
        if n <= 0:
            copy = None
            break
        pos, dst, left = pos + n, dst + n, left - n
    while left > 0:
        chunk = os.pread(src, min(left, 1 << 24), pos)
        if not chunk:
            raise CheckpointError(f"{files.root / shard}: unexpected end of file while copying")
        os.pwrite(out, chunk, dst)
        pos, dst, left = pos + len(chunk), dst + len(chunk), left - len(chunk)
    os.lseek(out, dst, os.SEEK_SET)
    with files._lock:
        files.bytes_copied += total


@dataclass(frozen=True)
class StoredRows:
    """Rows ``keep`` (dim 0) of a stored tensor -- the kept experts of a fused expert tensor -- as a
    stored entry: the writer copies each run of consecutive rows as one byte range, never decoded."""

    base: StoredTensor
    keep: tuple[int, ...]

    @property
    def files(self) -> ShardFiles:
        return self.base.files

    @property
    def shard(self) -> str:
        return self.base.shard

    @property
    def key(self) -> str:
        return self.base.key

    @property
    def dtype(self) -> str:
        return self.base.dtype

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.base.torch_dtype

    @property
    def shape(self) -> tuple[int, ...]:
        return (len(self.keep),) + tuple(self.base.shape[1:])

    @property
    def nbytes(self) -> int:
        return len(self.keep) * self.base.row_bytes

    def read(self) -> torch.Tensor:
        t = torch.empty(self.shape, dtype=self.torch_dtype)
        for a, r, n in row_runs(self.keep):
            self.base.read_rows(r, t[a:a + n])
        return t

    def read_into(self, out: torch.Tensor) -> None:
        out.copy_(self.read())

    def parts(self) -> dict[str, "StoredRows"]:
        return {self.key: self}

    def rows(self, keep) -> "StoredRows":
        return StoredRows(self.base, tuple(self.keep[int(j)] for j in keep))

    def copy_to(self, f) -> None:
        rb = self.base.row_bytes
        for _, r, n in row_runs(self.keep):
            copy_range(self.files, self.shard, self.base.offset + r * rb, n * rb, f)


class _Computed:
    """Where a ``HeldTensor``'s bytes are, for error messages: computed, not in a shard."""

    root = Path("<computed by the plan>")


@dataclass(frozen=True, eq=False)
class HeldTensor:
    """A tensor already in host memory seen as a stored entry (``StoredTensor``'s reading side), so an
    ``ExpertSource`` serves experts a plan computed (merged experts, held for the writer anyway) in
    groups, as it serves those in the shards: ``ExpertSource.from_layer`` over a layer's output."""

    tensor: torch.Tensor
    key: str = ""
    files = _Computed()
    shard = ""

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.tensor.shape)

    @property
    def torch_dtype(self) -> torch.dtype:
        return self.tensor.dtype

    @property
    def nbytes(self) -> int:
        return self.tensor.numel() * self.tensor.element_size()

    def read(self) -> torch.Tensor:
        return self.tensor

    def read_into(self, out: torch.Tensor) -> None:
        """The tensor into ``out``: its shape and dtype, or its bytes (``out`` uint8, as a packed group's
        stored parts are loaded)."""
        src = self.tensor if out.dtype == self.tensor.dtype else self.tensor.contiguous().view(torch.uint8)
        out.copy_(src.reshape(out.shape))

    @property
    def row_bytes(self) -> int:
        """Bytes of one row of dim 0 (one expert of a fused expert tensor)."""
        return self.nbytes // self.tensor.shape[0]

    def read_rows(self, row: int, out: torch.Tensor) -> None:
        """Rows ``row``, ``row + 1``, ... of dim 0, as many as ``out`` holds (``StoredTensor.read_rows``):
        a fused expert tensor's experts, in its dtype or as bytes."""
        n = out.numel() * out.element_size() // self.row_bytes
        HeldTensor(self.tensor[row:row + n], self.key).read_into(out)


@dataclass(frozen=True)
class QuantizedStored:
    """One quantized weight as stored, seen as its logical float tensor: FP8 block (``X.weight``
    values + ``X.weight_scale_inv``) or MXFP4 (``P_blocks`` + ``P_scales``, experts fused on dim 0).
    ``read``/``read_into`` dequantize it (``formats``) into the compute dtype; ``parts`` are the
    stored tensors the writer copies unchanged; ``rows(keep)`` the kept experts of a fused one."""

    main: StoredTensor | StoredRows
    scale: StoredTensor | StoredRows
    fmt: object  # formats.QuantFormat
    torch_dtype: torch.dtype  # the dequantized (compute) dtype
    logical: str = ""  # its logical key (default: the values' key, as for FP8)

    @property
    def files(self) -> ShardFiles:
        return self.main.files

    @property
    def shard(self) -> str:
        return self.main.shard

    @property
    def key(self) -> str:
        return self.logical or self.main.key

    @property
    def shape(self) -> tuple[int, ...]:
        """The logical (dequantized, runtime-layout) shape."""
        main, scale = self.fmt.parts(self.key)
        return tuple(self.fmt.logical_shape({main: self.main.shape, scale: self.scale.shape}, self.key))

    def decode(self, main: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype,
               out: torch.Tensor | None = None) -> torch.Tensor:
        """Stored values and scales (any leading rows, on any device) -> the logical tensor there (into
        ``out`` when given)."""
        names = self.fmt.parts(self.key)  # (a copied expert's parts keep their input keys: a renumbered expert's differ)
        return self.fmt.dequantize(dict(zip(names, (main, scale))), self.key, dtype, out=out)

    def read(self) -> torch.Tensor:
        return self.decode(self.main.read(), self.scale.read(), self.torch_dtype)

    def read_into(self, out: torch.Tensor) -> None:
        out.copy_(self.read())

    def parts(self) -> dict[str, StoredTensor | StoredRows]:
        return {self.main.key: self.main, self.scale.key: self.scale}

    @property
    def nbytes(self) -> int:
        """Bytes as stored: values and scales."""
        return self.main.nbytes + self.scale.nbytes

    def rows(self, keep) -> "QuantizedStored":
        return QuantizedStored(self.main.rows(keep), self.scale.rows(keep), self.fmt, self.torch_dtype, self.logical)


# A layer's tensors may be a dict whose values are tensors or stored entries (``StoredTensor``,
# ``StoredRows``, ``QuantizedStored``, ``HeldTensor``: read on access), or a ``LazyLayer``. These read
# only what they return.


def entry(tensors, key: str):
    """``tensors[key]`` without reading it: a lazily read layer's stored entry, else the value."""
    stored = tensors.stored(key) if hasattr(tensors, "stored") else None
    return tensors[key] if stored is None else stored


def decoded(value) -> torch.Tensor:
    """A tensor, or a stored entry decoded."""
    return value if isinstance(value, torch.Tensor) else value.read()


def entry_dtype(value) -> torch.dtype:
    """The (decoded) dtype of a tensor or a stored entry."""
    return value.dtype if isinstance(value, torch.Tensor) else value.torch_dtype


def entry_rows(value, rows: list[int]) -> torch.Tensor:
    """Rows ``rows`` (dim 0) of a tensor, or of a stored entry (only those rows' bytes read)."""
    return value[rows] if isinstance(value, torch.Tensor) else value.rows(rows).read()


def reads_lazily(ck) -> bool:
    """Whether ``read_lazy_layer`` can read ``ck``'s routed experts in groups: an unquantized
    checkpoint, FP8 block weights (each expert's values and scales are their own tensors) and MXFP4
    (the experts fused on dim 0 of ``_blocks``/``_scales``: a group is a contiguous byte range)."""
    fmt = ck.quant_format
    return fmt is None or fmt.method in ("fp8", "mxfp4")


class LazyLayer(Mapping):
    """One decoder layer's on-disk tensors: the non-expert ones read, the routed experts' as
    ``StoredTensor``s (read on access, one at a time). Keys in the checkpoint's order."""

    def __init__(self, layer_idx: int, keys: list[str], read: dict[str, torch.Tensor], stored: dict[str, StoredTensor],
                 experts: "ExpertSource | None" = None):
        self.layer_idx = layer_idx
        self._keys = list(keys)
        self._read = read
        self._stored = stored
        self.experts = experts  # the routed experts as a source of runtime-layout groups

    def __getitem__(self, key: str) -> torch.Tensor:
        if key in self._read:
            return self._read[key]
        return self._stored[key].read()

    def __iter__(self):
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __contains__(self, key) -> bool:  # without reading (``Mapping``'s would decode the tensor)
        return key in self._read or key in self._stored

    @property
    def resident(self) -> dict[str, torch.Tensor]:
        """The tensors that were read (everything but the routed experts)."""
        return self._read

    def stored(self, key: str) -> StoredTensor | None:
        return self._stored.get(key)

    def stored_parts(self, keys: list[str]) -> dict[str, StoredTensor]:
        """The stored tensors (stored keys) of the routed-expert entries among ``keys``, in that order."""
        return {k: v for key in keys if key in self._stored for k, v in self._stored[key].parts().items()}

    def for_plan(self, selection_only: bool) -> dict:
        """The layer for ``apply.apply_layer``: expert entries as ``StoredTensor``s when the plan only
        selects experts (passed through and copied as bytes), else every tensor decoded."""
        if selection_only:
            return {k: self._read[k] if k in self._read else self._stored[k] for k in self._keys}
        return {k: self[k] for k in self._keys}


def selection_only(lp) -> bool:
    """Whether a layer plan only keeps experts (no merge matrix, no extra fields): its experts can be
    copied as stored bytes."""
    return lp is not None and lp.merge is None and not lp.extra


class ExpertSource:
    """A MoE layer's routed experts on disk, loaded a few at a time.

    ``names``: experts-module parameter names (transformers' ``gate_up_proj``/``down_proj``, or a fused
    layout's tensors); ``parts[name]``: per expert, the stored pieces concatenated on dim 0 of that
    expert's runtime row (per-expert gate then up for ``gate_up_proj``); for a fused on-disk tensor a
    piece is (StoredTensor, row). ``ids``: which on-disk experts this source exposes, in order (a
    pruned layer's kept experts).

    ``load(a, z)`` reads experts ``a..z-1`` into host buffers and ``decode(buffers, dtype)`` turns them
    into runtime-layout tensors on whatever device the buffers were moved to. Unquantized experts are
    read in runtime layout, stored dtype, and ``decode`` returns them as they are. Quantized ones
    (``packed``: FP8 block, MXFP4) are read as their stored bytes -- one uint8 buffer per stored part of
    each piece (values, scales), which no host->device copy casts -- and ``decode`` dequantizes them
    where they are: on the compute device, so the host never holds a float copy of the group. A fused
    tensor's consecutive experts are one byte range, read with one call."""

    def __init__(self, layer_idx: int, names: list[str], pieces: dict[str, list[list[tuple[StoredTensor, int | None]]]],
                 ids: list[int] | None = None):
        self.layer_idx = layer_idx
        self.names = list(names)
        self._pieces = pieces
        total = len(next(iter(pieces.values())))
        self.ids = list(range(total)) if ids is None else list(ids)
        self._preloaded = None  # (a, z, pool buffer, tensors, pool): a group read ahead (``preload``)
        self._prestaged = None  # (a, z, job, accountant token): that group on its way to the device (``prestage``)
        p0 = {n: pieces[n][0] for n in names}
        self._row_shape = {n: _row_shape(p) for n, p in p0.items()}  # runtime layout, one expert
        self._dtype = {n: p[0][0].torch_dtype for n, p in p0.items()}
        self.packed = any(isinstance(st, QuantizedStored) for p in p0.values() for st, _ in p)
        # packed: slot "name/piece/part" -> (name, piece index, part index, bytes per expert)
        self._slots: dict[str, tuple[str, int, int, int]] = {}
        if self.packed:
            for n in self.names:
                for i, (st, r) in enumerate(p0[n]):
                    for j, part in enumerate(_stored_parts(st)):
                        self._slots[f"{n}/{i}/{j}"] = (n, i, j, part.nbytes if r is None else part.row_bytes)

    @classmethod
    def from_layer(cls, adapter, layer_idx: int, stored: dict[str, StoredTensor], num_experts: int) -> "ExpertSource | None":
        """The source of the layer's ``stored`` expert tensors, or None where their stored layout is not
        transformers' runtime layout row for row (fused tensors renamed or moved at load, e.g. GraniteMoE)."""
        base = adapter.layer_prefix(layer_idx) + adapter.moe_prefix + "experts."
        if adapter.expert_layout == "per_expert":
            g, u, d = adapter.expert_projs
            pieces = {adapter.runtime_gate_up: [], adapter.runtime_down: []}
            for e in range(num_experts):
                k = f"{base}{e}."
                pieces[adapter.runtime_gate_up].append([(stored[k + g + ".weight"], None), (stored[k + u + ".weight"], None)])
                pieces[adapter.runtime_down].append([(stored[k + d + ".weight"], None)])
            return cls(layer_idx, list(pieces), pieces)
        pieces = {}
        for t in adapter.fused_tensors:
            st = stored.get(base + t)
            if st is not None:
                pieces[t] = [[(st, e)] for e in range(st.shape[0])]
        return cls(layer_idx, list(pieces), pieces) if pieces else None

    @property
    def num_experts(self) -> int:
        return len(self.ids)

    def subset(self, keep: list[int]) -> "ExpertSource":
        """The experts ``keep`` (indices into this source), renumbered 0..len(keep)-1."""
        return ExpertSource(self.layer_idx, self.names, self._pieces, [self.ids[j] for j in keep])

    def expert_numel(self) -> int:
        return sum(_prod(s) for s in self._row_shape.values())

    def row_shape(self, name: str) -> tuple[int, ...]:
        """One expert's runtime-layout shape of parameter ``name``."""
        return self._row_shape[name]

    def stored_dtype(self, name: str) -> torch.dtype:
        """The dtype parameter ``name`` is stored in (a quantized one's: its values')."""
        return self._dtype[name]

    def expert_stored_bytes(self) -> int:
        """Bytes of one expert as loaded into host memory (``buffer_shapes``)."""
        if self.packed:
            return sum(rb for *_, rb in self._slots.values())
        return sum(_prod(self._row_shape[n]) * self._dtype[n].itemsize for n in self.names)

    def buffer_shapes(self, count: int) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        if self.packed:
            return {s: ((count, rb), torch.uint8) for s, (*_, rb) in self._slots.items()}
        return {n: ((count,) + self._row_shape[n], self._dtype[n]) for n in self.names}

    def check_finite(self, a: int, z: int) -> None:
        """Re-read experts ``a..z-1`` checking each piece: raises the error naming the first tensor
        holding NaN/Inf (after a check on the device found one in the group)."""
        self.load(a, z)
        raise CheckpointError(f"{self.pieces_root()}: layer {self.layer_idx}, experts {self.ids[a:z]}: NaN/Inf "
                              f"in the weights")

    def pieces_root(self) -> Path:
        st = self._pieces[self.names[0]][0][0][0]
        return st.files.root

    def preload(self, a: int, z: int, pool: "StagingPool") -> bool:
        """Read experts ``a..z-1`` now into a pool buffer (``StagingPool.try_acquire``; False when the
        pool has none to spare), for the group that will ask for them (``take_preloaded``). The layer
        reader calls it for the next layer's first group, off the main thread."""
        got = pool.try_acquire(self.buffer_shapes(z - a))
        if got is None:
            return False
        i, views = got
        try:
            host = self.load(a, z, views)
        except BaseException:
            pool.release(i)
            raise
        self._preloaded = (a, z, i, host, pool)
        return True

    def adopt_preloaded(self) -> None:
        """The layer is now computing: its preloaded group's buffer is the layer's, not a preload's (so
        the next layer may preload into another)."""
        if self._preloaded is not None:
            self._preloaded[4].adopt(self._preloaded[2])

    def take_preloaded(self, a: int, z: int):
        """``(pool buffer, tensors)`` of experts ``a..z-1`` if they were preloaded, else None."""
        p = self._preloaded
        if p is None or (p[0], p[1]) != (a, z):
            return None
        self._preloaded = None
        p[4].adopt(p[2])
        return p[2], p[3]

    def prestage(self, a: int, z: int, job, token: int) -> None:
        """Experts ``a..z-1`` are being staged for the device ahead of the layer (``Placer.stage_next``):
        ``job`` is a future of ``(Staged, pool buffer)``, ``token`` the accountant's entry for its bytes."""
        self._prestaged = (a, z, job, token)

    def take_prestaged(self, a: int, z: int):
        """``(job, token)`` of experts ``a..z-1`` if they were staged ahead, else None."""
        p = self._prestaged
        if p is None or (p[0], p[1]) != (a, z):
            return None
        self._prestaged = None
        return p[2], p[3]

    def drop_prestaged(self):
        """``(job, token)`` of a group staged ahead and never asked for (the caller frees it), else None."""
        p, self._prestaged = self._prestaged, None
        return None if p is None else (p[2], p[3])

    def drop_preloaded(self) -> None:
        """Give a preloaded group that was never used back to its pool."""
        p = self._preloaded
        if p is not None:
            self._preloaded = None
            p[4].release(p[2])

    def load(self, a: int, z: int, out: dict[str, torch.Tensor] | None = None, check: bool = True) -> dict[str, torch.Tensor]:
        """Experts ``a..z-1`` of this source into host memory (into ``out``: buffers of at least
        ``z - a`` rows, e.g. from a ``StagingPool``): runtime layout and stored dtype, or, ``packed``,
        the stored bytes of each part (``decode`` makes them runtime tensors). ``check``: refuse NaN/Inf
        in float weights here (a CUDA run checks them on the device instead, ``check_finite``); stored
        quantized bytes are always checked here."""
        if self.packed:
            return self._load_packed(a, z, out)
        n = z - a
        res = {}
        for name in self.names:
            shape, dt = (n,) + self._row_shape[name], self._dtype[name]
            buf = torch.empty(shape, dtype=dt) if out is None else out[name][:n]
            for j, e in enumerate(self.ids[a:z]):
                row, at = buf[j], 0
                for st, r in self._pieces[name][e]:
                    if r is None:
                        rows = st.shape[0] if st.shape else 1
                        seg = row[at:at + rows] if row.dim() else row
                        st.read_into(seg)
                        at += rows
                    else:
                        seg = row
                        st.read_rows(r, row)
                    if check and seg.is_floating_point() and not all_finite(seg):  # as Checkpoint.read checks
                        raise nonfinite_error(st.files.root / st.shard, st.key, f" (layer {self.layer_idx}, expert {e})",
                                              int((~torch.isfinite(seg)).sum()))
            res[name] = buf
        return res

    def _load_packed(self, a: int, z: int, out: dict[str, torch.Tensor] | None) -> dict[str, torch.Tensor]:
        ids = self.ids[a:z]
        res = {}
        for slot, (name, i, j, rb) in self._slots.items():
            buf = torch.empty((len(ids), rb), dtype=torch.uint8) if out is None else out[slot][:len(ids)]
            pieces = self._pieces[name]
            if pieces[ids[0]][i][1] is not None:  # rows of one fused tensor: a run of experts is one read
                part = _stored_parts(pieces[ids[0]][i][0])[j]
                for at, r, cnt in row_runs([pieces[e][i][1] for e in ids]):
                    part.read_rows(r, buf[at:at + cnt])
            else:
                for k, e in enumerate(ids):
                    _stored_parts(pieces[e][i][0])[j].read_into(buf[k])
            self._check_stored(slot, buf, ids)
            res[slot] = buf
        return res

    def _check_stored(self, slot: str, buf: torch.Tensor, ids: list[int]) -> None:
        """NaN/Inf among stored bytes (float parts; FP8 NaN codes; MXFP4's NaN scale 0xFF): the
        error ``Checkpoint.read`` gives, naming the tensor, layer and expert."""
        name, i, j, _ = self._slots[slot]
        st = self._pieces[name][ids[0]][i][0]
        part = _stored_parts(st)[j]
        dt = part.torch_dtype
        if dt in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            def nonfinite(row):
                return ~torch.isfinite(row.view(dt))
        elif dt == torch.float8_e4m3fn:
            def nonfinite(row):
                return (row & 0x7F) == 0x7F  # e4m3fn has no inf; S.1111.111 is NaN
        elif isinstance(st, QuantizedStored) and st.fmt.method == "mxfp4" and j == 1:
            def nonfinite(row):
                return row == 0xFF  # E8M0 0xFF is NaN
        else:
            return
        for k in range(len(ids)):  # one expert at a time: temporaries of one expert's bytes
            bad = nonfinite(buf[k])
            if bool(bad.any()):
                raise nonfinite_error(part.files.root / part.shard, part.key, f" (layer {self.layer_idx}, expert {ids[k]})",
                                      int(bad.sum()))

    def decode(self, tensors: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """A loaded group (``load``'s buffers, moved to any device) -> runtime-layout tensors on that
        device: quantized parts dequantized there, in ``dtype``; unquantized ones unchanged."""
        if not self.packed:
            return tensors
        n = next(iter(tensors.values())).shape[0]
        out = {}
        for name in self.names:
            pieces = self._pieces[name][self.ids[0]]
            # several pieces (a per-expert gate and up) decode into their rows of one tensor: no copy
            # of the group beside it, as a concatenation would make
            full = None if len(pieces) == 1 else torch.empty((n,) + self._row_shape[name], dtype=dtype,
                                                              device=next(iter(tensors.values())).device)
            at = 0
            for i, (st, r) in enumerate(pieces):
                parts = _stored_parts(st)
                raw = [tensors[f"{name}/{i}/{j}"].view(p.torch_dtype).view((n,) + (tuple(p.shape[1:]) if r is not None
                                                                                   else tuple(p.shape)))
                       for j, p in enumerate(parts)]
                rows = raw[0].shape[1] if raw[0].dim() > 1 else 1
                dest = None if full is None else full[:, at:at + rows]
                if isinstance(st, QuantizedStored):
                    seg = st.decode(raw[0], raw[1], dtype, out=dest)
                else:
                    seg = raw[0].to(dtype) if dest is None else dest.copy_(raw[0])
                at += rows
            out[name] = seg if full is None else full
        return out


def _stored_parts(st) -> list:
    """The stored tensors of a located weight: values and scales of a quantized one, else itself."""
    return [st.main, st.scale] if isinstance(st, QuantizedStored) else [st]


def _prod(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _row_shape(pieces: list[tuple[StoredTensor, int | None]]) -> tuple[int, ...]:
    st, r = pieces[0]
    if r is not None:
        return tuple(st.shape[1:])
    rows = sum(p.shape[0] for p, _ in pieces)
    return (rows,) + tuple(st.shape[1:])


class StagingPool:
    """A fixed set of host buffers that expert groups are read into, reused across groups and layers.

    ``count`` buffers of ``nbytes`` each -- two for the group computing and the group arriving, a third
    when the layer reader preloads the next layer's first group (``ExpertSource.preload``) -- page-locked
    with ``pin`` (CUDA: the host->device copy is a DMA). Each buffer is made the first time it is
    taken, so the first layer waits for one buffer, not ``count`` (page-locking a GiB takes a sizeable
    fraction of a second; the others are made on the threads that read later groups, while a group
    computes); sized once, grown only if a later layer's group needs more (free buffers at once, busy
    ones when next taken). ``acquire`` hands out a free buffer's views for a source's group,
    ``release`` gives it back; more than ``count`` at a time is a bug (RuntimeError), which is what
    keeps host memory at ``count * nbytes`` (pinned: torch's power-of-two blocks, ``device.pinned_bytes``).
    ``warm`` makes the first buffer ahead of need (a pass starts it on a thread of its own as it
    begins); a buffer taken meanwhile waits for it rather than making another. ``close`` drops the
    buffers. Thread-safe: the layer reader and the expert loader take buffers from their own threads.
    ``stats``: making a buffer is timed as stage ``staging_alloc``."""

    def __init__(self, count: int = 2, nbytes: int = 0, *, pin: bool = False, stats=None):
        self.count, self.pin = int(count), bool(pin)
        self.nbytes = 0
        self.stats = stats
        self._bufs: list[torch.Tensor | None] = []
        self._free: list[int] = []
        self._lock = threading.RLock()
        self._made = threading.Condition(self._lock)  # notified when a buffer ``warm`` was making is ready
        self._warming: int | None = None  # the buffer ``warm`` is making (out of ``_free`` meanwhile)
        self._closed = False
        self._preloads: set[int] = set()  # buffers held by preloads (try_acquire), not yet adopted
        self.allocations = 0  # how many times the pool was sized (the first size, then each growth)
        self.buffers_made = 0  # buffers allocated, counting remakes after a growth
        self.peak_bytes = 0  # the most ``held_bytes`` have been
        self.made_ahead = 0  # buffers ``warm`` made
        if nbytes:
            self._allocate(int(nbytes))

    def _new(self, nbytes: int) -> torch.Tensor:
        with self._lock:
            self.buffers_made += 1
        with self.stats.stage("staging_alloc") if self.stats is not None else contextlib.nullcontext():
            return torch.empty(nbytes, dtype=torch.uint8, pin_memory=self.pin)

    def _allocate(self, nbytes: int) -> None:
        """Size the pool for groups of up to ``nbytes``: the free buffers are dropped now and made at
        the new size when taken; a busy one is remade when next taken (``_claim``)."""
        with self._lock:
            if not self._bufs:  # the first sizing: every buffer is free
                self._bufs, self._free = [None] * self.count, list(range(self.count))
            for i in self._free:
                self._bufs[i] = None
            self.nbytes = nbytes
            self.allocations += 1

    @property
    def held_bytes(self) -> int:
        return sum(b.numel() for b in self._bufs if b is not None)

    def close(self) -> None:
        """Drop every free buffer (a pass that ended; its pinned blocks go back to torch's cache, and
        to the system with ``device.release_pinned_cache``). Buffers still in use are left alone."""
        with self._lock:
            self._closed = True
            for i in self._free:
                if i < len(self._bufs):
                    self._bufs[i] = None

    def warm(self, nbytes: int) -> None:
        """Make one buffer of at least ``nbytes`` now, unless one is made already. The pool is sized
        for it if it was not; a failure is left to the first real take to report."""
        with self._lock:
            if self._closed or self._warming is not None:
                return
            if int(nbytes) > self.nbytes:
                self._allocate(int(nbytes))
            if not self._free or any(self._bufs[i] is not None for i in self._free):
                return
            i = self._free.pop(0)
            self._warming, size = i, self.nbytes
        buf = None
        try:
            buf = self._new(size)
        except Exception as e:  # noqa: BLE001 -- out of (page-locked) memory: the take that needs it raises
            log.debug("staging buffer not made ahead: %s", e)
        with self._lock:
            if buf is not None and not self._closed:
                self._bufs[i] = buf
                self.peak_bytes = max(self.peak_bytes, self.held_bytes)
                self.made_ahead += 1
            self._free.insert(0, i)
            self._warming = None
            self._made.notify_all()

    def _settle(self) -> None:
        """Wait (the lock held) for a buffer ``warm`` is making: taking it beats making another."""
        while self._warming is not None:
            self._made.wait()

    def has_free(self) -> bool:
        with self._lock:
            return bool(self._free) or not self._bufs

    @property
    def in_use(self) -> int:
        return len(self._bufs) - len(self._free)

    def ensure(self, nbytes: int) -> None:
        if nbytes > self.nbytes:
            self._allocate(int(nbytes))

    def _claim(self, need: int) -> tuple[int, int]:
        """Take a free buffer (the lock held): one already made and large enough first. Returns its
        index and the size to make it at (0: it is ready)."""
        ready = [i for i in self._free if self._bufs[i] is not None and self._bufs[i].numel() >= need]
        i = ready[0] if ready else self._free[0]
        self._free.remove(i)
        if i in ready:
            return i, 0
        self._bufs[i] = None  # not made yet, or made before the pool grew
        return i, self.nbytes

    def _fill(self, i: int, size: int, shapes) -> dict[str, torch.Tensor]:
        """Make buffer ``i`` if ``size`` (outside the lock: page-locking takes time, and the other
        thread may release or take a buffer meanwhile), then cut it into views for ``shapes``."""
        if size:
            try:
                buf = self._new(size)
            except BaseException:
                with self._lock:
                    self._free.insert(0, i)
                raise
            with self._lock:
                self._bufs[i] = buf
                self.peak_bytes = max(self.peak_bytes, self.held_bytes)
        buf, at, views = self._bufs[i], 0, {}
        for name, (shape, dt) in shapes.items():
            n = _prod(shape) * dt.itemsize
            views[name] = buf[at:at + n].view(dt).view(shape)
            at += _aligned(n)
        return views

    def acquire(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]) -> tuple[int, dict[str, torch.Tensor]]:
        need = sum(_aligned(_prod(s) * dt.itemsize) for s, dt in shapes.values())
        with self._lock:
            self._settle()
            if need > self.nbytes:
                self.ensure(need)
            if not self._free:
                gc.collect()  # a dropped layer whose experts module was not yet collected gives its buffer back
            if not self._free:
                raise RuntimeError(f"StagingPool: all {self.count} buffers are in use")
            i, size = self._claim(need)
        return i, self._fill(i, size, shapes)

    def try_acquire(self, shapes: dict[str, tuple[tuple[int, ...], torch.dtype]]):
        """A buffer for a preload (the next layer's first group, read ahead), or None. Preloads hold
        at most ``count - 2`` buffers, so the computing layer always has its two; a preload never
        waits (it may grow the pool: the free buffers now, the busy ones when next taken). ``adopt``
        hands the buffer over to the group that uses it."""
        need = sum(_aligned(_prod(s) * dt.itemsize) for s, dt in shapes.values())
        with self._lock:
            self._settle()
            if not self._bufs:  # not sized yet (the first layer's preload comes first)
                self._allocate(need)
            if not self._free or len(self._preloads) >= self.count - 2:
                return None
            if need > self.nbytes:
                self.ensure(need)
            i, size = self._claim(need)
            self._preloads.add(i)
        try:
            return i, self._fill(i, size, shapes)
        except BaseException:
            with self._lock:
                self._preloads.discard(i)
            raise

    def adopt(self, i: int) -> None:
        """A preloaded buffer is now an ordinary one (its group is being computed)."""
        with self._lock:
            self._preloads.discard(i)

    def release(self, i: int) -> None:
        with self._lock:
            if i in self._free or not 0 <= i < len(self._bufs):
                raise RuntimeError(f"StagingPool: buffer {i} released twice")
            self._preloads.discard(i)
            self._free.append(i)


def _aligned(n: int, a: int = 64) -> int:
    return (n + a - 1) // a * a


def read_lazy_layer(ck, files: ShardFiles, layer_idx: int) -> LazyLayer:
    """Layer ``layer_idx`` of the checkpoint ``ck``: non-expert tensors read (``ck.read``), routed
    experts located in ``files`` (nothing read; FP8 and MXFP4 experts as ``QuantizedStored``, decoded
    when a group is loaded). A dense layer has no stored entries. A checkpoint ``reads_lazily`` refuses
    is read whole, dequantized (``Checkpoint.read``)."""
    ad = ck.adapter
    keys = ck.layer_keys(layer_idx)
    if not keys:
        raise CheckpointError(f"{ck.path}: no tensors for layer {layer_idx} in the index")
    if not reads_lazily(ck):
        return LazyLayer(layer_idx, keys, ck.read(keys), {}, None)
    prefix = ad.layer_prefix(layer_idx)
    moe = layer_idx in set(ck.moe_layers())
    exp = [k for k in keys if moe and ad.is_expert_key(k[len(prefix):])] if moe else []
    if ad.expert_layout == "fused":  # only the 3-D (E, ...) tensors are loaded by rows; biases too
        exp = [k for k in exp if k in set(ad.fused_keys(layer_idx))]
    stored = {k: _locate(ck, files, k) for k in exp}
    read = ck.read([k for k in keys if k not in stored])
    src = ExpertSource.from_layer(ad, layer_idx, stored, ck.num_experts) if stored else None
    if stored and (src is None or ad.expert_layout == "fused" and len(src.names) != len(ad.fused_tensors)):
        # experts the source cannot read row by row (a fused layout renamed at load): read everything
        return LazyLayer(layer_idx, keys, ck.read(keys), {}, None)
    return LazyLayer(layer_idx, keys, read, stored, src)


def _locate(ck, files: ShardFiles, key: str) -> "StoredTensor | QuantizedStored":
    """Where logical tensor ``key`` is stored (a quantized weight: its values and its scales)."""
    parts = ck.parts[key] if ck.quant_format is not None else (key,)
    located = [files.stored(p, ck.weight_map[p]) for p in parts]
    if len(located) == 1:
        return located[0]
    return QuantizedStored(located[0], located[1], ck.quant_format, ck.compute_dtype, key)
