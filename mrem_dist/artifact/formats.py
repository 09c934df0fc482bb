"""The export formats behind one interface: what a run's `export.format` list names ("mrem",
"compressed-tensors"), each as a shard of a model (or of a rank's modules) and a writer of the
merged shards (artifact/shard.py)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from mrem_dist.scheme import QuantScheme

from .compressed_tensors import ct_shard, write_compressed_tensors
from .export import TENSORS, mrem_shard, write_mrem
from .shard import Manifest, Shard


@dataclass(frozen=True)
class ExportInfo:
    """What every format records beside the tensors, the same for every shard of a run."""

    tokenizer: Any
    scheme: QuantScheme
    kind: str  # Task.kind
    family: str  # ModelFamily.name
    source: Optional[str] = None  # the full-precision model (what mrem_dist.evaluate compares against)
    dtype: Optional[str] = None  # compressed-tensors: cast the unquantized tensors and scales to it

    def shard(self, fmt: str, model: nn.Module, held: Optional[Callable[[str], bool]] = None) -> Shard:
        """`fmt`'s part of `model`: all of it, or the state names `held` keeps."""
        if fmt == "mrem":
            return mrem_shard(model, held)
        return ct_shard(model, self.scheme, self.family, self.dtype, held)

    def write(self, fmt: str, path: str | os.PathLike, manifest: Manifest,
              stream: Iterable[tuple[str, torch.Tensor]], model: nn.Module) -> int:
        """Write `fmt`'s folder at `path` from the manifest and the stream of its tensors; `model`:
        any model of the architecture (config, class, module order). Returns the tensor file's bytes."""
        if fmt == "mrem":
            meta = write_mrem(path, manifest, stream, model, self.tokenizer, self.scheme, self.kind, self.source)
            return meta["bytes"][TENSORS]
        return write_compressed_tensors(path, manifest, stream, model, self.tokenizer, self.scheme, self.kind,
                                        self.source, self.dtype)["bytes"]
