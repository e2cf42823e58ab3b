"""Quantized weight formats as published: FP8 block (DeepSeek-V3 style) and MXFP4 (GPT-OSS).

Where it sits: ``Checkpoint`` asks ``detect_format(config)`` which format a checkpoint uses, and
``group_keys`` which stored tensors make up each logical weight. Reading a logical weight
dequantizes it (``QuantFormat.dequantize``) so that the rest of the engine (``apply_layer``, the
adapters' ``to_runtime``, the layer stream) sees ordinary float tensors; writing copies the stored
bytes of kept experts and re-quantizes merged ones (``QuantFormat.quantize``).

FP8 block (``quant_method: "fp8"``), per quantized Linear ``X``::

    X.weight            float8_e4m3fn (out, in)
    X.weight_scale_inv  float (ceil(out/bo), ceil(in/bi))      # one multiplier per (bo, bi) block
    W[i, j] = float32(q[i, j]) * s[i // bo, j // bi]            # then cast to the compute dtype

Quantizing a block: s = amax / 448 (1 for an all-zero block), q = round_to_e4m3(W / s); edge blocks
of a shape that is not a multiple of the block are zero-padded, so their amax is that of the
values present (DeepSeek's ``README_WEIGHTS.md``).

MXFP4 (``quant_method: "mxfp4"``), per fused expert projection ``P`` of (E, out, in) values::

    P_blocks  uint8 (E, out, in/32, 16)   # 32 FP4 E2M1 codes per group, two per byte:
                                          # low nibble = even element, high nibble = odd element
    P_scales  uint8 (E, out, in/32)       # E8M0: byte s means 2**(s - 127)
    W[e, o, 32g + 2k]     = E2M1[b & 0xF] * 2**(s - 127),  b = P_blocks[e, o, g, k]
    W[e, o, 32g + 2k + 1] = E2M1[b >> 4]  * 2**(s - 127)

and the logical (runtime) tensor is W transposed to (E, in, out), as transformers' GPT-OSS experts
hold ``gate_up_proj`` (E, H, 2I) and ``down_proj`` (E, I, H). Quantizing a group picks the smallest
power of two 2**x with amax / 2**x <= 6 (so nothing is clipped) and rounds each value to the
nearest E2M1 code (ties to the even code).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

import torch

from ..errors import CheckpointError, UnsupportedModelError

FP8_MAX = 448.0  # largest finite float8_e4m3fn
FP8_DTYPE = torch.float8_e4m3fn

# FP4 E2M1 values of codes 0..15 (bit 3 is the sign).
E2M1_VALUES = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0)
MX_GROUP = 32  # values per E8M0 scale
E8M0_BIAS = 127
# float32 temporaries of one (de)quantization step: large tensors (an expert group, a fused layer) are
# decoded, FP8-encoded and round-trip-checked in slices of about this size, on whatever device they are
SCRATCH_BYTES = 32 << 20


# ---- FP8 block ---------------------------------------------------------------------------------


def fp8_scale_shape(shape: tuple[int, ...], block: tuple[int, int]) -> tuple[int, ...]:
    """Shape of ``weight_scale_inv`` for a weight of ``shape`` (ceiling division on the last two dims)."""
    *lead, rows, cols = shape
    return (*lead, -(-rows // block[0]), -(-cols // block[1]))


def _expand_blocks(s: torch.Tensor, rows: int, cols: int, block: tuple[int, int]) -> torch.Tensor:
    """(..., R, C) block values -> (..., rows, cols): each block value repeated over its block."""
    return s.repeat_interleave(block[0], dim=-2)[..., :rows, :].repeat_interleave(block[1], dim=-1)[..., :cols]


def _band_rows(width: int, block_rows: int, bytes_per_value: int) -> int:
    """Rows per step, a whole number of blocks, whose temporaries (``bytes_per_value`` for each of
    ``width`` values a row) come to about ``SCRATCH_BYTES`` (at least one block row)."""
    return max(1, SCRATCH_BYTES // (bytes_per_value * max(1, width) * block_rows)) * block_rows


def _check_fp8(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
    """ValueError unless ``scale_inv`` has the shape and device of ``q``'s block scales."""
    want = fp8_scale_shape(tuple(q.shape), block)
    if tuple(scale_inv.shape) != want:
        raise ValueError(f"scale shape {tuple(scale_inv.shape)} does not match weight {tuple(q.shape)} "
                         f"with block {list(block)} (expected {want})")
    if scale_inv.device != q.device:
        raise ValueError(f"scales on {scale_inv.device} but values on {q.device}")


def fp8_block_dequantize(q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int],
                         dtype: torch.dtype = torch.bfloat16, out: torch.Tensor | None = None) -> torch.Tensor:
    """``q`` (..., out, in) float8_e4m3fn times its per-block ``scale_inv`` -> ``dtype``, on ``q``'s
    device. Computed a band of block rows at a time (float32 temporaries of about ``SCRATCH_BYTES``
    whatever the size of ``q``: a whole expert group decodes into little more than its output).
    ``out``: write there instead (``q``'s shape; may be a slice of a larger tensor, e.g. the gate half
    of a stacked gate-up group)."""
    rows, cols = q.shape[-2:]
    _check_fp8(q, scale_inv, block)
    if out is None:
        out = torch.empty(q.shape, dtype=dtype, device=q.device)
    elif tuple(out.shape) != tuple(q.shape) or out.device != q.device:
        raise ValueError(f"output {tuple(out.shape)} on {out.device} does not match values {tuple(q.shape)} on {q.device}")
    if q.numel() == 0:
        return out
    q3, s3, o3 = q.reshape(-1, rows, cols), scale_inv.reshape(-1, *scale_inv.shape[-2:]), out.view(-1, rows, cols)
    band = _band_rows(cols, block[0], 12)
    for e in range(q3.shape[0]):
        for r0 in range(0, rows, band):
            r1 = min(rows, r0 + band)
            s = _expand_blocks(s3[e, r0 // block[0]:-(-r1 // block[0])].float(), r1 - r0, cols, block)
            o3[e, r0:r1] = q3[e, r0:r1].float().mul_(s)
    return out


def fp8_block_quantize(w: torch.Tensor, block: tuple[int, int],
                       scale_dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (..., out, in) -> (float8_e4m3fn values, ``weight_scale_inv`` of ``scale_dtype``), on
    ``w``'s device.

    Each block on its own, so the result does not depend on how the work is split: one leading index
    and a band of block rows at a time, through a reused float32 buffer of about ``SCRATCH_BYTES``
    (re-quantizing a merged fused layer needs little more than its output)."""
    w = w.detach()
    *lead, rows, cols = w.shape
    bo, bi = block
    R, C = fp8_scale_shape(tuple(w.shape), block)[-2:]
    q = torch.empty(w.shape, dtype=FP8_DTYPE, device=w.device)
    s = torch.empty((*lead, R, C), dtype=scale_dtype, device=w.device)
    if w.numel() == 0:
        return q, s
    band = _band_rows(C * bi, bo, 8)  # the padded band and its |values|, 4 bytes each
    pad = torch.empty((min(band, R * bo), C * bi), dtype=torch.float32, device=w.device)
    mag = torch.empty_like(pad)
    for idx in itertools.product(*map(range, lead)):
        for r0 in range(0, rows, band):
            r1 = min(rows, r0 + band)
            b0, b1 = r0 // bo, -(-r1 // bo)
            x = pad[:(b1 - b0) * bo]
            x[:r1 - r0, :cols] = w[idx][r0:r1]
            x[r1 - r0:].zero_()  # zero padding: an edge block's amax is that of its real values
            x[:, cols:].zero_()
            amax = torch.abs(x, out=mag[:len(x)]).view(b1 - b0, bo, C, bi).amax(dim=(1, 3))  # (b1 - b0, C)
            sb = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax)).to(scale_dtype)
            s[idx][b0:b1] = sb
            # divide by the scale as stored, so dequantizing multiplies back by exactly that value
            x.view(b1 - b0, bo, C, bi).div_(sb.float()[:, None, :, None]).clamp_(-FP8_MAX, FP8_MAX)
            q[idx][r0:r1] = x[:r1 - r0, :cols]
    return q, s


# ---- MXFP4 -------------------------------------------------------------------------------------


def mxfp4_dequantize(blocks: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """``blocks`` (..., out, G, 16) uint8 and ``scales`` (..., out, G) uint8 -> (..., out, 32G) values.

    Not transposed: ``MXFP4.dequantize`` transposes to the runtime layout."""
    if blocks.dtype != torch.uint8 or scales.dtype != torch.uint8:
        raise ValueError(f"MXFP4 blocks/scales must be uint8 (got {blocks.dtype}/{scales.dtype})")
    if tuple(blocks.shape[:-1]) != tuple(scales.shape) or blocks.shape[-1] != MX_GROUP // 2:
        raise ValueError(f"MXFP4 blocks {tuple(blocks.shape)} and scales {tuple(scales.shape)} do not match "
                         f"(expected blocks = scales shape + ({MX_GROUP // 2},))")
    # each byte's two values at once: the even element from the low nibble, the odd one from the high
    vals = _e2m1_pairs(blocks.device)[blocks.int()].view(*blocks.shape[:-1], MX_GROUP)
    # 2**(s - 127) exactly (ldexp, not pow), one per group of 32
    vals.mul_(torch.ldexp(torch.ones(scales.shape, device=blocks.device), scales.to(torch.int32) - E8M0_BIAS).unsqueeze(-1))
    return vals.flatten(-2).to(dtype)


_pairs: dict[torch.device, torch.Tensor] = {}


def _e2m1_pairs(device: torch.device) -> torch.Tensor:
    """(256, 2) float32: the two E2M1 values a byte of MXFP4 blocks holds (low nibble, high nibble)."""
    if device not in _pairs:
        lut, b = torch.tensor(E2M1_VALUES, dtype=torch.float32), torch.arange(256)
        _pairs[device] = torch.stack([lut[b & 0x0F], lut[b >> 4]], dim=-1).to(device)
    return _pairs[device]


def _e2m1_codes(y: torch.Tensor) -> torch.Tensor:
    """Nearest E2M1 code of each value of ``y`` (|y| <= 6), ties to the code with an even mantissa bit."""
    mags = torch.tensor(E2M1_VALUES[:8], dtype=torch.float32, device=y.device)  # 0 .. 6, codes 0..7
    a = y.abs().contiguous()
    # midpoints between neighbours; a tie goes to the even code (0, 1.0, 2.0, 4.0 -> codes 0, 2, 4, 6)
    mids = (mags[1:] + mags[:-1]) / 2
    code = torch.bucketize(a, mids, right=False)  # a <= mid -> lower code
    tie = (a.unsqueeze(-1) == mids).any(-1)
    upper = torch.bucketize(a, mids, right=True)
    code = torch.where(tie & (upper % 2 == 0), upper, code)
    code = code.clamp(max=7)
    sign = (y < 0) | ((y == 0) & torch.signbit(y))
    return (code + 8 * sign.long()).to(torch.uint8)


def mxfp4_quantize(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``w`` (..., out, in) values (in a multiple of 32) -> (blocks (..., out, in/32, 16), scales (..., out, in/32)).

    Each group of 32 on its own, so one leading index and a band of rows at a time: the encoder's
    temporaries (~64 bytes a value: float32 copies, int64 codes) stay near ``SCRATCH_BYTES``."""
    *lead, rows, cols = w.shape
    if cols % MX_GROUP:
        raise ValueError(f"MXFP4 needs the input dim to be a multiple of {MX_GROUP} (got {cols})")
    blocks = torch.empty((*lead, rows, cols // MX_GROUP, MX_GROUP // 2), dtype=torch.uint8, device=w.device)
    scales = torch.empty((*lead, rows, cols // MX_GROUP), dtype=torch.uint8, device=w.device)
    band = max(1, SCRATCH_BYTES // (64 * max(1, cols)))
    for idx in itertools.product(*map(range, lead)):
        for r0 in range(0, rows, band):
            blocks[idx][r0:r0 + band], scales[idx][r0:r0 + band] = _mxfp4_encode(w[idx][r0:r0 + band])
    return blocks, scales


def _mxfp4_encode(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``mxfp4_quantize`` of (rows, in) values at once."""
    cols = w.shape[-1]
    g = w.float().unflatten(-1, (cols // MX_GROUP, MX_GROUP))  # (..., out, G, 32)
    amax = g.abs().amax(-1)
    # smallest 2**x with amax / 2**x <= 6; an all-zero group takes the smallest scale
    x = torch.ceil(torch.log2(amax / 6.0))
    x = torch.where(amax > 0, x, torch.full_like(x, -E8M0_BIAS)).clamp(-E8M0_BIAS, E8M0_BIAS)
    codes = _e2m1_codes(torch.ldexp(g, -x.to(torch.int32).unsqueeze(-1)))
    packed = codes[..., 0::2] | (codes[..., 1::2] << 4)
    return packed.contiguous(), (x.to(torch.int32) + E8M0_BIAS).to(torch.uint8)


# ---- formats of a checkpoint --------------------------------------------------------------------


@dataclass
class RoundTrip:
    """A re-quantization's error, summed over one or more tensors (``QuantFormat.roundtrip_sums``)."""

    err_max: float = 0.0
    w_max: float = 0.0
    err_ss: float = 0.0  # sum of squared errors
    w_ss: float = 0.0  # sum of squared weights

    def add(self, other: "RoundTrip") -> "RoundTrip":
        return RoundTrip(max(self.err_max, other.err_max), max(self.w_max, other.w_max),
                         self.err_ss + other.err_ss, self.w_ss + other.w_ss)

    def rel(self) -> tuple[float, float]:
        """(max |err| / max |w|, ||err|| / ||w||), 0.0 where the weights are all zero."""
        return (self.err_max / self.w_max if self.w_max else 0.0,
                (self.err_ss / self.w_ss) ** 0.5 if self.w_ss else 0.0)


@dataclass(frozen=True)
class QuantFormat:
    """How one checkpoint stores its quantized weights: ``"fp8"`` (block) or ``"mxfp4"``.

    A *logical* weight is what the engine computes with (float); its *parts* are the stored
    tensors (FP8: ``X.weight`` + ``X.weight_scale_inv``; MXFP4: ``P_blocks`` + ``P_scales`` for
    the logical ``P``)."""

    method: str
    block: tuple[int, int] = (128, 128)

    @property
    def suffixes(self) -> tuple[str, str]:
        return (".weight", ".weight_scale_inv") if self.method == "fp8" else ("_blocks", "_scales")

    def parts(self, logical: str) -> tuple[str, str]:
        if self.method == "fp8":
            return logical, logical + "_scale_inv"
        return logical + "_blocks", logical + "_scales"

    def group_keys(self, keys) -> dict[str, tuple[str, ...]]:
        """Stored keys -> {logical key: its stored parts}; a key that is not part of a quantized
        weight is its own logical key."""
        keys = set(keys)
        out: dict[str, tuple[str, ...]] = {}
        used: set[str] = set()
        main_suffix, scale_suffix = self.suffixes
        for k in sorted(keys):
            if not k.endswith(scale_suffix):
                continue
            logical = k[: -len(scale_suffix)] + (".weight" if self.method == "fp8" else "")
            main = self.parts(logical)[0]
            if main not in keys:
                raise CheckpointError(f"index has {k!r} but not {main!r} (the {self.method} values it scales)")
            out[logical] = (main, k)
            used |= {main, k}
        for k in sorted(keys - used):
            if self.method == "mxfp4" and k.endswith("_blocks"):
                raise CheckpointError(f"index has {k!r} but not its scales {k[:-len('_blocks')] + '_scales'!r}")
            out[k] = (k,)
        return out

    def dequantize(self, parts: dict[str, torch.Tensor], logical: str, dtype: torch.dtype,
                   out: torch.Tensor | None = None) -> torch.Tensor:
        """Stored ``parts`` of ``logical`` -> its float tensor in ``dtype`` (CheckpointError naming
        the key when the parts do not fit together); ``out``: written there (FP8 decodes in place,
        MXFP4 copies its result in)."""
        try:
            if out is not None and self.method == "fp8":
                return fp8_block_dequantize(*self._fp8_parts(parts, logical), self.block, dtype, out=out)
            t = self._dequantize(parts, logical, dtype)
            return t if out is None else out.copy_(t)
        except ValueError as e:
            raise CheckpointError(f"tensor {logical!r}: {e}") from None

    def _fp8_parts(self, parts: dict[str, torch.Tensor], logical: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, scales) of an FP8 ``logical``: CheckpointError if the values are not FP8,
        ValueError if the scales do not fit them."""
        main, scale = (parts[p] for p in self.parts(logical))
        if main.dtype != FP8_DTYPE:
            raise CheckpointError(f"{logical}: has a weight_scale_inv but is {main.dtype}, not float8_e4m3fn")
        _check_fp8(main, scale, self.block)
        return main, scale

    def _dequantize(self, parts: dict[str, torch.Tensor], logical: str, dtype: torch.dtype) -> torch.Tensor:
        if self.method == "fp8":
            return fp8_block_dequantize(*self._fp8_parts(parts, logical), self.block, dtype)
        main, scale = (parts[p] for p in self.parts(logical))
        # (E, out, in) -> runtime (E, in, out) on main's device, a few experts (or, for a large
        # expert, a band of its rows) at a time: the temporaries of one step stay near SCRATCH_BYTES
        if main.device != scale.device:
            raise ValueError(f"scales on {scale.device} but blocks on {main.device}")
        if main.dim() < 3:
            return mxfp4_dequantize(main, scale, dtype).transpose(-1, -2).contiguous()
        *_, out_dim, groups, _ = main.shape
        out = torch.empty((main.shape[0], groups * MX_GROUP, out_dim), dtype=dtype, device=main.device)
        per_row = groups * MX_GROUP * 12  # ~12 temporary bytes per value
        step = SCRATCH_BYTES // (out_dim * per_row)
        if step >= 1:
            for e in range(0, main.shape[0], step):
                out[e:e + step] = mxfp4_dequantize(main[e:e + step], scale[e:e + step], dtype).transpose(-1, -2)
            return out
        band = max(1, SCRATCH_BYTES // per_row)
        for e in range(main.shape[0]):
            for o in range(0, out_dim, band):
                out[e, :, o:o + band] = mxfp4_dequantize(main[e, o:o + band], scale[e, o:o + band], dtype).transpose(-1, -2)
        return out

    def quantize(self, logical: str, w: torch.Tensor, scale_dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
        """Float ``w`` (the logical layout) -> its stored parts; ``scale_dtype``: of an FP8
        ``weight_scale_inv`` (keep the input's: float32 for DeepSeek, bf16 in some Qwen3 checkpoints)."""
        main_key, scale_key = self.parts(logical)
        if self.method == "fp8":
            q, s = fp8_block_quantize(w, self.block, scale_dtype)
            return {main_key: q, scale_key: s}
        # runtime (..., in, out) -> stored (..., out, in/32, 16): a band of rows at a time (``mxfp4_quantize``)
        blocks, scales = mxfp4_quantize(w.transpose(-1, -2))
        return {main_key: blocks, scale_key: scales}

    def roundtrip_of(self, parts: dict[str, torch.Tensor], logical: str, w: torch.Tensor) -> dict:
        """Relative error of the quantized ``parts`` against the float ``w`` they were made from:
        max |err| / max |w| and ||err|| / ||w|| (Frobenius), err = dequantized (float32) - w
        (``roundtrip_sums``)."""
        max_abs_rel, fro_rel = self.roundtrip_sums(parts, logical, w).rel()
        return {"max_abs_rel": max_abs_rel, "fro_rel": fro_rel}

    def roundtrip_sums(self, parts: dict[str, torch.Tensor], logical: str, w: torch.Tensor) -> "RoundTrip":
        """max |err|, max |w| and the sums of squares of err and w (err = dequantized (float32) - w),
        one leading index and a band of stored rows at a time (float32 temporaries of about
        ``SCRATCH_BYTES``): the maxima exact, each sum of squares per-band float32 norms squared added
        in float64 (within ~1e-7 relative of a one-shot float32 norm). Several tensors' errors add up
        (``RoundTrip.add``)."""
        if self.method == "fp8":
            try:
                main, scale = self._fp8_parts(parts, logical)
            except ValueError as e:
                raise CheckpointError(f"tensor {logical!r}: {e}") from None
            if tuple(w.shape) != tuple(main.shape):
                raise ValueError(f"tensor {logical!r}: weight {tuple(w.shape)} does not match its parts {tuple(main.shape)}")
            *lead, rows, cols = main.shape
            bo = self.block[0]
            band = _band_rows(cols, bo, 16)  # decoded band, w, |.| and the decode's own

            def bands(idx):
                for r0 in range(0, rows, band):
                    r1 = min(rows, r0 + band)
                    yield (fp8_block_dequantize(main[idx][r0:r1], scale[idx][r0 // bo:-(-r1 // bo)], self.block, torch.float32),
                           w[idx][r0:r1])
        else:
            main, scale = (parts[p] for p in self.parts(logical))
            if tuple(w.shape) != self.logical_shape({p: tuple(parts[p].shape) for p in self.parts(logical)}, logical):
                raise ValueError(f"tensor {logical!r}: weight {tuple(w.shape)} does not match its parts {tuple(main.shape)}")
            *lead, rows, groups, _ = main.shape
            band = max(1, SCRATCH_BYTES // (24 * groups * MX_GROUP))  # decoded rows, w's, |.| and the decode's own

            def bands(idx):  # stored rows are the logical tensor's columns
                for r0 in range(0, rows, band):
                    yield (mxfp4_dequantize(main[idx][r0:r0 + band], scale[idx][r0:r0 + band], torch.float32),
                           w[idx][:, r0:r0 + band].T)
        out = RoundTrip()
        if main.numel() == 0:
            return out
        w_max = err_max = torch.zeros((), device=main.device)
        w_ss = err_ss = torch.zeros((), dtype=torch.float64, device=main.device)
        for idx in itertools.product(*map(range, lead)):
            for err, x in bands(idx):
                x = x.float()
                w_max, w_ss = torch.maximum(w_max, x.abs().amax()), w_ss + x.norm().double() ** 2
                err.sub_(x)
                err_ss = err_ss + err.norm().double() ** 2
                err_max = torch.maximum(err_max, err.abs_().amax())
        return RoundTrip(err_max.item(), w_max.item(), err_ss.item(), w_ss.item())

    def logical_shape(self, parts_info: dict[str, tuple[int, ...]], logical: str) -> tuple[int, ...]:
        main = parts_info[self.parts(logical)[0]]
        if self.method == "fp8":
            return tuple(main)
        *lead, out, groups, _ = main
        return (*lead, groups * MX_GROUP, out)


def detect_format(cfg: dict, source: str = "config.json") -> QuantFormat | None:
    """The checkpoint's quantized format from ``quantization_config`` (None: not quantized).

    Refuses what lowmoe cannot read exactly, naming the key: other quant methods, static
    activation scales, power-of-two (``ue8m0``) FP8 scales and FP4 experts in an FP8 config."""
    qc = cfg.get("quantization_config")
    if not qc:
        return None
    if not isinstance(qc, dict):
        raise CheckpointError(f"{source}: quantization_config is not an object")
    method = qc.get("quant_method")
    if method == "fp8":
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise UnsupportedModelError(f"{source}: quantization_config.activation_scheme {qc.get('activation_scheme')!r} "
                                  "is not supported (only 'dynamic': static activation scales are not read)")
        if qc.get("scale_fmt") not in (None, "float32", "fp32"):
            raise UnsupportedModelError(f"{source}: quantization_config.scale_fmt {qc['scale_fmt']!r} is not supported "
                                  "(only float weight_scale_inv)")
        if qc.get("expert_dtype") not in (None, "fp8", "float8_e4m3fn"):
            raise UnsupportedModelError(f"{source}: quantization_config.expert_dtype {qc['expert_dtype']!r} is not supported")
        if qc.get("fmt") not in (None, "e4m3", "float8_e4m3fn"):
            raise UnsupportedModelError(f"{source}: quantization_config.fmt {qc['fmt']!r} is not supported (only e4m3)")
        block = qc.get("weight_block_size")
        if (not isinstance(block, (list, tuple)) or len(block) != 2
                or not all(isinstance(b, int) and b > 0 for b in block)):
            raise CheckpointError(f"{source}: quantization_config.weight_block_size {block!r} is not supported "
                                  "(expected two positive ints such as [128, 128]; per-tensor FP8 is not read)")
        return QuantFormat("fp8", (int(block[0]), int(block[1])))
    if method == "mxfp4":
        return QuantFormat("mxfp4")
    raise UnsupportedModelError(f"{source}: quantization_config.quant_method {method!r} is not supported "
                          "(lowmoe reads 'fp8' block-quantized and 'mxfp4' checkpoints; dequantize others first)")


def roundtrip_error(w: torch.Tensor, fmt: QuantFormat, logical: str = "w.weight") -> dict:
    """Relative error of quantizing ``w`` to ``fmt`` and dequantizing it again (``roundtrip_of``)."""
    return fmt.roundtrip_of(fmt.quantize(logical, w), logical, w)


__all__ = ["E2M1_VALUES", "FP8_MAX", "QuantFormat", "detect_format", "fp8_block_dequantize", "fp8_block_quantize",
           "fp8_scale_shape", "mxfp4_dequantize", "mxfp4_quantize", "roundtrip_error"]
