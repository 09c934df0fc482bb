"""Score a model on held-out data: the task metric for a classifier, fidelity to the
full-precision model for a bare encoder.

Run as `python -m mrem_dist.evaluate artifact=<dir> ...` it scores a saved artifact
(mrem_dist.artifact.evaluate)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from mrem_dist.data import Batch, compute_metrics, fidelity_metrics, mean_pool
from mrem_dist.models.adapters import ModelAdapter


@dataclass
class EvalSet:
    batches: list[Batch]
    labels: Optional[list]  # None for unlabeled text
    metric_names: tuple[str, ...]  # task metrics; empty for fidelity-only evaluation
    regression: bool = False


def run_batch(model: nn.Module, adapter: ModelAdapter, batch: Batch) -> torch.Tensor:
    return adapter.forward(model, batch.input_ids, batch.attention_mask, batch.token_type_ids)


@torch.no_grad()
def model_outputs(model: nn.Module, adapter: ModelAdapter, batches: list[Batch]) -> torch.Tensor:
    """Logits of a task model, or mean-pooled sentence embeddings of a bare encoder."""
    outs = []
    for batch in batches:
        out = run_batch(model, adapter, batch)
        if not adapter.is_task_model(model):
            out = mean_pool(out, batch.attention_mask)
        if not torch.isfinite(out).all():
            raise FloatingPointError(
                "the model produced NaN/inf outputs on the evaluation data: check the quantization settings "
                "(e.g. a too-low activation bit width) and the input data"
            )
        outs.append(out.float().cpu())
    return torch.cat(outs)


def task_metrics(outputs: torch.Tensor, evalset: EvalSet) -> dict[str, float]:
    if evalset.regression:
        preds = outputs.squeeze(-1).tolist()
    else:
        preds = outputs.argmax(-1).tolist()
    return compute_metrics(evalset.metric_names, preds, evalset.labels)


def compare(fp_outputs: torch.Tensor, q_outputs: torch.Tensor, evalset: EvalSet) -> tuple[dict, dict]:
    """Metrics of the full-precision and the quantized model on the same data.

    With labels, both get the task metrics; the quantized model also gets its fidelity to the
    full-precision outputs (how closely it reproduces them, label-free)."""
    fidelity = fidelity_metrics(fp_outputs, q_outputs)
    if evalset.labels is None or not evalset.metric_names:
        identity = fidelity_metrics(fp_outputs, fp_outputs)
        return identity, fidelity
    fp = task_metrics(fp_outputs, evalset)
    q = task_metrics(q_outputs, evalset)
    q.update({f"fidelity_{k}": v for k, v in fidelity.items()})
    return fp, q


@torch.no_grad()
def layer_errors(fp_model: nn.Module, q_model: nn.Module, adapter: ModelAdapter, batches: list[Batch]) -> list[float]:
    """Relative error ||h_q - h_fp||^2 / ||h_fp||^2 of every layer's output (real tokens only),
    with each model run end to end: the quantized layer k sees the quantized layers before it,
    so this is the error that accumulates through the network."""
    config = adapter.encoder(fp_model).config
    num, den = None, None
    for batch in batches:
        m = batch.attention_mask.unsqueeze(-1).float()
        h_fp = adapter.embed(fp_model, batch.input_ids, batch.token_type_ids)
        h_q = adapter.embed(q_model, batch.input_ids, batch.token_type_ids)
        mask = adapter.layer_mask(config, h_fp, batch.attention_mask)
        diffs, norms = [], []
        for l_fp, l_q in zip(adapter.layers(fp_model), adapter.layers(q_model)):
            h_fp, h_q = adapter.run_layer(l_fp, h_fp, mask), adapter.run_layer(l_q, h_q, mask)
            diffs.append((((h_q - h_fp) ** 2) * m).sum().item())
            norms.append(((h_fp**2) * m).sum().item())
        num = diffs if num is None else [a + b for a, b in zip(num, diffs)]
        den = norms if den is None else [a + b for a, b in zip(den, norms)]
    return [a / max(b, 1e-30) for a, b in zip(num or [], den or [])]


if __name__ == "__main__":
    # The command line lives in its own module, so that this one is not imported twice
    # (once as __main__, once as mrem_dist.evaluate by the pipeline it calls).
    from mrem_dist.artifact.evaluate import main

    main()
