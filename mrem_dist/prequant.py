"""PreQuant (Gong et al., Findings of ACL 2023): quantize the pre-trained model once, task-agnostic,
then fine-tune per task only its outlier weights, kept in full precision, and the task head.

This module is the algorithm (which columns, how many, what trains); `method=prequant` runs it
end to end on one process (mrem_dist/drivers/prequant.py):

1. load the pre-trained model as a classifier (a new head when it has none);
2. quantize it with the quant preset (min-max, MSE clipping, row-wise... from the quantizer
   library) and calibrate the static activation ranges on training text;
3. pick in every quantized Linear the input columns the outlier rule ranks highest
   (`method.outlier_fraction` of them, at least one) and give them back their full-precision
   values as trainable `outlier_weight`s; every other weight stays frozen on its quantized grid;
4. fine-tune the outlier columns and the head on the labeled task (engine/finetune.py's loop);
5. evaluate the task metric (against `method.reference`, a full-precision fine-tuned model, when
   given), validate and export; the artifact keeps the outlier columns (artifact/export.py).

The paper's exact outlier criterion could not be read; the rule is a setting (config.py):
`quant_error` ranks column j by E[x_j^2] * ||W[:, j] - Q(W)[:, j]||^2, the output error that
quantizing that column causes on the calibration activations; `weight_norm` by ||W[:, j]||.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from mrem_dist.models.families import ModelFamily
from mrem_dist.quant import QuantLinear
from mrem_dist.scoring import run_batch

# quant_error: E[x_j^2] * ||W[:, j] - Q(W)[:, j]||^2 (the output error column j causes); weight_norm: ||W[:, j]||.
OUTLIER_RULES = ("quant_error", "weight_norm")


@torch.no_grad()
def input_second_moments(model: nn.Module, family: ModelFamily, batches: list) -> dict[str, Tensor]:
    """E[x_j^2] of the input of every QuantLinear over the batches' real (non-padding) tokens."""
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}
    mask: list[Tensor] = []
    hooks = []

    def hook(name):
        def fn(_module, args):
            x = args[0].float()
            keep = mask[0].reshape(-1).bool()
            flat = x.reshape(-1, x.shape[-1])[keep]
            sums[name] = sums.get(name, 0) + flat.pow(2).sum(0)
            counts[name] = counts.get(name, 0) + flat.shape[0]
        return fn

    for name, module in model.named_modules():
        if isinstance(module, QuantLinear):
            hooks.append(module.register_forward_pre_hook(hook(name)))
    try:
        for batch in batches:
            mask[:] = [batch.attention_mask]
            run_batch(model, family, batch)
    finally:
        for h in hooks:
            h.remove()
    return {name: sums[name] / max(counts[name], 1) for name in sums}


@torch.no_grad()
def outlier_scores(module: QuantLinear, rule: str, moment: Tensor | None = None) -> Tensor:
    """One score per input column of the layer's weight; the highest are the outliers."""
    w = module.weight.float()
    if rule == "weight_norm":
        return w.norm(dim=0)
    if rule == "quant_error":
        if moment is None:
            raise ValueError("the quant_error rule needs the input's second moments (calibration activations)")
        err = (w - module.weight_quantizer(module.weight).float()).pow(2).sum(0)
        return err * moment.to(err.device)
    raise ValueError(f"method.outlier_rule={rule!r} is not one of {', '.join(OUTLIER_RULES)}")


def outlier_count(in_features: int, fraction: float) -> int:
    """Columns kept in full precision: the fraction rounded up, so every layer keeps at least one
    (fraction 0: none, only the head trains)."""
    return 0 if fraction <= 0 else min(in_features, math.ceil(fraction * in_features))


def select_outliers(model: nn.Module, family, rule: str, fraction: float, batches: list) -> dict[str, list[int]]:
    """Mark the outlier columns of every quantized Linear (`QuantLinear.set_outliers`); returns
    {layer name: column indices}."""
    moments = input_second_moments(model, family, batches) if rule == "quant_error" and fraction > 0 else {}
    chosen: dict[str, list[int]] = {}
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear) or module.weight_quantizer is None:
            continue
        k = outlier_count(module.in_features, fraction)
        if k == 0:
            continue
        scores = outlier_scores(module, rule, moments.get(name))
        index = torch.topk(scores, k).indices.sort().values
        module.set_outliers(index)
        chosen[name] = index.tolist()
    return chosen


def parameter_counts(model: nn.Module, family) -> dict:
    total = sum(p.numel() for p in model.parameters())
    outlier = sum(m.outlier_weight.numel() for m in model.modules() if isinstance(m, QuantLinear) and m.outlier_weight is not None)
    # The latent weights of the outlier columns are replaced, not used: count the model without them.
    total -= outlier
    head = sum(p.numel() for _, p in family.head_parameters(model))
    return {"total": total, "outlier": outlier, "head": head, "trainable": outlier + head,
            "outlier_fraction": outlier / total, "trainable_fraction": (outlier + head) / total}


def trainable_parameters(model: nn.Module, family) -> list[nn.Parameter]:
    outliers = [m.outlier_weight for m in model.modules() if isinstance(m, QuantLinear) and m.outlier_weight is not None]
    return outliers + [p for _, p in family.head_parameters(model)]
