"""Rank-to-rank streams of boundary activations (the teacher f_n and the student fq_n of MREM-P).

One message per step: a small int64 header (sequence number, batch index, shape, which tensors
follow) and then the tensors, sent with non-blocking point-to-point ops. Every rank builds the
same calibration batches from the same seed, so only hidden states travel; the header lets the
receiver check that both sides are at the same message and batch (a desync is an error, never
silently wrong training). A message may instead carry one yes/no and no tensors (`send_answer`,
`recv_answer`: the pipelined never-worse check's "my outputs stand"). The sender keeps at most
`depth` messages in flight: the bounded queue that lets an upstream rank run ahead of its
consumer without unbounded memory.

A failed send or receive (the peer died, or did not answer within the process group's timeout)
is re-raised as a `PeerError` naming the peer rank.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor

from mrem_dist.distributed import peer_failed

_HEADER = 6  # sequence number, batch index, batch, seq, hidden, flags
_TEACHER, _STUDENT, _STOP = 1, 2, 4  # _STOP: the sender stops after this step (a stop signal)
_YES = 8  # an answer's flag: yes
_ANSWER = -1  # the batch index of an answer (a message without tensors); a batch index is >= 0


class StreamSender:
    def __init__(self, dst: int, depth: int = 4) -> None:
        if depth < 1:
            raise ValueError(f"stream depth must be >= 1, got {depth}")
        self.dst, self.depth = dst, depth
        # (works, tensors): the tensors must stay alive until their isend has completed.
        self._inflight: deque[tuple[list, tuple[Tensor, ...]]] = deque()
        self.blocked_seconds = 0.0  # time spent waiting because the queue was full

    def send(self, seq: int, batch_index: int, teacher: Optional[Tensor], student: Optional[Tensor] = None,
             stop: bool = False) -> None:
        ref = teacher if teacher is not None else student
        if ref is None:
            raise ValueError("nothing to send: give the teacher tensor, the student tensor or both")
        if teacher is not None and student is not None and student.shape != teacher.shape:
            raise ValueError(f"student shape {tuple(student.shape)} != teacher shape {tuple(teacher.shape)}")
        self._wait_room()
        b, s, h = ref.shape
        flags = (_TEACHER if teacher is not None else 0) | (_STUDENT if student is not None else 0) | (_STOP if stop else 0)
        header = torch.tensor([seq, batch_index, b, s, h, flags], dtype=torch.int64)
        self._post((header.to(ref.device),) + tuple(x.detach().contiguous() for x in (teacher, student) if x is not None))

    def send_answer(self, seq: int, yes: bool, device: torch.device) -> None:
        """A message of one yes/no instead of tensors (StreamReceiver.recv_answer)."""
        self._wait_room()
        self._post((torch.tensor([seq, _ANSWER, 0, 0, 0, _YES if yes else 0], dtype=torch.int64, device=device),))

    def _wait_room(self) -> None:
        """Wait while the queue is full (counted as blocked)."""
        start = time.perf_counter()
        while len(self._inflight) >= self.depth:
            self._wait_oldest()
        self.blocked_seconds += time.perf_counter() - start

    def _post(self, tensors: tuple[Tensor, ...]) -> None:
        try:
            works = [dist.isend(t, self.dst) for t in tensors]
        except Exception as e:
            raise peer_failed(self.dst, "sending to", e) from e
        self._inflight.append((works, tensors))

    def _wait_oldest(self) -> None:
        works, _ = self._inflight.popleft()
        try:
            for w in works:
                w.wait()
        except Exception as e:
            raise peer_failed(self.dst, "sending to", e) from e

    def flush(self) -> None:
        start = time.perf_counter()
        while self._inflight:
            self._wait_oldest()
        self.blocked_seconds += time.perf_counter() - start


class StreamReceiver:
    def __init__(self, src: int, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        self.src, self.device, self.dtype = src, device, dtype
        self.blocked_seconds = 0.0  # time spent waiting for messages
        self.stop_requested = False  # the last message said: the sender stops after this step

    def recv(self, seq: int, batch_index: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        """Block until message `seq` arrives; returns (teacher or None, student or None)."""
        start = time.perf_counter()
        try:
            b, s, h, flags = self._header(seq, batch_index)  # an answer has batch index _ANSWER: out of step
            self.stop_requested = bool(flags & _STOP)
            out = []
            for bit in (_TEACHER, _STUDENT):
                t = None
                if flags & bit:
                    t = torch.empty(b, s, h, dtype=self.dtype, device=self.device)
                    self._recv(t)
                out.append(t)
        finally:
            self.blocked_seconds += time.perf_counter() - start
        return out[0], out[1]

    def recv_answer(self, seq: int) -> bool:
        """Block until message `seq`, a StreamSender.send_answer, arrives; returns its yes/no (a
        message with tensors has a batch index >= 0: out of step)."""
        start = time.perf_counter()
        try:
            return bool(self._header(seq, _ANSWER)[3] & _YES)
        finally:
            self.blocked_seconds += time.perf_counter() - start

    def _header(self, seq: int, batch_index: int) -> tuple[int, int, int, int]:
        """Message `seq`'s header, checked: (batch, seq, hidden, flags)."""
        header = torch.empty(_HEADER, dtype=torch.int64, device=self.device)
        self._recv(header)
        got_seq, got_batch, b, s, h, flags = (int(x) for x in header.tolist())
        if (got_seq, got_batch) != (seq, batch_index):
            raise RuntimeError(
                f"stream from rank {self.src} is out of step: expected step {seq} (batch {batch_index}), "
                f"received step {got_seq} (batch {got_batch}); both ranks must use the same data, seed and steps"
            )
        return b, s, h, flags

    def _recv(self, t: Tensor) -> None:
        try:
            dist.recv(t, self.src)
        except Exception as e:
            raise peer_failed(self.src, "receiving from", e) from e
