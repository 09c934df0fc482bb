"""The run context: what one process of a run shares, built once from the resolved config.

Every driver (PTQ and the one-process reconstruction, an MREM-P rank and its coordinator, PreQuant,
fine-tuning, scoring an artifact) starts from `RunContext.begin` (threads, seed, device, timer) and
`load` (the model with its family and task, the data on the device); the quantizing drivers end
through `finish` (report -> validate -> export), the one place that does it.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import platform
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol

import torch

from mrem_dist.artifact.formats import make_shard, write_format
from mrem_dist.artifact.shard import ExportInfo
from mrem_dist.config import EXPORT_DIRS, RECONSTRUCTION_METHODS, MethodConfig, export_formats
from mrem_dist.distributed import DistContext, all_gather_objects, resolve_device
from mrem_dist.engine import ReconSettings, partition
from mrem_dist.engine.checkpoint import Checkpointer, fingerprint
from mrem_dist.inputs import PreparedData, prepare_data
from mrem_dist.layout import ParallelLayout
from mrem_dist.log import get_logger
from mrem_dist.memory import peak_memory_gb, release_freed_memory
from mrem_dist.models import LoadedModel, load_model
from mrem_dist.models.loading import load_skeleton
from mrem_dist.models.gguf import source_note
from mrem_dist.report import write_report
from mrem_dist.validation import Structure, ValidationFailed, validate_result

log = get_logger(__name__)


class Timer:
    """Seconds per phase, and every span of a phase for a rank's timeline: (phase, start, end,
    blocked, peak RSS), start and end in wall-clock seconds since the epoch (so the ranks of one
    machine, or of clock-synchronized nodes, line up), blocked the seconds of it the rank waited on
    a peer (`blocked`: a running total of those seconds, which a parallel driver points at its
    streams), peak RSS the process's peak resident memory in GB at the span's end (it only grows:
    the span that raises it is the one that needed the memory)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}
        self.spans: list[tuple[str, float, float, float, float]] = []
        self.blocked: Callable[[], float] = lambda: 0.0

    @contextmanager
    def __call__(self, name: str):
        start, wall, blocked = time.perf_counter(), time.time(), self.blocked()
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            release_freed_memory()  # what the phase freed, before the next one allocates
            # Accumulates: a stage may run in several pieces (evaluate before and after).
            self.seconds[name] = round(self.seconds.get(name, 0.0) + elapsed, 3)
            self.spans.append((name, round(wall, 3), round(wall + elapsed, 3), round(self.blocked() - blocked, 3),
                               round(peak_memory_gb(torch.device("cpu"))[0], 3)))


@dataclass
class RunContext:
    cfg: Any  # the resolved typed config (RunConfig, FinetuneConfig, EvaluateConfig)
    device: torch.device
    timer: Timer = field(default_factory=Timer)
    started: float = field(default_factory=time.perf_counter)
    dist: Optional[DistContext] = None  # the process group (a parallel run)
    loaded: Optional[LoadedModel] = None
    data: Optional[PreparedData] = None  # batches on `device`
    # The full-precision model the artifact records as its source (mrem_dist.evaluate compares
    # against it): the quantized checkpoint itself, unless the driver says otherwise (PreQuant).
    source: Optional[str] = None

    @classmethod
    def begin(cls, cfg: Any, dist: Optional[DistContext] = None) -> "RunContext":
        """The prologue of every run: CPU threads, the torch seed, the device."""
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        torch.manual_seed(getattr(cfg, "seed", 0))
        device = dist.device if dist is not None else resolve_device(cfg.device)
        model_cfg = getattr(cfg, "model", None)
        return cls(cfg, device, dist=dist, source=None if model_cfg is None else model_cfg.path)

    def load(self, kind: Optional[str] = None, num_labels: Optional[int] = None, calibration: bool = True,
             skeleton: bool = False) -> LoadedModel:
        """Load `cfg.model` (as `kind`, default `cfg.model.kind`) and prepare `cfg.data` for it; the
        model and the batches go to the device. skeleton: the model with its parameters on the meta
        device, for a rank to fill in with its own share (models/sharded.py)."""
        cfg = self.cfg
        if skeleton:
            loaded = load_skeleton(cfg.model.path, kind or cfg.model.kind, self.dtype)
        else:
            loaded = load_model(cfg.model.path, kind or cfg.model.kind, self.dtype, num_labels)
        log.info("%s %s (%s, %s) from %s", "built the skeleton of" if skeleton else "loaded", cfg.model.path,
                 loaded.family.name, loaded.task.kind, loaded.path)
        self.use(loaded, calibration, to_device=not skeleton)
        return loaded

    def use(self, loaded: LoadedModel, calibration: bool = True, to_device: bool = True) -> None:
        """Take a model loaded elsewhere (an artifact) and prepare `cfg.data` for it."""
        method = getattr(self.cfg, "method", None)  # an evaluate run has none
        holdout = self.cfg.data.holdout_samples if calibration and method is not None and \
            method.name in RECONSTRUCTION_METHODS else 0
        prepared = prepare_data(self.cfg.data, loaded, calibration, holdout)
        log.info("data %s: %d calibration / %d evaluation samples", self.cfg.data.name,
                 prepared.description["calibration_samples"], prepared.description["evaluation_samples"])
        if to_device:
            loaded.model = loaded.model.to(self.device)
        self.loaded, self.data = loaded, prepared.to(self.device)

    # -- what the drivers share -------------------------------------------------------------
    @property
    def dtype(self) -> str:
        """The dtype of the full-precision model and the forward passes: model.dtype, or by default
        bfloat16 on CUDA (what LLMs are served in) and float32 on the CPU."""
        chosen = self.cfg.model.dtype
        return chosen if chosen is not None else "bfloat16" if self.device.type == "cuda" else "float32"

    @property
    def sequence_length(self) -> int:
        """Tokens per sequence of the loaded model's data: a causal LM's windows, an encoder's padding."""
        return self.cfg.data.seq_len if self.loaded.task.kind == "causal_lm" else self.cfg.data.max_length

    def partition(self, model: torch.nn.Module) -> list:
        """The module partition of `model` for this run's method. The head is charged to the last
        module only when a training step runs it (a KD term on the logits)."""
        m = self.cfg.method
        return partition(model, self.loaded.family, m.modules, m.balance, self.sequence_length, head=m.kd_weight > 0)

    @property
    def scheme(self):
        """The quantization scheme the run builds: cfg.quant, with the weight clipping that
        method.init=rtn / mse asks for."""
        init = getattr(self.cfg.method, "init", None)
        if init in ("rtn", "mse"):
            return dataclasses.replace(self.cfg.quant, w_clip={"rtn": "minmax", "mse": "mse"}[init])
        return self.cfg.quant

    def recon_settings(self) -> ReconSettings:
        return recon_settings(self.cfg.method)

    def checkpointer(self, layout: ParallelLayout, model: torch.nn.Module) -> Optional[Checkpointer]:
        """This stage's checkpointer (None with checkpoint.dir=null). The directory is keyed by the
        settings that decide the result, so the same command finds its checkpoints again and other
        settings never meet them; the fingerprint adds the model weights and the calibration data,
        checked before anything is loaded."""
        cfg = self.cfg
        if not cfg.checkpoint.dir:
            return None
        m = cfg.method
        irrelevant = ("log_every", "cache", "cache_memory_gb", "queue")  # speed and display only
        settings = {
            "quant": dataclasses.asdict(cfg.quant), "data": dataclasses.asdict(cfg.data), "seed": cfg.seed,
            "method": {k: v for k, v in dataclasses.asdict(m).items() if k not in irrelevant},
            "ranks": layout.world_size, "dtype": self.dtype,
        }
        key = hashlib.sha256(json.dumps({**settings, "model": cfg.model.path}, sort_keys=True).encode()).hexdigest()[:10]
        root = Path(cfg.checkpoint.dir) / f"{m.name}_{cfg.quant.name}_{key}"
        every = cfg.checkpoint.every if cfg.checkpoint.every is not None else max(1, min(200, m.steps // 4))
        keep = Checkpointer.keep_for(layout.stages, m.queue, every)
        several = self.dist is not None and self.dist.world_size > 1
        fp = fingerprint(model, self.data.calib, settings,
                         gather=(lambda own: all_gather_objects(own, self.dist)) if several else None)
        return Checkpointer(root, fp, layout.stage, every, keep, cfg.checkpoint.resume, writer=layout.is_leader)

    # -- the end of every quantizing run ----------------------------------------------------
    def report(self, fp_metrics: Optional[dict], q_metrics: dict, extra: dict) -> dict:
        """`extra` may hold `rank_spans`: {rank: Timer.spans} of the other ranks of a parallel run,
        which join this process's own in the report's `timeline`."""
        cfg, loaded = self.cfg, self.loaded
        self.timer.seconds["total"] = round(time.perf_counter() - self.started, 3)
        extra = dict(extra)
        spans = {**extra.pop("rank_spans", {}), self.dist.rank if self.dist is not None else 0: self.timer.spans}
        return {
            "method": cfg.method.name,
            "quant": dataclasses.asdict(self.scheme),
            "model": {
                "path": cfg.model.path,
                "resolved_path": loaded.path,
                "family": loaded.family.name,
                "kind": loaded.task.kind,
                "parameters": loaded.num_parameters,
                **({"note": note} if (note := source_note(loaded.path)) else {}),
            },
            "data": self.data.description,
            "metrics": {"full_precision": fp_metrics, "quantized": q_metrics},
            **extra,
            "timings_s": self.timer.seconds,
            "timeline": timeline(spans),
            # This process (rank 0 of a parallel run; every rank's own figure is in reconstruction.ranks).
            "peak_memory_gb": dict(zip(("rss", "cuda"), (None if v is None else round(v, 3)
                                                         for v in peak_memory_gb(self.device)))),
            "environment": environment(self.device),
            "config": dataclasses.asdict(cfg),
        }

    def export_info(self) -> ExportInfo:
        loaded = self.loaded
        return ExportInfo(loaded.tokenizer, self.scheme, loaded.task.kind, loaded.family.name, self.source,
                          self.cfg.export.dtype)

    def _export(self, final: "FinalModel", fmt: str) -> dict:
        """Write the model as `fmt` to <run_dir>/<EXPORT_DIRS[fmt]>; returns its entry of the
        report's `artifacts` section."""
        out = Path(self.cfg.run_dir) / EXPORT_DIRS[fmt]
        size = final.write(fmt, out)
        n = self.loaded.num_parameters
        entry = {"path": str(out), "bytes": size, "fp32_parameter_bytes": 4 * n, "ratio_to_fp32": round(size / (4 * n), 4),
                 "ratio_to_fp16": round(size / (2 * n), 4)}
        log.info("wrote the quantized model as %s to %s (%.1f MB, %.3fx of FP16)", fmt, out, size / 1e6,
                 entry["ratio_to_fp16"])
        return entry

    def _write_all(self, final: "FinalModel", formats: tuple[str, ...], report: dict, reported: int) -> None:
        """Every export format of the run, into the report's `artifacts` (an error is recorded there
        before it is raised); the write spans join the timeline."""
        report["artifacts"] = {}
        for fmt in formats:
            try:
                with self.timer("write"):
                    report["artifacts"][fmt] = self._export(final, fmt)
            except BaseException as e:
                report["artifacts"][fmt] = {"error": f"{type(e).__name__}: {e}"}
                write_report(Path(self.cfg.run_dir), report, plot=False)
                raise
        rank = self.dist.rank if self.dist is not None else 0
        report["timeline"]["spans"] += timeline({rank: self.timer.spans[reported:]}, report["timeline"]["epoch_s"])["spans"]
        write_report(Path(self.cfg.run_dir), report, plot=False)

    def finish(self, final: "torch.nn.Module | FinalModel", metrics: tuple[Optional[dict], dict], extra: dict,
               failures: Optional[list[str]] = None) -> dict:
        """Report, validate the final model, and if it is sound export it (`<run_dir>/model`, with
        cfg.export); the report is written either way. Raises ValidationFailed (leaving no artifact)
        when it is not sound. `final`: the whole model, or (MREM-P) the stages' shards streamed to
        this process. `failures`: problems the caller already found (the assembly's)."""
        cfg = self.cfg
        if isinstance(final, torch.nn.Module):
            final = WholeModel(final, self.export_info())
        report = self.report(metrics[0], metrics[1], extra)
        reported = len(self.timer.spans)  # the spans after this one join the timeline below
        with self.timer("validate"):
            modules = report.get("reconstruction", {}).get("modules", [])
            fp, q = report["metrics"]["full_precision"] or {}, report["metrics"]["quantized"]
            # The error of the state each module kept (its initial one when training made it worse).
            kept = [m["error_after"] if m["kept"] == "trained" else m["error_before"] for m in modules]
            report["validation"] = validate_result(final.structure(), fp, q, kept, cfg.max_drop)
            if failures:
                report["validation"]["failures"][:0] = failures
                report["validation"]["passed"] = False
            # The report first, so that no failure below loses it; then the exports, then the report again.
            write_report(Path(cfg.run_dir), report)
        formats = export_formats(cfg.export)
        try:
            if report["validation"]["passed"] and formats:
                self._write_all(final, formats, report, reported)
        finally:
            final.done()
        log_summary(report)
        if not report["validation"]["passed"]:
            failed = "; ".join(report["validation"]["failures"])
            raise ValidationFailed(f"the quantized model failed validation: {failed} (report: {cfg.run_dir}/report.json)")
        return report


class FinalModel(Protocol):
    """The final quantized model as `RunContext.finish` validates and writes it: a whole model in
    this process (WholeModel), or the stage leaders' shards an MREM-P coordinator streams into the
    files (drivers.parallel.StreamedModel)."""

    def structure(self) -> Structure:
        """check_model's findings (validation.py)."""

    def write(self, fmt: str, path: Path) -> int:
        """Write the model as `fmt` to the folder `path`; returns the tensor file's bytes."""

    def done(self) -> None:
        """Nothing more will be written (called once, at the end, whatever happened)."""


@dataclass
class WholeModel:
    """A final model that is whole in this process."""

    model: torch.nn.Module
    info: ExportInfo

    def structure(self) -> Structure:
        return Structure.of(self.model)

    def write(self, fmt: str, path: Path) -> int:
        shard = make_shard(self.info, fmt, self.model)
        return write_format(self.info, fmt, path, shard.manifest(), shard.tensors.items(), self.model)

    def done(self) -> None:
        pass


def timeline(spans: dict[int, list[tuple[str, float, float, float, float]]], epoch: Optional[float] = None) -> dict:
    """The report's `timeline`: every phase span of every rank, in seconds from `epoch` (default:
    the earliest start; `epoch_s` is it, in wall-clock seconds since the Unix epoch)."""
    if epoch is None:
        epoch = min((s[1] for rank_spans in spans.values() for s in rank_spans), default=0.0)
    rows = [{"rank": rank, "phase": name, "start_s": round(start - epoch, 3), "end_s": round(end - epoch, 3),
             "blocked_s": blocked, "peak_rss_gb": rss}
            for rank, rank_spans in sorted(spans.items()) for name, start, end, blocked, rss in rank_spans]
    return {"epoch_s": epoch, "spans": rows}


def recon_settings(m: MethodConfig) -> ReconSettings:
    """The engine's flat settings from the method config (rem / lkd / mrem_s are presets of it)."""
    return ReconSettings(
        steps=m.steps, lam=m.lam, t0=m.t0, finish_steps=m.finish_steps, loss=m.loss, kd_weight=m.kd_weight,
        lr_weight=m.lr_weight, lr_weight_rel=m.lr_weight_rel, lr_scale=m.lr_scale, weight_decay=m.weight_decay,
        train_weights=m.train_weights, train_scales=m.train_scales,
        train_bias=m.train_bias, train_layernorm=m.train_layernorm, never_worse=m.never_worse, log_every=m.log_every,
    )


def environment(device: torch.device) -> dict:
    return {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
            "python": platform.python_version(), "machine": platform.machine()}


def fmt_metrics(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4f}" for k, v in metrics.items())


def log_summary(report: dict) -> None:
    """The end-of-run table in the log (the same figures are in summary.md and report.json)."""
    rec = report.get("reconstruction")
    if rec:
        lines = ["module | layers | rank | held-out error initial -> trained | kept | train s | resumed from"]
        for m in rec["modules"]:
            lines.append(f"{m['index']:>6} | {m['layers'][0]}-{m['layers'][1] - 1:<4} | {m['rank']:>4} | "
                         f"{m['error_before']:.4g} -> {m['error_after']:.4g} | {m['kept']:<7} | {m['seconds']:7.1f} | "
                         f"{m['resumed_from']}")
        log.info("reconstruction summary:\n  %s", "\n  ".join(lines))
    fp, q = report["metrics"]["full_precision"] or {}, report["metrics"]["quantized"]
    log.info("metrics: %s", ", ".join(f"{k} {fp[k]:.4f} -> {v:.4f}" if k in fp else f"{k} {v:.4f}" for k, v in q.items()))
    if report["validation"]["passed"]:
        log.info("%s", closing_line(report))


def closing_line(report: dict) -> str:
    """One sentence for a person: the headline metric from the start to the end, and what was written."""
    name = report["validation"]["headline_metric"]
    fp, q = (report["metrics"]["full_precision"] or {}).get(name), report["metrics"]["quantized"][name]
    before = (report.get("metrics_before_reconstruction") or {}).get(name)
    what = f"{report['method']} {report['quant']['name']} of {report['model']['path']}"
    label = "cosine to full precision" if name == "cosine" else name
    line = f"done: {what}: {label} {before:.4f} before reconstruction -> {q:.4f}" if before is not None else \
        f"done: {what}: {label} {q:.4f}"
    if fp is not None and name != "cosine":  # an encoder's cosine is to full precision already
        line += f" (full precision {fp:.4f})"
    for fmt, art in (report.get("artifacts") or {}).items():
        if "bytes" in art:
            line += (f"; {fmt} model in {art['path']}, {art['bytes'] / 1e6:.1f} MB ({art['ratio_to_fp32']:.2f}x of "
                     f"FP32's {art['fp32_parameter_bytes'] / 1e6:.1f} MB)")
    return line
