"""Rank-to-rank streams of boundary activations (the teacher f_n and the student fq_n of MREM-P).

One message per step: a small int64 header (step, batch index, shape, whether the student tensor
follows) and then the tensors, sent with non-blocking point-to-point ops. Every rank builds the
same calibration batches from the same seed, so only hidden states travel; the header's batch
index lets the receiver check that both sides are at the same batch (a desync is an error, never
silently wrong training). The sender keeps at most `depth` messages in flight: the bounded queue
that lets the frozen teacher run ahead of training without unbounded memory.
"""

from __future__ import annotations

from collections import deque
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

_HEADER = 6  # step, batch index, batch, seq, hidden, has_student


class StreamSender:
    def __init__(self, dst: int, depth: int = 4) -> None:
        if depth < 1:
            raise ValueError(f"stream depth must be >= 1, got {depth}")
        self.dst, self.depth = dst, depth
        # (works, tensors): the tensors must stay alive until their isend has completed.
        self._inflight: deque[tuple[list, tuple[Tensor, ...]]] = deque()

    def send(self, step: int, batch_index: int, teacher: Tensor, student: Optional[Tensor] = None) -> None:
        if student is not None and student.shape != teacher.shape:
            raise ValueError(f"student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}")
        while len(self._inflight) >= self.depth:
            self._wait_oldest()
        b, s, h = teacher.shape
        header = torch.tensor([step, batch_index, b, s, h, int(student is not None)], dtype=torch.int64)
        tensors = (header.to(teacher.device), teacher.detach().contiguous()) + (
            (student.detach().contiguous(),) if student is not None else ()
        )
        works = [dist.isend(t, self.dst) for t in tensors]
        self._inflight.append((works, tensors))

    def _wait_oldest(self) -> None:
        works, _ = self._inflight.popleft()
        for w in works:
            w.wait()

    def flush(self) -> None:
        while self._inflight:
            self._wait_oldest()


class StreamReceiver:
    def __init__(self, src: int, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.src, self.device, self.dtype = src, device, dtype

    def recv(self, step: int, batch_index: int) -> tuple[Tensor, Optional[Tensor]]:
        """Block until the message of `step` arrives; returns (teacher, student or None)."""
        header = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
        dist.recv(header, self.src)
        got_step, got_batch, b, s, h, has_student = (int(x) for x in header.tolist())
        if (got_step, got_batch) != (step, batch_index):
            raise RuntimeError(
                f"stream from rank {self.src} is out of step: expected step {step} (batch {batch_index}), "
                f"received step {got_step} (batch {got_batch}); both ranks must use the same data, seed and steps"
            )
        teacher = torch.empty(b, s, h, dtype=self.dtype, device=self.device)
        dist.recv(teacher, self.src)
        student = None
        if has_student:
            student = torch.empty_like(teacher)
            dist.recv(student, self.src)
        return teacher, student
