"""`python -m mrem_dist key=value ...` (console script: `mrem-dist`). Parse, build, run, close.

Launched as several ranks (torchrun, srun, the deepspeed launcher), the ranks first agree on one
start time, so that `${mrem_now:...}` in the run directory names one directory for all of them;
rank 0 writes the report and Hydra's config dump there, every rank its own `rank<N>.log`.

Exit codes: 0 done, 2 invalid configuration, 3 the quantized model failed validation (the report
says why), 4 stopped by SIGTERM / SIGUSR1 after a checkpoint (rerun the same command to resume),
1 any other error (under torchrun, recorded with the failing rank in its summary).
"""

from __future__ import annotations

import os
import sys
import time

import hydra
from omegaconf import DictConfig, OmegaConf

from mrem_dist.config import RunConfig, config_dir, entry_config, register_configs, validate
from mrem_dist.distributed import env_world_size
from mrem_dist.log import get_logger

log = get_logger("mrem_dist")

_START: list[float] = []  # the run's start time, agreed by all ranks (set once)


def _now(fmt: str) -> str:
    # Hydra's own ${now:} is resolved per process: ranks started a second apart would write to two
    # directories. This one is the start time rank 0 broadcast (or this process's, when alone).
    if not _START:
        _START.append(time.time())
    return time.strftime(fmt, time.localtime(_START[0]))


register_configs()
OmegaConf.register_new_resolver("mrem_now", _now, replace=True)


def _argv_value(argv: list[str], key: str, default: str) -> str:
    for arg in argv:
        if arg.startswith(f"{key}="):
            return arg.split("=", 1)[1]
    return default


def _join_ranks(argv: list[str]) -> list[str]:
    """For a multi-rank launch: join the process group now (before Hydra names the run directory),
    take rank 0's start time, and return the per-rank Hydra overrides."""
    from mrem_dist.distributed import init_distributed

    ctx = init_distributed(_argv_value(argv, "device", "auto"), float(_argv_value(argv, "timeout_s", "600")))
    import torch.distributed as dist

    box = [time.time()]
    dist.broadcast_object_list(box, src=0, device=ctx.device if ctx.backend == "nccl" else None)
    _START[:] = box
    overrides = [f"hydra.job_logging.handlers.file.filename=${{hydra.runtime.output_dir}}/rank{ctx.rank}.log"]
    if not ctx.is_main:
        overrides.append("hydra.output_subdir=null")  # only rank 0 writes the config dump
    return overrides


@hydra.main(config_path=config_dir(), config_name="config", version_base=None)
def _hydra_main(dcfg: DictConfig) -> None:
    # Imported here so that `--help` does not pay for importing torch/transformers.
    from mrem_dist.config import ConfigError
    from mrem_dist.engine.checkpoint import Preempted
    from mrem_dist.runner import run
    from mrem_dist.validation import ValidationFailed

    cfg: RunConfig = entry_config(dcfg, validate, log)
    try:
        report = run(cfg)
    except ConfigError as e:  # an input found unusable before the long work (preflight)
        log.error("invalid input: %s", e)
        if os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        raise SystemExit(2) from e
    except ValidationFailed as e:
        log.error("%s", e)
        raise SystemExit(3) from e
    except Preempted as e:
        log.warning("%s", e)
        raise SystemExit(Preempted.exit_code) from e
    except Exception as e:
        if os.environ.get("TORCHELASTIC_ERROR_FILE"):
            # torchrun's failure summary then names this rank and shows this error.
            from torch.distributed.elastic.multiprocessing.errors import get_error_handler

            get_error_handler().record_exception(e)
        raise
    if report is not None:
        q = report["metrics"]["quantized"]
        log.info("done: %s -> %s/report.json", ", ".join(f"{k}={v:.4f}" for k, v in q.items()), cfg.run_dir)


def _record_exit(code: int) -> None:
    """With MREM_EXIT_DIR set (launch/*.sh, *.sbatch), leave this rank's exit code there: torchrun
    reports any failing worker as 1, and the launch scripts give back what the ranks said (4 for a
    clean stop on a signal, 2 for invalid input, 3 for a failed validation)."""
    folder = os.environ.get("MREM_EXIT_DIR")
    if folder:
        from mrem_dist.distributed import env_rank

        try:
            with open(os.path.join(folder, f"rank{env_rank()}.code"), "w") as f:
                f.write(f"{code}\n")
        except OSError as e:
            log.warning("could not record the exit code in MREM_EXIT_DIR=%s: %s", folder, e)


def main() -> None:
    code = 1
    try:
        if env_world_size() > 1 and "--help" not in sys.argv and "-h" not in sys.argv:
            sys.argv += _join_ranks(sys.argv[1:])
        _hydra_main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        raise
    finally:
        _record_exit(code)
        if env_world_size() > 1:
            from mrem_dist.distributed import teardown_distributed

            teardown_distributed()


if __name__ == "__main__":
    sys.exit(main())
