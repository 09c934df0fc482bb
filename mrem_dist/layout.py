"""The parallel layout: which rank does what in a parallel run. The only place that turns rank numbers
into roles; no other code computes a peer from a rank number.

    world size = stages x replicas            stage s holds modules stage_modules[s]
    rank r:  stage = r // replicas,  replica = r % replicas
    the replicas of a stage: ranks [s * replicas, (s + 1) * replicas); its leader is the first one
    the stream: replica k of stage s receives from replica k of stage s - 1 and sends to stage s + 1

Module partitions are spread over the stages as evenly as possible, earlier stages taking the extra
ones (5 modules on 2 stages: [0-2], [3-4]). With one replica per stage (the default while there are
no more ranks than modules) stage == rank and the leader of every stage is the rank itself; with
more ranks than modules the replicas are derived (8 ranks, 4 modules: 4 stages x 2 replicas), or
set (method.replicas). The replicas of a stage split each training batch's rows and all-reduce
their gradients (engine/parallel.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional


def stage_modules(num_modules: int, stages: int) -> tuple[range, ...]:
    """The contiguous group of module indices of each stage."""
    if stages < 1:
        raise ValueError(f"the number of stages must be >= 1, got {stages}")
    if num_modules < stages:
        raise ValueError(
            f"{stages} ranks but only {num_modules} module partitions: every rank needs at least one. "
            f"Use at most {num_modules} ranks (--nproc_per_node={num_modules}) or more modules "
            f"(method.modules={stages} or higher, at most the number of layers)"
        )
    base, extra = divmod(num_modules, stages)
    out, start = [], 0
    for s in range(stages):
        n = base + (1 if s < extra else 0)
        out.append(range(start, start + n))
        start += n
    return tuple(out)


@dataclass(frozen=True)
class ParallelLayout:
    """This rank's place in a world of `stages x replicas` ranks."""

    rank: int
    world_size: int
    modules_of_stage: tuple[range, ...]  # module indices held by every stage
    replicas: int = 1

    @classmethod
    def build(cls, rank: int, world_size: int, num_modules: int, replicas: int = 1) -> "ParallelLayout":
        """replicas=0: derived, 1 while world_size <= num_modules, else world_size / num_modules."""
        if replicas < 0:
            raise ValueError(f"method.replicas={replicas} must be >= 0 (0: derived from the ranks and modules)")
        if replicas == 0:
            if world_size > num_modules and world_size % num_modules:
                raise ValueError(
                    f"{world_size} ranks do not split into stages x replicas of {num_modules} module partitions: "
                    f"use a multiple of {num_modules} ranks, method.modules={world_size}, or set method.replicas")
            replicas = 1 if world_size <= num_modules else world_size // num_modules
        if world_size % replicas:
            raise ValueError(f"{world_size} ranks are not stages x replicas with method.replicas={replicas}: "
                             f"use a world size that is a multiple of {replicas}")
        if replicas > 1 and world_size // replicas > num_modules:
            raise ValueError(f"{world_size // replicas} stages ({world_size} ranks / method.replicas={replicas}) but only "
                             f"{num_modules} module partitions: every stage needs at least one. Use more replicas "
                             f"(method.replicas={world_size // num_modules if world_size % num_modules == 0 else 0}) "
                             f"or more modules (method.modules={world_size // replicas})")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside a world of {world_size}")
        return cls(rank, world_size, stage_modules(num_modules, world_size // replicas), replicas)

    @classmethod
    def single(cls, num_modules: int) -> "ParallelLayout":
        """One process holding every module (in lockstep)."""
        return cls.build(0, 1, num_modules)

    # -- this rank ---------------------------------------------------------------------------
    @property
    def stages(self) -> int:
        return len(self.modules_of_stage)

    @property
    def stage(self) -> int:
        return self.rank // self.replicas

    @property
    def replica(self) -> int:
        return self.rank % self.replicas

    @property
    def modules(self) -> range:
        """The module indices this rank trains."""
        return self.modules_of_stage[self.stage]

    @property
    def is_first_stage(self) -> bool:
        return self.stage == 0

    @property
    def is_last_stage(self) -> bool:
        return self.stage == self.stages - 1

    @property
    def is_coordinator(self) -> bool:
        """The rank that assembles, validates and writes (rank 0)."""
        return self.rank == 0

    # -- peers -------------------------------------------------------------------------------
    def ranks_of_stage(self, stage: int) -> range:
        return range(stage * self.replicas, (stage + 1) * self.replicas)

    def leader_of(self, stage: int) -> int:
        """The rank that checkpoints the stage and reports it to the coordinator."""
        return self.ranks_of_stage(stage)[0]

    @property
    def is_leader(self) -> bool:
        return self.rank == self.leader_of(self.stage)

    @property
    def leaders(self) -> list[int]:
        return [self.leader_of(s) for s in range(self.stages)]

    @property
    def prev_rank(self) -> Optional[int]:
        """The rank this one receives the stream from (None on the first stage)."""
        return None if self.is_first_stage else self.ranks_of_stage(self.stage - 1)[self.replica]

    @property
    def next_rank(self) -> Optional[int]:
        """The rank this one sends the stream to (None on the last stage)."""
        return None if self.is_last_stage else self.ranks_of_stage(self.stage + 1)[self.replica]

    def rows(self, n: int) -> slice:
        """This replica's share of a batch of n rows (contiguous; the whole batch with one replica)."""
        return slice(n * self.replica // self.replicas, n * (self.replica + 1) // self.replicas)

    def batches(self, n: int) -> list[int]:
        """This replica's share of n batches of a pass without training (every replicas-th one)."""
        return list(range(self.replica, n, self.replicas))

    def describe(self) -> str:
        return (f"rank {self.rank} of {self.world_size}: stage {self.stage} of {self.stages}, replica {self.replica} "
                f"of {self.replicas}, modules {list(self.modules)}")
