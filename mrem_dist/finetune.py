"""`python -m mrem_dist.finetune data=<task> ...`: full-precision fine-tuning of every weight on a
labeled task (console script: `mrem-dist-finetune`).

It makes the task models the quantizers start from (`model.path=<run_dir>/model` for PTQ, REM,
LKD, MREM) and PreQuant's full-precision baseline (`method.reference=<run_dir>/model`). Writes
`<run_dir>/model` (a Hugging Face folder: config, weights, tokenizer; renamed into place only when
complete), `report.json` and `summary.md`. Exit codes: 0 done, 2 invalid configuration, 1 error.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mrem_dist.config import FinetuneConfig, config_dir, entry_config, register_configs, validate_finetune
from mrem_dist.io import atomic_dir
from mrem_dist.log import get_logger

log = get_logger("mrem_dist.finetune")

register_configs()


def save_model(loaded, path: Path) -> None:
    """save_pretrained into a folder renamed into place when complete: never half a model at `path`."""
    with atomic_dir(path, "run directory") as tmp:
        loaded.model.save_pretrained(tmp)
        loaded.tokenizer.save_pretrained(tmp)


def run_finetune(cfg: FinetuneConfig) -> dict:
    from mrem_dist.context import RunContext, environment
    from mrem_dist.engine.finetune import FinetuneSettings, train_task
    from mrem_dist.inputs import prepare_train, task_train_split
    from mrem_dist.io import atomic_write_json, atomic_write_text
    from mrem_dist.preflight import check_outputs
    from mrem_dist.scoring import score

    check_outputs(Path(cfg.run_dir), None, 0)  # before the training, not after it
    ctx = RunContext.begin(cfg)
    timer, device = ctx.timer, ctx.device
    with timer("load"):
        train_split, num_labels = task_train_split(cfg.data)
        loaded = ctx.load("classifier", num_labels, calibration=False)
        train = prepare_train(train_split, cfg.data, loaded)
    prepared = ctx.data
    log.info("fine-tuning %s (%d labels) on %s: %d training / %d evaluation examples, %d steps", cfg.model.path,
             num_labels, cfg.data.name, len(train), prepared.description["evaluation_samples"], cfg.steps)
    model, family = loaded.model, loaded.family
    settings = FinetuneSettings(steps=cfg.steps, lr=cfg.lr, warmup=cfg.warmup, weight_decay=cfg.weight_decay,
                                batch_size=cfg.data.batch_size, seed=cfg.seed, log_every=cfg.log_every)
    with timer("finetune"):
        history = train_task(model, family, list(model.parameters()), train, settings, device)
    with timer("evaluate"):
        _, metrics = score(None, model, family, loaded.task, prepared.evalset).compute()
    run_dir = Path(cfg.run_dir)
    save_model(loaded, run_dir / "model")
    timer.seconds["total"] = round(time.perf_counter() - ctx.started, 3)
    report = {
        "command": "finetune", "model": {"path": cfg.model.path, "parameters": loaded.num_parameters, "labels": num_labels},
        "data": {**prepared.description, "train_samples": len(train)},
        "metrics": metrics, "output": str(run_dir / "model"),
        "finetune": {"steps": cfg.steps, "lr": cfg.lr, "loss_first": history["losses"][0],
                     "loss_last": history["losses"][-1], "seconds": history["seconds"]},
        "timings_s": timer.seconds,
        "environment": environment(device),
        "config": dataclasses.asdict(cfg),
    }
    atomic_write_json(run_dir / "report.json", report)
    lines = [f"# mrem-dist finetune: {cfg.model.path} on {cfg.data.name}", "",
             f"- {len(train)} training examples, {cfg.steps} steps of batch {cfg.data.batch_size}, lr {cfg.lr}, "
             f"loss {history['losses'][0]:.4f} -> {history['losses'][-1]:.4f}",
             f"- model: `{run_dir / 'model'}`", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {v:.4f} |" for k, v in metrics.items()]
    atomic_write_text(run_dir / "summary.md", "\n".join(lines) + "\n")
    log.info("done: %s -> %s", ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()), run_dir / "model")
    return report


@hydra.main(config_path=config_dir(), config_name="finetune", version_base=None)
def _hydra_main(dcfg: DictConfig) -> None:
    from mrem_dist.config import ConfigError

    cfg: FinetuneConfig = entry_config(dcfg, validate_finetune, log)
    try:
        run_finetune(cfg)
    except ConfigError as e:
        log.error("invalid input: %s", e)
        raise SystemExit(2) from e


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
