"""A run, end to end: load -> data -> quantize -> calibrate -> evaluate -> report.

`run(cfg)` is what `python -m mrem_dist` calls after Hydra has composed and validated the config.
Everything that can fail on bad input (model, data columns, bit widths, group counts) is checked
before the long work starts, and nothing is written to the run directory until the end.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from mrem_dist import data as D
from mrem_dist.artifact import export_quantized
from mrem_dist.config import BUILTIN_DATA, MOVIE_REVIEWS, PARALLEL_METHODS, RECONSTRUCTION_METHODS, MethodConfig, RunConfig
from mrem_dist.distributed import env_world_size, resolve_device
from mrem_dist.engine import ReconSettings, partition, reconstruct_sequential
from mrem_dist.engine.checkpoint import Checkpointer, StopSignal, fingerprint
from mrem_dist.engine.finetune import TrainSet
from mrem_dist.engine.parallel import peak_memory_gb
from mrem_dist.evaluate import EvalSet, compare, layer_errors, model_outputs, run_batch
from mrem_dist.log import get_logger
from mrem_dist.models import LoadedModel, load_model
from mrem_dist.quantize import calibrate_activations, needs_calibration, quantize_model
from mrem_dist.report import write_report
from mrem_dist.validation import ValidationFailed, validate_result

log = get_logger(__name__)


@dataclass
class PreparedData:
    calib: list[D.Batch]
    evalset: EvalSet
    description: dict


def _load_splits(cfg_data, calibration: bool = True) -> tuple[Optional[D.TextDataset], D.TextDataset, Optional[D.TaskSpec]]:
    """(calibration split or None when not wanted, evaluation split, task spec or None)."""
    if cfg_data.name == BUILTIN_DATA:
        return (D.load_builtin("calibration") if calibration else None), D.load_builtin("evaluation"), None
    if cfg_data.name == MOVIE_REVIEWS:
        return (D.load_movie_reviews("train") if calibration else None), D.load_movie_reviews("validation"), None
    if cfg_data.name == "local":
        fields, label = list(cfg_data.text_fields), cfg_data.label_field or None
        train_path = cfg_data.train_file or cfg_data.validation_file
        eval_path = cfg_data.validation_file or cfg_data.train_file
        train = D.load_local(train_path, fields, label) if calibration else None
        return train, D.load_local(eval_path, fields, label), None
    spec = D.get_task(cfg_data.name)
    return (D.load_glue(cfg_data.name, "train") if calibration else None), D.load_glue(cfg_data.name, "eval"), spec


def prepare_data(cfg_data, loaded: LoadedModel, calibration: bool = True) -> PreparedData:
    """Tokenized calibration batches (none with calibration=False: evaluating a saved artifact)
    and the evaluation set, checked against the model (labels for a classifier)."""
    train, evaluation, spec = _load_splits(cfg_data, calibration)
    calib: list[D.Batch] = []
    n_calib = 0
    if train is not None:
        if len(train) == 0:
            raise ValueError(f"the calibration source of data={cfg_data.name} is empty: give it at least one row")
        n_calib = min(cfg_data.calib_samples, len(train))
        if n_calib < cfg_data.calib_samples:
            log.warning("data has %d calibration rows, fewer than data.calib_samples=%d: using all", n_calib, cfg_data.calib_samples)
        calib_idx = D.sample_indices(len(train), n_calib, cfg_data.seed)
        calib = D.make_batches(D.tokenize(train, loaded.tokenizer, cfg_data.max_length, calib_idx), cfg_data.batch_size)

    eval_idx = D.sample_indices(len(evaluation), min(cfg_data.eval_samples, len(evaluation)), cfg_data.seed + 1)
    labels = [evaluation.labels[i] for i in eval_idx] if evaluation.labels is not None else None
    metric_names: tuple[str, ...] = ()
    regression = False
    if loaded.kind == "classifier":
        if labels is None:
            raise ValueError(
                f"model {loaded.path} is a classifier but data={cfg_data.name} has no labels: give labeled evaluation "
                "data (data.label_field=<column>) or use model.kind=encoder to measure fidelity instead"
            )
        n_labels = spec.num_labels if spec else len(set(labels))
        if spec is not None and spec.num_labels != loaded.num_labels:
            raise ValueError(
                f"model {loaded.path} has {loaded.num_labels} output labels but task {spec.name} has {spec.num_labels}: "
                "use a checkpoint fine-tuned on this task"
            )
        if spec is None and n_labels > loaded.num_labels:
            raise ValueError(
                f"the evaluation labels take {n_labels} values but model {loaded.path} predicts {loaded.num_labels}: "
                "use a checkpoint fine-tuned on these labels"
            )
        regression = loaded.num_labels == 1
        metric_names = spec.metrics if spec else (("pearson", "spearman") if regression else ("accuracy",))
    encoded = D.tokenize(evaluation, loaded.tokenizer, cfg_data.max_length, eval_idx)
    eval_batches = D.make_batches(encoded, cfg_data.batch_size)
    description = {
        "name": cfg_data.name,
        "calibration_samples": n_calib,
        "evaluation_samples": len(eval_idx),
        "max_length": cfg_data.max_length,
        "labeled": labels is not None,
    }
    return PreparedData(calib, EvalSet(eval_batches, labels, metric_names, regression), description)


def task_train_split(cfg_data) -> tuple[D.TextDataset, int]:
    """The labeled training split, and the outputs a classifier for it needs: the GLUE table's,
    else the label names' count, 1 for float labels (regression), or the largest class id + 1."""
    train, _, spec = _load_splits(cfg_data)
    if train.labels is None:
        raise ValueError(f"data={cfg_data.name} has no labels to fine-tune on: set data.label_field=<the label column>")
    if spec is not None:
        return train, spec.num_labels
    if train.label_names:
        return train, len(train.label_names)
    if any(isinstance(v, float) for v in train.labels):
        return train, 1
    return train, int(max(train.labels)) + 1


def prepare_train(train: D.TextDataset, cfg_data, loaded: LoadedModel) -> TrainSet:
    """data.train_samples (0 = all) labeled examples of `train`, tokenized for `loaded`."""
    n = len(train) if cfg_data.train_samples == 0 else min(cfg_data.train_samples, len(train))
    if n < cfg_data.train_samples:
        log.warning("data has %d training rows, fewer than data.train_samples=%d: using all", n, cfg_data.train_samples)
    idx = D.sample_indices(len(train), n, cfg_data.seed + 2)
    labels = [train.labels[i] for i in idx]
    regression = loaded.num_labels == 1
    if not regression and (min(labels) < 0 or max(labels) >= loaded.num_labels):
        raise ValueError(f"training labels span {min(labels)}..{max(labels)} but the model has {loaded.num_labels} outputs: "
                         "use class ids 0..num_labels-1")
    target = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
    return TrainSet(D.tokenize(train, loaded.tokenizer, cfg_data.max_length, idx), target)


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            # Accumulates: a stage may run in several pieces (evaluate before and after).
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.perf_counter() - start, 3)


def recon_settings(m: MethodConfig) -> ReconSettings:
    """The engine's flat settings from the method config (rem / lkd / mrem_s are presets of it)."""
    return ReconSettings(
        steps=m.steps, lam=m.lam, t0=m.t0, loss=m.loss, kd_weight=m.kd_weight,
        lr_weight=m.lr_weight, lr_scale=m.lr_scale, weight_decay=m.weight_decay,
        train_weights=m.train_weights, train_scales=m.train_scales,
        train_bias=m.train_bias, train_layernorm=m.train_layernorm, log_every=m.log_every,
    )


def make_checkpointer(cfg: RunConfig, rank: int, world_size: int, model: torch.nn.Module,
                      calib: list) -> Optional[Checkpointer]:
    """This rank's checkpointer (None with checkpoint.dir=null). The directory is keyed by the
    settings that decide the result, so the same command finds its checkpoints again and other
    settings never meet them; the fingerprint adds the model weights and the calibration data,
    checked before anything is loaded."""
    if not cfg.checkpoint.dir:
        return None
    m = cfg.method
    irrelevant = ("log_every", "cache", "cache_memory_gb", "queue")  # speed and display only
    settings = {
        "quant": dataclasses.asdict(cfg.quant), "data": dataclasses.asdict(cfg.data), "seed": cfg.seed,
        "method": {k: v for k, v in dataclasses.asdict(m).items() if k not in irrelevant},
        "ranks": world_size, "dtype": cfg.model.dtype,
    }
    key = hashlib.sha256(json.dumps({**settings, "model": cfg.model.path}, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(cfg.checkpoint.dir) / f"{m.name}_{cfg.quant.name}_{key}"
    keep = Checkpointer.keep_for(world_size, m.queue, cfg.checkpoint.every)
    return Checkpointer(root, fingerprint(model, calib, settings), rank, cfg.checkpoint.every, keep,
                        cfg.checkpoint.resume)


def run(cfg: RunConfig) -> Optional[dict]:
    """Run the configured method; returns the report (also written to cfg.run_dir) on the main
    rank, None on the other ranks of a parallel run."""
    result = execute(cfg)
    return None if result is None else result[0]


def execute(cfg: RunConfig) -> Optional[tuple[dict, torch.nn.Module]]:
    """`run`, also returning the final quantized model (None on the non-main ranks)."""
    if cfg.method.name in PARALLEL_METHODS:
        from mrem_dist.coordinator import run_parallel

        return run_parallel(cfg)
    world = env_world_size()
    if cfg.method.name == "prequant" and world == 1:
        from mrem_dist.prequant import run_prequant

        return run_prequant(cfg)
    if world > 1:
        raise RuntimeError(
            f"method={cfg.method.name} runs in one process but this was launched as {world} ranks: launch it "
            "without torchrun/srun, or use method=mrem_p to train module partitions on every rank"
        )
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    device = resolve_device(cfg.device)
    reconstruct = cfg.method.name in RECONSTRUCTION_METHODS
    timer = Timer()
    t0 = time.perf_counter()

    with timer("load"):
        loaded, prepared = load_inputs(cfg)
    model, adapter = loaded.model.to(device), loaded.adapter
    calib = [b.to(device) for b in prepared.calib]
    eval_batches = [b.to(device) for b in prepared.evalset.batches]
    # Building the quantized copy validates the scheme against the real shapes (group counts,
    # OCS) before any long forward pass; so does the partition.
    with timer("quantize"):
        qmodel = quantize_model(copy.deepcopy(model), adapter, cfg.quant, learnable=reconstruct)
        specs = []
        if reconstruct:
            specs = partition(model, adapter, cfg.method.modules, cfg.method.balance, cfg.data.max_length)
    with timer("calibrate"):
        if needs_calibration(qmodel):
            calibrate_activations(qmodel, lambda m, b: run_batch(m, adapter, b), calib)
            log.info("calibrated static activation ranges on %d batches", len(calib))

    with timer("evaluate"):
        fp_out = model_outputs(model, adapter, eval_batches)
    extra: dict = {}
    checkpoint = None
    if reconstruct:
        checkpoint = make_checkpointer(cfg, 0, 1, model, calib)
        with StopSignal() as stop:
            extra = _reconstruct(cfg, model, qmodel, adapter, specs, calib, fp_out, prepared.evalset, eval_batches,
                                 timer, device, checkpoint, stop)

    with timer("evaluate"):
        q_out = model_outputs(qmodel, adapter, eval_batches)
        fp_metrics, q_metrics = compare(fp_out, q_out, prepared.evalset)
    timer.seconds["total"] = round(time.perf_counter() - t0, 3)
    report = build_report(cfg, loaded, prepared, fp_metrics, q_metrics, extra, timer, device)
    report = finish(cfg, report, qmodel, loaded)
    if checkpoint is not None:  # the artifact and report are written: nothing left to resume
        checkpoint.remove()
    return report, qmodel


def load_inputs(cfg: RunConfig) -> tuple[LoadedModel, PreparedData]:
    loaded = load_model(cfg.model.path, cfg.model.kind, cfg.model.dtype)
    log.info("loaded %s (%s, %s) from %s", cfg.model.path, loaded.adapter.family, loaded.kind, loaded.path)
    prepared = prepare_data(cfg.data, loaded)
    log.info("data %s: %d calibration / %d evaluation samples", cfg.data.name,
             prepared.description["calibration_samples"], prepared.description["evaluation_samples"])
    return loaded, prepared


def build_report(cfg: RunConfig, loaded: LoadedModel, prepared: PreparedData, fp_metrics: dict, q_metrics: dict,
                 extra: dict, timer: Timer, device: torch.device) -> dict:
    return {
        "method": cfg.method.name,
        "quant": dataclasses.asdict(cfg.quant),
        "model": {
            "path": cfg.model.path,
            "resolved_path": loaded.path,
            "family": loaded.adapter.family,
            "kind": loaded.kind,
            "parameters": loaded.num_parameters,
        },
        "data": prepared.description,
        "metrics": {"full_precision": fp_metrics, "quantized": q_metrics},
        **extra,
        "timings_s": timer.seconds,
        # This process (rank 0 of a parallel run; every rank's own figure is in reconstruction.ranks).
        "peak_memory_gb": dict(zip(("rss", "cuda"), (None if v is None else round(v, 3) for v in peak_memory_gb(device)))),
        "environment": {
            "torch": torch.__version__,
            "device": str(device),
            "threads": torch.get_num_threads(),
            "python": platform.python_version(),
            "machine": platform.machine(),
        },
        "config": dataclasses.asdict(cfg),
    }


def finish(cfg: RunConfig, report: dict, qmodel: torch.nn.Module, loaded: LoadedModel,
           failures: Optional[list[str]] = None) -> dict:
    """Validate the final model; if it is sound, export it (`<run_dir>/model`, with cfg.export);
    write the report; fail (ValidationFailed) if it is not sound, leaving no artifact.
    `failures`: problems the caller already found (e.g. the coordinator's assembly check)."""
    modules = report.get("reconstruction", {}).get("modules", [])
    fp, q = report["metrics"]["full_precision"], report["metrics"]["quantized"]
    report["validation"] = validate_result(qmodel, fp, q, [m["error_after"] for m in modules], cfg.max_drop)
    if failures:
        report["validation"]["failures"][:0] = failures
        report["validation"]["passed"] = False
    if report["validation"]["passed"] and cfg.export:
        # The full-precision model `mrem_dist.evaluate` compares the artifact with: PreQuant's
        # starting point has no trained head, its counterpart is the FP fine-tuned reference.
        source = cfg.method.reference if cfg.method.name == "prequant" else cfg.model.path
        meta = export_quantized(qmodel, loaded.tokenizer, cfg.quant, loaded.kind, Path(cfg.run_dir) / "model", source=source)
        size = meta["bytes"]["model.safetensors"]
        report["artifact"] = {
            "path": str(Path(cfg.run_dir) / "model"),
            "bytes": size,
            "fp32_parameter_bytes": 4 * loaded.num_parameters,
            "ratio_to_fp32": round(size / (4 * loaded.num_parameters), 4),
        }
        log.info("wrote the quantized model to %s (%.1f MB, %.3fx of FP32)", report["artifact"]["path"], size / 1e6,
                 report["artifact"]["ratio_to_fp32"])
    write_report(Path(cfg.run_dir), report)
    _log_summary(report)
    if not report["validation"]["passed"]:
        failures = "; ".join(report["validation"]["failures"])
        raise ValidationFailed(f"the quantized model failed validation: {failures} (report: {cfg.run_dir}/report.json)")
    return report


def _log_summary(report: dict) -> None:
    """The end-of-run table in the log (the same figures are in summary.md and report.json)."""
    rec = report.get("reconstruction")
    if rec:
        lines = ["module | layers | rank | error before -> after | train s | resumed from"]
        for m in rec["modules"]:
            lines.append(f"{m['index']:>6} | {m['layers'][0]}-{m['layers'][1] - 1:<4} | {m.get('rank', 0):>4} | "
                         f"{m['error_before']:.4g} -> {m['error_after']:.4g} | {m['seconds']:7.1f} | "
                         f"{m.get('resumed_from', 0)}")
        log.info("reconstruction summary:\n  %s", "\n  ".join(lines))
    fp, q = report["metrics"]["full_precision"], report["metrics"]["quantized"]
    log.info("metrics: %s", ", ".join(f"{k} {fp.get(k, float('nan')):.4f} -> {v:.4f}" for k, v in q.items()))


def _reconstruct(cfg, model, qmodel, adapter, specs, calib, fp_out, evalset, eval_batches, timer, device,
                 checkpoint, stop) -> dict:
    """Train qmodel's modules in place; returns the report's reconstruction sections (the metrics
    and per-layer error before, each module's error before/after, per-layer error after)."""
    probe = eval_batches[:4]
    with timer("evaluate"):
        _, init_metrics = compare(fp_out, model_outputs(qmodel, adapter, eval_batches), evalset)
        before = layer_errors(model, qmodel, adapter, probe)
    log.info("before reconstruction: %s", _fmt_metrics(init_metrics))
    with timer("reconstruct"):
        engine = reconstruct_sequential(
            model, qmodel, adapter, specs, calib, recon_settings(cfg.method),
            cache=cfg.method.cache, cache_memory_gb=cfg.method.cache_memory_gb, seed=cfg.seed, device=device,
            checkpoint=checkpoint, stop=stop,
        )
    with timer("evaluate"):
        after = layer_errors(model, qmodel, adapter, probe)
    return {
        "metrics_before_reconstruction": init_metrics,
        "reconstruction": {"partition": [s.describe() for s in specs], "cache": engine.cache, "modules": engine.modules},
        "layer_error": {"before": before, "after": after},
    }


def _fmt_metrics(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())
