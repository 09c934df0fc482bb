"""Integer codes packed into bytes: 8-bit codes one per byte, 3-4 bit codes two per byte, 2-bit
codes four per byte (5-7 bit codes take a byte each: no cross-byte fields, so unpacking stays a
few vectorised shifts).

A code c of a signed grid is stored as c + 2^(w-1) in a w-bit field (w the field width), of an
unsigned grid as c; fields fill a byte from its low bits up, in row-major order, and the last
byte is padded with zeros. The packed tensor is uint8 and 1-D; the shape is kept by the caller.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor


def field_bits(bits: int) -> int:
    """Width of the field a `bits`-bit code is stored in: 2, 4 or 8."""
    if not 1 <= bits <= 8:
        raise ValueError(f"codes of {bits} bits cannot be packed: 1 to 8 bits are supported")
    return 2 if bits <= 2 else 4 if bits <= 4 else 8


def packed_bytes(numel: int, bits: int) -> int:
    return math.ceil(numel * field_bits(bits) / 8)


def code_range(bits: int, signed: bool) -> tuple[int, int]:
    """The codes a field of this many bits can hold (the grid's own range is inside it)."""
    return (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def pack_codes(codes: Tensor, bits: int, signed: bool) -> Tensor:
    """Pack integer `codes` (any shape) of a `bits`-bit grid into a 1-D uint8 tensor."""
    if codes.is_floating_point():
        raise TypeError(f"pack_codes takes integer codes, got {codes.dtype}: round and cast them first")
    lo, hi = code_range(bits, signed)
    flat = codes.reshape(-1).to(torch.int32)
    if flat.numel() and (int(flat.min()) < lo or int(flat.max()) > hi):
        raise ValueError(
            f"codes span [{int(flat.min())}, {int(flat.max())}], outside the {bits}-bit "
            f"{'signed' if signed else 'unsigned'} range [{lo}, {hi}]"
        )
    w = field_bits(bits)
    unsigned = flat + (2 ** (w - 1) if signed else 0)
    per_byte = 8 // w
    pad = (-unsigned.numel()) % per_byte
    fields = torch.cat([unsigned, unsigned.new_zeros(pad)]).view(-1, per_byte)
    shifts = torch.arange(per_byte, dtype=torch.int32, device=codes.device) * w
    return (fields << shifts).sum(dim=1).to(torch.uint8)


def unpack_codes(packed: Tensor, bits: int, signed: bool, shape: tuple[int, ...] | torch.Size) -> Tensor:
    """The inverse of pack_codes: int8 codes of the given shape (int16 for unsigned 8-bit)."""
    if packed.dtype != torch.uint8 or packed.dim() != 1:
        raise ValueError(f"packed codes must be a 1-D uint8 tensor, got {packed.dtype} of shape {tuple(packed.shape)}")
    numel = math.prod(shape)
    if packed.numel() != packed_bytes(numel, bits):
        raise ValueError(
            f"{packed.numel()} packed bytes do not hold {numel} codes of {bits} bits "
            f"(expected {packed_bytes(numel, bits)}): the file is truncated or the shape is wrong"
        )
    w = field_bits(bits)
    per_byte = 8 // w
    shifts = torch.arange(per_byte, dtype=torch.int32, device=packed.device) * w
    fields = (packed.to(torch.int32).unsqueeze(1) >> shifts) & (2**w - 1)
    codes = fields.reshape(-1)[:numel] - (2 ** (w - 1) if signed else 0)
    dtype = torch.int16 if (not signed and bits == 8) else torch.int8
    return codes.to(dtype).reshape(shape)
