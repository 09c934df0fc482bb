"""Resumable reconstruction: per-rank checkpoints of the modules being trained, and the stop signal.

Layout under the checkpoint directory (`checkpoint.dir`, which must outlive the run: a restart
gets a new timestamped run directory):

    fingerprint.json      what the checkpoints belong to: hashes of the model weights, the
                          calibration data and the settings that decide the result
    stage<S>/step<T>.ckpt the modules of stage S (parallel layout; one process: stage 0) after T
                          training steps: each module's student state, optimizer state, and
                          loss / lam history (a one-process run: module<M>_step<T>.ckpt)
    stage<S>/.lock        the process using the stage's checkpoints (pid@host)

A checkpoint file cannot carry code: its tensors are safetensors and everything else is JSON in its
header (statefile.py); nothing is ever unpickled, and the header's fingerprint is checked before a
tensor is read. A stage's folder is locked by the process using it, so two runs with the same
settings cannot train into (and then delete) the same checkpoints at once; a lock left by a dead
process is taken over. Files are written under a temporary name and renamed, so a crash leaves
either the old or the new checkpoint, never half of one. Ranks checkpoint at the same steps but not at the same moment (an
upstream rank runs up to `queue` steps ahead of the next), so each keeps enough old ones that the
step every rank has reached is still on disk; a restart resumes all ranks from that step.

A checkpoint whose fingerprint differs from the run's is refused with the differing parts named:
stale state is never mixed in.
"""

from __future__ import annotations

import atexit
import hashlib
import json
import math
import os
import shutil
import signal
import socket
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from mrem_dist.data import Batch
from mrem_dist.io import pid_alive
from mrem_dist.log import get_logger

from .statefile import StateFileError, load_state, read_header, save_state

log = get_logger(__name__)

RESUME_MODES = ("auto", "never")
FINGERPRINT = "fingerprint.json"
# Exit code of a run stopped by SIGTERM / SIGUSR1 after writing its checkpoint: rerun to resume.
PREEMPTED_EXIT_CODE = 4


class CheckpointMismatch(RuntimeError):
    """The checkpoint directory holds checkpoints of a different run."""


@dataclass(frozen=True)
class Fingerprint:
    model: str
    data: str
    settings: str

    def differences(self, other: "Fingerprint") -> list[str]:
        return [k for k in ("model", "data", "settings") if getattr(self, k) != getattr(other, k)]


def fingerprint(model: nn.Module, batches: Sequence[Batch], settings: dict,
                gather: Optional[Callable[[dict], list[dict]]] = None) -> Fingerprint:
    """Hashes of the full-precision weights (values, not file names), of the calibration batches
    (token ids and masks, in order), and of `settings` (everything else that decides the result).

    The weights' hash is over one hash per named tensor. A rank of a parallel run holds only its
    partition (the other tensors are empty): `gather` (every rank's dict, on every rank) merges the
    ranks' hashes, so every stage computes the same fingerprint of the whole model, whichever rank
    count and loading it ran with."""
    tensors = {name: hashlib.sha256(t.detach().cpu().reshape(-1).view(torch.uint8).numpy().tobytes()).hexdigest()
               for name, t in model.state_dict().items() if t.numel()}
    if gather is not None:
        for part in gather(tensors):
            tensors.update(part)
    m = hashlib.sha256()
    for name, digest in sorted(tensors.items()):
        m.update(f"{name}={digest};".encode())
    d = hashlib.sha256()
    for b in batches:
        for t in (b.input_ids, b.attention_mask, b.token_type_ids):
            if t is not None:
                d.update(t.cpu().contiguous().numpy().tobytes())
    s = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode())
    return Fingerprint(m.hexdigest()[:16], d.hexdigest()[:16], s.hexdigest()[:16])


SUFFIX = ".ckpt"
LOCK = ".lock"


class CheckpointLock:
    """An exclusive claim on a folder of checkpoints: a file holding `pid@host`, created with
    O_EXCL. A lock of a process that no longer runs on this host is stale and taken over."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / LOCK
        self.held = False

    def acquire(self) -> None:
        if self.held:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = f"{os.getpid()}@{socket.gethostname()}"
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                owner = self.path.read_text().strip() if self.path.is_file() else ""
                pid, _, host = owner.partition("@")
                if owner == me:
                    break
                if host == socket.gethostname() and pid.isdigit() and not pid_alive(int(pid)):
                    log.warning("taking over %s: its process %s is gone", self.path, owner)
                    self.path.unlink(missing_ok=True)
                    continue
                raise CheckpointMismatch(
                    f"{self.path.parent} is in use by another run ({owner or 'unknown'}): two runs with the same "
                    "settings would overwrite and delete each other's checkpoints. Wait for it, point checkpoint.dir "
                    f"elsewhere, or delete {self.path} if that run is gone")
            with os.fdopen(fd, "w") as f:
                f.write(me + "\n")
            break
        self.held = True
        # Released however this process ends short of a kill -9 (a preempted rank included), so that a
        # job requeued onto another node, where this pid cannot be checked, finds the folder free.
        atexit.register(self.release)

    def release(self) -> None:
        if self.held:
            try:
                if self.path.read_text().strip() == f"{os.getpid()}@{socket.gethostname()}":
                    self.path.unlink()
            except OSError:  # gone already (the run's checkpoints were removed)
                pass
            self.held = False


class Checkpointer:
    """One stage's checkpoints (written by its leader). `every`: steps between checkpoints (0: only
    on a stop signal). `keep`: how many of its latest checkpoints it keeps (see the module docstring).
    writer=False: a data-parallel replica that is not its stage's leader, which reads the leader's
    checkpoints to resume from the same step and writes, locks and discards nothing."""

    def __init__(self, root: str | os.PathLike, fp: Fingerprint, stage: int, every: int, keep: int = 2,
                 resume: str = "auto", writer: bool = True) -> None:
        if resume not in RESUME_MODES:
            raise ValueError(f"checkpoint.resume={resume!r} is not one of {', '.join(RESUME_MODES)}")
        self.root, self.fp, self.stage, self.every, self.keep = Path(root), fp, stage, every, max(keep, 2)
        self.resume, self.writer = resume, writer
        self.dir = self.root / f"stage{stage}"
        self.lock = CheckpointLock(self.dir)

    @staticmethod
    def keep_for(stages: int, queue: int, every: int) -> int:
        """Checkpoints a stage must keep so that the step the last stage reached is still there:
        stage 0 can be up to (stages - 1) * queue steps ahead of the last one."""
        return 2 + (math.ceil((stages - 1) * queue / every) if every else 0)

    def prepare(self) -> None:
        """Lock this stage's folder, then check (resume=auto) or discard (resume=never) what it
        holds. Every stage checks for itself."""
        if self.writer:
            self.lock.acquire()
        meta = self.root / FINGERPRINT
        if self.resume == "never":
            if not self.writer:  # the leader discards them (resume takes the lowest step of all ranks)
                return
            for old in self.dir.glob(f"*{SUFFIX}"):
                old.unlink()
            if self.stage == 0:
                meta.unlink(missing_ok=True)
            return
        if meta.is_file():
            try:
                stored = Fingerprint(**json.loads(meta.read_text()))
            except (ValueError, TypeError) as e:
                raise CheckpointMismatch(f"{meta} is unreadable ({e}): delete {self.root} or set checkpoint.resume=never") from e
            diff = stored.differences(self.fp)
            if diff:
                raise CheckpointMismatch(
                    f"{self.root} holds checkpoints of a different run (its {', '.join(diff)} differ from this run's): "
                    f"they are not used. Set checkpoint.resume=never to discard them, point checkpoint.dir "
                    f"elsewhere, or delete {self.root}"
                )

    def _file(self, step: int, tag: str) -> Path:
        return self.dir / f"{tag}step{step:08d}{SUFFIX}"

    def steps_on_disk(self, tag: str = "") -> list[int]:
        """Steps checkpointed under `tag` (a module name in a one-process run; "" for a stage's modules)."""
        if not self.dir.is_dir():
            return []
        digits = (p.stem[len(tag) + 4:] for p in self.dir.glob(f"{tag}step*{SUFFIX}"))
        return sorted(int(d) for d in digits if d.isdigit())

    def _header(self, path: Path) -> dict:
        """The checkpoint's JSON header, refused unless it is this run's (before any tensor is read)."""
        try:
            header = read_header(path)
        except StateFileError as e:
            raise CheckpointMismatch(f"{e}: delete {self.root} or set checkpoint.resume=never") from e
        if header.get("fingerprint") != asdict(self.fp):
            raise CheckpointMismatch(f"{path} belongs to a different run: delete {self.root} or set checkpoint.resume=never")
        return header

    def latest(self, tag: str = "") -> int:
        """The latest step on disk (0: none), or 0 with resume=never."""
        steps = self.steps_on_disk(tag) if self.resume == "auto" else []
        return steps[-1] if steps else 0

    def load(self, step: int, trainers: list, tag: str = "") -> dict:
        """Load the trainers' state at `step`; returns what was saved with it as `extra`."""
        path = self._file(step, tag)
        if not path.is_file():
            raise CheckpointMismatch(
                f"stage {self.stage} has no checkpoint of step {step} in {self.dir} (it has {self.steps_on_disk(tag)}): "
                f"the stages' checkpoints do not fit together; delete {self.root} or set checkpoint.resume=never"
            )
        header = self._header(path)
        if header.get("modules") != len(trainers):
            raise CheckpointMismatch(f"{path} holds {header.get('modules')} modules, this stage trains {len(trainers)}: "
                                     f"delete {self.root} or set checkpoint.resume=never")
        try:
            modules = load_state(path)
        except StateFileError as e:
            raise CheckpointMismatch(f"{e}: delete {self.root} or set checkpoint.resume=never") from e
        for trainer, module_state in zip(trainers, modules):
            trainer.load_state_dict(module_state)
        log.info("stage %d: resumed from %s (step %d)", self.stage, path, step)
        return header.get("extra") or {}

    def extra(self, step: int, tag: str = "") -> Optional[dict]:
        """What was saved with the checkpoint of `step` as `extra` (None: no such checkpoint, or none saved)."""
        path = self._file(step, tag)
        if self.resume != "auto" or not path.is_file():
            return None
        return self._header(path).get("extra")

    def save(self, step: int, trainers: list, tag: str = "", extra: Optional[dict] = None) -> None:
        if not self.writer:
            return
        self.lock.acquire()
        meta = self.root / FINGERPRINT
        if not meta.is_file():  # every rank writes the same content: whoever comes first
            tmp = meta.with_name(f"{meta.name}.{self.stage}.tmp")
            tmp.write_text(json.dumps(asdict(self.fp), indent=1) + "\n")
            os.replace(tmp, meta)
        header = {"fingerprint": asdict(self.fp), "step": step, "modules": len(trainers), "extra": extra}
        save_state(self._file(step, tag), [tr.state_dict() for tr in trainers], header)
        for old in self.steps_on_disk(tag)[: -self.keep]:
            self._file(old, tag).unlink(missing_ok=True)
        log.info("stage %d: checkpoint at step %d -> %s", self.stage, step, self._file(step, tag))

    def due(self, done: int, total: int) -> bool:
        """A periodic checkpoint after `done` steps (none after the last: the run ends there)."""
        return bool(self.every) and done % self.every == 0 and done < total

    def remove(self) -> None:
        """Delete every checkpoint of the run (after its artifact is written), and checkpoint.dir
        itself when nothing else is left in it."""
        self.lock.release()
        shutil.rmtree(self.root, ignore_errors=True)
        try:
            self.root.parent.rmdir()
        except OSError:  # other runs' checkpoints are there, or it is gone already
            pass


class StopSignal:
    """SIGTERM / SIGUSR1 (SLURM's pre-timeout warning, torchrun shutting down) set a flag instead
    of killing the process; the training loop checks it at step boundaries, checkpoints and exits
    with PREEMPTED_EXIT_CODE. Installed for the duration of a `with` block, in the main thread.

    A handler that was there before (submitit's, which requeues the job) is called when the block
    ends after a signal: our checkpoint first, then its requeue."""

    SIGNALS = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.received: Optional[str] = None
        self._old: dict = {}

    def _handle(self, signum, _frame) -> None:
        self.received = signal.Signals(signum).name
        log.warning("received %s: stopping at the next step boundary after a checkpoint", self.received)

    def __enter__(self) -> "StopSignal":
        for name in self.SIGNALS:
            sig = getattr(signal, name, None)
            if sig is not None:
                try:
                    self._old[sig] = signal.signal(sig, self._handle)
                except ValueError:  # not the main thread: leave the default handling
                    pass
        return self

    def __exit__(self, *exc) -> None:
        for sig, old in self._old.items():
            signal.signal(sig, old)
        if self.received is not None:
            previous = self._old.get(getattr(signal, self.received))
            if callable(previous):
                previous(getattr(signal, self.received), None)


class Preempted(Exception):
    """The run stopped on a signal after checkpointing; rerunning the same command resumes it."""

    exit_code = PREEMPTED_EXIT_CODE
