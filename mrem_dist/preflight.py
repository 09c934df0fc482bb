"""Checks of a run's inputs before any long work: everything that can be checked without the
weights. The config alone was checked by `config.validate`; this adds what needs the model's
config.json and shapes (a meta-device skeleton, no weights), the data files and the places the run
will write. Every failure is an `InputError` (a ConfigError: exit code 2, one line naming the
problem and the fix)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Optional

from mrem_dist.config import EXPORT_DIRS, RECONSTRUCTION_METHODS, ConfigError, RunConfig, export_formats


class InputError(ConfigError):
    """An input of the run (model, data, output folders) is unusable; the message names the fix."""


def _checked(what: str, fn, *args):
    try:
        return fn(*args)
    except ConfigError:
        raise
    except (ValueError, OSError, KeyError, ImportError) as e:
        raise InputError(str(e) if what in str(e) else f"{what}: {e}") from e


def _skeleton(cfg: RunConfig):
    """The model built on the meta device from its config.json (shapes without storage), and its family."""
    import torch

    from mrem_dist.models.families import family_for
    from mrem_dist.models.loading import auto_kind, load_config, resolve_model_path
    from mrem_dist.models.tasks import task_for

    resolved = _checked("model.path", resolve_model_path, cfg.model.path)
    config = _checked("model.path", load_config, resolved)
    family = _checked("model.path", family_for, config.model_type)
    # Only the shapes matter here: a head the checkpoint lacks is load_model's error to report.
    kind = auto_kind(config, cfg.model.kind)
    with torch.device("meta"):
        model = task_for(kind, int(config.num_labels)).auto_class().from_config(config)
    return model, family, kind


def _check_shapes(cfg: RunConfig, model, family, kind: str) -> None:
    from torch import nn

    layers = family.layers(model)
    if kind == "causal_lm":
        context = getattr(family.config(model), "max_position_embeddings", None)
        if context and cfg.data.seq_len > context:
            raise InputError(f"data.seq_len={cfg.data.seq_len} is longer than the model's context of {context} tokens: "
                             f"set data.seq_len<={context}")
        if cfg.quant.e_bits is not None:
            raise InputError(f"quant.e_bits={cfg.quant.e_bits} on a decoder LLM: its embedding (tied to the LM head in "
                             "many models) stays in full precision in mrem-dist; set quant.e_bits=null")
        if cfg.method.name == "prequant":
            raise InputError("method=prequant fine-tunes a sequence-classification head on a labeled task; a decoder LLM "
                             "is scored by perplexity on text: use method=gptq, ptq or a reconstruction method")
    family.normalize_projections(model)  # GPT-2's Conv1D counted as the nn.Linear it becomes
    m, q = cfg.method, cfg.quant
    if m.name in RECONSTRUCTION_METHODS and m.modules > len(layers):
        raise InputError(f"method.modules={m.modules} but the model has {len(layers)} layers: every module needs at "
                         f"least one layer. Use method.modules<={len(layers)}, or method.modules=0 for one per layer")
    for i, layer in enumerate(layers):
        for name, linear in layer.named_modules():
            if not isinstance(linear, nn.Linear):
                continue
            if q.w_granularity == "group" and linear.out_features % q.w_groups:
                raise InputError(
                    f"quant.w_groups={q.w_groups} does not divide the {linear.out_features} output rows of layer "
                    f"{i}'s {name}: pick a divisor of every projection's rows (e.g. a divisor of "
                    f"{linear.out_features})")
            if q.w_granularity == "input_group" and linear.in_features % q.w_group_size:
                raise InputError(
                    f"quant.w_group_size={q.w_group_size} does not divide the {linear.in_features} input columns of "
                    f"layer {i}'s {name}: use a group size that divides every projection's inputs (e.g. 64 or 32 "
                    f"for {linear.in_features})")


def _check_writable(folder: Path, what: str) -> None:
    if folder.exists() and not folder.is_dir():
        raise InputError(f"{what}={folder} is a file, not a folder: point it at a folder")
    probe = folder
    while not probe.exists():
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise InputError(f"{what}={folder} cannot be written ({probe} is not writable): point it somewhere writable")


def check_outputs(run_dir: Path, checkpoint_dir: Optional[str], needed_bytes: int,
                  outputs: tuple[str, ...] = ("model",)) -> None:
    """The run directory (none of the `outputs` folders in it yet; what a killed export left is
    removed), the checkpoint folder, and the free space for the exported folders."""
    from mrem_dist.io import clean_stale_temporaries

    run_dir = Path(run_dir)
    # A killed export leaves .model.<pid>.*.tmp in its own run directory: the next run (here or in a
    # sibling run directory of the same day) removes it.
    for folder in [run_dir, *(run_dir.parent.glob("*/") if run_dir.parent.is_dir() else [])]:
        for name in outputs:
            clean_stale_temporaries(folder / name)
    for name in outputs:
        if (run_dir / name).exists():
            raise InputError(f"{run_dir / name} already exists: this run directory holds a finished run; choose a "
                             "new run_dir (the default is a new timestamped one) or move the old artifact away")
    _check_writable(run_dir, "run_dir")
    if checkpoint_dir:
        _check_writable(Path(checkpoint_dir), "checkpoint.dir")
    if needed_bytes:
        probe = run_dir
        while not probe.exists():
            probe = probe.parent
        free = shutil.disk_usage(probe).free
        if free < needed_bytes:
            raise InputError(f"{probe} has {free / 1e6:.0f} MB free but the artifact and report need up to "
                             f"{needed_bytes / 1e6:.0f} MB: free some space or choose another run_dir")


def check_data(cfg_data, kind: str = "encoder") -> None:
    """The evaluation data a config names is there and readable for a model of task `kind`
    (columns, texts, labels; a causal LM's documents); InputError if not."""
    from mrem_dist.inputs import load_splits, load_texts

    _checked(f"data={cfg_data.name}", load_texts if kind == "causal_lm" else load_splits, cfg_data, False)


def preflight(cfg: RunConfig) -> None:
    """Every check that needs no weights; raises InputError (exit code 2)."""
    from mrem_dist.inputs import load_splits, load_texts, split_holdout

    model, family, kind = _skeleton(cfg)
    formats = export_formats(cfg.export)
    if "compressed-tensors" in formats:
        from mrem_dist.artifact.compressed_tensors import unsupported

        problems = unsupported(cfg.quant, family.name)
        if problems:
            raise InputError("export.format=compressed-tensors cannot express this run's model: " + "; ".join(problems))
    _check_shapes(cfg, model, family, kind)
    splits = _checked(f"data={cfg.data.name}", load_texts if kind == "causal_lm" else load_splits, cfg.data)
    rows = len(splits[0]) if kind != "causal_lm" and splits[0] is not None else 0  # a text's windows: any number
    if cfg.method.name in RECONSTRUCTION_METHODS and rows:
        _checked("data.holdout_samples", split_holdout, min(cfg.data.calib_samples, rows), rows,
                 cfg.data.holdout_samples, f"data.calib_samples={cfg.data.calib_samples} of {rows} rows", False)
    # An upper bound of each export: every parameter at 32 bits (they are 4-8x smaller), plus the report.
    needed = 4 * sum(p.numel() for p in model.parameters()) * len(formats) + 10**7
    checkpoints = cfg.checkpoint.dir if cfg.method.name in RECONSTRUCTION_METHODS else None
    check_outputs(Path(cfg.run_dir), checkpoints, needed, tuple(EXPORT_DIRS[f] for f in formats) or ("model",))
