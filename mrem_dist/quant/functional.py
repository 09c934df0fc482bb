"""Integer-grid primitives shared by every quantizer.

Three consumers use these: fake-quant training (straight-through estimator + LSQ step sizes),
integer export, and real INT8 kernels. They must agree bit for bit, so the functions are written
such that `dequantize(quantize_codes(x, s, z, ...), s, z) == fake_quant(x, s, z, ...)` holds
exactly (not just to a tolerance), including when the LSQ gradient scaling is active.
"""

from __future__ import annotations

import numbers

import torch
from torch import Tensor

__all__ = ["check_bits", "qrange", "round_ste", "fake_quant", "quantize_codes", "dequantize", "symmetric_levels",
           "tokenwise_scale"]


def check_bits(bits: int, name: str = "bits") -> None:
    """Raise ValueError unless `bits` is an int in 2..8 (the widths the library supports)."""
    # bool is an Integral too, but bits=True is always a mistake.
    if isinstance(bits, bool) or not isinstance(bits, numbers.Integral):
        raise ValueError(f"{name}={bits!r} is not an integer: choose an int {name} between 2 and 8")
    if not 2 <= bits <= 8:
        raise ValueError(f"{name}={bits} is outside 2..8: choose {name} between 2 and 8")


def qrange(bits: int, symmetric: bool, full_range: bool = False) -> tuple[int, int]:
    """Integer code range. Symmetric uses the restricted range [-(2^(b-1)-1), 2^(b-1)-1] by
    default: dropping -2^(b-1) keeps the grid symmetric around 0 (2-bit = {-1, 0, 1}, 8-bit =
    [-127, 127]), which is what symmetric INT8 activation kernels assume. `full_range` keeps all
    2^b codes [-2^(b-1), 2^(b-1)-1] (DeepSpeed ZeroQuant's weight grid: 2-bit = {-2, -1, 0, 1});
    at 2 bits that is 4 levels instead of 3. Asymmetric is [0, 2^b - 1] (already all 2^b codes)."""
    check_bits(bits)
    if symmetric:
        q = 2 ** (bits - 1) - 1
        return (-q - 1 if full_range else -q), q
    return 0, 2**bits - 1


def round_ste(x: Tensor) -> Tensor:
    """round(x) in the forward pass, identity gradient in the backward pass.

    Written as round(x) + (x - x.detach()) rather than (round(x) - x).detach() + x: the added
    term is exactly 0 in floating point, so the forward value is exactly round(x)."""
    return x.round().detach() + (x - x.detach())


def fake_quant(
    x: Tensor,
    scale: Tensor,
    zero_point: Tensor | None,
    qmin: int,
    qmax: int,
    grad_scale: float | None = None,
) -> Tensor:
    """LSQ fake quantization: (clamp(round(x/scale) + zp, qmin, qmax) - zp) * scale.

    `scale` broadcasts to x. Gradients: x gets the STE gradient (1 inside the clip range, 0
    outside: clamp provides it); scale gets the LSQ gradient (autograd of the expression with
    round_ste). `grad_scale` (LSQ's g = 1/sqrt(numel * qmax)) multiplies only the scale gradient.
    `zero_point` is a non-learnable integer-valued float tensor, or None for symmetric grids.
    """
    if grad_scale is not None:
        # Same gradient as the usual `scale*g + (scale - scale*g).detach()` trick, but this form
        # adds (y - y) == 0 exactly, so the forward value is bit-identical to `scale` and the
        # fake-quant output stays equal to dequantize(quantize_codes(...)).
        sg = scale * grad_scale
        scale = scale.detach() + (sg - sg.detach())
    q = round_ste(x / scale)
    if zero_point is not None:
        q = q + zero_point
    q = torch.clamp(q, qmin, qmax)
    if zero_point is not None:
        q = q - zero_point
    return q * scale


@torch.no_grad()
def quantize_codes(x: Tensor, scale: Tensor, zero_point: Tensor | None, qmin: int, qmax: int) -> Tensor:
    """Integer codes clamp(round(x/scale) + zp, qmin, qmax) as torch.int32.

    int32 rather than int8: asymmetric 8-bit codes are 0..255 and do not fit int8; a kernel that
    wants int8/uint8 casts (the values are guaranteed to lie in [qmin, qmax])."""
    q = torch.round(x / scale)
    if zero_point is not None:
        q = q + zero_point
    return torch.clamp(q, qmin, qmax).to(torch.int32)


def dequantize(codes: Tensor, scale: Tensor, zero_point: Tensor | None) -> Tensor:
    """(codes - zp) * scale, in scale's dtype; the exact inverse path of fake_quant."""
    q = codes.to(scale.dtype)
    if zero_point is not None:
        q = q - zero_point
    return q * scale


def symmetric_levels(bits: int, full_range: bool = False) -> float:
    """What max|x| is divided by to give a symmetric activation step: qmax = 2^(b-1)-1 on the
    restricted grid; (2^b - 1) / 2 (127.5 at 8 bits) on the full grid, compressed-tensors' choice
    (max|x| lands half a step beyond +qmax and is clipped; -max|x| rounds to -2^(b-1))."""
    qmin, qmax = qrange(bits, True, full_range)
    return (qmax - qmin) / 2 if full_range else float(qmax)


def tokenwise_scale(x: Tensor, bits: int, full_range: bool = False) -> Tensor:
    """Symmetric per-token scale amax(|x|, dim=-1, keepdim=True) / symmetric_levels(bits, full_range).

    Floored at the dtype's smallest normal number so that an all-zero token (e.g. padding)
    gets a positive scale instead of 0 (x/0 would be NaN); any positive scale codes 0 as 0."""
    levels = symmetric_levels(bits, full_range)
    return (x.abs().amax(dim=-1, keepdim=True) / levels).clamp_min(torch.finfo(x.dtype).tiny)
