"""`quantization.json`, mrem-dist's artifact schema: written and read here, versioned, and
independent of the Hydra config classes (renaming a config field cannot change what an artifact
means; a change of this schema is a new VERSION, with a reader for the old one).

Version 1 (every artifact so far):

    format      "mrem-dist-quantized"
    version     1
    kind        the task: "encoder" (bare backbone) or "classifier" (sequence classification)
    model_type  config.json's model_type
    source      the full-precision model it was quantized from (what `mrem_dist.evaluate`
                compares against), or null
    quant       the scheme: exactly the SCHEME_FIELDS below
    modules     per quantized module: kind (linear | embedding), bits, symmetric, ternary,
                granularity, groups, shape, dtype, and outlier_columns when it has any
    sha256      {file name: SHA-256} of model.safetensors
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mrem_dist.scheme import QuantScheme

FORMAT = "mrem-dist-quantized"
VERSION = 1
META = "quantization.json"
# The scheme's fields as version 1 stores them (the names are the schema's, whatever the dataclass's).
SCHEME_FIELDS = ("name", "w_bits", "e_bits", "a_bits", "w_symmetric", "w_full_range", "w_granularity", "w_groups",
                 "w_clip", "aciq_prior", "ternary", "ocs_ratio", "ocs_quant_aware", "a_mode", "a_symmetric", "a_clip",
                 "e_granularity")


class ArtifactError(ValueError):
    """A saved artifact cannot be loaded; the message names the file and the problem."""


@dataclass
class ModuleEntry:
    """One quantized Linear or Embedding: how its packed codes are read back."""

    kind: str  # "linear" or "embedding"
    bits: int
    symmetric: bool
    ternary: bool
    granularity: str
    groups: int  # rows of its scale tensor
    shape: list[int]
    dtype: str
    outlier_columns: int = 0  # PreQuant's full-precision input columns

    def to_json(self) -> dict:
        out = {"kind": self.kind, "bits": self.bits, "symmetric": self.symmetric, "ternary": self.ternary,
               "granularity": self.granularity, "groups": self.groups, "shape": list(self.shape), "dtype": self.dtype}
        if self.outlier_columns:
            out["outlier_columns"] = self.outlier_columns
        return out

    @classmethod
    def from_json(cls, d: dict) -> "ModuleEntry":
        return cls(d["kind"], int(d["bits"]), bool(d["symmetric"]), bool(d["ternary"]), d["granularity"],
                   int(d["groups"]), [int(x) for x in d["shape"]], d["dtype"], int(d.get("outlier_columns", 0)))


@dataclass
class ArtifactMeta:
    kind: str
    model_type: str
    scheme: QuantScheme
    modules: dict[str, ModuleEntry] = field(default_factory=dict)
    source: Optional[str] = None
    sha256: dict[str, str] = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "kind": self.kind, "model_type": self.model_type,
            "source": self.source, "quant": {k: getattr(self.scheme, k) for k in SCHEME_FIELDS},
            "modules": {name: m.to_json() for name, m in self.modules.items()}, "sha256": dict(self.sha256),
        }

    @classmethod
    def from_json(cls, d: dict, where: Path) -> "ArtifactMeta":
        if d.get("format") != FORMAT:
            raise ArtifactError(f"{where}: format {d.get('format')!r} is not {FORMAT!r}")
        if d.get("version") != VERSION:
            raise ArtifactError(
                f"{where}: format version {d.get('version')!r} is not supported by this mrem-dist "
                f"(it reads version {VERSION}): use the mrem-dist release that wrote it, or re-export"
            )
        try:
            quant = d["quant"]
            unknown = sorted(set(quant) - set(SCHEME_FIELDS))
            missing = sorted(set(SCHEME_FIELDS) - set(quant))
            if unknown or missing:
                raise ArtifactError(f"{where}: the quant scheme has unknown fields {unknown} / lacks {missing}: "
                                    "the file is corrupt or not written by mrem-dist")
            scheme = QuantScheme(**{k: quant[k] for k in SCHEME_FIELDS})
            modules = {name: ModuleEntry.from_json(m) for name, m in d["modules"].items()}
            return cls(d["kind"], d["model_type"], scheme, modules, d.get("source"), dict(d["sha256"]))
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ArtifactError):
                raise
            raise ArtifactError(f"{where}: a field is missing or malformed ({type(e).__name__}: {e})") from e


def write_meta(folder: Path, meta: ArtifactMeta) -> None:
    (folder / META).write_text(json.dumps(meta.to_json(), indent=1) + "\n")


def read_meta(path: Path) -> ArtifactMeta:
    meta_file = path / META
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a directory: give the directory export_quantized wrote")
    if not meta_file.is_file():
        raise ArtifactError(f"{meta_file} is missing: {path} is not an mrem-dist artifact (or was copied incompletely)")
    try:
        d = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{meta_file} is not valid JSON ({e}): the file is corrupt") from e
    return ArtifactMeta.from_json(d, meta_file)
