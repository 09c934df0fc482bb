"""Task fine-tuning: the loop behind `python -m mrem_dist.finetune` (full precision, every weight)
and `method=prequant` (a quantized model, only its outlier columns and the head).

One loop for both: the caller decides which parameters train. AdamW, linear warmup then linear
decay to zero (the BERT / Hugging Face Trainer default), cross-entropy for classes, MSE for a
regression head (STS-B), batches drawn from a fresh seeded permutation every epoch.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mrem_dist.data import Batch
from mrem_dist.log import get_logger
from mrem_dist.models.families import ModelFamily

from .reconstruct import Progress

log = get_logger(__name__)


@dataclass(frozen=True)
class FinetuneSettings:
    steps: int
    lr: float
    warmup: float = 0.1  # fraction of the steps with a linear warmup from 0
    weight_decay: float = 0.01
    batch_size: int = 32
    seed: int = 0
    log_every: int = 0  # 0: ten progress lines


@dataclass
class TrainSet:
    """Tokenized labeled examples: model inputs [N, L] and labels [N] (long, or float for regression)."""

    inputs: dict[str, Tensor]
    labels: Tensor

    def __post_init__(self) -> None:
        n = self.inputs["input_ids"].shape[0]
        if self.labels.shape[0] != n or n == 0:
            raise ValueError(f"a training set needs one label per example and at least one example: {n} examples, "
                             f"{self.labels.shape[0]} labels")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def batch(self, index: Tensor) -> Batch:
        tt = self.inputs.get("token_type_ids")
        return Batch(self.inputs["input_ids"][index], self.inputs["attention_mask"][index],
                     None if tt is None else tt[index], self.labels[index])


def lr_factor(t: int, steps: int, warmup: float) -> float:
    """Multiplier of the base lr at step t (0-based): linear warmup, then linear decay to 0."""
    w = int(round(warmup * steps))
    if t < w:
        return (t + 1) / w
    return max(0.0, (steps - t) / max(steps - w, 1))


def task_loss(logits: Tensor, labels: Tensor) -> Tensor:
    if labels.is_floating_point():  # regression head: one output
        return F.mse_loss(logits.squeeze(-1).float(), labels.float())
    return F.cross_entropy(logits.float(), labels)


def train_task(model: nn.Module, family: ModelFamily, params: list[nn.Parameter], data: TrainSet,
               s: FinetuneSettings, device: torch.device, desc: str = "finetune") -> dict:
    """Fine-tune `params` of the task model on `data` for s.steps steps, in place. Every other
    parameter is left untouched (its requires_grad is switched off for the loop and restored).
    Returns {steps, losses, seconds}."""
    if s.steps <= 0:
        raise ValueError(f"steps={s.steps}: fine-tuning needs a positive number of steps")
    if not params:
        raise ValueError("no parameters to fine-tune")
    trainable = {id(p) for p in params}
    saved = {n: p.requires_grad for n, p in model.named_parameters()}
    for p in model.parameters():
        p.requires_grad_(id(p) in trainable)
    decay = [p for p in params if p.dim() >= 2]  # no weight decay on biases and LayerNorm gains
    groups = [{"params": decay, "weight_decay": s.weight_decay},
              {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}]
    optimizer = torch.optim.AdamW([g for g in groups if g["params"]], lr=s.lr, betas=(0.9, 0.999), eps=1e-8)
    generator = torch.Generator().manual_seed(s.seed)
    order: Optional[Tensor] = None
    pos = 0
    progress = Progress(desc, s.steps, s.log_every or max(s.steps // 10, 1))
    losses: list[float] = []
    start = time.perf_counter()
    model.train()  # dropout on, as in any fine-tuning
    try:
        for t in range(s.steps):
            if order is None or pos + s.batch_size > len(order):
                order, pos = torch.randperm(len(data), generator=generator), 0
            batch = data.batch(order[pos: pos + s.batch_size]).to(device)
            pos += s.batch_size
            lr = s.lr * lr_factor(t, s.steps, s.warmup)
            for g in optimizer.param_groups:
                g["lr"] = lr
            logits = family.forward(model, batch)
            loss = task_loss(logits, batch.labels)
            if not torch.isfinite(loss):
                raise FloatingPointError(
                    f"{desc}: the loss became {loss.item()} at step {t + 1}: lower the learning rate, or check the "
                    "labels (a regression task needs float labels, a classifier class ids below its label count)"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            losses.append(loss.item())
            progress.update(t, losses[-1], lr=lr)
    finally:
        progress.close()
        model.eval()
        for n, p in model.named_parameters():
            p.requires_grad_(saved[n])
    return {"steps": s.steps, "losses": losses, "seconds": round(time.perf_counter() - start, 3)}
