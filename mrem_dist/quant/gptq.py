"""GPTQ (Frantar et al., 2023): second-order weight quantization of one nn.Linear, as a pure function.

Reference algorithm (IST-DASLab/gptq, `GPTQ.fasterquant`): H = 2/n X^T X over the calibration
inputs; dead inputs (H_ii == 0) get H_ii = 1 and W[:, i] = 0; damp * mean(diag H) is added to the
diagonal; U = upper Cholesky factor of H^-1. Columns are swept in blocks: quantize column i,
err = (w_i - q_i) / U_ii, update the rest of the block with err * U[i, i:], then the trailing
columns with one matmul per block (lazy batch updates). This is the Optimal Brain Quantization
update w_F -= (w_i - q_i) / [H_F^-1]_ii * [H_F^-1]_{F,i} (row i of U is [H_F^-1]_{i,F} / sqrt(...)).

Choices of this version:
* The grid is this codebase's (`qrange` restricted symmetric / integer zero point asymmetric, the
  min-max scale of `clip_range(..., "minmax")` + `scale_zero_point`), not the reference's symmetric
  grid (which uses 2^b - 1 levels with zero (maxq+1)/2). Codes and weights come from
  `quantize_codes` / `dequantize`, so `fake_quant` with GptqResult.scale/zero_point reproduces
  GptqResult.weight exactly.
* Per-channel scales (group_size=0) are taken after dead columns are zeroed (the reference takes
  them before; dead columns never reach the output, so zeroing first gives a tighter grid).
* Groups (group_size > 0) are consecutive input columns of a row. With act_order=False a group's
  scale is computed when the sweep reaches its first column, from the exact current (error-updated)
  weights: the columns of the current block as updated so far, and columns past the block with the
  block's pending lazy update applied. The reference reads its outer W there, which misses the
  in-block updates when the group starts mid-block; both agree when block_size divides group_size.
* act_order=True sorts columns by descending diag(H) (stable sort). With groups it uses the
  reference's `static_groups`: every group's scale comes up front from the original (dead-zeroed)
  weights, so groups stay consecutive in the original column order and no g_idx is needed.
* The sweep (the damped Hessian, its Cholesky factors, the error updates, the code choice) runs in
  float64, whatever the weight dtype: GPTQ's rounding is chaotic. In float32, LAPACK's blocking under
  another thread count moved a few Cholesky entries by an ulp; that flipped 5 codes of SmolLM2's
  layer-0 k_proj, 6% of layer 1's (whose inputs had moved), and W3 perplexity from 59.17 to 63.12:
  an MREM-P rank on 1 thread started elsewhere than one process on 2. In float64 such differences
  stay ~1e-16, far from any rounding boundary, so the codes do not depend on the thread count. The
  grid (scales, zero points) and the dequantized weights stay float32, computed as the quantizers
  compute them; `weight` is returned in the input dtype. (In bfloat16, re-quantizing the stored
  weight is exact only while |code - zero| * 2^-8 < 0.5, i.e. up to 6-7 bits; float16 and float32
  are exact at every supported width.)
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import torch
from torch import Tensor

from .clipping import clip_range, scale_zero_point
from .functional import dequantize, qrange, quantize_codes

__all__ = ["GptqResult", "HessianAccumulator", "gptq_quantize"]


class HessianAccumulator:
    """Running H = 2/n * sum_rows x x^T (float32) over every row of the inputs given to `add`.

    Same running-mean update as the reference (H *= n/(n+m); x *= sqrt(2/(n+m))), so H stays
    O(|x|^2) and never overflows; unlike the reference, n counts rows (tokens), not batches."""

    def __init__(self, name: str = "this Linear", in_features: int | None = None) -> None:
        self.name, self.in_features, self.rows = name, in_features, 0
        self._h: Tensor | None = None

    @torch.no_grad()
    def add(self, x: Tensor) -> None:
        """Accumulate the Linear's inputs `x` [..., in] (float16 / bfloat16 / float32 / float64)."""
        if x.dim() == 0 or (self.in_features is not None and x.shape[-1] != self.in_features):
            raise ValueError(f"calibration activations of {self.name} have shape {tuple(x.shape)}, expected "
                             f"[..., {self.in_features}]: record the input of the Linear itself")
        x = x.detach().reshape(-1, x.shape[-1]).float()
        if not torch.isfinite(x).all():
            raise ValueError(f"calibration activations of {self.name} contain NaN/inf: the model overflows on "
                             "the calibration data (e.g. run calibration in float32) or the data is corrupt")
        self.in_features, m = x.shape[1], x.shape[0]
        if self._h is None:
            self._h = x.new_zeros(self.in_features, self.in_features)
        if m == 0:
            return
        self._h *= self.rows / (self.rows + m)
        self.rows += m
        x = x * math.sqrt(2.0 / self.rows)
        self._h += x.T @ x

    @property
    def hessian(self) -> Tensor:
        """H [in, in] float32 (the accumulator's own tensor, not a copy)."""
        if self._h is None or self.rows == 0:
            raise RuntimeError(f"no calibration activations were recorded for {self.name}: run calibration "
                               "batches through the model (with the hook installed) before quantizing it")
        return self._h


@dataclass
class GptqResult:
    """weight: dequantized codes [out, in] in the input dtype; scale / zero_point: [out, n_groups] float32
    (zero_point None when symmetric; group g of row r covers columns g*G..(g+1)*G-1); codes: [out, in]
    int32; error: sum_r (w_r - q_r)^T H (w_r - q_r) with the H given (undamped) and the original w, i.e.
    2/n ||X W^T - X Q^T||^2 on the calibration inputs. (The reference's `Losses` sum is half of this
    form taken with the damped H and the dead-zeroed weight.)"""

    weight: Tensor
    scale: Tensor
    zero_point: Tensor | None
    codes: Tensor
    error: float


def _positive_int(value: object, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name}={value!r} must be an integer >= {minimum}")
    return int(value)


@dataclass(frozen=True)
class GptqOptions:
    """How GPTQ runs: columns per lazy-batch block, damping (a fraction of the Hessian's mean
    diagonal) and act-order; they change the rounding, not the grid."""

    block_size: int = 128
    damp: float = 0.01
    act_order: bool = False


@torch.no_grad()
def gptq_quantize(weight: Tensor, hessian: Tensor, bits: int, symmetric: bool, group_size: int = 0,
                  options: GptqOptions = GptqOptions(), name: str = "this Linear") -> GptqResult:
    """GPTQ-quantize `weight` [out, in] given the input Hessian `hessian` [in, in] (see the module doc)."""
    block_size, damp, act_order = options.block_size, options.damp, options.act_order
    qmin, qmax = qrange(bits, symmetric)
    if weight.dim() != 2:
        raise ValueError(f"gptq_quantize expects a 2-D [out, in] weight, got shape {tuple(weight.shape)} for {name}")
    out, n = weight.shape
    if tuple(hessian.shape) != (n, n):
        raise ValueError(f"the Hessian of {name} has shape {tuple(hessian.shape)} but the weight has {n} input "
                         f"columns: expected [{n}, {n}] (accumulate it from this Linear's inputs)")
    gs = _positive_int(group_size, "group_size", 0) or n
    block_size = _positive_int(block_size, "block_size", 1)
    if n % gs:
        divs = ", ".join([str(d) for d in range(1, n + 1) if n % d == 0][:12])
        raise ValueError(f"group_size={group_size} does not divide the {n} input columns of {name}: "
                         f"use a divisor of {n}, e.g. {divs}")
    if not (isinstance(damp, numbers.Real) and math.isfinite(damp) and damp >= 0):
        raise ValueError(f"damp={damp!r} must be a finite number >= 0 (the reference uses 0.01)")
    if not torch.isfinite(weight).all():
        raise ValueError(f"the weight of {name} contains NaN/inf: the model checkpoint is corrupt, reload it")
    h0 = hessian.detach().to(device=weight.device, dtype=torch.float32)
    if not torch.isfinite(h0).all():
        raise ValueError(f"the Hessian of {name} contains NaN/inf: recompute it (HessianAccumulator rejects "
                         "non-finite activations)")

    W = weight.detach().to(torch.float64, copy=True)
    H = h0.double()
    dead = H.diagonal() == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    ng = n // gs
    scale = h0.new_zeros(out, ng)
    zero = None if symmetric else h0.new_zeros(out, ng)

    def set_group(g: int, cols: Tensor) -> None:  # the float32 min-max grid of the weight quantizer
        s, z = scale_zero_point(*clip_range(cols.float(), bits, symmetric, "minmax"), bits, symmetric)
        scale[:, g] = s[:, 0]
        if zero is not None:
            zero[:, g] = z[:, 0]

    static = gs == n or act_order
    if static:
        for g in range(ng):
            set_group(g, W[:, g * gs:(g + 1) * gs])
    perm = torch.argsort(H.diagonal(), descending=True, stable=True) if act_order else torch.arange(n, device=W.device)
    W, H = W[:, perm], H[perm][:, perm]
    group_of = (perm // gs).tolist()
    H.diagonal().add_(damp * H.diagonal().mean())
    fail = (f"the Hessian of {name} is not positive definite even after damping={damp}: "
            "raise damp (e.g. 0.1) or calibrate on more tokens")
    L, info = torch.linalg.cholesky_ex(H)
    if info.item() != 0:
        raise ValueError(fail)
    U, info = torch.linalg.cholesky_ex(torch.cholesky_inverse(L), upper=True)
    if info.item() != 0 or not torch.isfinite(U).all():
        raise ValueError(fail)

    Q = scale.new_zeros(out, n)
    codes = torch.zeros(out, n, dtype=torch.int32, device=W.device)
    for i1 in range(0, n, block_size):
        i2 = min(i1 + block_size, n)
        W1, U1 = W[:, i1:i2].clone(), U[i1:i2, i1:i2]
        E1 = torch.zeros_like(W1)
        for i in range(i2 - i1):
            j = i1 + i
            if not static and j % gs == 0:
                cur = W1[:, i:i + gs]
                if j + gs > i2:  # the group runs past the block: apply the block's pending update
                    cur = torch.cat([cur, W[:, i2:j + gs] - E1[:, :i] @ U[i1:j, i2:j + gs]], dim=1)
                set_group(j // gs, cur)
            g = group_of[j]
            s, z = scale[:, g:g + 1], None if zero is None else zero[:, g:g + 1]
            w = W1[:, i:i + 1]
            c = quantize_codes(w, s.double(), None if z is None else z.double(), qmin, qmax)
            q = dequantize(c, s, z)
            codes[:, j], Q[:, j] = c[:, 0], q[:, 0]
            err = (w - q.double()) / U1[i, i]
            W1[:, i:] -= err @ U1[i:i + 1, i:]
            E1[:, i:i + 1] = err
        W[:, i2:] -= E1 @ U[i1:i2, i2:]

    inv = torch.argsort(perm)
    Q, codes = Q[:, inv], codes[:, inv]
    diff = weight.detach().double() - Q.double()
    error = float(((diff @ h0.double()) * diff).sum())
    return GptqResult(Q.to(weight.dtype), scale, zero, codes, error)
