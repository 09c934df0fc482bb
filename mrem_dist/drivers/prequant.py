"""PreQuant end to end in one process: load as a classifier -> quantize (frozen grids) -> calibrate
-> pick the outlier columns -> fine-tune them and the head -> score (against method.reference) ->
finish. The algorithm is mrem_dist/prequant.py."""

from __future__ import annotations

import torch

from mrem_dist.context import RunContext
from mrem_dist.engine.finetune import FinetuneSettings, train_task
from mrem_dist.inputs import prepare_train, task_train_split
from mrem_dist.log import get_logger
from mrem_dist.models import load_model
from mrem_dist.prequant import parameter_counts, select_outliers, trainable_parameters
from mrem_dist.quantize import calibrate_activations, needs_calibration, quantize_model
from mrem_dist.scoring import run_batch, score

log = get_logger(__name__)


def run_prequant(ctx: RunContext) -> tuple[dict, torch.nn.Module]:
    """method=prequant; returns (report, quantized model) like the other drivers."""
    cfg, timer, device = ctx.cfg, ctx.timer, ctx.device
    m = cfg.method
    # The new head's initialisation is the first draw after the seed (RunContext.begin).
    with timer("load"):
        train_split, num_labels = task_train_split(cfg.data)
        loaded = ctx.load("classifier", num_labels)
        train = prepare_train(train_split, cfg.data, loaded)
    prepared = ctx.data
    log.info("PreQuant on %s (%d labels): %d training / %d calibration / %d evaluation examples", cfg.model.path,
             num_labels, len(train), prepared.description["calibration_samples"], prepared.description["evaluation_samples"])
    prepared.description["train_samples"] = len(train)
    family, model, calib = loaded.family, loaded.model, prepared.calib
    # PreQuant's starting point has no trained head: its counterpart is the FP fine-tuned reference.
    ctx.source = m.reference
    with timer("quantize"):
        quantize_model(model, family, cfg.quant, learnable=False)  # frozen grids: no LSQ step sizes
    with timer("calibrate"):
        if needs_calibration(model):
            calibrate_activations(model, lambda mod, b: run_batch(mod, family, b), calib)
    with timer("select"):
        chosen = select_outliers(model, family, m.outlier_rule, m.outlier_fraction, calib)
    counts = parameter_counts(model, family)
    log.info("trainable: %d outlier weights (%.3f%% of %d) in %d layers + %d head parameters = %.3f%%", counts["outlier"],
             100 * counts["outlier_fraction"], counts["total"], len(chosen), counts["head"], 100 * counts["trainable_fraction"])
    settings = FinetuneSettings(steps=m.steps, lr=m.lr_weight, warmup=m.warmup, weight_decay=m.weight_decay,
                                batch_size=cfg.data.batch_size, seed=cfg.seed, log_every=m.log_every)
    with timer("finetune"):
        history = train_task(model, family, trainable_parameters(model, family), train, settings, device, "prequant")
    with timer("evaluate"):
        reference = None
        if m.reference:
            ref = load_model(m.reference, "classifier", ctx.dtype)
            if ref.task.num_labels != num_labels:
                raise ValueError(f"method.reference={m.reference} has {ref.task.num_labels} labels, the task "
                                 f"{num_labels}: give a model fine-tuned on this task")
            reference = ref.model.to(device)
        fp_metrics, q_metrics = score(reference, model, family, loaded.task, prepared.evalset).compute()
    extra = {"prequant": {
        "rule": m.outlier_rule, "fraction": m.outlier_fraction, "reference": m.reference,
        "outlier_columns": {name: len(cols) for name, cols in chosen.items()},
        "parameters": counts,
        "finetune": {"steps": history["steps"], "seconds": history["seconds"], "lr": m.lr_weight,
                     "loss_first": history["losses"][0], "loss_last": history["losses"][-1],
                     # Mean loss of each tenth of the run: the curve without thousands of numbers.
                     "loss_curve": _tenths(history["losses"])},
    }}
    return ctx.finish(model, (fp_metrics or {}, q_metrics), extra), model


def _tenths(values: list[float]) -> list[float]:
    n = len(values)
    cuts = [round(i * n / 10) for i in range(11)]
    return [sum(values[a:b]) / (b - a) for a, b in zip(cuts, cuts[1:]) if b > a]
