"""What a model is scored on, as objects: the task knows the model class it loads with, what output
of a batch it compares, and the streaming metric state that turns those outputs into metrics.

- `EmbeddingFidelity` (a bare encoder, `kind` "encoder"): the mean-pooled last hidden state,
  scored by its fidelity to the full-precision model (cosine, rank agreement, relative error).
- `SequenceClassification` (`kind` "classifier"): the head's logits, scored by the task metric
  against the labels, plus the fidelity of the logits.
- `CausalLM` (`kind` "causal_lm"): the LM head's next-token logits, scored by perplexity on the
  evaluation windows and, for the quantized model, by its agreement with full precision (the
  perplexity ratio, top-1 next-token agreement, mean per-token KL(FP || quantized)).

A metric state is updated batch by batch (`update(fp_out, q_out, batch)`), two partial states merge
(`merge`: ranks that scored different batches), and `compute()` gives (full-precision metrics,
quantized metrics). These two tasks' states keep the reduced per-example vectors (a pooled
embedding or a row of logits, [N, D]): rank agreement is a statistic of all pairs of examples and
needs them. Nothing keeps per-token outputs; a causal LM's state (perplexity) is sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import Tensor, nn

from mrem_dist.data import Batch, compute_metrics, fidelity_metrics, mean_pool
from .families import ModelFamily

TASK_KINDS = ("encoder", "classifier", "causal_lm")


@dataclass
class EvalSet:
    """Tokenized evaluation batches (their labels, when the data has them, travel in batch.labels)
    and how the task metric is computed."""

    batches: list[Batch]
    metric_names: tuple[str, ...] = ()  # task metrics; empty for fidelity-only evaluation
    regression: bool = False

    @property
    def labeled(self) -> bool:
        return bool(self.batches) and self.batches[0].labels is not None


def _check_finite(out: Tensor, who: str) -> Tensor:
    if not torch.isfinite(out).all():
        if who == "full-precision":
            raise FloatingPointError(
                "the full-precision model itself produced NaN/inf outputs on the evaluation data: the checkpoint "
                "or the input data is broken (this is not a quantization problem)")
        raise FloatingPointError(
            "the quantized model produced NaN/inf outputs on the evaluation data: check the quantization settings "
            "(e.g. a too-low activation bit width) and the input data")
    return out


@dataclass
class FidelityState:
    """Per-example outputs of both models, in batch order (see the module docstring for why)."""

    fp: list[Tensor] = field(default_factory=list)
    q: list[Tensor] = field(default_factory=list)

    def update(self, fp_out: Optional[Tensor], q_out: Tensor, batch: Batch) -> None:
        if fp_out is not None:
            self.fp.append(_check_finite(fp_out, "full-precision").float().cpu())
        self.q.append(_check_finite(q_out, "quantized").float().cpu())

    def merge(self, other: "FidelityState") -> "FidelityState":
        """This state followed by `other` (the later batches)."""
        self.fp += other.fp
        self.q += other.q
        return self

    def compute(self) -> tuple[Optional[dict], dict]:
        if not self.fp:
            raise ValueError("fidelity needs the full-precision outputs too: score both models (compare=true)")
        fp, q = torch.cat(self.fp), torch.cat(self.q)
        if fp.shape != q.shape:
            raise ValueError(f"the full-precision outputs have shape {tuple(fp.shape)} but the quantized ones "
                             f"{tuple(q.shape)}: compare against the model the quantized one was made from")
        return fidelity_metrics(fp, fp), fidelity_metrics(fp, q)


@dataclass
class ClassificationState(FidelityState):
    metric_names: tuple[str, ...] = ()
    regression: bool = False
    labels: list[Tensor] = field(default_factory=list)

    def update(self, fp_out: Optional[Tensor], q_out: Tensor, batch: Batch) -> None:
        super().update(fp_out, q_out, batch)
        self.labels.append(batch.labels.cpu())

    def merge(self, other: "ClassificationState") -> "ClassificationState":
        super().merge(other)
        self.labels += other.labels
        return self

    def _task_metrics(self, outputs: list[Tensor]) -> dict:
        out = torch.cat(outputs)
        preds = out.squeeze(-1).tolist() if self.regression else out.argmax(-1).tolist()
        return compute_metrics(self.metric_names, preds, torch.cat(self.labels).tolist())

    def compute(self) -> tuple[Optional[dict], dict]:
        """Both models' task metrics, and the quantized model's fidelity to full precision."""
        if not self.fp:  # the quantized model alone
            return None, self._task_metrics(self.q)
        _, fidelity = super().compute()
        q = self._task_metrics(self.q)
        q.update({f"fidelity_{k}": v for k, v in fidelity.items()})
        return self._task_metrics(self.fp), q


class Task:
    kind: str = ""

    def auto_class(self):
        raise NotImplementedError

    def reduce(self, batch: Batch, hidden: Tensor, logits: Optional[Tensor]) -> Tensor:
        """The output that is scored, from the last hidden state and the head's logits."""
        raise NotImplementedError

    def output(self, family: ModelFamily, model: nn.Module, batch: Batch) -> Tensor:
        """The scored output of the whole model on one batch."""
        raise NotImplementedError

    def metric(self, evalset: EvalSet) -> FidelityState:
        raise NotImplementedError


@dataclass(frozen=True)
class EmbeddingFidelity(Task):
    kind: str = "encoder"

    def auto_class(self):
        from transformers import AutoModel

        return AutoModel

    def reduce(self, batch: Batch, hidden: Tensor, logits: Optional[Tensor]) -> Tensor:
        return mean_pool(hidden, batch.attention_mask)

    def output(self, family: ModelFamily, model: nn.Module, batch: Batch) -> Tensor:
        return mean_pool(family.forward(model, batch), batch.attention_mask)

    def metric(self, evalset: EvalSet) -> FidelityState:
        return FidelityState()


@dataclass(frozen=True)
class SequenceClassification(Task):
    num_labels: int = 2
    kind: str = "classifier"

    def auto_class(self):
        from transformers import AutoModelForSequenceClassification

        return AutoModelForSequenceClassification

    def reduce(self, batch: Batch, hidden: Tensor, logits: Optional[Tensor]) -> Tensor:
        return logits

    def output(self, family: ModelFamily, model: nn.Module, batch: Batch) -> Tensor:
        return family.forward(model, batch)

    def metric(self, evalset: EvalSet) -> FidelityState:
        if evalset.labeled and evalset.metric_names:
            return ClassificationState(metric_names=evalset.metric_names, regression=evalset.regression)
        return FidelityState()  # unlabeled text: how closely the logits follow full precision


# Most logits PerplexityState.update turns into float32 temporaries at a time (16 MB each).
_CHUNK_ELEMENTS = 2**22


@dataclass
class PerplexityState:
    """Sums over every predicted token (position t predicts token t+1 of its window): negative
    log-likelihood of both models, and the quantized model's agreement with full precision. Two
    states merge by adding; nothing per token is kept."""

    nll_fp: float = 0.0
    nll_q: float = 0.0
    kl: float = 0.0
    agree: int = 0
    tokens: int = 0
    compared: bool = False

    def update(self, fp_out: Optional[Tensor], q_out: Tensor, batch: Batch) -> None:
        _check_finite(q_out, "quantized")
        if fp_out is not None:
            _check_finite(fp_out, "full-precision")
        # A few positions at a time: a 49K-way vocabulary makes every [tokens, vocab] float32
        # temporary (the log-softmaxes, the KL terms) as large as the logits, and the last stage
        # held some seven of them at once. The log-likelihoods are gathered per position and summed
        # once, as over the whole batch; the KL is summed per chunk.
        chunk = max(1, _CHUNK_ELEMENTS // q_out.shape[-1])
        nll_q, nll_fp = [], []
        for row in range(q_out.shape[0]):
            for lo in range(0, q_out.shape[1] - 1, chunk):
                hi = min(lo + chunk, q_out.shape[1] - 1)
                targets = batch.input_ids[row, lo + 1:hi + 1].unsqueeze(1)
                q = q_out[row, lo:hi].float()
                q_logp = torch.log_softmax(q, -1)
                nll_q.append(q_logp.gather(1, targets))
                if fp_out is not None:
                    fp = fp_out[row, lo:hi].float()
                    fp_logp = torch.log_softmax(fp, -1)
                    nll_fp.append(fp_logp.gather(1, targets))
                    self.kl += (fp_logp.exp() * (fp_logp - q_logp)).sum().item()
                    self.agree += int((fp.argmax(-1) == q.argmax(-1)).sum())
        if nll_q:  # windows of one token predict nothing
            self.nll_q += -torch.cat(nll_q).sum().item()
        if nll_fp:
            self.nll_fp += -torch.cat(nll_fp).sum().item()
        self.compared = self.compared or fp_out is not None
        self.tokens += q_out.shape[0] * (q_out.shape[1] - 1)

    def merge(self, other: "PerplexityState") -> "PerplexityState":
        self.nll_fp, self.nll_q, self.kl = self.nll_fp + other.nll_fp, self.nll_q + other.nll_q, self.kl + other.kl
        self.agree, self.tokens = self.agree + other.agree, self.tokens + other.tokens
        self.compared = self.compared or other.compared
        return self

    def compute(self) -> tuple[Optional[dict], dict]:
        if not self.tokens:
            raise ValueError("perplexity needs at least one evaluation window of two or more tokens")
        q_ppl = math.exp(self.nll_q / self.tokens)
        if not self.compared:
            return None, {"perplexity": q_ppl}
        fp_ppl = math.exp(self.nll_fp / self.tokens)
        return {"perplexity": fp_ppl}, {"perplexity": q_ppl, "perplexity_ratio": q_ppl / fp_ppl,
                                        "top1_agreement": self.agree / self.tokens, "kl": self.kl / self.tokens}


@dataclass(frozen=True)
class CausalLM(Task):
    kind: str = "causal_lm"

    def auto_class(self):
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM

    def reduce(self, batch: Batch, hidden: Tensor, logits: Optional[Tensor]) -> Tensor:
        return logits

    def output(self, family: ModelFamily, model: nn.Module, batch: Batch) -> Tensor:
        return family.forward(model, batch)

    def metric(self, evalset: EvalSet) -> PerplexityState:
        return PerplexityState()


def task_for(kind: str, num_labels: int = 0) -> Task:
    if kind == "encoder":
        return EmbeddingFidelity()
    if kind == "classifier":
        return SequenceClassification(num_labels)
    if kind == "causal_lm":
        return CausalLM()
    raise ValueError(f"model kind {kind!r} is not one of {', '.join(TASK_KINDS)}")
