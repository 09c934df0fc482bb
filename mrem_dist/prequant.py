"""PreQuant (Gong et al., Findings of ACL 2023): quantize the pre-trained model once, task-agnostic,
then fine-tune per task only its outlier weights, kept in full precision, and the task head.

`method=prequant` runs it end to end on one process:

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
import time

import torch
from torch import Tensor, nn

from mrem_dist.config import OUTLIER_RULES, RunConfig
from mrem_dist.distributed import resolve_device
from mrem_dist.engine.finetune import FinetuneSettings, head_parameters, train_task
from mrem_dist.evaluate import compare, model_outputs, run_batch, task_metrics
from mrem_dist.log import get_logger
from mrem_dist.models import load_model
from mrem_dist.quant import QuantLinear
from mrem_dist.quantize import calibrate_activations, needs_calibration, quantize_model

log = get_logger(__name__)


@torch.no_grad()
def input_second_moments(model: nn.Module, adapter, batches: list) -> dict[str, Tensor]:
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
            run_batch(model, adapter, batch)
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


def select_outliers(model: nn.Module, adapter, rule: str, fraction: float, batches: list) -> dict[str, list[int]]:
    """Mark the outlier columns of every quantized Linear (`QuantLinear.set_outliers`); returns
    {layer name: column indices}."""
    moments = input_second_moments(model, adapter, batches) if rule == "quant_error" and fraction > 0 else {}
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


def parameter_counts(model: nn.Module, adapter) -> dict:
    total = sum(p.numel() for p in model.parameters())
    outlier = sum(m.outlier_weight.numel() for m in model.modules() if isinstance(m, QuantLinear) and m.outlier_weight is not None)
    # The latent weights of the outlier columns are replaced, not used: count the model without them.
    total -= outlier
    head = sum(p.numel() for _, p in head_parameters(model, adapter))
    return {"total": total, "outlier": outlier, "head": head, "trainable": outlier + head,
            "outlier_fraction": outlier / total, "trainable_fraction": (outlier + head) / total}


def trainable_parameters(model: nn.Module, adapter) -> list[nn.Parameter]:
    outliers = [m.outlier_weight for m in model.modules() if isinstance(m, QuantLinear) and m.outlier_weight is not None]
    return outliers + [p for _, p in head_parameters(model, adapter)]


def run_prequant(cfg: RunConfig):
    """method=prequant; returns (report, quantized model) like pipeline.execute."""
    from mrem_dist.pipeline import Timer, build_report, finish, prepare_data, prepare_train, task_train_split

    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)  # the new head's initialisation
    device = resolve_device(cfg.device)
    m = cfg.method
    timer = Timer()
    t0 = time.perf_counter()
    with timer("load"):
        train_split, num_labels = task_train_split(cfg.data)
        loaded = load_model(cfg.model.path, "classifier", cfg.model.dtype, num_labels=num_labels)
        prepared = prepare_data(cfg.data, loaded)
        train = prepare_train(train_split, cfg.data, loaded)
    log.info("PreQuant on %s (%d labels): %d training / %d calibration / %d evaluation examples", cfg.model.path,
             num_labels, len(train), prepared.description["calibration_samples"], prepared.description["evaluation_samples"])
    prepared.description["train_samples"] = len(train)
    adapter = loaded.adapter
    model = loaded.model.to(device)
    calib = [b.to(device) for b in prepared.calib]
    eval_batches = [b.to(device) for b in prepared.evalset.batches]
    with timer("quantize"):
        quantize_model(model, adapter, cfg.quant, learnable=False)  # frozen grids: no LSQ step sizes
    with timer("calibrate"):
        if needs_calibration(model):
            calibrate_activations(model, lambda mod, b: run_batch(mod, adapter, b), calib)
    with timer("select"):
        chosen = select_outliers(model, adapter, m.outlier_rule, m.outlier_fraction, calib)
    counts = parameter_counts(model, adapter)
    log.info("trainable: %d outlier weights (%.3f%% of %d) in %d layers + %d head parameters = %.3f%%", counts["outlier"],
             100 * counts["outlier_fraction"], counts["total"], len(chosen), counts["head"], 100 * counts["trainable_fraction"])
    settings = FinetuneSettings(steps=m.steps, lr=m.lr_weight, warmup=m.warmup, weight_decay=m.weight_decay,
                                batch_size=cfg.data.batch_size, seed=cfg.seed, log_every=m.log_every)
    with timer("finetune"):
        history = train_task(model, adapter, trainable_parameters(model, adapter), train, settings, device, "prequant")
    with timer("evaluate"):
        q_out = model_outputs(model, adapter, eval_batches)
        if m.reference:
            ref = load_model(m.reference, "classifier", cfg.model.dtype)
            if ref.num_labels != num_labels:
                raise ValueError(f"method.reference={m.reference} has {ref.num_labels} labels, the task {num_labels}: "
                                 "give a model fine-tuned on this task")
            fp_metrics, q_metrics = compare(model_outputs(ref.model.to(device), ref.adapter, eval_batches), q_out, prepared.evalset)
        else:
            fp_metrics, q_metrics = {}, task_metrics(q_out, prepared.evalset)
    timer.seconds["total"] = round(time.perf_counter() - t0, 3)
    extra = {"prequant": {
        "rule": m.outlier_rule, "fraction": m.outlier_fraction, "reference": m.reference,
        "outlier_columns": {name: len(cols) for name, cols in chosen.items()},
        "parameters": counts,
        "finetune": {"steps": history["steps"], "seconds": history["seconds"], "lr": m.lr_weight,
                     "loss_first": history["losses"][0], "loss_last": history["losses"][-1],
                     # Mean loss of each tenth of the run: the curve without thousands of numbers.
                     "loss_curve": _tenths(history["losses"])},
    }}
    report = build_report(cfg, loaded, prepared, fp_metrics, q_metrics, extra, timer, device)
    return finish(cfg, report, model, loaded), model


def _tenths(values: list[float]) -> list[float]:
    n = len(values)
    cuts = [round(i * n / 10) for i in range(11)]
    return [sum(values[a:b]) / (b - a) for a, b in zip(cuts, cuts[1:]) if b > a]
