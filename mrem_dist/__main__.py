"""`python -m mrem_dist key=value ...` (console script: `mrem-dist`). Parse, build, run, close."""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from mrem_dist.config import ConfigError, RunConfig, register_configs, validate
from mrem_dist.log import get_logger

log = get_logger("mrem_dist")


def _config_dir() -> str:
    """conf/ beside the package in a checkout, or shipped inside it (mrem_dist/conf) in a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"mrem-dist's config directory (conf/config.yaml) is missing near {here}: reinstall the package")


register_configs()


@hydra.main(config_path=_config_dir(), config_name="config", version_base=None)
def _hydra_main(dcfg: DictConfig) -> None:
    # Imported here so `--help` and config errors do not pay for importing torch/transformers.
    from transformers.utils import logging as hf_logging

    from mrem_dist.pipeline import run

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    cfg: RunConfig = OmegaConf.to_object(dcfg)
    try:
        validate(cfg)
    except ConfigError as e:
        log.error("invalid configuration: %s", e)
        raise SystemExit(2) from e
    report = run(cfg)
    q = report["metrics"]["quantized"]
    log.info("done: %s -> %s/report.json", ", ".join(f"{k}={v:.4f}" for k, v in q.items()), cfg.run_dir)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    sys.exit(main())
