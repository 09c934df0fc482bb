"""Task metrics (GLUE) and fidelity metrics (encoders without a task head), computed in-process.

Nothing here calls `evaluate.load`: that downloads metric scripts from the hub and fails offline.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import torch

# scipy and sklearn are imported inside the functions: together they add seconds to the import of
# mrem_dist.data, which every command pays even when it computes no metric.

ArrayLike = Sequence[float] | np.ndarray | torch.Tensor


def _accuracy(pred: np.ndarray, gold: np.ndarray) -> float:
    from sklearn.metrics import accuracy_score

    return float(accuracy_score(gold, pred))


def _f1(pred: np.ndarray, gold: np.ndarray) -> float:
    from sklearn.metrics import f1_score

    # GLUE reports binary F1 of the positive class (MRPC: paraphrase, QQP: duplicate).
    return float(f1_score(gold, pred, average="binary", pos_label=1, zero_division=0.0))


def _mcc(pred: np.ndarray, gold: np.ndarray) -> float:
    from sklearn.metrics import matthews_corrcoef

    return float(matthews_corrcoef(gold, pred))


def _pearson(pred: np.ndarray, gold: np.ndarray) -> float:
    from scipy.stats import pearsonr

    return float(pearsonr(pred.astype(np.float64), gold.astype(np.float64))[0])


def _spearman(pred: np.ndarray, gold: np.ndarray) -> float:
    from scipy.stats import spearmanr

    return float(spearmanr(pred, gold)[0])


_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": _accuracy,
    "f1": _f1,
    "mcc": _mcc,
    "pearson": _pearson,
    "spearman": _spearman,
}
_CLASS_METRICS = {"accuracy", "f1", "mcc"}


def _as_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def compute_metrics(names: Sequence[str], predictions: ArrayLike, labels: ArrayLike) -> dict[str, float]:
    """Each metric in `names` as a plain float.

    predictions are class ids for accuracy/f1/mcc (take argmax of the logits first) and real
    values for pearson/spearman (the regression output of e.g. STS-B).
    """
    pred, gold = _as_numpy(predictions), _as_numpy(labels)
    if pred.ndim != 1 or gold.ndim != 1:
        raise ValueError(
            f"predictions and labels must be 1-D, got shapes {pred.shape} and {gold.shape}: pass "
            f"class ids (logits.argmax(-1)) or, for regression, logits.squeeze(-1)"
        )
    if len(pred) != len(gold):
        raise ValueError(
            f"got {len(pred)} predictions for {len(gold)} labels: evaluate the model on every "
            f"example of the evaluation set, in the same order as the labels"
        )
    if len(pred) == 0:
        raise ValueError("no predictions to score: the evaluation set is empty, give it some examples")
    unknown = [n for n in names if n not in _METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {unknown}: choose from {', '.join(_METRICS)}")
    out: dict[str, float] = {}
    for name in names:
        if name in _CLASS_METRICS and np.issubdtype(pred.dtype, np.floating):
            if not np.all(pred == np.round(pred)):
                raise ValueError(
                    f"metric {name!r} needs class ids but got fractional predictions: pass "
                    f"logits.argmax(-1), or use pearson/spearman for a regression task"
                )
            out[name] = _METRICS[name](pred.astype(np.int64), gold.astype(np.int64))
        else:
            out[name] = _METRICS[name](pred, gold)
    return out


def mean_pool(last_hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Masked mean over the sequence, [B, S, H] -> [B, H] (sentence-transformers' MiniLM pooling)."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden.dtype)
    summed = (last_hidden * mask).sum(dim=1)
    # clamp: an all-padding row would divide by zero; sentence-transformers uses the same 1e-9.
    return summed / mask.sum(dim=1).clamp(min=1e-9)


def fidelity_metrics(ref: torch.Tensor, test: torch.Tensor) -> dict[str, float]:
    """How close the quantized model's sentence embeddings (test) stay to full precision (ref).

    cosine / cosine_min: mean and worst cosine(ref_i, test_i).
    rank_agreement: Spearman correlation of the pairwise cosine similarities (i < j) of ref and of
        test, i.e. whether the quantized model still ranks sentence pairs the same way.
    rel_error: mean ||ref_i - test_i|| / ||ref_i||.
    """
    if ref.ndim != 2 or ref.shape != test.shape:
        raise ValueError(
            f"ref and test must be [N, D] embeddings of the same texts, got shapes "
            f"{tuple(ref.shape)} and {tuple(test.shape)}: pool both models' outputs (mean_pool) "
            f"on the same batches"
        )
    from scipy.stats import spearmanr

    n = ref.shape[0]
    if n < 3:
        raise ValueError(
            f"fidelity needs at least 3 texts to rank sentence pairs, got {n}: evaluate on more texts"
        )
    # float64: the identity ref == test must give exactly 1 and 0, and bf16/fp16 inputs are common.
    ref64 = ref.detach().to("cpu", torch.float64)
    test64 = test.detach().to("cpu", torch.float64)
    cos = torch.nn.functional.cosine_similarity(ref64, test64, dim=1, eps=1e-12)
    rel = (ref64 - test64).norm(dim=1) / ref64.norm(dim=1).clamp(min=1e-12)

    def pairwise(x: torch.Tensor) -> np.ndarray:
        unit = torch.nn.functional.normalize(x, dim=1, eps=1e-12)
        sims = unit @ unit.T
        i, j = torch.triu_indices(n, n, offset=1)
        return sims[i, j].numpy()

    rank = spearmanr(pairwise(ref64), pairwise(test64))[0]
    return {
        "cosine": float(cos.mean()),
        "cosine_min": float(cos.min()),
        "rank_agreement": float(rank),
        "rel_error": float(rel.mean()),
    }
