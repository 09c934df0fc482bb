"""MREM-P: every rank trains its own module partition at the same time.

A rank holds the modules of its stage in the parallel layout (`layout.modules`: one module per
rank by default, a contiguous group when there are more modules than ranks), as a frozen
full-precision teacher Stage and a quantized student Stage each. At step t it receives from the
previous stage's rank (`layout.prev_rank`) the boundary
activations of batch order[t]: the teacher f_{n-1} and the student fq_{n-1}; trains each of its
modules on lam_t * f + (1 - lam_t) * fq (annealed teacher forcing, lam_t = max(1 - t/T0, 0)),
passing one module's outputs to the next inside the rank; and sends its own last f_n and fq_n
(detached: gradients never cross ranks) to the next stage's rank (`layout.next_rank`). fq_n is the student's output on its
training input of that step, so no extra forward pass is spent on the student stream.

Queue and warm-up: the first rank starts at once, rank r as soon as rank r-1 has sent step 0 (a
pipeline fill of r steps, the paper's warm-up); then a rank may run up to `queue` steps ahead of
the next one (the bounded FIFO of the stream), so nobody waits for an upstream module to finish
training. Every rank computes exactly what one process running all modules in lockstep computes,
so the result does not depend on the number of ranks (tested bit for bit).

Finish phase (method.finish_steps = D > 0): the last D steps of every module train on the
outputs of the *finished* (trained and checked) modules before it, as MREM-S does, instead of the
stream of still-training ones. A rank runs steps 0..T-D-1 in the parallel pipeline above,
checkpoints, then waits for the previous rank's finished stream (one message per finish step),
trains its modules' last D steps one module after another, each followed by its check, and streams
its own finished outputs on. The wall time grows from about T steps to T + (stages - 1) x D; D = T
with lam=zero is MREM-S.

After the training steps every module gets the never-worse check (`_settle`): measured on
held-out batches in its trained and its initial state, both fed by the kept upstream modules, it
keeps the better one, and the kept state's outputs feed the next module. Without a finish phase
the check overlaps across the ranks (`_check_pipelined`): a rank's last module sends its trained
outputs while it is measured, the next rank's first module is measured on them as they arrive,
and an answer says whether they stand (else the kept ones follow and are measured again).

The same relay carries the passes without training: calibration of the static activation ranges,
the evaluation of the initial and the final quantized model against full precision (the last stage
updates the task's streaming metric state), which also takes, on its first batches, the per-layer
error probes.

Data-parallel replicas (layout.replicas > 1): the replicas of a stage hold the same modules and
split the work. A training step's batch is cut into row shares (layout.rows), replica k trains on
share k (its stream: replica k of the stages before and after) and the stage's replicas all-reduce
their gradients once per step, each weighted by its share of the batch's real tokens, so they step
identically with the full batch's gradient of the token-mean reconstruction loss (a KD term on a
classifier head, a per-example mean, is weighted by tokens too). The evaluation (and its probes)
splits the batches (layout.batches: every replicas-th one; the coordinator merges the sums and
metric states). Calibration and the never-worse check run every batch on every replica, so their
results are identical without a reduction (calibration is one forward pass; the held-out batches
are a few). The stage leader writes the checkpoints; the other replicas resume from them.
"""

from __future__ import annotations

import time
from contextlib import ExitStack
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.func import functional_call

from mrem_dist.data import Batch
from mrem_dist.distributed import stage_group
from mrem_dist.layout import ParallelLayout
from mrem_dist.log import get_logger
from mrem_dist.memory import peak_memory_gb, release_freed_memory
from mrem_dist.models.families import ModelFamily
from mrem_dist.quant import calibrating
from mrem_dist.quant.gptq import GptqOptions

from .checkpoint import Checkpointer, Preempted, StopSignal
from .gptq import gptq_layers
from .partition import ModuleSpec
from .reconstruct import (ModuleResult, ModuleTrainer, Progress, ReconSettings, check_lam, log_kept, mix_inputs,
                          reconstruction_loss, load_snapshot, snapshot)
from .records import keep_trained
from .stage import Stage, StageOutput
from .stream import StreamReceiver, StreamSender

log = get_logger(__name__)

# visit(batch index, module position on this rank, batch, teacher output or None, student output)
Visit = Callable[[int, int, Batch, Optional[StageOutput], StageOutput], None]
# A module's inputs on one batch: (full precision, quantized upstream); None for the first module.
Inputs = tuple[Optional[Tensor], Optional[Tensor]]
# The never-worse check of one module: (error initial, error trained, "initial" or "trained" kept).
Decision = tuple[float, float, str]
# A module measured on the held-out batches: its summed errors (initial, trained) and its outputs in both states.
Measured = tuple[list[float], tuple[list[Inputs], list[Inputs]]]
# A probe's per-layer sums: layer -> (||h_q - h||^2, ||h||^2, ||h_q||^2) over the real tokens.
Probed = dict[int, tuple[float, float, float]]


@dataclass
class RankStats:
    rank: int
    modules: list[int]
    train_seconds: float
    recv_blocked_seconds: float  # waiting for the previous rank's message
    send_blocked_seconds: float  # waiting for the next rank to drain the queue
    peak_rss_gb: float  # this process's peak resident memory so far
    peak_cuda_gb: Optional[float]
    resumed_from: int = 0  # the step training started at (> 0: resumed from a checkpoint)

    @property
    def blocked_fraction(self) -> float:
        return (self.recv_blocked_seconds + self.send_blocked_seconds) / max(self.train_seconds, 1e-9)

    def as_dict(self) -> dict:
        return {
            "rank": self.rank, "modules": self.modules, "train_seconds": round(self.train_seconds, 3),
            "recv_blocked_seconds": round(self.recv_blocked_seconds, 3),
            "send_blocked_seconds": round(self.send_blocked_seconds, 3),
            "blocked_fraction": round(self.blocked_fraction, 4),
            "peak_rss_gb": round(self.peak_rss_gb, 3),
            "peak_cuda_gb": None if self.peak_cuda_gb is None else round(self.peak_cuda_gb, 3),
            "resumed_from": self.resumed_from,
        }


class RankPipeline:
    """This rank's modules and its links to the previous and next rank."""

    def __init__(
        self,
        fp_model: nn.Module,
        q_model: nn.Module,
        family: ModelFamily,
        specs: list[ModuleSpec],
        layout: ParallelLayout,
        device: torch.device,
        queue: int = 4,
    ) -> None:
        self.layout, self.rank, self.device = layout, layout.rank, device
        self.held = [specs[i] for i in layout.modules]
        self.teachers = [Stage(fp_model, family, s) for s in self.held]
        self.students = [Stage(q_model, family, s) for s in self.held]
        self.sender = StreamSender(layout.next_rank, queue) if layout.next_rank is not None else None
        dtype = next(q_model.parameters()).dtype
        self.receiver = StreamReceiver(layout.prev_rank, device, dtype) if layout.prev_rank is not None else None
        # Message counter, advanced identically on both ends of a link: a desync is caught.
        self.seq = 0
        self.group = stage_group(layout)  # the stage's replicas (None: one replica)
        self._weight = 1.0  # this replica's share of the current training batch's real tokens

    @property
    def is_last(self) -> bool:
        return self.layout.is_last_stage

    def blocked_clock(self) -> Callable[[], float]:
        """A running total of the seconds this rank has waited on its neighbours (receiving, and
        sending into a full queue), for the driver's timeline. It holds the streams, not the pipeline."""
        streams = [s for s in (self.receiver, self.sender) if s is not None]
        return lambda: sum(s.blocked_seconds for s in streams)

    # -- data-parallel replicas ---------------------------------------------------------------
    def _share(self, batch: Batch) -> Batch:
        """This replica's rows of a training batch (the batch itself with one replica), and the
        weight of its gradient in the step's all-reduce."""
        rows = batch.rows(self.layout.rows(batch.input_ids.shape[0]))
        if self.group is not None:
            self._weight = float(rows.attention_mask.sum()) / max(float(batch.attention_mask.sum()), 1.0)
        return rows

    def _sync(self, params: list[Tensor], loss: Tensor) -> float:
        """The stage's all-reduce (ModuleTrainer's sync): the replicas' gradients and losses, each
        weighted by its share of the batch's tokens, summed in one buffer, so every replica gets the
        same full-batch gradient and records the full batch's loss."""
        grads = [p.grad for p in params if p.grad is not None]
        flat = torch.cat([*(g.reshape(-1) for g in grads), loss.reshape(1).to(grads[0].dtype)]) * self._weight
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for g in grads:
            g.copy_(flat[offset:offset + g.numel()].view_as(g))
            offset += g.numel()
        return float(flat[-1])

    def _agree(self, stopping: bool) -> bool:
        """Whether any replica of the first stage got a stop signal (each may see it at another step)."""
        if self.group is None or self.receiver is not None:
            return stopping
        flag = torch.tensor([int(stopping)], device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self.group)
        return bool(flag.item())

    def _trainer(self, student: Stage, teacher: Stage, settings: ReconSettings) -> ModuleTrainer:
        return ModuleTrainer(student, teacher, settings, progress=False, sync=None if self.group is None else self._sync)

    def _recv(self, batch_index: int) -> tuple[Optional[Tensor], Optional[Tensor]]:
        if self.receiver is None:
            return None, None  # the first module embeds the token ids itself
        return self.receiver.recv(self.seq, batch_index)

    def _send(self, batch_index: int, fp: Optional[Tensor], q: Optional[Tensor], stop: bool = False) -> None:
        if self.sender is not None:
            self.sender.send(self.seq, batch_index, fp, q, stop)
        self.seq += 1

    def flush(self) -> None:
        if self.sender is not None:
            self.sender.flush()

    # -- passes without training -------------------------------------------------------------
    @torch.no_grad()
    def relay(self, batches: list[Batch], indices: list[int], *, teacher: bool, lam: float = 0.0,
              visit: Optional[Visit] = None) -> None:
        """Run this rank's modules on the given batches, from the previous rank's outputs to the
        next rank. teacher=False runs the quantized chain alone (calibration, evaluation)."""
        for i in indices:
            batch = batches[i]
            fp, q = self._recv(i)
            for k, (tch, stu) in enumerate(zip(self.teachers, self.students)):
                t_out = tch(fp, batch) if teacher else None
                s_out = stu(mix_inputs(lam, fp, q) if teacher else q, batch)
                if visit is not None:
                    visit(i, k, batch, t_out, s_out)
                fp = t_out.hidden[-1] if teacher else None
                q = s_out.hidden[-1]
            self._send(i, fp, q)
            release_freed_memory()
        self.flush()

    def gptq(self, q_model: nn.Module, family: ModelFamily, batches: list[Batch], options: GptqOptions) -> None:
        """GPTQ of this rank's layers (method.init=gptq), down the pipeline: GPTQ quantizes each
        layer on the outputs of the GPTQ-quantized layers before it, so a rank waits for the
        previous stage's last layer's outputs on every calibration batch, runs GPTQ on its own
        layers and streams its outputs on. Every rank holds only its partition, and the whole
        model's GPTQ is done once across the ranks: the weights one process's GPTQ gives, bit for
        bit. Replicas of a stage all run every batch (the same result, no reduction)."""
        hidden, base = None, self.seq
        if self.receiver is not None:  # message base + i: batch i (GPTQ needs them all before a layer)
            hidden = []
            for i in range(len(batches)):
                self.seq = base + i
                hidden.append(self._recv(i)[1])
        layers = [i for spec in self.held for i in spec.layers]
        _, outputs = gptq_layers(q_model, family, batches, options, layers, hidden)
        self.seq = base
        for i, h in enumerate(outputs):
            self._send(i, None, h)
        self.flush()

    def calibrate(self, batches: list[Batch]) -> None:
        """Static activation ranges of this rank's quantized modules, observed on the quantized
        chain exactly as a single-process calibration of the whole model would see them."""
        with ExitStack() as stack:
            for stu in self.students:
                stack.enter_context(calibrating(stu))
            self.relay(batches, list(range(len(batches))), teacher=False)

    def evaluate(self, batches: list[Batch], reduce: Callable[[Batch, StageOutput], Tensor], state,
                 probe: int = 0) -> Probed:
        """Run the full-precision and the quantized chain on the evaluation batches; the last stage
        updates the streaming metric `state` with both models' outputs (`reduce`d) batch by batch.
        The same pass (no relay of its own) probes the layer errors of this rank's layers on the
        first `probe` batches: returns their sums over the real tokens."""
        last = len(self.students) - 1
        sums: Probed = {}

        def visit(i, k, batch, t_out, s_out):
            if self.is_last and k == last:
                state.update(reduce(batch, t_out), reduce(batch, s_out), batch)
            if i >= probe:
                return
            m = batch.attention_mask.unsqueeze(-1).float()
            for layer, h_q, h in zip(self.held[k].layers, s_out.hidden, t_out.hidden):
                num, den, sq = sums.get(layer, (0.0, 0.0, 0.0))
                sums[layer] = (num + (((h_q - h) ** 2) * m).sum().item(), den + ((h**2) * m).sum().item(),
                               sq + ((h_q**2) * m).sum().item())

        self.relay(batches, self.layout.batches(len(batches)), teacher=True, lam=0.0, visit=visit)
        return sums

    def initial_states(self) -> list[dict[str, Tensor]]:
        """This rank's quantized modules as they are now (before training), to return to."""
        return [snapshot(stu, tch) for stu, tch in zip(self.students, self.teachers)]

    # -- training ------------------------------------------------------------------------------
    def _resume(self, checkpoint: Checkpointer, trainers: list[ModuleTrainer]) -> int:
        """The step to start from: the latest one that every rank has a checkpoint of (0: none)."""
        checkpoint.prepare()
        step = checkpoint.latest()
        if self.layout.world_size > 1:
            agreed = torch.tensor([step], dtype=torch.int64, device=self.device)
            dist.all_reduce(agreed, op=dist.ReduceOp.MIN)
            step = int(agreed.item())
        if step:
            checkpoint.load(step, trainers)
        return step

    def train(self, batches: list[Batch], order: list[int], settings: ReconSettings, holdout: list[Batch],
              initial: list[dict[str, Tensor]], checkpoint: Optional[Checkpointer] = None,
              stop: Optional[StopSignal] = None) -> tuple[list[ModuleResult], list[Decision], RankStats]:
        """`settings.steps` steps on batches[order[t]] for every module of this rank: the parallel
        phase (steps 0..T-D-1, the rank's modules in lockstep), then down the pipeline the finish
        phase (the last D = settings.finish_steps steps, none by default) and the never-worse check
        on the `holdout` batches against the `initial` states (`_settle`). Returns the modules'
        results, the check's (error initial, error trained, kept) per module, and the rank's stats.

        With a checkpointer: resume from the latest step every rank has a checkpoint of, and
        checkpoint every `checkpoint.every` steps and at the end of the parallel phase. With a stop
        signal: rank 0 (with replicas: the first stage's, as soon as one of them has it) stops at the
        step boundary after the signal (after the second step for a signal during the first, whose
        message went out early) and tells the next rank in that step's message, which stops
        after the same step, and so on down the pipeline: every rank
        checkpoints the same step and raises Preempted. The finish phase is not interrupted (it is
        short; a rank lost in it resumes from the end of the parallel phase)."""
        if len(order) != settings.steps:
            raise ValueError(f"the batch order has {len(order)} entries for {settings.steps} steps")
        # One progress display for the rank (a bar on a terminal, else a line every 10%): its
        # modules step together, each figure is one module's loss.
        trainers = [self._trainer(stu, tch, settings) for stu, tch in zip(self.students, self.teachers)]
        first = self._resume(checkpoint, trainers) if checkpoint is not None else 0
        names = [s.index for s in self.held]
        finish_from = settings.steps - settings.finish_steps  # the parallel phase ends here
        progress = self._progress("", finish_from, settings)
        progress.resume_at(min(first, finish_from))
        # LKD-style runs (lam = 1 throughout) never use the quantized stream: do not send it.
        use_q = settings.lam != "one"
        recv0 = self.receiver.blocked_seconds if self.receiver else 0.0
        send0 = self.sender.blocked_seconds if self.sender else 0.0
        start = time.perf_counter()
        results: list[ModuleResult] = []
        try:
            # The pipeline fill: the next rank's first step waits for this rank's first message,
            # the outputs of its modules' forward passes before any update. They go out before
            # this rank trains that step (one forward pass without gradients more), so the next
            # rank waits for the forward passes only, not for the whole step. A stop signal during
            # that step is honoured after the next one (its message has gone without the flag).
            early = first < finish_from and self.sender is not None
            if early:
                pending = self._recv(order[first])
                self._send(order[first], *self._outputs(trainers, first, self._share(batches[order[first]]), *pending, use_q))
            for t in range(first, finish_from):
                i = order[t]
                batch = self._share(batches[i])
                fp, q = pending if early and t == first else self._recv(i)
                for trainer in trainers:
                    target, out = trainer.train_step(t, batch, fp, q)
                    fp, q = target.hidden[-1], (out.hidden[-1].detach() if use_q else None)
                losses = [tr.losses[-1] for tr in trainers]
                progress.update(t, sum(losses) / len(losses), lam=trainers[-1].lams[-1],
                                **({f"m{n}": x for n, x in zip(names, losses)} if len(names) > 1 else {}))
                stopping = self._agree(self.receiver.stop_requested if self.receiver is not None
                                       else stop is not None and stop.received is not None)
                if early and t == first:
                    stopping = False  # this step's message went out already, without the flag
                else:
                    self._send(i, fp, q, stop=stopping)
                # The end of a parallel phase followed by a finish phase is always checkpointed: a
                # rank lost in the finish phase resumes there (no checkpoint is taken in it).
                if checkpoint is not None and (stopping or checkpoint.due(t + 1, settings.steps)
                                               or t + 1 == finish_from < settings.steps):
                    checkpoint.save(t + 1, trainers)
                if stopping:
                    self.flush()
                    where = f"checkpoint in {checkpoint.root}" if checkpoint is not None else "no checkpoint (checkpoint.dir=null)"
                    raise Preempted(f"rank {self.rank} stopped after step {t + 1} of {settings.steps} on a stop signal; "
                                    f"{where}: run the same command again to resume")
            self.flush()
            progress.close()  # before the finish phase's own display (closing twice is harmless)
            window_from = max(first, finish_from)
            decisions = self._settle(trainers, batches, order[window_from:], window_from, holdout, initial, settings)
            if settings.finish_steps and stop is not None and stop.received is not None:
                log.warning("rank %d: a stop signal arrived during the finish phase, which is not interrupted: "
                            "the run goes on", self.rank)
        finally:
            progress.close()
            seconds = time.perf_counter() - start
            recv = (self.receiver.blocked_seconds if self.receiver else 0.0) - recv0
            send = (self.sender.blocked_seconds if self.sender else 0.0) - send0
            results = [tr.finish(recv + send) for tr in trainers]
        rss, cuda = peak_memory_gb(self.device)
        stats = RankStats(self.rank, [s.index for s in self.held], seconds, recv, send, rss, cuda, first)
        log.info(
            "rank %d trained modules %s in %.1fs, blocked %.1f%% of it (receiving %.2fs, sending %.2fs)",
            self.rank, stats.modules, seconds, 100 * stats.blocked_fraction, recv, send,
        )
        return results, decisions, stats

    @staticmethod
    def _outputs(trainers: list[ModuleTrainer], t: int, batch: Batch, fp: Optional[Tensor], q: Optional[Tensor],
                 use_q: bool) -> tuple[Tensor, Optional[Tensor]]:
        """What this rank sends for step t, without training: its modules' chained forward passes."""
        for trainer in trainers:
            target, out = trainer.outputs(t, batch, fp, q)
            fp, q = target.hidden[-1], (out.hidden[-1] if use_q else None)
        return fp, q

    def _progress(self, doing: str, total: int, settings: ReconSettings) -> Progress:
        """The rank's progress display over `total` steps (a bar on a terminal, else a line every
        10%), named by its modules (and its rank when there are several)."""
        names = [s.index for s in self.held]
        desc = f"{doing}module{'s' if len(names) > 1 else ''} {', '.join(map(str, names))}"
        return Progress(desc if self.layout.world_size == 1 else f"rank {self.rank}: {desc}", total,
                        settings.log_every or max(total // 10, 1))

    def _settle(self, trainers: list[ModuleTrainer], batches: list[Batch], window: list[int], first: int,
                holdout: list[Batch], initial: list[dict[str, Tensor]], settings: ReconSettings) -> list[Decision]:
        """Down the pipeline, one module after another: the finish steps (steps first.. on
        batches[window]) on the finished outputs of the modules before it, then the never-worse
        check: the module measured (mean reconstruction loss at
        `check_lam`) on the held-out batches in its initial and its trained state, both fed by the
        kept modules before it; with settings.never_worse it keeps the better one. The kept state's
        outputs feed the next module; the rank's last module's go to the next rank. This is what
        MREM-S does module by module: with finish_steps = steps and lam=zero, MREM-S bit for bit.
        Without finish steps the ranks overlap their checks instead (`_check_pipelined`).

        Messages on both links: the window's batches in step order, then the held-out ones. The
        rank's first module trains on the window's messages as they arrive; a rank needs every
        held-out batch before it can decide, so it receives them all first (they are a few). The
        window's inputs stay in memory until the rank's last module is done: one boundary's
        activations of the batches it visits (at most the calibration set, as MREM-S caches)."""
        if not holdout:
            raise ValueError("no held-out calibration batches to measure the modules on: set data.holdout_samples >= 1")
        lam, base = check_lam(settings), self.seq
        if not window:
            return self._check_pipelined(holdout, initial, lam, settings)
        progress = self._progress("finishing ", len(window) * len(trainers), settings)
        train_in: dict[int, Inputs] = {}  # batch index -> the module's inputs (a batch seen twice: the same)
        held_in: list[Inputs] = []
        decisions: list[Decision] = []
        try:
            for k, trainer in enumerate(trainers):
                for j, i in enumerate(window):
                    if k == 0:  # message base + j carries step first + j's batch: every one is read
                        self.seq = base + j
                        received = self._recv(i)
                        train_in.setdefault(i, received)
                    trainer.train_step(first + j, self._share(batches[i]), *train_in[i])
                    progress.update(k * len(window) + j, trainer.losses[-1], lam=trainer.lams[-1])
                if k == 0:
                    for h in range(len(holdout)):  # then message base + len(window) + h: held-out batch h
                        self.seq = base + len(window) + h
                        held_in.append(self._recv(h))
                decision, held_in = self._keep_better(k, holdout, held_in, initial[k], lam, settings)
                decisions.append(decision)
                train_in = {i: self._final_outputs(k, self._share(batches[i]), x) for i, x in train_in.items()}
        finally:
            progress.close()
        self.seq = base
        for i in window:
            self._send(i, *train_in[i])
        for h, (fp, q) in enumerate(held_in):
            self._send(h, fp, q)
        self.flush()
        return decisions

    @torch.no_grad()
    def _check_pipelined(self, holdout: list[Batch], initial: list[dict[str, Tensor]], lam: float,
                         settings: ReconSettings) -> list[Decision]:
        """The never-worse check of `_settle` without a finish phase: one module after another on
        the rank (a module is decided on the kept outputs of the ones before it: measured once),
        overlapped with the previous and the next rank. Each module is measured batch by batch in
        both states (the teacher runs once), so its kept outputs are at hand when it is decided.

        The rank's first module measures each batch of what the previous rank sends first as it
        arrives: that rank's last module sends its trained outputs batch by batch while it is
        being measured, then answers whether they stand (they do unless that module kept its
        initial state, or the rank's inputs did not stand and it has one module), and after a no
        sends its kept outputs, on which the first module is measured again. A pipeline so waits
        for one module of each rank, not for every module of the ranks before.

        Messages on both links: the n held-out batches' first outputs, the answer, the n kept
        outputs after a no (their numbers skipped after a yes)."""
        base, n, last = self.seq, len(holdout), len(self.students) - 1
        send_from = base if self.sender is not None else None  # the last module sends its trained outputs

        def first_outputs() -> Iterator[Inputs]:  # the previous rank's, as the first module needs them
            for h in range(n):
                self.seq = base + h
                yield self._recv(h)

        sent_stand = True  # whether the outputs this rank sends first are measured on the right inputs
        measured = self._measure_module(0, holdout, first_outputs(), initial[0], lam, settings,
                                        send_from if last == 0 else None)
        if self.receiver is not None and not self.receiver.recv_answer(base + n):
            kept_upstream = []
            for h in range(n):
                self.seq = base + n + 1 + h
                kept_upstream.append(self._recv(h))
            sent_stand = last > 0  # a one-module rank has sent what it measured on the outputs sent first
            measured = self._measure_module(0, holdout, kept_upstream, initial[0], lam, settings, None)
        decision, outputs = self._decide(0, measured, initial[0], settings)
        decisions = [decision]
        for k in range(1, last + 1):
            measured = self._measure_module(k, holdout, outputs, initial[k], lam, settings, send_from if k == last else None)
            decision, outputs = self._decide(k, measured, initial[k], settings)
            decisions.append(decision)
        if self.sender is not None:
            answer = sent_stand and decisions[-1][2] == "trained"
            self.sender.send_answer(base + n, answer, self.device)
            if not answer:
                for h, (fp, q) in enumerate(outputs):
                    self.seq = base + n + 1 + h
                    self._send(h, fp, q)
        self.seq = base + 2 * n + 1  # the same on every rank, whatever was answered
        self.flush()
        return decisions

    @torch.no_grad()
    def _final_outputs(self, k: int, batch: Batch, inputs: Inputs) -> tuple[Tensor, Tensor]:
        """Module k's teacher output and its student's on the quantized chain, as the final model
        runs it (and as the sequential engine caches it for the next module)."""
        fp, q = inputs
        return (self.teachers[k](fp, batch, logits=False).hidden[-1],
                self.students[k](mix_inputs(0.0, fp, q), batch, logits=False).hidden[-1])

    @torch.no_grad()
    def _keep_better(self, k: int, holdout: list[Batch], inputs: list[Inputs], initial: dict[str, Tensor], lam: float,
                     settings: ReconSettings) -> tuple[Decision, list[Inputs]]:
        """The never-worse check of module k (see _settle): its decision and the kept state's
        outputs on the held-out batches (only module outputs are kept)."""
        return self._decide(k, self._measure_module(k, holdout, inputs, initial, lam, settings, None), initial, settings)

    def _measure_module(self, k: int, holdout: list[Batch], inputs: Iterable[Inputs], initial: dict[str, Tensor],
                        lam: float, settings: ReconSettings, send_from: Optional[int]) -> Measured:
        """Module k on every held-out batch (`_measure`): its errors summed over the batches and its
        outputs, in the initial and in the trained state. `send_from`: send each batch's trained
        outputs to the next rank as they are computed, as messages send_from + batch."""
        errors, outs = [0.0, 0.0], ([], [])  # initial, trained
        for h, ((fp, q), b) in enumerate(zip(inputs, holdout)):
            t, states = self._measure(k, b, fp, q, initial, lam, settings)
            for j, (error, o) in enumerate(states):
                errors[j] += error
                outs[j].append((t, o))
            if send_from is not None:
                self.seq = send_from + h
                self._send(h, t, states[1][1])
        return errors, outs

    def _decide(self, k: int, measured: Measured, initial: dict[str, Tensor],
                settings: ReconSettings) -> tuple[Decision, list[Inputs]]:
        """Module k's never-worse decision from its measured errors: it returns to its `initial`
        state when that measured better; returns the decision and the kept state's outputs."""
        (error_initial, error_trained), outs = measured
        before, after = error_initial / len(outs[0]), error_trained / len(outs[1])
        kept = "trained" if keep_trained(before, after, settings.never_worse) else "initial"
        if kept == "initial":
            load_snapshot(self.students[k], initial)
        log_kept(self.held[k], before, after, kept)
        return (before, after, kept), outs[kept == "trained"]

    def _measure(self, k: int, b: Batch, fp: Optional[Tensor], q: Optional[Tensor], initial: dict[str, Tensor],
                 lam: float, settings: ReconSettings) -> tuple[Tensor, tuple[tuple[float, Tensor], tuple[float, Tensor]]]:
        """Module k on one held-out batch at the check's input mix: the teacher's output, and the
        student's (error, output) in its initial and in its trained state. The teacher runs once;
        the initial state is run by `functional_call` (nothing is loaded or copied)."""
        tch, stu = self.teachers[k], self.students[k]
        x, t = mix_inputs(lam, fp, q), tch(fp, b, logits=False)
        before = functional_call(stu, initial, (x, b), {"logits": False}, strict=False, tie_weights=False)
        after = stu(x, b, logits=False)

        def error(o: StageOutput) -> float:
            return reconstruction_loss(o, t, b.attention_mask, settings.loss, 0.0).item()

        return t.hidden[-1], ((error(before), before.hidden[-1]), (error(after), after.hidden[-1]))
