"""End-to-end checks of a finished quantized model, before anything is declared valid.

- every parameter and buffer is finite;
- every quantized weight maps to integer codes in its quantizer's range, and those codes,
  dequantized, are exactly the weights the model was evaluated with (what an export would
  store is what was measured);
- every module's reconstruction error is finite;
- optionally, the headline metric (the first task metric, cosine fidelity for a bare encoder,
  perplexity for a causal LM) has not dropped (perplexity: risen) by more than `max_drop`
  relative to full precision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn

from mrem_dist.quant import QuantEmbedding, QuantLinear
from mrem_dist.quant.functional import dequantize
from mrem_dist.quant.quantizers import group_view


class ValidationFailed(RuntimeError):
    """The final model failed validation; the report (with the failures) has been written."""


# Headline metrics where lower is better: their "drop" is the relative rise.
LOWER_IS_BETTER = ("perplexity",)


def headline_metric(metrics: dict[str, float]) -> str:
    for name in metrics:
        if not name.startswith("fidelity_"):
            return name
    raise ValueError(f"no headline metric among {sorted(metrics)}")


@dataclass
class Structure:
    """What check_model found in a model, or in the modules a rank holds (the parallel coordinator
    adds up its stages'): the failures and how many quantized weights were checked."""

    failures: list[str] = field(default_factory=list)
    checked: int = 0

    @classmethod
    def of(cls, model: nn.Module) -> "Structure":
        return cls(check_model(model), sum(1 for _ in _quantized(model)))

    def __add__(self, other: "Structure") -> "Structure":
        return Structure(self.failures + other.failures, self.checked + other.checked)


def _quantized(model: nn.Module):
    """The quantized Linear / Embedding modules of `model` that hold their weight (on a rank of
    MREM-P, the others' weights are not there)."""
    for name, module in model.named_modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)) and module.weight_quantizer is not None and \
                module.weight.numel() and not module.weight.is_meta:
            yield name, module


@torch.no_grad()
def check_model(model: nn.Module) -> list[str]:
    """Structural checks; returns the failures (empty when the model is sound). Tensors that are not
    held (empty or on the meta device: another rank's modules) are skipped."""
    failures = []
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if t.is_meta or not t.numel():
            continue
        if t.is_floating_point() and not torch.isfinite(t).all():
            failures.append(f"{name} has NaN/inf values")
    for name, module in _quantized(model):
        wq = module.weight_quantizer
        codes = wq.codes(module.weight)
        lo, hi = int(codes.min()), int(codes.max())
        if lo < wq.qmin or hi > wq.qmax:
            failures.append(f"{name}: integer codes span [{lo}, {hi}], outside [{wq.qmin}, {wq.qmax}]")
            continue
        scale, zp = wq.dequant_params()
        if not (scale > 0).all():
            failures.append(f"{name}: a quantization step size is not positive")
            continue
        rebuilt = dequantize(group_view(codes, scale.shape[0]), scale, zp).reshape(module.weight.shape)
        if not torch.allclose(rebuilt, wq(module.weight).float(), rtol=1e-5, atol=1e-7):
            failures.append(f"{name}: dequantized integer codes differ from the weights the model runs with")
    return failures


def validate_result(
    structure: Structure,
    fp_metrics: dict[str, float],
    q_metrics: dict[str, float],
    module_errors: list[float],
    max_drop: Optional[float],
) -> dict:
    """The report's `validation` section: {passed, checks, failures}. `structure`: Structure.of the
    final model (or its stages' added up)."""
    failures = list(structure.failures)
    for which, metrics in (("full-precision", fp_metrics), ("quantized", q_metrics)):
        for key, value in metrics.items():
            if value is None or not math.isfinite(value):
                failures.append(f"the {which} model's {key} is {value}: the evaluation data or the model is degenerate "
                                "(e.g. empty texts, constant outputs)")
    bad = [i for i, e in enumerate(module_errors) if not torch.isfinite(torch.tensor(e))]
    if bad:
        failures.append(f"modules {bad} ended with a non-finite reconstruction error")
    name = headline_metric(q_metrics)
    # No full-precision figure (method=prequant without a reference): no drop to check.
    fp, q = fp_metrics.get(name), q_metrics[name]
    drop = None if fp is None else 0.0 if not fp else (q - fp) / abs(fp) if name in LOWER_IS_BETTER else (fp - q) / abs(fp)
    if max_drop is not None and drop is not None and drop > max_drop:
        failures.append(
            f"{name} {'rose' if name in LOWER_IS_BETTER else 'dropped'} by {100 * drop:.2f}% ({fp:.4f} -> {q:.4f}), more "
            f"than max_drop={max_drop} "
            f"({100 * max_drop:.2f}%): train longer (method.steps), use more bits, or raise max_drop"
        )
    return {
        "passed": not failures,
        "headline_metric": name,
        "relative_drop": drop,
        "max_drop": max_drop,
        "checked_quantized_tensors": structure.checked,
        "failures": failures,
    }
