"""The one place that reads launcher environments (torchrun, SLURM, single process) and sets up
the process group.

Algorithm code asks this module for its rank; it never reads RANK/SLURM_PROCID itself.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

if TYPE_CHECKING:  # torch is imported lazily: `--help` and config errors stay fast
    import torch


def _env_int(*keys: str) -> int:
    """The first of `keys` set to an integer in the environment, else 0 (single process)."""
    for key in keys:
        value = os.environ.get(key)
        if value is not None and value.strip().isdigit():
            return int(value)
    return 0


def env_rank() -> int:
    """Global rank as set by the launcher: torchrun first, then SLURM, else 0 (single process)."""
    return _env_int("RANK", "SLURM_PROCID")


def is_main_process() -> bool:
    return env_rank() == 0


def resolve_device(name: str):
    """`auto` picks CUDA when there is a GPU (the local rank's one under torchrun/SLURM), else CPU."""
    import torch

    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        name = f"cuda:{env_local_rank() % max(torch.cuda.device_count(), 1)}"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device={name} was asked for but this machine has no CUDA device: use device=cpu or device=auto")
    return device


def env_local_rank() -> int:
    """Rank within the node: torchrun's LOCAL_RANK, then SLURM_LOCALID, else 0."""
    return _env_int("LOCAL_RANK", "SLURM_LOCALID")


def env_world_size() -> int:
    """Number of ranks: torchrun's WORLD_SIZE, then SLURM_NTASKS, else 1."""
    return max(_env_int("WORLD_SIZE", "SLURM_NTASKS"), 1)


@dataclass(frozen=True)
class DistContext:
    """Who this process is. Keep the global rank, the local rank and the stage index (which
    module partition a rank trains: see rank_modules) as separate names."""

    rank: int
    world_size: int
    local_rank: int
    backend: Optional[str]  # None: a single process without a process group
    device: "torch.device"

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def backend_for(device: "torch.device") -> str:
    """NCCL for CUDA tensors, gloo for CPU tensors: chosen from the device, never hard-coded."""
    return "nccl" if device.type == "cuda" else "gloo"


def init_distributed(device: str = "auto", timeout_s: float = 300.0) -> DistContext:
    """Join the process group the launcher described (idempotent). A single process (no
    WORLD_SIZE/SLURM_NTASKS, or a world of 1) gets no process group at all.

    Collective timeouts are `timeout_s`, so a dead peer ends a rank with an error rather than a hang.
    """
    import torch
    import torch.distributed as dist

    world = env_world_size()
    dev = resolve_device(device)
    if world == 1:
        return DistContext(0, 1, 0, None, dev)
    backend = backend_for(dev)
    if not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(
                    f"{key} is not set for a {world}-rank run: launch with torchrun (it sets it), or export "
                    f"{key} (the first node's address / a free port) in the job script"
                )
        dist.init_process_group(
            backend, rank=env_rank(), world_size=world, timeout=datetime.timedelta(seconds=timeout_s)
        )
    return DistContext(dist.get_rank(), dist.get_world_size(), env_local_rank(), dist.get_backend(), dev)


def teardown_distributed() -> None:
    """Leave the process group if there is one; safe to call on every exit path."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_modules(num_modules: int, world_size: int) -> list[range]:
    """The contiguous group of module indices each rank trains: module partitions are spread as
    evenly as possible, earlier ranks taking the extra ones (5 modules on 2 ranks: [0-2], [3-4])."""
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    if num_modules < world_size:
        raise ValueError(
            f"{world_size} ranks but only {num_modules} module partitions: every rank needs at least one. "
            f"Use at most {num_modules} ranks (--nproc_per_node={num_modules}) or more modules "
            f"(method.modules={world_size} or higher, at most the number of layers)"
        )
    base, extra = divmod(num_modules, world_size)
    out, start = [], 0
    for r in range(world_size):
        n = base + (1 if r < extra else 0)
        out.append(range(start, start + n))
        start += n
    return out


class PeerError(RuntimeError):
    """Communication with another rank failed; `peer` is that rank."""

    def __init__(self, peer: int, message: str) -> None:
        super().__init__(message)
        self.peer = peer


def peer_failed(peer: int, what: str, e: BaseException) -> PeerError:
    """The error a rank raises when `what` (e.g. 'receiving from') rank `peer` failed."""
    return PeerError(
        peer,
        f"{what} rank {peer} failed: {e}. Rank {peer} has probably failed or stopped answering "
        "(its own error is in its log); stopping this rank too",
    )


def gather_to_main(obj: Any, ctx: DistContext) -> Optional[list[Any]]:
    """Every rank's `obj` on rank 0 (in rank order), None on the other ranks.

    Point-to-point, rank by rank, rather than a collective gather, so that a rank that died or
    timed out is named in the error."""
    import torch.distributed as dist

    if ctx.world_size == 1:
        return [obj]
    if not ctx.is_main:
        try:
            dist.send_object_list([obj], dst=0, device=ctx.device if ctx.backend == "nccl" else None)
        except Exception as e:
            raise peer_failed(0, "sending results to coordinator", e) from e
        return None
    out = [obj]
    for src in range(1, ctx.world_size):
        box = [None]
        try:
            dist.recv_object_list(box, src=src, device=ctx.device if ctx.backend == "nccl" else None)
        except Exception as e:
            raise peer_failed(src, "the coordinator receiving results from", e) from e
        out.append(box[0])
    return out
