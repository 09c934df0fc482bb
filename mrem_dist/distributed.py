"""The one place that reads launcher environments (torchrun, SLURM, single process).

Algorithm code asks this module for its rank; it never reads RANK/SLURM_PROCID itself.
"""

from __future__ import annotations

import os


def env_rank() -> int:
    """Global rank as set by the launcher: torchrun first, then SLURM, else 0 (single process)."""
    for key in ("RANK", "SLURM_PROCID"):
        value = os.environ.get(key)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def is_main_process() -> bool:
    return env_rank() == 0
