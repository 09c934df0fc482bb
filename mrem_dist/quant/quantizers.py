"""Weight and activation quantizers (fake quantization with explicit integer codes and scales).

Scales are kept in float32 whatever the model dtype (a 1e-8 floor underflows in float16, and INT8
kernels take float32 scales anyway); outputs are cast back to the input's dtype. A learnable
scale is an `nn.Parameter` trained with the LSQ gradient; the zero point is always a buffer.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch
from torch import Tensor, nn

from .clipping import SCALE_EPS, check_clip, clip_range, scale_zero_point
from .functional import check_bits, fake_quant, qrange, quantize_codes, symmetric_levels, tokenwise_scale

__all__ = [
    "GRANULARITIES", "ACT_MODES", "SAMPLE_SIZE", "group_view", "expand_to_rows", "WeightQuantizer", "ActQuantizer",
]

# group: ZeroQuant's blocks of consecutive OUTPUT rows (`groups` of them); input_group: GPTQ's /
# AWQ's / AutoRound's groups of `group_size` consecutive INPUT columns within each output row.
GRANULARITIES = ("tensor", "row", "group", "input_group")
ACT_MODES = ("static", "dynamic")
# The integer grid of a symmetric weight: restricted codes [-(2^(b-1)-1), 2^(b-1)-1]; full: all 2^b
# codes with step max|w| / 2^(b-1) (DeepSpeed ZeroQuant's grid); ternary: {-alpha, 0, alpha} (2 bits).
GRIDS = ("restricted", "full", "ternary")
# Most activation values a static quantizer keeps for aciq/mse calibration (bounded memory).
SAMPLE_SIZE = 2**16
_SAMPLE_SEED = 0


def _divisors(n: int, limit: int = 12) -> str:
    divs = [d for d in range(1, n + 1) if n % d == 0]
    shown = ", ".join(map(str, divs[:limit]))
    return shown + ("..." if len(divs) > limit else "")


def group_view(w: Tensor, groups: int) -> Tensor:
    """View a [out, in] weight as [groups, out*in/groups]: with groups <= out each group is a block
    of CONSECUTIVE output rows (the ZeroQuant / DeepSpeed convention; groups=1 is per-tensor,
    groups=out per-row); with groups = out * k each row splits into k groups of consecutive input
    columns (GPTQ's group size in/k)."""
    if w.dim() != 2:
        raise ValueError(f"group_view expects a 2-D [out, in] weight, got shape {tuple(w.shape)}: reshape it to 2-D")
    rows, columns = w.shape
    if (isinstance(groups, numbers.Integral) and not isinstance(groups, bool) and groups > rows
            and groups % rows == 0 and columns % (groups // rows) == 0):
        return w.reshape(groups, -1)
    if isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1 or rows % groups:
        raise ValueError(
            f"groups={groups} does not divide the {rows} rows of the weight: "
            f"choose a divisor of {rows}, e.g. {_divisors(rows)}"
        )
    return w.reshape(groups, -1)


def expand_to_rows(t: Tensor, rows: int) -> Tensor:
    """Expand a per-group [G, 1] tensor (scale / zero point) of row blocks to per-row [rows, 1].
    Groups of input columns (G > rows) have no per-row equivalent: an error."""
    if t.shape[0] > rows or rows % t.shape[0]:
        raise ValueError(f"{t.shape[0]} scales do not expand to one per row of {rows} rows: groups of input columns "
                         "(quant.w_granularity=input_group) have several scales per row; use w_granularity=row here")
    return t.repeat_interleave(rows // t.shape[0], dim=0)


def check_group_size(group_size: int, columns: int) -> None:
    """Groups of input columns must tile every row exactly."""
    if isinstance(group_size, bool) or not isinstance(group_size, numbers.Integral) or group_size < 1:
        raise ValueError(f"group_size={group_size!r} must be a positive number of input columns, e.g. 64 or 128")
    if columns % group_size:
        raise ValueError(f"group_size={group_size} does not divide the {columns} input columns: use a divisor of "
                         f"{columns}, e.g. {_divisors(columns)}")


def _store(module: nn.Module, name: str, value: Tensor | None, param: bool) -> None:
    """(Re)register `name` as a Parameter or buffer; copy in place when the kind and shape match so
    that an optimizer already holding the Parameter keeps working after a re-init."""
    old = getattr(module, name)
    if value is None:
        module._parameters.pop(name, None)
        module._buffers[name] = None
        return
    if old is not None and isinstance(old, nn.Parameter) == param and old.shape == value.shape:
        with torch.no_grad():
            old.copy_(value)
        return
    module._parameters.pop(name, None)
    module._buffers.pop(name, None)
    if param:
        module.register_parameter(name, nn.Parameter(value))
    else:
        module.register_buffer(name, value)


class WeightQuantizer(nn.Module):
    """Fake-quantizes a 2-D [out, in] weight with one scale (and zero point) per group: the whole
    tensor, a row, a block of rows (granularity="group": `groups` blocks) or `groups` consecutive
    input columns of a row (granularity="input_group": GPTQ's group size). Every group is a run of consecutive elements of the row-major weight, so one view
    [G, out*in/G] (group_view) serves them all.

    Call `init_from(weight)` once (it fixes the number of groups G and the initial scales), then
    `forward(weight)` returns the fake-quantized weight; `codes(weight)` / `dequant_params()` give
    the integer export with `dequantize(codes, expand_to_rows(scale), ...) == forward(weight)`.
    """

    scale: Tensor | None
    zero_point: Tensor | None

    def __init__(
        self,
        bits: int,
        symmetric: bool = True,
        granularity: str = "row",
        groups: int = 0,
        clip: str = "minmax",
        prior: str = "laplace",
        grid: str = "restricted",
        learnable: bool = True,
    ) -> None:
        super().__init__()
        check_bits(bits)
        if grid not in GRIDS:
            raise ValueError(f"grid={grid!r} is not one of {', '.join(GRIDS)}: pick one of them")
        ternary, full_range = grid == "ternary", grid == "full"
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity={granularity!r} is not one of {', '.join(GRANULARITIES)}: pick one of them")
        # `groups` is read per granularity: group = how many blocks of output rows, input_group =
        # how many input columns per group (the run config names them w_groups and w_group_size);
        # tensor / row ignore it (not reject it), as the config reads each only with its own.
        if granularity == "group" and (
            isinstance(groups, bool) or not isinstance(groups, numbers.Integral) or groups < 1
        ):
            raise ValueError(
                f"granularity='group' needs groups > 0 (the number of groups of consecutive output rows), "
                f"got groups={groups!r}: pass e.g. groups=48"
            )
        if granularity == "input_group":
            check_group_size(groups, columns=groups)  # positive; divisibility is per weight, at init_from
        check_clip(clip, prior)
        if ternary and bits != 2:
            raise ValueError(
                f"grid='ternary' needs bits=2 (codes -1, 0, 1), got bits={bits}: set bits=2 or another grid"
            )
        if ternary and not symmetric:
            raise ValueError("grid='ternary' is symmetric by definition: set symmetric=True or another grid")
        if full_range and not symmetric:
            raise ValueError("grid='full' widens a symmetric grid to all 2^bits codes; an asymmetric grid already uses "
                             "them: use grid='restricted'")
        self.bits, self.symmetric, self.granularity, self.full_range = bits, symmetric, granularity, full_range
        self.groups = int(groups) if granularity == "group" else 0
        self.group_size = int(groups) if granularity == "input_group" else 0
        self.clip, self.prior, self.ternary, self.learnable = clip, prior, ternary, learnable
        self.qmin, self.qmax = qrange(bits, symmetric, full_range)
        # Shapes ([G, 1]) are known only at init_from; None buffers stay out of the state_dict.
        self.register_buffer("scale", None)
        self.register_buffer("zero_point", None)

    def num_groups(self, shape: tuple[int, int]) -> int:
        rows, columns = shape
        if self.granularity == "input_group":
            check_group_size(self.group_size, columns)
            return rows * columns // self.group_size
        return {"tensor": 1, "row": rows, "group": self.groups}[self.granularity]

    @torch.no_grad()
    def init_from(self, weight: Tensor) -> "WeightQuantizer":
        """Compute the initial scale / zero point from `weight` [out, in]. Callable again (re-init)."""
        if weight.dim() != 2:
            raise ValueError(
                f"WeightQuantizer expects a 2-D [out, in] weight, got shape {tuple(weight.shape)}: reshape it to 2-D"
            )
        if not torch.isfinite(weight).all():
            raise ValueError("the weight contains NaN/inf: the model checkpoint is corrupt, reload it")
        wg = group_view(weight.detach().float(), self.num_groups(tuple(weight.shape)))
        if self.ternary:
            scale, zero_point = _twn(wg)[0], None
        else:
            lo, hi = clip_range(wg, self.bits, self.symmetric, self.clip, self.prior, self.full_range)
            scale, zero_point = scale_zero_point(lo, hi, self.bits, self.symmetric, self.full_range)
        # Ternary alpha is recomputed from the current weight on every forward: never learned.
        _store(self, "scale", scale, param=self.learnable and not self.ternary)
        _store(self, "zero_point", zero_point, param=False)
        return self

    def _group(self, weight: Tensor) -> Tensor:
        if self.scale is None:
            raise RuntimeError("WeightQuantizer was not initialised: call init_from(weight) before using it")
        return group_view(weight, self.scale.shape[0])

    def forward(self, weight: Tensor) -> Tensor:
        wg = self._group(weight)
        if self.ternary:
            with torch.no_grad():
                alpha, codes = _twn(wg.detach().float())
                self.scale.copy_(alpha)  # keep scale == alpha so codes()/export work uniformly
            # STE: the value is alpha*codes exactly (the added term is 0), the gradient identity.
            out = (alpha * codes).to(weight.dtype) + (wg - wg.detach())
        else:
            # LSQ gradient scale g = 1/sqrt(N*qmax), N = weights sharing one scale.
            g = 1.0 / math.sqrt(wg.shape[1] * self.qmax) if self.learnable else None
            out = fake_quant(wg, self.scale, self.zero_point, self.qmin, self.qmax, g).to(weight.dtype)
        return out.reshape(weight.shape)

    def rowwise(self) -> bool:
        """One scale per row, not ternary: row i's fake-quant depends on row i alone."""
        return self.scale is not None and not self.ternary and self.granularity == "row"

    def forward_rows(self, weight: Tensor, index: Tensor) -> Tensor:
        """forward(weight)[index] computed on the selected rows only (an embedding lookup touches a
        few hundred of 30K rows); same values and gradients. Needs rowwise()."""
        if not self.rowwise():
            raise RuntimeError("forward_rows needs per-row, non-ternary quantization: use forward(weight)[index]")
        rows = weight[index]
        zp = None if self.zero_point is None else self.zero_point[index]
        g = 1.0 / math.sqrt(weight.shape[1] * self.qmax) if self.learnable else None
        return fake_quant(rows, self.scale[index], zp, self.qmin, self.qmax, g).to(weight.dtype)

    @torch.no_grad()
    def codes(self, weight: Tensor) -> Tensor:
        """Integer codes (int32, in [qmin, qmax]) of `weight`, shape [out, in]."""
        wg = self._group(weight.detach()).float()
        if self.ternary:
            alpha, codes = _twn(wg)
            self.scale.copy_(alpha)
            return codes.to(torch.int32).reshape(weight.shape)
        return quantize_codes(wg, self.scale, self.zero_point, self.qmin, self.qmax).reshape(weight.shape)

    def dequant_params(self) -> tuple[Tensor, Tensor | None]:
        """(scale [G, 1], zero_point [G, 1] or None); expand_to_rows gives the per-row [out, 1]."""
        if self.scale is None:
            raise RuntimeError("WeightQuantizer was not initialised: call init_from(weight) before using it")
        zp = None if self.zero_point is None else self.zero_point.detach()
        return self.scale.detach(), zp

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        # A checkpoint fixes G: create placeholders of the stored shapes so that loading also works
        # on a quantizer that has not seen init_from yet.
        for name, param in (("scale", self.learnable and not self.ternary), ("zero_point", False)):
            stored = state_dict.get(prefix + name)
            if stored is not None and getattr(self, name) is None:
                _store(self, name, torch.empty_like(stored, dtype=torch.float32), param=param)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def extra_repr(self) -> str:
        groups = "" if self.scale is None else f", num_groups={self.scale.shape[0]}"
        return (
            f"bits={self.bits}, symmetric={self.symmetric}, full_range={self.full_range}, granularity={self.granularity}, "
            f"groups={self.groups}{groups}, group_size={self.group_size}, clip={self.clip}, ternary={self.ternary}, learnable={self.learnable}"
        )


def _twn(wg: Tensor) -> tuple[Tensor, Tensor]:
    """Ternary weight networks (as in TernaryBERT), per row of wg [G, K]:
    delta = 0.7 * mean|w|, alpha = mean(|w| where |w| > delta), codes = sign(w) * (|w| > delta)."""
    a = wg.abs()
    delta = 0.7 * a.mean(dim=1, keepdim=True)
    mask = a > delta
    # An all-zero group has no element above delta: guard the empty mean, and floor alpha like
    # every other scale (its codes are all 0, so the output is 0 either way).
    alpha = (a * mask).sum(dim=1, keepdim=True) / mask.sum(dim=1, keepdim=True).clamp_min(1)
    return alpha.clamp_min(SCALE_EPS), torch.sign(wg) * mask


class ActQuantizer(nn.Module):
    """Fake-quantizes activations.

    dynamic: symmetric token-wise scales computed at run time from each token (no calibration).
    static:  one per-tensor scale from calibration: `start_observing()`, forward batches (passed
             through unchanged, running min/max recorded, plus a bounded seeded subsample for
             clip aciq/mse), then `stop_observing()` computes and freezes scale / zero point.
    full_range (symmetric only): all 2^b codes, step max|x| / ((2^b-1)/2), compressed-tensors' grid
             (functional.symmetric_levels); otherwise the restricted grid, step max|x| / (2^(b-1)-1).
    """

    scale: Tensor
    zero_point: Tensor | None
    calibrated: Tensor

    def __init__(
        self,
        bits: int = 8,
        mode: str = "static",
        symmetric: bool = True,
        clip: str = "minmax",
        learnable: bool = True,
        prior: str = "laplace",
        name: str = "",
        full_range: bool = False,
    ) -> None:
        super().__init__()
        check_bits(bits)
        if mode not in ACT_MODES:
            raise ValueError(f"mode={mode!r} is not one of {', '.join(ACT_MODES)}: pick one of them")
        if mode == "dynamic" and not symmetric:
            raise ValueError("mode='dynamic' (token-wise) is symmetric only: set symmetric=True or mode='static'")
        if full_range and not symmetric:
            raise ValueError("full_range widens a symmetric grid to all 2^bits codes; an asymmetric grid already uses "
                             "them: set full_range=False")
        check_clip(clip, prior)
        self.bits, self.mode, self.symmetric, self.full_range = bits, mode, symmetric, bool(full_range)
        self.clip, self.prior, self.learnable, self.name = clip, prior, learnable, name
        self.qmin, self.qmax = qrange(bits, symmetric, self.full_range)
        if mode == "static":
            # Fixed shapes from the constructor, so load_state_dict works on a fresh quantizer.
            scale = torch.ones(1)
            if learnable:
                self.scale = nn.Parameter(scale)
            else:
                self.register_buffer("scale", scale)
            self.register_buffer("zero_point", None if symmetric else torch.zeros(1))
            self.register_buffer("calibrated", torch.tensor(False))
        # Python mirror of `calibrated`: reading the tensor would sync the GPU on every forward.
        self._is_calibrated = False
        self._reset_observer()

    @property
    def label(self) -> str:
        return f"ActQuantizer '{self.name}'" if self.name else "ActQuantizer"

    @property
    def observing(self) -> bool:
        return self._observing

    @property
    def observed_numel(self) -> int:
        """Number of activation values seen since start_observing()."""
        return self._seen

    def _reset_observer(self) -> None:
        self._observing = False
        self._min: Tensor | None = None
        self._max: Tensor | None = None
        self._sample: Tensor | None = None
        self._seen = 0
        self._gen: torch.Generator | None = None

    def start_observing(self) -> None:
        """Begin (re)calibration; a no-op for dynamic quantizers, which need none."""
        if self.mode == "dynamic":
            return
        self._reset_observer()
        self._observing = True
        self._gen = torch.Generator().manual_seed(_SAMPLE_SEED)

    def cancel_observing(self) -> None:
        """Stop observing without touching the current scale (used when calibration fails)."""
        self._reset_observer()

    @torch.no_grad()
    def stop_observing(self) -> None:
        """Compute scale / zero point from what was observed, and freeze them."""
        if self.mode == "dynamic":
            return
        if not self._observing:
            raise RuntimeError(
                f"{self.label}: stop_observing() called without start_observing(): call start_observing() first"
            )
        if self._min is None or self._max is None:
            raise RuntimeError(
                f"{self.label} saw no activations while observing: run calibration batches through "
                "the model between start_observing() and stop_observing()"
            )
        extremes = torch.stack([self._min, self._max])
        if self.clip == "minmax" or self._sample is None:
            values = extremes  # minmax on [min, max] equals minmax on all observed values, exactly
        else:
            # The true extremes join the subsample so aciq's cap and mse's grid use the real range.
            values = torch.cat([self._sample, extremes])
        lo, hi = clip_range(values.reshape(1, -1), self.bits, self.symmetric, self.clip, self.prior)
        if self.full_range:
            scale, zero_point = (torch.maximum(hi, -lo) / symmetric_levels(self.bits, True)).clamp_min(SCALE_EPS), None
        else:
            scale, zero_point = scale_zero_point(lo, hi, self.bits, self.symmetric)
        self.scale.copy_(scale.reshape(1))
        if self.zero_point is not None:
            self.zero_point.copy_(zero_point.reshape(1))
        self.calibrated.fill_(True)
        self._is_calibrated = True
        self._reset_observer()

    @torch.no_grad()
    def _observe(self, x: Tensor) -> None:
        x = x.detach()
        if not torch.isfinite(x).all():
            raise FloatingPointError(
                f"{self.label} observed NaN/inf during calibration: the calibration data or the model "
                "produces non-finite activations; check the inputs and the layers before this quantizer"
            )
        flat = x.float().flatten()
        n = flat.numel()
        if n == 0:
            return
        lo, hi = flat.min(), flat.max()
        self._min = lo if self._min is None else torch.minimum(self._min, lo)
        self._max = hi if self._max is None else torch.maximum(self._max, hi)
        if self.clip != "minmax":
            self._add_sample(flat)
        self._seen += n

    def _add_sample(self, flat: Tensor) -> None:
        # Keep at most SAMPLE_SIZE values, approximately uniform over everything seen: the new
        # batch gets a share proportional to its size, the rest is a random subset of the old sample.
        n, total = flat.numel(), self._seen + flat.numel()
        take = n if total <= SAMPLE_SIZE else round(SAMPLE_SIZE * n / total)
        new = flat if take == n else flat[torch.randint(n, (take,), generator=self._gen).to(flat.device)]
        old = self._sample
        if old is not None and old.numel() + take > SAMPLE_SIZE:
            keep = SAMPLE_SIZE - take
            old = old[torch.randperm(old.numel(), generator=self._gen)[:keep].to(old.device)]
        self._sample = new.clone() if old is None else torch.cat([old, new])

    def forward(self, x: Tensor) -> Tensor:
        if self.mode == "dynamic":
            # The per-token scale is a statistic of x, not a learned quantity: no gradient through it.
            scale = tokenwise_scale(x.detach().float(), self.bits, self.full_range)
            return fake_quant(x, scale, None, self.qmin, self.qmax).to(x.dtype)
        if self._observing:
            self._observe(x)
            return x
        if not self._is_calibrated:
            raise RuntimeError(
                f"{self.label} was not calibrated: run calibration batches first "
                "(inside `with calibrating(model):`, or between start_observing() and stop_observing())"
            )
        # LSQ gradient scale g = 1/sqrt(N*qmax), N = activation values per example.
        per_example = x.numel() // x.shape[0] if x.dim() > 1 else x.numel()
        g = 1.0 / math.sqrt(max(per_example, 1) * self.qmax) if self.learnable else None
        return fake_quant(x, self.scale, self.zero_point, self.qmin, self.qmax, g).to(x.dtype)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any, **kwargs: Any) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.mode == "static":
            self._is_calibrated = bool(self.calibrated)

    def extra_repr(self) -> str:
        name = f"name={self.name!r}, " if self.name else ""
        clip = "" if self.mode == "dynamic" else f", clip={self.clip}, calibrated={self._is_calibrated}"
        full = ", full_range=True" if self.full_range else ""
        return f"{name}bits={self.bits}, mode={self.mode}, symmetric={self.symmetric}{full}{clip}, learnable={self.learnable}"
