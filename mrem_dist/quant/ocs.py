"""Outlier Channel Splitting (Zhao et al., ICML 2019) for a Linear weight [out, in].

Splitting input column c halves it and appends a copy of the halved column; feeding input
feature c to both copies (`x[..., in_index]`) leaves the layer's function unchanged, while the
largest |w| -- which sets the quantization step -- shrinks. Columns are split one at a time,
always the column currently holding the largest |w| in the (already partly split) matrix.

Typical use (QuantLinear does this):
  1. w1, idx = ocs_split(w, ratio)                       # plain halving
  2. compute the quantizer step on w1 (e.g. WeightQuantizer.init_from(w1), scale per row)
  3. optionally w2, idx = ocs_split_quant_aware(w, ratio, step)  # same columns, split so that
     the two halves round to the grid of `step` with less error; re-init the quantizer on w2.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["ocs_num_split", "ocs_split", "ocs_split_quant_aware"]


def ocs_num_split(in_features: int, ratio: float) -> int:
    """n = ceil(ratio * in_features) columns to split."""
    if not (isinstance(ratio, (int, float)) and 0.0 <= ratio <= 1.0):
        raise ValueError(
            f"ocs_ratio={ratio!r} is outside [0, 1]: pass the fraction of input channels to split, e.g. 0.02"
        )
    # The small tolerance keeps float noise (0.1 * 30 = 3.0000000000000004) from adding a column.
    return math.ceil(ratio * in_features - 1e-9)


def _split_sequence(weight: Tensor, n: int) -> list[int]:
    """Columns (indices into the growing matrix) split at each of the n steps of plain OCS."""
    if weight.dim() != 2:
        raise ValueError(f"OCS expects a 2-D [out, in] weight, got shape {tuple(weight.shape)}: reshape it to 2-D")
    col_max = torch.zeros(weight.shape[1] + n, dtype=torch.float64)
    col_max[: weight.shape[1]] = weight.detach().abs().amax(dim=0).double().cpu()
    seq = []
    for i in range(n):
        # argmax over the columns that exist so far; ties go to the lowest index.
        c = int(torch.argmax(col_max[: weight.shape[1] + i]))
        col_max[c] /= 2  # halving is exact, so the column maxima stay exact
        col_max[weight.shape[1] + i] = col_max[c]
        seq.append(c)
    return seq


def _apply(weight: Tensor, seq: list[int], step: Tensor | None) -> tuple[Tensor, Tensor]:
    out, n_in = weight.shape
    new = weight.new_zeros(out, n_in + len(seq))
    new[:, :n_in] = weight.detach()
    index = torch.arange(n_in + len(seq), device=weight.device)
    for i, c in enumerate(seq):
        j = n_in + i
        v = new[:, c].clone()
        if step is None:
            new[:, c] = v / 2
            new[:, j] = v / 2
        else:
            # Quantization-aware split: the pair still sums to v, but is offset by a quarter step
            # each so that round(a/step) + round(b/step) == round(v/step) more often than halves.
            new[:, c] = v / 2 - step / 4
            new[:, j] = v / 2 + step / 4
        index[j] = index[c]
    return new, index


def ocs_split(weight: Tensor, ratio: float) -> tuple[Tensor, Tensor]:
    """Split n = ceil(ratio*in) columns: returns (new_weight [out, in+n], in_index LongTensor [in+n])
    with x[..., in_index] @ new_weight.T == x @ weight.T (up to float rounding)."""
    n = ocs_num_split(weight.shape[-1], ratio)
    return _apply(weight, _split_sequence(weight, n), None)


def ocs_split_quant_aware(weight: Tensor, ratio: float, step: Tensor | float) -> tuple[Tensor, Tensor]:
    """Same split columns as ocs_split(weight, ratio), each split of a column v giving
    v/2 - step/4 (in place) and v/2 + step/4 (appended). `step` is a scalar or per-row [out, 1]."""
    n = ocs_num_split(weight.shape[-1], ratio)
    seq = _split_sequence(weight, n)
    out = weight.shape[0]
    s = torch.as_tensor(step, dtype=weight.dtype, device=weight.device).detach()
    if s.numel() not in (1, out):
        raise ValueError(
            f"step has {s.numel()} elements but the weight has {out} rows: pass a scalar or a per-row "
            f"[{out}, 1] step (expand per-group scales with expand_to_rows)"
        )
    return _apply(weight, seq, s.reshape(-1).expand(out))
