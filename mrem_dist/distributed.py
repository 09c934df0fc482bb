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

    from mrem_dist.layout import ParallelLayout


def _env_int(key: str, default: int) -> int:
    value = os.environ.get(key, "").strip()
    if not value.isdigit():
        return default
    return int(value)


def launcher() -> str:
    """Who started this process, read in this order:

    - "torchrun": RANK / WORLD_SIZE / LOCAL_RANK (torchrun, torch.distributed.run, the deepspeed
      launcher, and srun + torchrun, where torchrun's variables describe the ranks);
    - "slurm": a task of an srun job step (SLURM_PROCID / SLURM_STEP_NUM_TASKS / SLURM_LOCALID).
      Only inside a step: the batch script itself also sees SLURM_NTASKS and SLURM_PROCID=0, and a
      plain `python -m mrem_dist` there is one process, not rank 0 of a world that never comes;
    - "single": anything else."""
    if "RANK" in os.environ or "WORLD_SIZE" in os.environ:
        return "torchrun"
    if "SLURM_PROCID" in os.environ and "SLURM_STEP_NUM_TASKS" in os.environ:
        return "slurm"
    return "single"


_KEYS = {"torchrun": ("RANK", "WORLD_SIZE", "LOCAL_RANK"), "slurm": ("SLURM_PROCID", "SLURM_STEP_NUM_TASKS", "SLURM_LOCALID")}


def env_rank() -> int:
    """Global rank as set by the launcher (see `launcher`); 0 for a single process."""
    kind = launcher()
    return 0 if kind == "single" else _env_int(_KEYS[kind][0], 0)


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
    """Rank within the node, as set by the launcher; 0 for a single process."""
    kind = launcher()
    return 0 if kind == "single" else _env_int(_KEYS[kind][2], 0)


def env_world_size() -> int:
    """Number of ranks, as set by the launcher; 1 for a single process."""
    kind = launcher()
    return 1 if kind == "single" else max(_env_int(_KEYS[kind][1], 1), 1)


def first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: "gpu[03-05,9],cpu1" -> "gpu03" (what
    `scontrol show hostnames | head -1` prints, without needing scontrol on the node)."""
    depth, end = 0, len(nodelist)
    for i, c in enumerate(nodelist):  # the first entry ends at the first comma outside brackets
        depth += (c == "[") - (c == "]")
        if c == "," and depth == 0:
            end = i
            break
    entry = nodelist[:end].strip()
    if "[" not in entry:
        return entry
    prefix, rest = entry.split("[", 1)
    ranges, suffix = rest.split("]", 1)
    return prefix + ranges.split(",", 1)[0].split("-", 1)[0] + (first_host(suffix) if suffix else "")


def _slurm_rendezvous() -> None:
    """One task per rank under srun: the first node of the step hosts the store, on a port derived
    from the job id (every task computes the same one; jobs sharing a node get different ones)."""
    nodes = os.environ.get("SLURM_STEP_NODELIST") or os.environ.get("SLURM_JOB_NODELIST") or os.environ.get("SLURM_NODELIST")
    if "MASTER_ADDR" not in os.environ and nodes:
        os.environ["MASTER_ADDR"] = first_host(nodes)
    if "MASTER_PORT" not in os.environ and "SLURM_JOB_ID" in os.environ:
        os.environ["MASTER_PORT"] = str(20000 + _env_int("SLURM_JOB_ID", 0) % 20000)


@dataclass(frozen=True)
class DistContext:
    """Who this process is in the process group. What it does there (its stage, its peers) is the
    parallel layout's business (mrem_dist/layout.py)."""

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
    launcher, or a world of 1) gets no process group at all.

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
        if launcher() == "slurm":
            _slurm_rendezvous()
        for key in ("MASTER_ADDR", "MASTER_PORT"):
            if key not in os.environ:
                raise RuntimeError(
                    f"{key} is not set for a {world}-rank run: launch with torchrun (it sets it), or export "
                    f"{key} (the first node's address / a free port) in the job script"
                )
        timeout = datetime.timedelta(seconds=timeout_s)
        dist.init_process_group(backend, rank=env_rank(), world_size=world, timeout=timeout,
                                store=_elastic_store(world, timeout))
    return DistContext(dist.get_rank(), dist.get_world_size(), env_local_rank(), dist.get_backend(), dev)


def _elastic_store(world: int, timeout: datetime.timedelta):
    """Under torchrun, the rendezvous store with keys private to this attempt; None elsewhere
    (init_process_group then reads MASTER_ADDR / MASTER_PORT itself).

    torchrun keeps one store for the whole job; after a restart (--max-restarts) the new workers
    would find the dead workers' addresses in it under the same keys, and gloo connects to those
    (measured with torch 2.13: "Gloo connectFullMesh failed ... Connection refused"). A prefix with
    the restart count keeps every attempt's keys apart."""
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    if attempt is None:
        return None
    import torch.distributed as dist

    # The agent hosts the store when it says so; otherwise rank 0 does (torch's env:// convention).
    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
    base = dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world,
                         is_master=env_rank() == 0 and not agent, timeout=timeout)
    return dist.PrefixStore(f"mrem_dist/attempt{attempt}", base)


def teardown_distributed() -> None:
    """Leave the process group if there is one; safe to call on every exit path."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


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


def stage_group(layout: "ParallelLayout"):
    """The process group of this rank's stage: its replicas, for their gradient all-reduce. None
    with one replica per stage. Every rank creates every stage's group, in stage order, as
    torch.distributed requires of new_group."""
    import torch.distributed as dist

    if layout.replicas == 1:
        return None
    groups = [dist.new_group(list(layout.ranks_of_stage(s))) for s in range(layout.stages)]
    return groups[layout.stage]


def gather_to_main(obj: Any, ctx: DistContext, layout: "ParallelLayout") -> Optional[list[Any]]:
    """Every rank's `obj` on the coordinator (rank 0), in rank order; None on the other ranks.

    Point-to-point, rank by rank, rather than a collective gather, so that a rank that died or
    timed out is named in the error."""
    if ctx.world_size == 1:
        return [obj]
    if not layout.is_coordinator:
        send_object(obj, 0, ctx, "sending results to coordinator")
        return None
    return [obj] + [recv_object(src, ctx, "the coordinator receiving results from") for src in range(1, ctx.world_size)]


def send_object(obj: Any, dst: int, ctx: DistContext, what: str) -> None:
    """Send a picklable `obj` to rank `dst`; a failure names the peer and `what` was being done."""
    import torch.distributed as dist

    try:
        dist.send_object_list([obj], dst=dst, device=ctx.device if ctx.backend == "nccl" else None)
    except Exception as e:
        raise peer_failed(dst, what, e) from e


def recv_object(src: int, ctx: DistContext, what: str) -> Any:
    """The object rank `src` sends with send_object."""
    import torch.distributed as dist

    box = [None]
    try:
        dist.recv_object_list(box, src=src, device=ctx.device if ctx.backend == "nccl" else None)
    except Exception as e:
        raise peer_failed(src, what, e) from e
    return box[0]


def send_bytes(t: "torch.Tensor", dst: int, ctx: DistContext) -> None:
    """Send a tensor's bytes (any dtype, as its raw bytes: every dtype travels on every backend) to
    `dst`, which knows its dtype and shape (recv_bytes)."""
    import torch
    import torch.distributed as dist

    data = t.detach().contiguous().reshape(-1).view(torch.uint8)
    if not data.numel():
        return
    try:
        dist.send(data.to(ctx.device) if ctx.backend == "nccl" else data.cpu(), dst=dst)
    except Exception as e:
        raise peer_failed(dst, "sending the artifact's tensors to", e) from e


def recv_bytes(dtype: "torch.dtype", shape: tuple[int, ...], src: int, ctx: DistContext) -> "torch.Tensor":
    """The tensor of `dtype` and `shape` whose bytes rank `src` sends with send_bytes, on the CPU."""
    import torch
    import torch.distributed as dist

    n = torch.Size(shape).numel() * torch.empty((), dtype=dtype).element_size()
    buf = torch.empty(n, dtype=torch.uint8, device=ctx.device if ctx.backend == "nccl" else "cpu")
    if n:
        try:
            dist.recv(buf, src=src)
        except Exception as e:
            raise peer_failed(src, "the coordinator receiving the artifact's tensors from", e) from e
    return buf.cpu().view(dtype).reshape(shape)


def all_gather_objects(obj: Any, ctx: DistContext) -> list[Any]:
    """Every rank's `obj` (picklable, small), in rank order, on every rank."""
    import torch.distributed as dist

    if ctx.world_size == 1:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    try:
        dist.all_gather_object(out, obj)
    except Exception as e:
        raise RuntimeError(f"rank {ctx.rank}: the ranks could not exchange {type(obj).__name__} objects ({e}): a rank "
                           "has probably failed or stopped answering (its own error is in its log)") from e
    return out
