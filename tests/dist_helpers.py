"""Run a function on N real processes joined in a gloo process group (the way torchrun would
set them up: RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT)."""

from __future__ import annotations

import os
import socket

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, fn, world_size: int, port: int, args: tuple) -> None:
    os.environ.update({
        "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1",
    })
    fn(rank, *args)


def run_ranks(fn, world_size: int, *args) -> None:
    """fn(rank, *args) on `world_size` spawned processes; re-raises a rank's exception."""
    mp.spawn(_entry, args=(fn, world_size, free_port(), args), nprocs=world_size, join=True)


def run_ranks_unsupervised(fn, world_size: int, timeout: float, *args) -> list[int]:
    """Like run_ranks, but nobody kills the other ranks when one fails: each rank has to stop by
    itself (what the code under test must guarantee). Returns every rank's exit code; a rank still
    running after `timeout` seconds is killed and reported as None."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, fn, world_size, port, args)) for r in range(world_size)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout)
    codes = []
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
            codes.append(None)
        else:
            codes.append(p.exitcode)
    return codes


def capture_states(out_dir, rank: int) -> None:
    """In a rank's process, before the run: save the trained state of the modules it sends (a
    stage leader's) to <out_dir>/state<rank>.pt, where gathered_state finds it. No process of a
    multi-rank run holds the whole model; the test puts it together from the leaders'."""
    from pathlib import Path

    import torch

    from mrem_dist.drivers import parallel

    original = parallel.owned_state

    def saving(model, owner, held):
        state = original(model, owner, held)
        torch.save(state, Path(out_dir) / f"state{rank}.pt")
        return state

    parallel.owned_state = saving


def gathered_state(out_dir) -> dict:
    """The whole model's state from the leaders' (capture_states), as one process's state_dict."""
    from pathlib import Path

    import torch

    state = {}
    for f in sorted(Path(out_dir).glob("state*.pt")):
        for name, t in torch.load(f).items():
            assert name not in state or torch.equal(state[name], t), name  # a tied tensor: the same from both
            state[name] = t
    return state
