"""Train one quantized module to reproduce its full-precision twin.

`reconstruct_module` knows nothing of where its inputs come from: it pulls (batch, fp_input,
q_input) triples from a feed. The sequential driver feeds it from cached activations; the
distributed driver feeds it from the rank-to-rank streams. Every method (REM, LKD, MREM-S,
MREM-P) is this same loop with different settings.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrem_dist.data import Batch
from mrem_dist.distributed import env_world_size
from mrem_dist.log import get_logger
from mrem_dist.memory import release_freed_memory
from mrem_dist.quant import ActQuantizer, QuantEmbedding, QuantLinear, WeightQuantizer
from mrem_dist.quant.clipping import SCALE_EPS

from .stage import Stage, StageOutput

log = get_logger(__name__)


# Input mix lam*fp + (1-lam)*q: zero (REM, MREM-S), one (LKD), anneal (MREM-P, max(1 - t/t0, 0)).
LAM_SCHEDULES = ("zero", "one", "anneal")
# module_output: MSE of the module's output; every_layer: mean MSE over its layers' outputs.
LOSSES = ("module_output", "every_layer")

# (batch, full-precision input, quantized input); inputs are None for the first module.
Feed = Iterable[tuple[Batch, Optional[Tensor], Optional[Tensor]]]


@dataclass(frozen=True)
class ReconSettings:
    """Flat settings of the per-module training loop (built from the method config)."""

    steps: int = 40  # MethodConfig.steps
    lam: str = "zero"  # input mix lam*fp + (1-lam)*q: zero (REM, MREM-S), one (LKD), anneal (MREM-P)
    t0: int = 0  # anneal: lam_t = max(1 - t/t0, 0); 0 means 1.5x the steps (config.py says why)
    finish_steps: int = 0  # MREM-P: the last steps of every module train on the finished upstream
    loss: str = "every_layer"
    kd_weight: float = 0.0  # distillation on the logits, last module of a task model only
    lr_weight: Optional[float] = None  # absolute, for every latent weight; None: lr_weight_rel per tensor
    lr_weight_rel: float = 0.03  # relative to each weight's mean quantization step (benchmarks/lr_sweep.py)
    lr_scale: float = 1e-3  # relative to each step size's magnitude
    weight_decay: float = 0.0
    train_weights: bool = True
    train_scales: bool = True
    train_bias: bool = False
    train_layernorm: bool = False
    never_worse: bool = True  # keep the initial state of a module that ends worse on the held-out batches
    log_every: int = 0  # 0: ten progress lines per module


def lam_at(schedule: str, t: int, steps: int, t0: int = 0, finish_steps: int = 0) -> float:
    """Teacher-forcing weight of the full-precision input at step t (0-based). MREM-P's finish
    steps (the last `finish_steps`) train on the finished upstream's quantized outputs alone, as
    MREM-S does: the upstream no longer moves, so there is nothing to force."""
    if schedule == "zero" or (schedule == "anneal" and t >= steps - finish_steps):
        return 0.0
    if schedule == "one":
        return 1.0
    if schedule == "anneal":
        horizon = t0 if t0 > 0 else max(3 * steps // 2, 1)
        return max(1.0 - t / horizon, 0.0)
    raise ValueError(f"lam schedule {schedule!r} is not one of {', '.join(LAM_SCHEDULES)}")


def check_lam(settings: ReconSettings) -> float:
    """The input mix a module is measured on after training (the never-worse check, the recorded
    module errors): the quantized upstream's outputs, which it sees in the final model, whatever mix
    it ended training on (MREM-P's anneal ends at lam 1/3); LKD, which never computes the quantized
    stream, on the full-precision inputs it trained on."""
    return 1.0 if settings.lam == "one" else 0.0


def mix_inputs(lam: float, fp_in: Optional[Tensor], q_in: Optional[Tensor]) -> Optional[Tensor]:
    if fp_in is None and q_in is None:
        return None  # first module: token ids
    if lam >= 1.0 or q_in is None:
        return fp_in
    if lam <= 0.0:
        return q_in
    return lam * fp_in + (1.0 - lam) * q_in


def masked_mse(student: Tensor, teacher: Tensor, mask: Tensor) -> Tensor:
    """Mean squared error over the real (non-padding) tokens, in float32 whatever the model dtype."""
    m = mask.float().unsqueeze(-1)
    return ((student.float() - teacher.float()) ** 2 * m).sum() / (m.sum() * student.shape[-1]).clamp_min(1.0)


def reconstruction_loss(s: StageOutput, t: StageOutput, mask: Tensor, loss: str, kd_weight: float) -> Tensor:
    if loss == "every_layer":
        value = sum(masked_mse(a, b, mask) for a, b in zip(s.hidden, t.hidden)) / len(s.hidden)
    else:
        value = masked_mse(s.hidden[-1], t.hidden[-1], mask)
    if kd_weight and s.logits is not None:
        if s.logits.shape[-1] == 1:  # regression head
            kd = F.mse_loss(s.logits, t.logits)
        else:
            # Per token for an LM head ([B, T, V] -> [B*T, V]); per example for a classifier.
            sl, tl = (x.float().reshape(-1, x.shape[-1]) for x in (s.logits, t.logits))
            kd = F.kl_div(F.log_softmax(sl, -1), F.log_softmax(tl, -1), log_target=True, reduction="batchmean")
        value = value + kd_weight * kd
    return value


def trainable_groups(stage: Stage, settings: ReconSettings) -> list[dict]:
    """Set requires_grad on the student stage and return the optimizer parameter groups:
    latent weights (STE) at lr_weight (or lr_weight_rel of their grid step), quantizer step sizes
    (LSQ) at lr_scale of their magnitude."""
    weights, scales = [], []  # weights: (parameter, the tensor its relative lr is measured on)
    for p in stage.parameters():
        p.requires_grad_(False)
    for module in stage.modules():
        if isinstance(module, (QuantLinear, QuantEmbedding)) and settings.train_weights:
            wq = module.weight_quantizer
            weights.append((module.weight, module.weight if wq is None or wq.scale is None else wq.scale))
        if isinstance(module, QuantLinear) and settings.train_bias and module.bias is not None:
            weights.append((module.bias, module.bias))
        # LayerNorm, or a decoder's RMSNorm (LlamaRMSNorm, Qwen2RMSNorm, ...: one class per model type).
        if (isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("RMSNorm")) and settings.train_layernorm:
            weights.extend((p, p) for p in module.parameters())
        if isinstance(module, (WeightQuantizer, ActQuantizer)) and settings.train_scales:
            scale = getattr(module, "scale", None)
            if isinstance(scale, nn.Parameter):
                scales.append(scale)
    groups = []
    if weights and settings.lr_weight is not None:
        groups.append({"params": [w for w, _ in weights], "lr": settings.lr_weight, "weight_decay": settings.weight_decay,
                       "name": "weights"})
    elif weights:
        # One rule for every bit width: Adam moves a weight by about lr a step whatever its gradient,
        # and a grid step shrinks with the bits (a symmetric 8-bit grid spans the same range with 127
        # steps a side that a 4-bit one spans with 7), so one absolute lr is too large at W8 and too
        # small at W2. Each weight moves lr_weight_rel of its own mean grid step instead (AutoRound's
        # signed-gradient rounding offsets move lr = 1/iters of a step); a bias or a norm, which has
        # no grid, lr_weight_rel of its mean magnitude.
        for w, ref in weights:
            lr = settings.lr_weight_rel * ref.detach().abs().mean().item()
            groups.append({"params": [w], "lr": lr, "weight_decay": settings.weight_decay, "name": "weights"})
    # Step sizes span orders of magnitude (a 2-bit weight step ~1e-2, an 8-bit activation step
    # ~1e-1) and Adam's update is ~lr whatever the gradient, so each scale tensor gets its own
    # group with lr relative to its magnitude: lr_scale is a relative change per step.
    for scale in scales:
        magnitude = scale.detach().abs().mean().item()
        groups.append({"params": [scale], "lr": settings.lr_scale * magnitude, "weight_decay": 0.0, "name": "scales"})
    for g in groups:
        for p in g["params"]:
            p.requires_grad_(True)
    return groups


@dataclass
class ModuleResult:
    index: int
    losses: list[float]  # training loss at every step
    lams: list[float]
    seconds: float
    wait_seconds: float  # time spent waiting for the feed (input I/O or upstream ranks)


class Progress:
    """A tqdm bar on a terminal, periodic log lines otherwise (SLURM logs, CI)."""

    def __init__(self, desc: str, total: int, every: int) -> None:
        self.total, self.every, self.desc = total, every, desc
        self.start = time.perf_counter()
        self.first = 0  # the step this process started at (a resumed run starts past 0)
        self.bar = None
        # One bar per process: with several ranks on one terminal, log lines (they carry the rank).
        if sys.stderr.isatty() and env_world_size() == 1:
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=desc, dynamic_ncols=True, leave=False)

    def update(self, t: int, loss: float, **extra: float) -> None:
        """After step t (0-based); `extra` are more figures to show (lam, lr)."""
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{loss:.4g}", **{k: f"{v:.3g}" for k, v in extra.items()}, refresh=False)
            return
        done = t + 1
        if done % self.every == 0 or done == self.total:
            elapsed = time.perf_counter() - self.start
            eta = elapsed / max(done - self.first, 1) * (self.total - done)
            shown = "".join(f" {k} {v:.3g}" for k, v in extra.items())
            log.info("%s step %d/%d loss %.4g%s (%.1fs, eta %.0fs)", self.desc, done, self.total, loss, shown, elapsed, eta)

    def resume_at(self, step: int) -> None:
        self.first = step
        if self.bar is not None:
            self.bar.update(step)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# The replicas' all-reduce: (trainable parameters with their gradients, this replica's loss) ->
# the loss of the whole batch; it leaves the whole batch's gradient in the parameters.
Sync = Callable[[list[Tensor], Tensor], float]


class ModuleTrainer:
    """The training state of one module: optimizer, lr schedule, loss history, progress.

    `train_step` is one step on one batch; drivers own the loop. The sequential driver calls it
    through `reconstruct_module`; a rank holding several modules calls each trainer in turn on
    the same step (lockstep), passing one module's outputs as the next one's inputs.
    """

    def __init__(self, student: Stage, teacher: Stage, settings: ReconSettings, progress: bool = True,
                 sync: Optional[Sync] = None) -> None:
        """progress=False: the caller shows the progress (a rank training several modules shows one
        display for all of them). `sync(parameters, loss)`: runs on the gradients between the
        backward pass and the update and returns the loss to record (the data-parallel replicas'
        all-reduce: the full batch's gradient and loss)."""
        if settings.loss not in LOSSES:
            raise ValueError(f"loss={settings.loss!r} is not one of {', '.join(LOSSES)}")
        self.student, self.teacher, self.settings = student, teacher, settings
        self.groups = trainable_groups(student, settings)
        if not self.groups:
            raise ValueError("nothing to train in this module: enable method.train_weights or method.train_scales")
        self.optimizer = torch.optim.AdamW(self.groups, betas=(0.9, 0.999))
        self._updater = _Updater(self.optimizer, sync)
        self.base_lrs = [g["lr"] for g in self.optimizer.param_groups]
        self.scales = [p for g in self.groups if g["name"] == "scales" for p in g["params"]]
        freeze_stage(teacher)
        every = settings.log_every or max(settings.steps // 10, 1)
        self.progress = Progress(f"module {student.spec.index}", settings.steps, every) if progress else None
        self.losses: list[float] = []
        self.lams: list[float] = []
        self.start = time.perf_counter()

    def train_step(self, t: int, batch: Batch, fp_in: Optional[Tensor], q_in: Optional[Tensor]) -> tuple[StageOutput, StageOutput]:
        """Step t on one batch; returns (teacher output, student output) for the next module."""
        s = self.settings
        lam = lam_at(s.lam, t, s.steps, s.t0, s.finish_steps)
        # Cosine decay: large early moves to escape the rounding init, small late ones to settle.
        for g, lr in zip(self.optimizer.param_groups, self.base_lrs):
            g["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * t / s.steps))
        target, out, loss = step(self.student, self.teacher, self._updater, batch, fp_in, q_in, lam, s)
        with torch.no_grad():
            for scale in self.scales:  # a learned step size must stay positive
                scale.clamp_(min=SCALE_EPS)
        release_freed_memory()
        self.losses.append(loss)
        self.lams.append(lam)
        if self.progress is not None:
            self.progress.update(t, loss, lam=lam)
        return target, out

    @torch.no_grad()
    def outputs(self, t: int, batch: Batch, fp_in: Optional[Tensor], q_in: Optional[Tensor]) -> tuple[StageOutput, StageOutput]:
        """The (teacher output, student output) that train_step(t, ...) returns, without training:
        the module's forward pass before its update."""
        s = self.settings
        lam = lam_at(s.lam, t, s.steps, s.t0, s.finish_steps)
        return self.teacher(fp_in, batch, logits=False), self.student(mix_inputs(lam, fp_in, q_in), batch, logits=False)

    def state_dict(self) -> dict:
        """Everything a resumed run needs to continue exactly where this one is: the module's
        weights and step sizes, the optimizer moments, the loss history (its length is the step)."""
        return {"student": self.student.state_dict(), "optimizer": self.optimizer.state_dict(),
                "losses": list(self.losses), "lams": list(self.lams)}

    def load_state_dict(self, state: dict) -> None:
        self.student.load_state_dict(state["student"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.losses, self.lams = list(state["losses"]), list(state["lams"])
        if self.progress is not None:
            self.progress.resume_at(len(self.losses))

    def finish(self, wait_seconds: float = 0.0) -> ModuleResult:
        """Close the progress display and freeze the module again."""
        if self.progress is not None:
            self.progress.close()
        for g in self.groups:
            for p in g["params"]:
                p.requires_grad_(False)
        seconds = time.perf_counter() - self.start
        return ModuleResult(self.student.spec.index, self.losses, self.lams, seconds, wait_seconds)


class _Updater:
    """An optimizer's update, after `sync` where the stage has data-parallel replicas."""

    def __init__(self, optimizer: torch.optim.Optimizer, sync: Optional[Sync]) -> None:
        self.optimizer, self.sync = optimizer, sync

    def update(self, loss: Tensor) -> float:
        """The step after the backward pass; returns the loss to record."""
        value = loss.item() if self.sync is None else self.sync(
            [p for g in self.optimizer.param_groups for p in g["params"]], loss)
        self.optimizer.step()
        # The gradients are rebuilt by the next backward pass: free them now, so that a rank training
        # several modules in lockstep holds one module's gradients at a time, not all of them.
        self.optimizer.zero_grad(set_to_none=True)
        return value


def reconstruct_module(
    student: Stage,
    teacher: Stage,
    feed: Feed,
    settings: ReconSettings,
    trainer: Optional[ModuleTrainer] = None,
    first: int = 0,
    after_step: Optional[Callable[[int, ModuleTrainer], None]] = None,
) -> ModuleResult:
    """Train `student` for steps first..settings.steps-1 on the feed (which yields exactly those
    steps' inputs). The teacher stage is frozen and run on the full-precision input of each step for
    the targets. `trainer`: one restored from a checkpoint; `after_step(steps done, trainer)` runs
    after every step (checkpoints, the stop signal)."""
    trainer = trainer or ModuleTrainer(student, teacher, settings)
    waited = 0.0
    it = iter(feed)
    try:
        for t in range(first, settings.steps):
            t_wait = time.perf_counter()
            try:
                batch, fp_in, q_in = next(it)
            except StopIteration:
                raise RuntimeError(
                    f"{student.spec.describe()}: the input feed ended after {t} of {settings.steps} steps"
                ) from None
            waited += time.perf_counter() - t_wait
            trainer.train_step(t, batch, fp_in, q_in)
            if after_step is not None:
                after_step(t + 1, trainer)
    finally:
        result = trainer.finish(waited)
    return result


def step(
    student: Stage,
    teacher: Stage,
    updater: _Updater,
    batch: Batch,
    fp_in: Optional[Tensor],
    q_in: Optional[Tensor],
    lam: float,
    settings: ReconSettings,
) -> tuple[StageOutput, StageOutput, float]:
    """One optimizer step; returns (teacher output, student output, loss)."""
    kd = settings.kd_weight > 0
    with torch.no_grad():
        target = teacher(fp_in, batch, logits=kd)
    out = student(mix_inputs(lam, fp_in, q_in), batch, logits=kd)
    loss = reconstruction_loss(out, target, batch.attention_mask, settings.loss, settings.kd_weight)
    if not torch.isfinite(loss):
        raise FloatingPointError(
            f"{student.spec.describe()}: the reconstruction loss became {loss.item()} (lam={lam:.2f}): "
            "lower method.lr_weight_rel (or method.lr_weight) / method.lr_scale, or check the calibration data for NaN/inf"
        )
    loss.backward()  # into fresh gradients: the updater frees them after every step
    return target, out, updater.update(loss.detach())


@torch.no_grad()
def module_error(student: Stage, teacher: Stage, feed: Feed, lam: float, loss: str) -> float:
    """Mean reconstruction loss (no KD term) of the student on the given inputs."""
    total, n = 0.0, 0
    for batch, fp_in, q_in in feed:
        s = student(mix_inputs(lam, fp_in, q_in), batch, logits=False)
        t = teacher(fp_in, batch, logits=False)
        total += reconstruction_loss(s, t, batch.attention_mask, loss, 0.0).item()
        n += 1
    return total / max(n, 1)


def frozen_keys(stage: Stage) -> set[str]:
    """The state entries of a stage that training never changes and snapshots leave out: the
    tables of its unquantized embeddings (trainable_groups trains no nn.Embedding). A decoder's
    word embedding is a fifth of SmolLM2, shared with the full-precision model (copy_to_quantize):
    a snapshot would be its one other copy."""
    return {f"{name}.weight" if name else "weight" for name, m in stage.named_modules() if type(m) is nn.Embedding}


def snapshot(stage: Stage, teacher: Optional[Stage] = None) -> dict[str, torch.Tensor]:
    """A stage's state (its weights, step sizes and buffers) as it is now, to return to (`load_snapshot`).

    With its `teacher` (frozen: nothing writes into it), an entry equal to the teacher's entry of
    the same name (same dtype, device and values) is the teacher's tensor, not a copy: from an RTN
    start a latent weight is the full-precision weight (a float32 checkpoint), so the snapshot is
    only the step sizes, not one more copy of the module's weights (0.2 GB a rank on SmolLM2 at 2
    ranks). A GPTQ start, a bfloat16 checkpoint or OCS change the weights: those entries are copied."""
    frozen = frozen_keys(stage)
    source = teacher.state_dict() if teacher is not None else {}

    def kept(k: str, v: torch.Tensor) -> torch.Tensor:
        t = source.get(k)
        if (t is not None and t.dtype == v.dtype and t.shape == v.shape and t.device == v.device
                and torch.equal(t, v)):
            return t.detach()
        return v.detach().clone()

    return {k: kept(k, v) for k, v in stage.state_dict().items() if k not in frozen}


def load_snapshot(stage: Stage, state: dict[str, torch.Tensor]) -> None:
    """Load a `snapshot` back: every entry but the frozen ones, which have not changed."""
    missing, unexpected = stage.load_state_dict(state, strict=False)
    if unexpected or set(missing) != frozen_keys(stage):
        raise RuntimeError(f"{stage.spec.describe()}: the state to restore does not match the module (missing "
                           f"{sorted(set(missing) - frozen_keys(stage))[:4]}, unexpected {unexpected[:4]})")


def log_kept(spec, before: float, after: float, kept: str) -> None:
    if kept == "trained":
        log.info("%s: held-out reconstruction error %.4g -> %.4g", spec.describe(), before, after)
    else:
        log.warning("%s: training made it worse on the held-out batches (error %.4g -> %.4g): kept its initial state "
                    "(method.never_worse); a lower method.lr_weight_rel / method.lr_scale may train it", spec.describe(),
                    before, after)


def freeze_stage(stage: Stage) -> None:
    for p in stage.parameters():
        p.requires_grad_(False)
