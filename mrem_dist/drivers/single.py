"""PTQ, GPTQ and the one-process reconstruction methods (REM, LKD, MREM-S):

    load -> quantize (and partition) -> [GPTQ] -> calibrate -> [score, reconstruct module by module] -> score -> finish
"""

from __future__ import annotations


import torch

from mrem_dist.config import RECONSTRUCTION_METHODS
from mrem_dist.context import RunContext, fmt_metrics
from mrem_dist.engine.checkpoint import Checkpointer, StopSignal
from mrem_dist.engine.gptq import gptq_model, gptq_options
from mrem_dist.engine.sequential import EngineOptions, reconstruct_sequential
from mrem_dist.layout import ParallelLayout
from mrem_dist.log import get_logger
from mrem_dist.quantize import calibrate_activations, copy_to_quantize, needs_calibration, quantize_model
from mrem_dist.scoring import layer_errors, run_batch, score

log = get_logger(__name__)


def run_single(ctx: RunContext) -> tuple[dict, torch.nn.Module]:
    """Run the configured method in this process; returns (report, quantized model)."""
    cfg, timer = ctx.cfg, ctx.timer
    reconstruct = cfg.method.name in RECONSTRUCTION_METHODS
    with timer("load"):
        loaded = ctx.load()
    model, family, calib = loaded.model, loaded.family, ctx.data.calib
    # Building the quantized copy validates the scheme against the real shapes (group counts,
    # OCS) before any long forward pass; so does the partition.
    with timer("quantize"):
        qmodel = quantize_model(copy_to_quantize(model, family, ctx.scheme), family, ctx.scheme, learnable=reconstruct)
        specs = ctx.partition(model) if reconstruct else []
    extra: dict = {}
    if cfg.method.name == "gptq" or cfg.method.init == "gptq":
        with timer("gptq"):
            errors = gptq_model(qmodel, family, calib, gptq_options(cfg.method))
        extra["gptq"] = {"linears": len(errors), "calibration_sequences": sum(b.input_ids.shape[0] for b in calib)}
    with timer("calibrate"):
        if needs_calibration(qmodel):
            calibrate_activations(qmodel, lambda m, b: run_batch(m, family, b), calib)
            log.info("calibrated static activation ranges on %d batches", len(calib))
    checkpoint = None
    if reconstruct:
        checkpoint = ctx.checkpointer(ParallelLayout.single(len(specs)), model)
        with StopSignal() as stop:
            extra.update(_reconstruct(ctx, qmodel, specs, checkpoint, stop))
    with timer("evaluate"):
        metrics = score(model, qmodel, family, loaded.task, ctx.data.evalset).compute()
    report = ctx.finish(qmodel, metrics, extra)
    if checkpoint is not None:  # the artifact and report are written: nothing left to resume
        checkpoint.remove()
    return report, qmodel


def _reconstruct(ctx: RunContext, qmodel: torch.nn.Module, specs: list, checkpoint: Checkpointer | None,
                 stop: StopSignal) -> dict:
    """Train qmodel's modules in place; returns the report's reconstruction sections (the metrics
    and per-layer error before, each module's record, per-layer error after)."""
    cfg, timer, loaded, evalset = ctx.cfg, ctx.timer, ctx.loaded, ctx.data.evalset
    model, family = loaded.model, loaded.family
    probe = evalset.batches[:4]
    with timer("evaluate"):
        _, init_metrics = score(model, qmodel, family, loaded.task, evalset).compute()
        before = layer_errors(model, qmodel, family, probe)
    log.info("before reconstruction: %s", fmt_metrics(init_metrics))
    options = EngineOptions(cache=cfg.method.cache, cache_memory_gb=cfg.method.cache_memory_gb, seed=cfg.seed,
                            device=ctx.device, checkpoint=checkpoint, stop=stop)
    with timer("reconstruct"):
        engine = reconstruct_sequential(model, qmodel, family, specs, ctx.data.calib, ctx.data.holdout,
                                        ctx.recon_settings(), options)
    with timer("evaluate"):
        after = layer_errors(model, qmodel, family, probe)
    return {
        "metrics_before_reconstruction": init_metrics,
        "reconstruction": {"partition": [s.describe() for s in specs], "cache": engine.cache,
                           "modules": [m.as_dict() for m in engine.modules]},
        "layer_error": {"before": before, "after": after},
    }
