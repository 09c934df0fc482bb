"""The export formats behind one interface: what a run's `export.format` list names ("mrem",
"compressed-tensors"), each as a shard of a model (or of a rank's modules) and a writer of the
merged shards (artifact/shard.py)."""

from __future__ import annotations

import os
from typing import Callable, Iterable, Optional

import torch
from torch import nn

from .compressed_tensors import ct_shard, write_compressed_tensors
from .export import TENSORS, mrem_shard, write_mrem
from .shard import ExportInfo, Manifest, Shard


def make_shard(info: ExportInfo, fmt: str, model: nn.Module, held: Optional[Callable[[str], bool]] = None) -> Shard:
    """`fmt`'s part of `model`: all of it, or the state names `held` keeps."""
    if fmt == "mrem":
        return mrem_shard(model, held)
    return ct_shard(model, info.scheme, info.family, info.dtype, held)


def write_format(info: ExportInfo, fmt: str, path: str | os.PathLike, manifest: Manifest,
                 stream: Iterable[tuple[str, torch.Tensor]], model: nn.Module) -> int:
    """Write `fmt`'s folder at `path` from the manifest and the stream of its tensors; `model`: any
    model of the architecture (config, class, module order). Returns the tensor file's bytes."""
    if fmt == "mrem":
        return write_mrem(path, manifest, stream, model, info)["bytes"][TENSORS]
    return write_compressed_tensors(path, manifest, stream, model, info)["bytes"]
