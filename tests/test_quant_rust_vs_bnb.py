"""oxpeft's Rust quantisers against bitsandbytes 0.50.2's own CPU output, byte for byte.

Two places where bitsandbytes' CPU code departs from the exact rule are pinned down here:

* Double quantisation: its C++ 8-bit quantiser looks codes up in a 65536-bin table over [-1, 1]
  instead of comparing with midpoints, so a value within half a bin (~1.5e-5) of a midpoint can get
  a neighbouring code. oxpeft takes the exact nearest code; the test models bitsandbytes' table
  and checks that every differing code is one of those near-midpoint cases.
* 4-bit dequantisation: its AVX-512 kernel indexes block scales per row as
  `row * (cols // blocksize) + col // blocksize`, which is wrong whenever `cols` is not a multiple of
  `blocksize` (blocks then cross rows). oxpeft follows the flat-block rule that its quantiser (and its
  pure-PyTorch dequantiser) use; the test shows both facts.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from oxpeft import _native
from oxpeft.quant import functional as Q

bnb = pytest.importorskip("bitsandbytes")
F = pytest.importorskip("bitsandbytes.functional")
from bitsandbytes.backends.default.ops import _dequantize_4bit_compute  # noqa: E402

_exact_bnb_dequant = getattr(_dequantize_4bit_compute, "__wrapped__", _dequantize_4bit_compute)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = [(64, 64), (33, 17), (300, 129), (1,), (7,), (4, 3, 40), (2, 1024)]


def _weight(shape, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(shape, generator=g) * 0.05
    flat = w.view(-1)
    if flat.numel() > 200:
        flat[64:160] = 0.0  # whole zero blocks at blocksize 32 (and part of larger ones)
        flat[5] = 3.0  # an outlier that dominates its block
        flat[6] = -1e-30  # tiny values scaled up to near zero
    return w.to(dtype)


def test_code_tables_are_bitsandbytes():
    for qt in ("nf4", "fp4"):
        ours = torch.from_numpy(_native.four_bit_code(qt))
        theirs = F.get_4bit_type(qt, device="cpu")
        assert torch.equal(ours.view(torch.int32), theirs.view(torch.int32)), qt
    assert torch.equal(
        torch.from_numpy(_native.dynamic_map()).view(torch.int32), F.create_dynamic_map(signed=True).view(torch.int32)
    )


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("blocksize", [32, 64, 128, 256, 1024, 4096])
def test_packed_weight_and_absmax_equal_bitsandbytes(dtype, quant_type, blocksize):
    for i, shape in enumerate(SHAPES):
        w = _weight(shape, dtype, seed=i)
        packed, state = Q.quantize_4bit(w, blocksize, quant_type, compress_statistics=False)
        bnb_packed, bnb_state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)
        assert packed.shape == bnb_packed.shape and packed.dtype == bnb_packed.dtype
        assert torch.equal(packed, bnb_packed), (shape, "packed")
        assert torch.equal(state.absmax.view(torch.int32), bnb_state.absmax.view(torch.int32)), (shape, "absmax")
        assert torch.equal(state.quant_map.view(torch.int32), bnb_state.code.view(torch.int32))


def test_ties_and_edge_values_equal_bitsandbytes():
    # Values exactly on the midpoints (absmax 1), both zeros, and +-1.
    for qt in ("nf4", "fp4"):
        code = F.get_4bit_type(qt, device="cpu")
        ascending = code.sort().values
        mids = (ascending[:-1] + ascending[1:]) / 2
        row = torch.cat([torch.tensor([1.0, -1.0, 0.0, -0.0, 1e-4, -1e-4]), mids, torch.nextafter(mids, torch.tensor(2.0))])
        w = torch.cat([row, torch.zeros(64 - row.numel() % 64)])
        packed, _ = Q.quantize_4bit(w, 64, qt, compress_statistics=False)
        assert torch.equal(packed, F.quantize_4bit(w, blocksize=64, quant_type=qt)[0]), qt


def _bnb_lut_codes(values: np.ndarray) -> np.ndarray:
    """bitsandbytes 0.50.2's CPU 8-bit quantiser for one block of shifted absmax values, modelled
    step by step in fp32: a 65536-bin table of nearest codes over [-1, 1], indexed by
    `trunc(((v * (1 / blockmax) + 1) * 0.5) * 65535 + 0.5)`."""
    code = F.create_dynamic_map(signed=True).numpy()
    mids = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    bins = (np.float32(-1.0) + (np.float32(2.0) * np.arange(65536, dtype=np.float32)) / np.float32(65535)).astype(np.float32)
    lut = np.searchsorted(mids, bins, side="left").astype(np.uint8)  # midpoints strictly below each bin value
    block_max = np.float32(np.abs(values).max())
    if block_max == 0:
        return np.zeros(values.shape, np.uint8)
    v = np.clip(values * (np.float32(1.0) / block_max), np.float32(-1), np.float32(1)).astype(np.float32)
    idx = ((v + np.float32(1.0)) * np.float32(0.5) * np.float32(65535) + np.float32(0.5)).astype(np.float32)
    return lut[idx.astype(np.int64)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
def test_double_quantisation_equals_bitsandbytes_up_to_its_lookup_table(dtype, quant_type):
    code = F.create_dynamic_map(signed=True).numpy()
    mids = (np.float32(0.5) * (code[:-1] + code[1:])).astype(np.float32)
    differing = 0
    for i, (shape, blocksize) in enumerate([((256, 256), 64), ((300, 129), 32), ((33, 17), 64), ((1000, 64), 128), ((64, 64), 4096)]):
        w = _weight(shape, dtype, seed=100 + i)
        packed, state = Q.quantize_4bit(w, blocksize, quant_type, compress_statistics=True)
        bnb_packed, bnb_state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=True)
        assert torch.equal(packed, bnb_packed)
        assert state.nested_offset == bnb_state.offset.item()
        assert torch.equal(state.nested_absmax.view(torch.int32), bnb_state.state2.absmax.view(torch.int32))
        assert torch.equal(state.nested_quant_map, bnb_state.state2.code)
        ours, theirs = state.absmax.numpy(), bnb_state.absmax.numpy()
        shifted = (F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type)[1].absmax - bnb_state.offset).numpy()
        for start in range(0, shifted.size, 256):
            block = shifted[start : start + 256]
            # bitsandbytes' bytes are exactly its lookup-table rule ...
            assert np.array_equal(theirs[start : start + 256], _bnb_lut_codes(block))
            # ... and oxpeft's are the exact nearest code (ties to the lower one).
            block_max = np.float32(np.abs(block).max())
            if block_max == 0:
                assert not ours[start : start + 256].any()
                continue
            normalised = np.clip(block * (np.float32(1) / block_max), -1, 1).astype(np.float32)
            assert np.array_equal(ours[start : start + 256], np.searchsorted(mids, normalised, side="left"))
            # The table's bins are 2/65535 wide: codes differ only within half a bin of a midpoint.
            diff = ours[start : start + 256] != theirs[start : start + 256]
            distance = np.abs(normalised[diff, None] - mids[None, :]).min(axis=1, initial=1.0)
            assert np.all(distance <= 1.0001 / 65535), distance
            differing += int(diff.sum())
    assert differing < 0.02 * 5000, differing


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quant_type", ["nf4", "fp4"])
@pytest.mark.parametrize("nested", [False, True])
def test_dequantise_equals_bitsandbytes(dtype, quant_type, nested):
    for i, (shape, blocksize) in enumerate([((64, 64), 64), ((32, 128), 32), ((33, 17), 64), ((16, 96), 64), ((64, 64), 256), ((7,), 64)]):
        w = _weight(shape, dtype, seed=200 + i)
        bnb_packed, bnb_state = F.quantize_4bit(w, blocksize=blocksize, quant_type=quant_type, compress_statistics=nested)
        # Load bitsandbytes' own state, so that both sides dequantise the same bytes.
        state = Q.QuantState.from_state_dict_items(
            {k.removeprefix("weight."): v for k, v in bnb_state.as_dict(packed=True).items()}, "bnb"
        )
        ours = Q.dequantize_4bit(bnb_packed, state)
        scales = F.dequantize_blockwise(bnb_state.absmax, bnb_state.state2) + bnb_state.offset if nested else bnb_state.absmax
        exact = _exact_bnb_dequant(bnb_packed.reshape(-1), scales, F.get_4bit_type(quant_type, device="cpu"), blocksize, shape, dtype)
        assert torch.equal(ours.view(-1).view(torch.uint8), exact.view(-1).view(torch.uint8)), (shape, blocksize)
        kernel = F.dequantize_4bit(bnb_packed, bnb_state)
        rows_hold_whole_blocks = shape[-1] % blocksize == 0 or shape[-1] % 2 == 1 or len(shape) == 1
        if rows_hold_whole_blocks:
            assert torch.equal(ours.view(-1).view(torch.uint8), kernel.view(-1).view(torch.uint8)), (shape, blocksize)
        else:
            # bitsandbytes' AVX-512 kernel picks the wrong scale once blocks cross rows.
            assert not torch.equal(ours, kernel), (shape, blocksize)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_int8_equals_bitsandbytes(dtype):
    g = torch.Generator().manual_seed(7)
    w = (torch.randn(48, 80, generator=g) * 0.1).to(dtype)
    w[3] = 0.0  # a zero row
    w[5, :4] = torch.tensor([127.0, 0.5, 1.5, -2.5]) / 127  # values on rounding ties
    cb, scb = Q.quantize_int8(w)
    bnb_cb, bnb_scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
    assert torch.equal(cb, bnb_cb)
    assert torch.equal(scb, bnb_scb)
    for out_dtype in DTYPES:
        ours = Q.dequantize_int8(cb, scb, out_dtype)
        theirs = F.int8_vectorwise_dequant(bnb_cb, bnb_scb).to(out_dtype)
        assert torch.equal(ours.view(-1).view(torch.uint8), theirs.view(-1).view(torch.uint8)), out_dtype


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_linear8bit_threshold_equals_bitsandbytes_linear8bitlt(dtype):
    """Same bits as bitsandbytes' Linear8bitLt in inference (where its CPU backend runs LLM.int8();
    in training mode on CPU it dequantises instead). Exact equality holds because both sides take the
    same steps: int8 codes and the int32 products are exact, and the fp32 rescaling, the bias add and
    the float matmul of the outlier columns are the same operations in the same order."""
    import logging

    from torch import nn

    from oxpeft.quant import Linear8bit

    torch.manual_seed(0)
    linear = nn.Linear(96, 40).to(dtype)
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(3, 5, 96, generator=g) * 2).to(dtype)
    x[..., 7] = 9.0
    x[1, 2, 30] = -7.5
    theirs = bnb.nn.Linear8bitLt(96, 40, has_fp16_weights=False, threshold=6.0)
    theirs.load_state_dict(linear.state_dict())
    theirs = theirs.to("cpu").eval()
    mine = Linear8bit.from_linear(linear, compute_dtype=dtype, threshold=6.0)
    logging.disable(logging.WARNING)  # bitsandbytes warns that it rounds the input to float16
    try:
        with torch.no_grad():
            expected = theirs(x)
    finally:
        logging.disable(logging.NOTSET)
    assert torch.equal(mine.weight, theirs.weight.data)
    assert torch.equal(mine(x), expected)
