"""`quantization.json`, mrem-dist's artifact schema: written and read here, versioned, and
independent of the Hydra config classes (renaming a config field cannot change what an artifact
means; a change of this schema is a new VERSION, with a reader for the old one).

Version 4 (version 3 plus the scheme's a_full_range; version 3 plus w_group_size was version 2.
Versions 1-3 still load, as a_full_range=false and, before 3, w_group_size=0: they predate the
full activation grid and groups of input columns):

    format      "mrem-dist-quantized"
    version     4
    kind        the task: "encoder" (bare backbone) or "classifier" (sequence classification)
    model_type  config.json's model_type
    source      the full-precision model it was quantized from (what `mrem_dist.evaluate`
                compares against), or null
    quant       the scheme: exactly the SCHEME_FIELDS below
    modules     per quantized module: kind (linear | embedding), bits, symmetric, ternary,
                granularity, groups, shape, dtype, and outlier_columns when it has any
    sha256      {file name: SHA-256} of model.safetensors
    tied        (only when there are any) {alias: name}: a tensor under several names is stored once,
                under `name`, and re-tied to `alias` on load

`manifest.json` lists every other file of the folder, quantization.json, config.json and the
tokenizer files included, with its size and SHA-256. Loading checks it before reading anything
else: a file edited, truncated, missing, or added after export is refused by name. A version-1
artifact (written before manifests) has only its model.safetensors checksum checked, with a warning.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from mrem_dist.log import get_logger
from mrem_dist.scheme import QuantScheme

log = get_logger(__name__)

FORMAT = "mrem-dist-quantized"
VERSION = 4
READABLE_VERSIONS = (1, 2, 3, 4)
META = "quantization.json"
MANIFEST = "manifest.json"
# The scheme's fields as versions 1 and 2 store them (the names are the schema's, whatever the dataclass's).
SCHEME_FIELDS_V2 = ("name", "w_bits", "e_bits", "a_bits", "w_symmetric", "w_full_range", "w_granularity", "w_groups",
                    "w_clip", "aciq_prior", "ternary", "ocs_ratio", "ocs_quant_aware", "a_mode", "a_symmetric", "a_clip",
                    "e_granularity")
SCHEME_FIELDS_V3 = SCHEME_FIELDS_V2 + ("w_group_size",)
SCHEME_FIELDS = SCHEME_FIELDS_V3 + ("a_full_range",)
# The scheme fields of each readable version (a field a version lacks takes its default).
FIELDS_OF_VERSION = {1: SCHEME_FIELDS_V2, 2: SCHEME_FIELDS_V2, 3: SCHEME_FIELDS_V3, 4: SCHEME_FIELDS}


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
    tied: dict[str, str] = field(default_factory=dict)  # alias -> the name the tied tensor is stored under
    version: int = VERSION  # of the file it was read from

    def to_json(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "kind": self.kind, "model_type": self.model_type,
            "source": self.source, "quant": {k: getattr(self.scheme, k) for k in SCHEME_FIELDS},
            "modules": {name: m.to_json() for name, m in self.modules.items()}, "sha256": dict(self.sha256),
            **({"tied": dict(self.tied)} if self.tied else {}),
        }

    @classmethod
    def from_json(cls, d: dict, where: Path) -> "ArtifactMeta":
        if d.get("format") != FORMAT:
            raise ArtifactError(f"{where}: format {d.get('format')!r} is not {FORMAT!r}")
        if d.get("version") not in READABLE_VERSIONS:
            raise ArtifactError(
                f"{where}: format version {d.get('version')!r} is not supported by this mrem-dist "
                f"(it reads versions {', '.join(map(str, READABLE_VERSIONS))}): use the mrem-dist release that wrote "
                "it, or re-export"
            )
        try:
            quant = d["quant"]
            fields = FIELDS_OF_VERSION[d["version"]]
            unknown = sorted(set(quant) - set(fields))
            missing = sorted(set(fields) - set(quant))
            if unknown or missing:
                raise ArtifactError(f"{where}: the quant scheme has unknown fields {unknown} / lacks {missing}: "
                                    "the file is corrupt or not written by mrem-dist")
            scheme = QuantScheme(**{k: quant[k] for k in fields})
            modules = {name: ModuleEntry.from_json(m) for name, m in d["modules"].items()}
            meta = cls(d["kind"], d["model_type"], scheme, modules, d.get("source"), dict(d["sha256"]),
                       dict(d.get("tied", {})))
            meta.version = int(d["version"])
            return meta
        except (KeyError, TypeError, ValueError) as e:
            if isinstance(e, ArtifactError):
                raise
            raise ArtifactError(f"{where}: a field is missing or malformed ({type(e).__name__}: {e})") from e


def write_meta(folder: Path, meta: ArtifactMeta) -> None:
    (folder / META).write_text(json.dumps(meta.to_json(), indent=1) + "\n")


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path) -> dict:
    """manifest.json: every file of the folder (written last) with its size and SHA-256."""
    files = {f.name: {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
             for f in sorted(folder.iterdir()) if f.is_file() and f.name != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"format": FORMAT, "files": files}, indent=1) + "\n")
    return files


def verify_manifest(folder: Path) -> None:
    """Refuse, naming the file, anything that differs from what was exported."""
    manifest = folder / MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ArtifactError(f"{manifest} is corrupt ({type(e).__name__}: {e}): re-export the model") from e
    present = {f.name for f in folder.iterdir() if f.is_file() and f.name != MANIFEST}
    missing, added = sorted(set(files) - present), sorted(present - set(files))
    if missing:
        raise ArtifactError(f"{folder / missing[0]} is missing (listed in {MANIFEST}): the artifact was copied "
                            "incompletely or edited; re-export it")
    if added:
        raise ArtifactError(f"{folder / added[0]} was added after export (it is not in {MANIFEST}): remove it; an "
                            "artifact loads only the files it was written with")
    for name, entry in files.items():
        f = folder / name
        if f.stat().st_size != entry["bytes"] or sha256_file(f) != entry["sha256"]:
            raise ArtifactError(f"{f}: checksum mismatch with {MANIFEST} (the file is truncated or was modified after "
                                "export): re-export the model")


def read_meta(path: Path) -> ArtifactMeta:
    """The verified metadata of the artifact folder `path` (manifest first, for version 2)."""
    meta_file = path / META
    if not path.is_dir():
        raise ArtifactError(f"{path} is not a directory: give the directory export_quantized wrote")
    if (path / MANIFEST).is_file():
        verify_manifest(path)
    if not meta_file.is_file():
        raise ArtifactError(f"{meta_file} is missing: {path} is not an mrem-dist artifact (or was copied incompletely)")
    try:
        d = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise ArtifactError(f"{meta_file} is not valid JSON ({e}): the file is corrupt") from e
    meta = ArtifactMeta.from_json(d, meta_file)
    if meta.version >= 2 and not (path / MANIFEST).is_file():
        raise ArtifactError(f"{path / MANIFEST} is missing: a version-{meta.version} artifact lists its files there; "
                            "the folder was copied incompletely, re-export it")
    if meta.version == 1:
        log.warning("%s is a version-1 artifact (written before manifests): only model.safetensors is checksummed", path)
    return meta
