"""Scoring models on held-out batches: both models batch by batch into the task's streaming metric
state, and the per-layer error that accumulates through the quantized network.

The command that scores a saved artifact is `python -m mrem_dist.evaluate` (mrem_dist/evaluate.py)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from mrem_dist.data import Batch
from mrem_dist.models.families import ModelFamily
from mrem_dist.models.tasks import EvalSet, FidelityState, Task


def run_batch(model: nn.Module, family: ModelFamily, batch: Batch) -> torch.Tensor:
    return family.forward(model, batch)


@torch.no_grad()
def score(fp_model: Optional[nn.Module], q_model: nn.Module, family: ModelFamily, task: Task,
          evalset: EvalSet) -> FidelityState:
    """The task's metric state after both models (or the quantized one alone: fp_model=None) ran
    on every evaluation batch; `.compute()` gives (full-precision metrics, quantized metrics)."""
    state = task.metric(evalset)
    for batch in evalset.batches:
        fp = None if fp_model is None else task.output(family, fp_model, batch)
        state.update(fp, task.output(family, q_model, batch), batch)
    return state


@torch.no_grad()
def layer_errors(fp_model: nn.Module, q_model: nn.Module, family: ModelFamily, batches: list[Batch]) -> list[float]:
    """Relative error ||h_q - h_fp||^2 / ||h_fp||^2 of every layer's output (real tokens only),
    with each model run end to end: the quantized layer k sees the quantized layers before it,
    so this is the error that accumulates through the network."""
    config = family.config(fp_model)
    num, den = None, None
    for batch in batches:
        m = batch.attention_mask.unsqueeze(-1).float()
        h_fp = family.embed(family.embeddings(fp_model), batch)
        h_q = family.embed(family.embeddings(q_model), batch)
        context = family.layer_context(config, h_fp, batch)
        diffs, norms = [], []
        for l_fp, l_q in zip(family.layers(fp_model), family.layers(q_model)):
            h_fp, h_q = family.run_layer(l_fp, h_fp, context), family.run_layer(l_q, h_q, context)
            diffs.append((((h_q - h_fp) ** 2) * m).sum().item())
            norms.append(((h_fp**2) * m).sum().item())
        num = diffs if num is None else [a + b for a, b in zip(num, diffs)]
        den = norms if den is None else [a + b for a, b in zip(den, norms)]
    return [a / max(b, 1e-30) for a, b in zip(num or [], den or [])]
