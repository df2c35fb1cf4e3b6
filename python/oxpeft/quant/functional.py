"""4-bit (NF4 / FP4) and int8 quantisation of torch tensors in bitsandbytes' format.

On CPU the work runs in the Rust core (`oxpeft._native`); on any other device it runs as torch
ops on that device. Both paths give the same bytes and values (tests/test_quant_modules.py holds
them to it on CPU), so a checkpoint quantised on one device loads and dequantises on another.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from oxpeft import _native

__all__ = [
    "BLOCKSIZES",
    "NESTED_BLOCKSIZE",
    "QuantState",
    "quantize_4bit",
    "dequantize_4bit",
    "quantize_int8",
    "dequantize_int8",
    "set_output_pool_limit",
]

#: Blocksizes bitsandbytes accepts for 4-bit quantisation.
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
#: Blocksize of the second-level (double) quantisation of absmax.
NESTED_BLOCKSIZE = 256
_FLOAT_DTYPES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}
_DTYPE_NAMES = {name: dtype for dtype, name in _FLOAT_DTYPES.items()}
# FP4 codes in ascending value order; bitsandbytes ranks +0 (code 0) before the sign-bit zero (code 8).
_FP4_ASCENDING = (11, 10, 13, 12, 15, 14, 9, 0, 8, 1, 6, 7, 4, 5, 2, 3)
_MIN_SCALE = 1e-38


def _code(quant_type: str) -> torch.Tensor:
    return torch.from_numpy(_native.four_bit_code(quant_type))


def _dynamic_map() -> torch.Tensor:
    return torch.from_numpy(_native.dynamic_map())


@dataclass
class QuantState:
    """Everything needed besides the packed bytes to dequantise a 4-bit tensor.

    Field names follow bitsandbytes' serialisation: `absmax` holds fp32 block scales, or their
    uint8 codes when `nested` (double quantisation) with `nested_absmax`, `nested_quant_map` and
    `nested_offset` describing the second level.
    """

    absmax: torch.Tensor
    shape: torch.Size
    dtype: torch.dtype
    blocksize: int
    quant_type: str
    quant_map: torch.Tensor
    nested_absmax: Optional[torch.Tensor] = None
    nested_quant_map: Optional[torch.Tensor] = None
    nested_offset: Optional[float] = None
    nested_blocksize: int = field(default=NESTED_BLOCKSIZE)

    @property
    def nested(self) -> bool:
        """Whether the block scales are double-quantised."""
        return self.nested_absmax is not None

    @property
    def numel(self) -> int:
        """Number of elements of the quantised tensor."""
        n = 1
        for d in self.shape:
            n *= int(d)
        return n

    def to(self, device: torch.device | str) -> "QuantState":
        """A copy of the state with its tensors on `device` (dtypes unchanged)."""
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return QuantState(
            absmax=move(self.absmax),
            shape=self.shape,
            dtype=self.dtype,
            blocksize=self.blocksize,
            quant_type=self.quant_type,
            quant_map=move(self.quant_map),
            nested_absmax=move(self.nested_absmax),
            nested_quant_map=move(self.nested_quant_map),
            nested_offset=self.nested_offset,
            nested_blocksize=self.nested_blocksize,
        )

    def block_scales(self) -> torch.Tensor:
        """The fp32 absmax of every block (undoing double quantisation when present)."""
        if not self.nested:
            return self.absmax
        if _use_native(self.absmax):
            return torch.from_numpy(
                _native.dequantize_nested_absmax(
                    _np(self.absmax), _np(self.nested_absmax), float(self.nested_offset)
                )
            )
        return _block_scales_torch(self.absmax, self.nested_absmax, self.nested_quant_map, self.nested_offset)

    def packed_metadata(self) -> dict:
        """The non-tensor fields as bitsandbytes packs them into `quant_state.bitsandbytes__<type>`."""
        meta = {
            "quant_type": self.quant_type,
            "blocksize": self.blocksize,
            "dtype": _FLOAT_DTYPES[self.dtype],
            "shape": [int(d) for d in self.shape],
        }
        if self.nested:
            meta.update(
                {
                    "nested_blocksize": self.nested_blocksize,
                    "nested_dtype": "float32",
                    "nested_offset": float(self.nested_offset),
                }
            )
        return meta

    def state_dict_items(self, prefix: str) -> dict[str, torch.Tensor]:
        """The tensors bitsandbytes / transformers store next to `<prefix>weight`."""
        items = {f"{prefix}weight.absmax": self.absmax, f"{prefix}weight.quant_map": self.quant_map}
        if self.nested:
            items[f"{prefix}weight.nested_absmax"] = self.nested_absmax
            items[f"{prefix}weight.nested_quant_map"] = self.nested_quant_map
        blob = json.dumps(self.packed_metadata()).encode("utf-8")
        items[f"{prefix}weight.quant_state.bitsandbytes__{self.quant_type}"] = torch.tensor(
            list(blob), dtype=torch.uint8
        )
        return items

    @classmethod
    def from_state_dict_items(cls, items: dict[str, torch.Tensor], where: str) -> "QuantState":
        """Rebuilds a state from the entries `absmax`, `quant_map`, `nested_*` and the packed
        `quant_state.bitsandbytes__<type>` blob (keys without the `<prefix>weight.` part).
        `where` names the module in error messages."""
        packed_keys = [k for k in items if k.startswith("quant_state.bitsandbytes__")]
        if len(packed_keys) != 1:
            raise ValueError(
                f"{where}: expected exactly one 'weight.quant_state.bitsandbytes__nf4' or '__fp4' entry, "
                f"found {sorted(packed_keys) or 'none'}"
            )
        try:
            meta = json.loads(bytes(items[packed_keys[0]].to("cpu", torch.uint8).tolist()).decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ValueError(f"{where}: {packed_keys[0]} does not hold UTF-8 JSON: {exc}") from None
        for key in ("quant_type", "blocksize", "dtype", "shape"):
            if key not in meta:
                raise ValueError(f"{where}: quant state lacks '{key}' (got {sorted(meta)})")
        if meta["quant_type"] not in ("nf4", "fp4") or packed_keys[0] != f"quant_state.bitsandbytes__{meta['quant_type']}":
            raise ValueError(f"{where}: quant_type '{meta['quant_type']}' does not match {packed_keys[0]}")
        if meta["blocksize"] not in BLOCKSIZES:
            raise ValueError(f"{where}: blocksize {meta['blocksize']} is not one of {BLOCKSIZES}")
        if meta["dtype"] not in _DTYPE_NAMES:
            raise ValueError(f"{where}: dtype '{meta['dtype']}' is not one of {sorted(_DTYPE_NAMES)}")
        for key in ("absmax", "quant_map"):
            if key not in items:
                raise ValueError(f"{where}: missing 'weight.{key}'")
        nested = "nested_absmax" in items
        if nested and ("nested_quant_map" not in items or "nested_offset" not in meta):
            raise ValueError(f"{where}: double-quantised state needs nested_absmax, nested_quant_map and nested_offset")
        state = cls(
            absmax=items["absmax"],
            shape=torch.Size(meta["shape"]),
            dtype=_DTYPE_NAMES[meta["dtype"]],
            blocksize=int(meta["blocksize"]),
            quant_type=meta["quant_type"],
            quant_map=items["quant_map"].float(),
            nested_absmax=items["nested_absmax"].float() if nested else None,
            nested_quant_map=items["nested_quant_map"].float() if nested else None,
            nested_offset=float(meta["nested_offset"]) if nested else None,
            nested_blocksize=int(meta.get("nested_blocksize", NESTED_BLOCKSIZE)),
        )
        state.validate(where)
        # The kernels use the built-in tables; a checkpoint with other values would dequantise wrongly.
        if not torch.equal(state.quant_map.cpu(), _code(state.quant_type)):
            raise ValueError(f"{where}: quant_map is not bitsandbytes' {state.quant_type} table; custom 4-bit maps are not supported")
        if state.nested and not torch.equal(state.nested_quant_map.cpu(), _dynamic_map()):
            raise ValueError(f"{where}: nested_quant_map is not bitsandbytes' signed dynamic map")
        return state

    def validate(self, where: str) -> None:
        """Checks that the tensor sizes agree with shape and blocksize."""
        blocks = -(-self.numel // self.blocksize)
        if self.absmax.numel() != blocks:
            raise ValueError(f"{where}: absmax has {self.absmax.numel()} values, expected {blocks} for shape {list(self.shape)} and blocksize {self.blocksize}")
        if self.nested:
            if self.absmax.dtype != torch.uint8:
                raise ValueError(f"{where}: double-quantised absmax must be uint8, got {self.absmax.dtype}")
            if self.nested_blocksize != NESTED_BLOCKSIZE:
                raise ValueError(f"{where}: nested_blocksize {self.nested_blocksize} is not {NESTED_BLOCKSIZE}")
            nested_blocks = -(-blocks // self.nested_blocksize)
            if self.nested_absmax.numel() != nested_blocks or self.nested_quant_map.numel() != 256:
                raise ValueError(f"{where}: nested_absmax must have {nested_blocks} values and nested_quant_map 256")
        elif self.absmax.dtype != torch.float32:
            raise ValueError(f"{where}: absmax must be float32 without double quantisation, got {self.absmax.dtype}")
        if self.quant_map.numel() != 16:
            raise ValueError(f"{where}: quant_map must have 16 values, got {self.quant_map.numel()}")
        scales = self.nested_absmax if self.nested else self.absmax
        if not scales.is_meta and not bool(torch.isfinite(scales).all()):
            raise ValueError(f"{where}: {'nested_absmax' if self.nested else 'absmax'} holds NaN or Inf block scales")
        if self.nested and not math.isfinite(self.nested_offset):
            raise ValueError(f"{where}: nested_offset is {self.nested_offset}, expected a finite number")


def _use_native(t: torch.Tensor) -> bool:
    """Whether `t`'s device runs the Rust kernels (CPU); everything else takes the torch-op path.
    The tests patch this to run the torch-op path on CPU."""
    return t.device.type == "cpu"


def _np(t: torch.Tensor) -> np.ndarray:
    """A zero-copy numpy view of a contiguous CPU tensor; 16-bit floats as uint16 bit patterns."""
    t = t.detach().contiguous().reshape(-1)
    if t.dtype in (torch.bfloat16, torch.float16):
        return t.view(torch.int16).numpy().view(np.uint16)
    return t.numpy()


def _from_bits(array: np.ndarray, dtype: torch.dtype) -> torch.Tensor:
    if dtype in (torch.bfloat16, torch.float16):
        return torch.from_numpy(array.view(np.int16)).view(dtype)
    return torch.from_numpy(array)


def _check_float(tensor: torch.Tensor, what: str) -> None:
    if tensor.dtype not in _FLOAT_DTYPES:
        raise ValueError(f"{what}: dtype must be float32, bfloat16 or float16, got {tensor.dtype}")


def _ranks(normalised: torch.Tensor, midpoints: torch.Tensor) -> torch.Tensor:
    # bucketize(right=False) counts the midpoints strictly below each value: ties go to the lower code.
    return torch.bucketize(normalised, midpoints)


def _four_bit_tables(quant_type: str, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    code = _code(quant_type).to(device)
    order = torch.arange(16) if quant_type == "nf4" else torch.tensor(_FP4_ASCENDING)
    order = order.to(device)
    ascending = code[order]
    midpoints = (ascending[:-1] + ascending[1:]) / 2
    return code, midpoints, order.to(torch.uint8)


def _block_scales_torch(codes: torch.Tensor, nested_absmax: torch.Tensor, nested_map: torch.Tensor, offset: float) -> torch.Tensor:
    scales = nested_absmax.repeat_interleave(NESTED_BLOCKSIZE)[: codes.numel()]
    return nested_map[codes.long()] * scales + torch.tensor(offset, dtype=torch.float32, device=scales.device)


def _dequantize_4bit_torch(
    packed: torch.Tensor, scales: torch.Tensor, n: int, blocksize: int, code: torch.Tensor, dtype: torch.dtype
) -> torch.Tensor:
    flat = packed.reshape(-1)
    idx = torch.stack([flat >> 4, flat & 0x0F], dim=1).reshape(-1).long()
    padded = scales.numel() * blocksize
    idx = torch.cat([idx, idx.new_zeros(max(padded - idx.numel(), 0))])[:padded]
    values = code.to(packed.device, torch.float32)[idx].view(-1, blocksize) * scales.unsqueeze(1)
    return values.reshape(-1)[:n].to(dtype)


def _quantize_int8_torch(half: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = half.float()
    scb = x.abs().amax(dim=1)
    cb = torch.round(x * (127.0 / scb).unsqueeze(1))
    return torch.where((scb == 0).unsqueeze(1), torch.zeros_like(cb), cb).to(torch.int8), scb


def _dequantize_int8_torch(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (cb.float() * scb.float().unsqueeze(1) * 7.874015718698502e-3).to(dtype)


def _quantize_4bit_torch(flat: torch.Tensor, blocksize: int, quant_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Torch-op twin of the Rust kernel: same scaling (reciprocal for full blocks, division for
    the short last block), same midpoints, same padding of an odd count with the code of 0.0."""
    _, midpoints, order = _four_bit_tables(quant_type, flat.device)
    x = flat.float()
    n = x.numel()
    full = n - n % blocksize
    blocks = x[:full].view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    parts = [(blocks * (1.0 / absmax.clamp(min=_MIN_SCALE)).unsqueeze(1)).clamp(-1, 1).reshape(-1)]
    if full < n:
        tail_max = x[full:].abs().amax()
        parts.append((x[full:] / tail_max.clamp(min=_MIN_SCALE)).clamp(-1, 1))
        absmax = torch.cat([absmax, tail_max.unsqueeze(0)])
    scaled = torch.cat(parts)
    if n % 2:
        scaled = torch.cat([scaled, scaled.new_zeros(1)])
    codes = order[_ranks(scaled, midpoints)]
    packed = (codes[0::2] << 4) | codes[1::2]
    return packed, absmax


def _double_quantize_torch(absmax: torch.Tensor, offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    dyn = _dynamic_map().to(absmax.device)
    midpoints = 0.5 * (dyn[:-1] + dyn[1:])
    shifted = absmax - torch.tensor(offset, dtype=torch.float32, device=absmax.device)
    n = shifted.numel()
    padded = torch.cat([shifted, shifted.new_zeros(-n % NESTED_BLOCKSIZE)]).view(-1, NESTED_BLOCKSIZE)
    block_max = padded.abs().amax(dim=1)
    inv = 1.0 / torch.where(block_max == 0, torch.ones_like(block_max), block_max)
    codes = _ranks((padded * inv.unsqueeze(1)).clamp(-1, 1), midpoints).to(torch.uint8)
    codes = torch.where((block_max == 0).unsqueeze(1), torch.zeros_like(codes), codes)
    return codes.reshape(-1)[:n], block_max


def quantize_4bit(
    weight: torch.Tensor,
    blocksize: int = 64,
    quant_type: str = "nf4",
    compress_statistics: bool = True,
    name: str = "weight",
) -> tuple[torch.Tensor, QuantState]:
    """Quantises `weight` to packed 4-bit codes in bitsandbytes' layout.

    Returns the packed bytes, uint8 of shape `(ceil(numel / 2), 1)`, on `weight`'s device, and the
    `QuantState` needed to undo it. With `compress_statistics` the block scales are themselves
    quantised to 8 bits around their mean (bitsandbytes' double quantisation). `name` labels
    errors (NaN / Inf values, bad blocksize or dtype).
    """
    _check_float(weight, name)
    if blocksize not in BLOCKSIZES:
        raise ValueError(f"{name}: blocksize must be one of {BLOCKSIZES}, got {blocksize}")
    if quant_type not in ("nf4", "fp4"):
        raise ValueError(f"{name}: quant_type must be 'nf4' or 'fp4', got {quant_type!r}")
    if weight.numel() == 0:
        raise ValueError(f"{name}: cannot quantise an empty tensor")
    weight = weight.detach()
    if _use_native(weight):
        try:
            packed_np, absmax_np = _native.quantize_4bit(_np(weight), blocksize, quant_type, _FLOAT_DTYPES[weight.dtype])
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        packed, absmax = torch.from_numpy(packed_np), torch.from_numpy(absmax_np)
    else:
        flat = weight.reshape(-1)
        if not bool(torch.isfinite(flat).all()):
            raise ValueError(f"{name}: input holds NaN or Inf; 4-bit quantisation needs finite values")
        packed, absmax = _quantize_4bit_torch(flat, blocksize, quant_type)
    state = QuantState(
        absmax=absmax,
        shape=weight.shape,
        dtype=weight.dtype,
        blocksize=blocksize,
        quant_type=quant_type,
        quant_map=_code(quant_type).to(weight.device),
    )
    if compress_statistics:
        # torch's fp32 mean is what bitsandbytes subtracts; using it keeps the bytes identical.
        offset = float(absmax.mean())
        if _use_native(absmax):
            (codes_np, nested_np), offset = _native.double_quantize_absmax(absmax.numpy(), offset)
            codes, nested = torch.from_numpy(codes_np), torch.from_numpy(nested_np)
        else:
            codes, nested = _double_quantize_torch(absmax, offset)
        state.absmax = codes
        state.nested_absmax = nested
        state.nested_quant_map = _dynamic_map().to(weight.device)
        state.nested_offset = offset
    return packed.reshape(-1, 1), state


def dequantize_4bit(
    packed: torch.Tensor,
    state: QuantState,
    dtype: Optional[torch.dtype] = None,
    out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The tensor `state.shape` in `dtype` (default: `out`'s dtype, else the quantised tensor's dtype): every
    value is `quant_map[code] * absmax[block]` in fp32, then rounded to `dtype` (nearest, ties to even).

    `out` (a contiguous tensor of `state.shape` on the packed weight's device) receives the result, which
    saves allocating a fresh output each call (bitsandbytes has the same option). On CPU a fresh output of
    1 MiB or more needs no `out`: it comes from a pool of huge-page-advised buffers that outputs return
    to once freed (see `set_output_pool_limit`), which avoids most of the page-fault cost."""
    dtype = dtype or (out.dtype if out is not None else state.dtype)
    if out is not None and (
        out.dtype != dtype or tuple(out.shape) != tuple(state.shape) or not out.is_contiguous()
        or out.device != packed.device
    ):
        raise ValueError(
            f"dequantize_4bit: out must be a contiguous {dtype} tensor of shape {list(state.shape)} on "
            f"{packed.device}, got {out.dtype} {list(out.shape)} on {out.device}"
        )
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dequantize_4bit: dtype must be float32, bfloat16 or float16, got {dtype}")
    n = state.numel
    if packed.dtype != torch.uint8 or packed.numel() != (n + 1) // 2:
        raise ValueError(
            f"dequantize_4bit: packed weight must be uint8 with {(n + 1) // 2} bytes for shape {list(state.shape)}, "
            f"got {packed.dtype} with {packed.numel()}"
        )
    scales = state.block_scales()
    if _use_native(packed):
        target = None if out is None else _np(out)
        result = _native.dequantize_4bit(
            _np(packed), _np(scales), n, state.blocksize, state.quant_type, _FLOAT_DTYPES[dtype], target
        )
        return out if out is not None else _from_bits(result, dtype).view(state.shape)
    result = _dequantize_4bit_torch(packed, scales, n, state.blocksize, state.quant_map, dtype).view(state.shape)
    return result if out is None else out.copy_(result)


def set_output_pool_limit(nbytes: int) -> int:
    """Sets how many bytes of freed CPU dequantisation outputs (1 MiB or more each) oxpeft keeps for reuse,
    256 MiB by default; 0 turns the reuse off and releases what is held. Returns the previous limit.

    A freed output's pages stay mapped while pooled, so this much memory can stay resident after the
    tensors are gone; in exchange the next output of about that size skips the page faults (and the
    kernel's zeroing) of fresh memory, which on CPU cost more than dequantising itself."""
    if isinstance(nbytes, bool) or not isinstance(nbytes, int) or nbytes < 0:
        raise ValueError(f"set_output_pool_limit: nbytes must be an int >= 0, got {nbytes!r}")
    return _native.set_output_pool_limit(nbytes)


def quantize_int8(weight: torch.Tensor, name: str = "weight") -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise int8 quantisation of a 2-D weight (LLM.int8() format).

    Like bitsandbytes, the weight is first rounded to float16, then `SCB = max|row|` (fp32) and
    `CB = round(W * (127 / SCB))`. Returns `(CB int8 (out, in), SCB float32 (out,))` on the
    weight's device.
    """
    _check_float(weight, name)
    if weight.dim() != 2:
        raise ValueError(f"{name}: int8 quantisation needs a 2-D weight, got shape {list(weight.shape)}")
    half = weight.detach().to(torch.float16)
    if not bool(torch.isfinite(half).all()):
        raise ValueError(f"{name}: weight holds NaN or Inf (after rounding to float16, as bitsandbytes does)")
    if _use_native(half):
        cb, scb = _native.quantize_int8_rows(_np(half).reshape(half.shape), "float16")
        return torch.from_numpy(cb), torch.from_numpy(scb)
    return _quantize_int8_torch(half)


def dequantize_int8(cb: torch.Tensor, scb: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """`CB * SCB / 127` computed in fp32 as bitsandbytes does, rounded to `dtype`."""
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"dequantize_int8: dtype must be float32, bfloat16 or float16, got {dtype}")
    if cb.dtype != torch.int8 or cb.dim() != 2 or scb.numel() != cb.shape[0]:
        raise ValueError(
            f"dequantize_int8: need int8 CB (out, in) and one SCB per row, got {cb.dtype} {list(cb.shape)} and {scb.numel()} scales"
        )
    if _use_native(cb):
        out = _native.dequantize_int8_rows(cb.contiguous().numpy(), _np(scb.float()), _FLOAT_DTYPES[dtype])
        return _from_bits(out, dtype).view(cb.shape)
    return _dequantize_int8_torch(cb, scb, dtype)
