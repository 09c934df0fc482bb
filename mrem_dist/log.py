"""One logger for the package, with the process rank in every record (`%(rank)s`)."""

from __future__ import annotations

import logging

from mrem_dist.distributed import env_rank

_base_factory = logging.getLogRecordFactory()


def _record_factory(*args, **kwargs) -> logging.LogRecord:
    record = _base_factory(*args, **kwargs)
    record.rank = env_rank()
    return record


# Installed at import, before Hydra configures handlers whose format names %(rank)s.
logging.setLogRecordFactory(_record_factory)


def get_logger(name: str = "mrem_dist") -> logging.Logger:
    return logging.getLogger(name)
