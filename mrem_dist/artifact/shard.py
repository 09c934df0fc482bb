"""A part of an export, and the export's file written from parts that arrive one tensor at a time.

An exporter (export.py: the mrem format; compressed_tensors.py) turns a model, or the modules of it
that one rank holds, into a `Shard`: its tensors as the file stores them, the format's per-module
entries, the tied aliases. A one-process run writes its one shard; an MREM-P coordinator receives
every stage leader's `Manifest` first (names, dtypes, shapes and SHA-256 of its tensors, no data),
merges them (`Manifest.merge`: a name two ranks hold, a tied tensor, must agree), lays the file out
from the merged manifest and then writes each tensor as it arrives (`write_tensors`): no process
ever holds the whole model. Every tensor's bytes are checked against the sender's hash on arrival
and once more as they lie in the finished file, in the same pass that takes the file's checksum, so
that a tensor lost, damaged or put under another name on the way is an error, not an artifact.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Optional

import torch

from mrem_dist.scheme import QuantScheme

from .schema import ArtifactError
from .tensorfile import TensorFileWriter, TensorSpec


@dataclass(frozen=True)
class ExportInfo:
    """What every export format records beside the tensors, the same for every shard of a run."""

    tokenizer: Any
    scheme: QuantScheme
    kind: str  # Task.kind
    family: str  # ModelFamily.name
    source: Optional[str] = None  # the full-precision model (what mrem_dist.evaluate compares against)
    dtype: Optional[str] = None  # compressed-tensors: cast the unquantized tensors and scales to it


def tensor_sha256(t: torch.Tensor) -> str:
    """The SHA-256 of a tensor's bytes as a safetensors file stores them."""
    return hashlib.sha256(t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()).hexdigest()


def state_digest(digests: Mapping[str, str]) -> str:
    """One SHA-256 of a model state from its tensors' (name -> tensor_sha256): what the report
    records, so that two runs (one process and N ranks) can be compared without their tensors."""
    h = hashlib.sha256()
    for name in sorted(digests):
        h.update(f"{name}\0{digests[name]}\n".encode())
    return h.hexdigest()


@dataclass
class Manifest:
    """What a shard holds, without its data: per stored name its TensorSpec and SHA-256 (`ranks`:
    which ranks sent the name, for the errors), the format's entries, the tied aliases."""

    specs: dict[str, TensorSpec]
    digests: dict[str, str]
    modules: dict[str, Any] = field(default_factory=dict)
    tied: dict[str, str] = field(default_factory=dict)
    ranks: dict[str, int] = field(default_factory=dict)

    @classmethod
    def merge(cls, parts: Mapping[int, "Manifest"]) -> "Manifest":
        """The manifests of the ranks (rank -> manifest) as one. A name held by two ranks (a tied
        tensor both end stages keep) must have the same bytes in both."""
        out = cls({}, {})
        for rank, part in sorted(parts.items()):
            for name, digest in part.digests.items():
                if name in out.digests and (out.digests[name] != digest or out.specs[name] != part.specs[name]):
                    raise ArtifactError(f"{name} was sent by both rank {out.ranks[name]} and rank {rank}, with "
                                        "different values: every rank must run the same model and settings")
                out.specs.setdefault(name, part.specs[name])
                out.digests.setdefault(name, digest)
                out.ranks.setdefault(name, rank)
            out.modules.update(part.modules)
            out.tied.update(part.tied)
        return out


@dataclass
class Shard:
    """Tensors under the names the file stores them by, and what the format's metadata says of them."""

    tensors: dict[str, torch.Tensor]
    modules: dict[str, Any] = field(default_factory=dict)  # format-specific, per quantized module
    tied: dict[str, str] = field(default_factory=dict)  # alias -> the stored name

    def manifest(self, rank: int = 0) -> Manifest:
        return Manifest({n: TensorSpec.of(t) for n, t in self.tensors.items()},
                        {n: tensor_sha256(t) for n, t in self.tensors.items()}, dict(self.modules), dict(self.tied),
                        {n: rank for n in self.tensors})


def write_tensors(path: str | os.PathLike, manifest: Manifest, stream: Iterable[tuple[str, torch.Tensor]],
                  metadata: Optional[Mapping[str, str]] = None) -> str:
    """Write the safetensors file of `manifest` at `path` from `stream` ((name, tensor) pairs in any
    order; a name that comes twice, a tied tensor from both end stages, is written once) and return
    the file's SHA-256. Every tensor must arrive with the bytes its sender hashed, and lie in the
    finished file with them."""
    with TensorFileWriter(path, manifest.specs, metadata) as out:
        for name, t in stream:
            if name not in manifest.digests:
                raise ArtifactError(f"{name} arrived but is in no rank's manifest of the export")
            if tensor_sha256(t) != manifest.digests[name]:
                raise ArtifactError(f"{name} arrived from rank {manifest.ranks.get(name, 0)} with other bytes than the "
                                    "rank hashed: it was damaged in transfer; nothing was written, rerun the job")
            if name in out.missing:
                out.write(name, t)
    return _check_file(path, out, manifest)


def _check_file(path: str | os.PathLike, out: TensorFileWriter, manifest: Manifest) -> str:
    """The file's SHA-256, read back once, every tensor's bytes checked against its sender's hash."""
    whole = hashlib.sha256()
    ranges = sorted((begin + out.base, end + out.base, name) for name, (begin, end) in out.offsets.items())
    with open(path, "rb") as f:
        head = f.read(out.base)
        whole.update(head)
        for begin, end, name in ranges:
            data = f.read(end - begin)
            whole.update(data)
            if hashlib.sha256(data).hexdigest() != manifest.digests[name]:
                raise ArtifactError(f"{name}: the bytes written to {path} differ from the ones rank "
                                    f"{manifest.ranks.get(name, 0)} sent (a full disk or a failing file system?)")
        rest = f.read()
        if rest:
            raise ArtifactError(f"{path}: {len(rest)} bytes after the last tensor")
    return whole.hexdigest()
