"""Choosing the clipping range [lo, hi] of each quantization group, and its scale / zero point.

Inputs are already grouped by the caller: `xg` is [G, K], one row per group (a weight reshaped
with `group_view`, or a [1, N] sample of activations). Every function is vectorised over rows.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .functional import check_bits, fake_quant, qrange

__all__ = ["ACIQ_ALPHA", "CLIP_METHODS", "ACIQ_PRIORS", "SCALE_EPS", "check_clip", "clip_range", "scale_zero_point"]

# Optimal clipping value in units of the distribution's scale parameter, per bit width
# (Banner et al., "Post-training 4-bit quantization..."). Multiply by b = mean|x - mean(x)| for
# Laplace, by the standard deviation for Gauss. These exact numbers are a tested contract.
ACIQ_ALPHA: dict[str, dict[int, float]] = {
    "laplace": {2: 2.83, 3: 3.89, 4: 5.03, 5: 6.20, 6: 7.41, 7: 8.64, 8: 9.89},
    "gauss": {2: 1.71, 3: 2.15, 4: 2.55, 5: 2.93, 6: 3.28, 7: 3.61, 8: 3.92},
}
CLIP_METHODS = ("minmax", "aciq", "mse")
ACIQ_PRIORS = ("laplace", "gauss")
# Scale floor: a degenerate group (all zeros) must still give a finite, positive scale.
SCALE_EPS = 1e-8
# Shrink factors of the minmax range tried by the mse search; 1.0 (plain minmax) is included,
# so mse can never reconstruct worse than minmax.
MSE_SHRINK = torch.linspace(0.2, 1.0, 81)
_MSE_BLOCK = 2**16  # values per cache-sized block in the mse search


def check_clip(clip: str, prior: str = "laplace") -> None:
    if clip not in CLIP_METHODS:
        raise ValueError(f"clip={clip!r} is not one of {', '.join(CLIP_METHODS)}: pick one of them")
    if prior not in ACIQ_PRIORS:
        raise ValueError(f"prior={prior!r} is not one of {', '.join(ACIQ_PRIORS)}: pick one of them")


def scale_zero_point(
    lo: Tensor, hi: Tensor, bits: int, symmetric: bool, full_range: bool = False
) -> tuple[Tensor, Tensor | None]:
    """Scale (and zero point for asymmetric grids) mapping [lo, hi] onto the integer range.

    symmetric: scale = max(hi, -lo) / -qmin (== hi / qmax on the restricted grid; on the full-range
    grid -max maps to code -2^(b-1) and +max is clipped to (2^(b-1)-1) * scale, as in ZeroQuant).
    asymmetric: scale = (hi - lo) / (qmax - qmin), zero_point = clamp(round(qmin - lo/scale)),
    an integer-valued float tensor. Scale is floored at SCALE_EPS."""
    qmin, qmax = qrange(bits, symmetric, full_range)
    if symmetric:
        return (torch.maximum(hi, -lo) / -qmin).clamp_min(SCALE_EPS), None
    scale = ((hi - lo) / (qmax - qmin)).clamp_min(SCALE_EPS)
    zero_point = torch.round(qmin - lo / scale).clamp(qmin, qmax)
    return scale, zero_point


def _minmax(xg: Tensor, symmetric: bool) -> tuple[Tensor, Tensor]:
    if symmetric:
        hi = xg.abs().amax(dim=1, keepdim=True)
        return -hi, hi
    # Keep 0 inside the range so that zero (padding, ReLU/GELU zeros, pruned weights) is exact.
    lo = xg.amin(dim=1, keepdim=True).clamp(max=0)
    hi = xg.amax(dim=1, keepdim=True).clamp(min=0)
    return lo, hi


def _aciq(xg: Tensor, bits: int, symmetric: bool, prior: str) -> tuple[Tensor, Tensor]:
    mean = xg.mean(dim=1, keepdim=True)
    if prior == "laplace":
        b = (xg - mean).abs().mean(dim=1, keepdim=True)
    else:
        # Population std: a one-element group must not give NaN.
        b = xg.std(dim=1, correction=0, keepdim=True)
    alpha = ACIQ_ALPHA[prior][bits] * b
    lo_mm, hi_mm = _minmax(xg, symmetric)
    if symmetric:
        hi = torch.minimum(alpha, hi_mm)
        lo = -hi
    else:
        lo = torch.maximum(xg.amin(dim=1, keepdim=True), mean - alpha)
        hi = torch.minimum(lo + 2 * alpha, xg.amax(dim=1, keepdim=True))  # never wider than minmax
        lo, hi = lo.clamp(max=0), hi.clamp(min=0)
    # A constant group has b == 0, so alpha == 0 would clip every value to 0; minmax is exact there.
    constant = b <= 0
    return torch.where(constant, lo_mm, lo), torch.where(constant, hi_mm, hi)


def _mse(xg: Tensor, bits: int, symmetric: bool, full_range: bool) -> tuple[Tensor, Tensor]:
    qmin, qmax = qrange(bits, symmetric, full_range)
    lo_mm, hi_mm = _minmax(xg, symmetric)
    # r = 1 (minmax) comes first and argmin returns the first minimum: ties keep the widest range,
    # and mse can never be worse than minmax.
    shrink = [1.0] + MSE_SHRINK.tolist()[:-1]
    params = [scale_zero_point(lo_mm * r, hi_mm * r, bits, symmetric, full_range) for r in shrink]
    scales = torch.cat([s for s, _ in params], dim=1)  # [G, C]
    zps = None if symmetric else torch.cat([z for _, z in params], dim=1)
    # Blocks that fit in cache: the candidates then re-read cache, not RAM (several times faster
    # on a 30522 x 384 embedding); every block is vectorised over its rows.
    rows, cols = xg.shape
    rb, cb = max(1, _MSE_BLOCK // cols), min(cols, _MSE_BLOCK)
    err = xg.new_zeros(rows, len(shrink))
    for r0 in range(0, rows, rb):
        for c0 in range(0, cols, cb):
            xb = xg[r0 : r0 + rb, c0 : c0 + cb]
            for i in range(len(shrink)):
                s = scales[r0 : r0 + rb, i : i + 1]
                z = None if zps is None else zps[r0 : r0 + rb, i : i + 1]
                err[r0 : r0 + rb, i] += (xb - fake_quant(xb, s, z, qmin, qmax)).pow_(2).sum(dim=1)
    r = torch.tensor(shrink, dtype=xg.dtype, device=xg.device)[err.argmin(dim=1, keepdim=True)]
    return lo_mm * r, hi_mm * r


@torch.no_grad()
def clip_range(
    xg: Tensor, bits: int, symmetric: bool, method: str = "minmax", prior: str = "laplace", full_range: bool = False
) -> tuple[Tensor, Tensor]:
    """Per-row clipping range (lo [G,1], hi [G,1]) of `xg` [G, K].

    minmax: the full range (symmetric: +-max|x|; asymmetric: [min, max] widened to contain 0).
    aciq:   Banner et al.'s analytic clip alpha = ACIQ_ALPHA[prior][bits] * b, capped at minmax.
    mse:    the shrink r * minmax range, r in linspace(0.2, 1, 81), with the least squared
            fake-quant error per row (on the grid `full_range` selects, see qrange).
    Statistics are taken in float32 so that low-precision weights give the same ranges."""
    check_bits(bits)
    check_clip(method, prior)
    if xg.dim() != 2 or xg.shape[1] == 0:
        raise ValueError(
            f"clip_range expects a non-empty 2-D [groups, values] tensor, got shape {tuple(xg.shape)}: "
            "reshape with group_view(weight, groups) or x.reshape(1, -1)"
        )
    xg = xg.float()
    if method == "minmax":
        return _minmax(xg, symmetric)
    if method == "aciq":
        return _aciq(xg, bits, symmetric, prior)
    return _mse(xg, bits, symmetric, full_range)
