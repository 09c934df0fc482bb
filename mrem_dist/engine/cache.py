"""Boundary activations of the calibration set, in memory or on disk.

Sequential reconstruction needs, for every calibration batch, the hidden state entering the
current module (full precision and quantized). For a large model and a 4K-sample calibration set
that is gigabytes per boundary, so a store spills to disk (one file per batch, memory-mapped on
read) when the estimate exceeds the budget: bounded memory instead of an out-of-memory crash.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Optional

import torch
from torch import Tensor

# memory, disk, or auto: disk when the estimate exceeds the memory budget.
CACHE_MODES = ("auto", "memory", "disk")


def choose_cache(mode: str, bytes_needed: int, budget_gb: float) -> str:
    """'memory' or 'disk' for a run needing `bytes_needed` of live activations."""
    if mode not in CACHE_MODES:
        raise ValueError(f"cache={mode!r} is not one of {', '.join(CACHE_MODES)}: pick one of them")
    if mode != "auto":
        return mode
    return "memory" if bytes_needed <= budget_gb * 2**30 else "disk"


class ActivationStore:
    """Tensors indexed by calibration batch number; `kind` is 'memory' or 'disk'."""

    def __init__(self, kind: str, root: Optional[Path] = None, name: str = "acts") -> None:
        if kind not in ("memory", "disk"):
            raise ValueError(f"ActivationStore kind must be 'memory' or 'disk', got {kind!r}")
        self.kind = kind
        self._items: dict[int, Tensor] = {}
        self._dir: Optional[Path] = None
        if kind == "disk":
            self._dir = Path(tempfile.mkdtemp(prefix=f"mrem-{name}-", dir=root))

    def __len__(self) -> int:
        return len(self._items) if self.kind == "memory" else len(list(self._dir.glob("*.pt")))

    def put(self, index: int, tensor: Tensor) -> None:
        tensor = tensor.detach()
        if self.kind == "memory":
            self._items[index] = tensor
        else:
            torch.save(tensor.cpu().contiguous(), self._dir / f"{index}.pt")

    def get(self, index: int, device: Optional[torch.device] = None) -> Tensor:
        if self.kind == "memory":
            t = self._items[index]
        else:
            t = torch.load(self._dir / f"{index}.pt", mmap=True, weights_only=True)
        return t if device is None else t.to(device)

    def close(self) -> None:
        self._items.clear()
        if self._dir is not None:
            shutil.rmtree(self._dir, ignore_errors=True)
            self._dir = None

    def __del__(self) -> None:  # a crashed run must not leave gigabytes in /tmp
        self.close()
