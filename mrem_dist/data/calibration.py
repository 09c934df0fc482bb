"""Sample, tokenize and batch calibration data into fixed-shape tensors."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .sources import TextDataset

# Tokenizer outputs a BERT-like model accepts; anything else a tokenizer returns is dropped.
_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def sample_indices(n_total: int, n: int, seed: int) -> list[int]:
    """n distinct indices of range(n_total) in a seeded random order; all of them if n >= n_total.

    torch's CPU generator gives the same permutation for the same seed on every machine, unlike
    Python's hash-seeded or numpy-version-dependent alternatives. The caller warns when
    n > n_total, since the run then calibrates on fewer examples than asked for.
    """
    if n <= 0:
        raise ValueError(f"number of calibration examples must be positive, got {n}: set it to >= 1")
    if n_total <= 0:
        raise ValueError(f"calibration set is empty: cannot sample {n} examples from {n_total}")
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=generator)[: min(n, n_total)].tolist()


@dataclass
class Batch:
    """One batch of model inputs; labels travel alongside and are not passed to the model."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    token_type_ids: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    def to(self, device: torch.device | str) -> Batch:
        def move(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t.to(device)

        return replace(
            self,
            input_ids=self.input_ids.to(device),
            attention_mask=self.attention_mask.to(device),
            token_type_ids=move(self.token_type_ids),
            labels=move(self.labels),
        )

    def rows(self, index: slice) -> Batch:
        """The batch of rows `index` (a data-parallel replica's share); the batch itself for all rows."""
        if index == slice(0, self.input_ids.shape[0]):
            return self

        def cut(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else t[index]

        return replace(self, input_ids=self.input_ids[index], attention_mask=self.attention_mask[index],
                       token_type_ids=cut(self.token_type_ids), labels=cut(self.labels))

    def as_model_kwargs(self) -> dict[str, torch.Tensor]:
        # Labels are left out so a model with a task head returns logits rather than a loss.
        kwargs = {"input_ids": self.input_ids, "attention_mask": self.attention_mask}
        if self.token_type_ids is not None:
            kwargs["token_type_ids"] = self.token_type_ids
        return kwargs


def tokenize(
    dataset: TextDataset, tokenizer: Any, max_length: int, indices: Sequence[int] | None = None
) -> dict[str, torch.Tensor]:
    """Tokenize (a subset of) the dataset, every row padded/truncated to exactly max_length.

    Fixed [N, max_length] shapes: batches are later streamed between processes, which needs every
    batch to have the same shape.
    """
    if max_length <= 0:
        raise ValueError(f"max_length must be positive, got {max_length}: set e.g. max_length=128")
    model_max = getattr(tokenizer, "model_max_length", None)
    # Tokenizers without a known limit report a huge sentinel (int(1e30)); only check real limits.
    if isinstance(model_max, int) and model_max < 1_000_000 and max_length > model_max:
        raise ValueError(
            f"max_length={max_length} exceeds the model's limit of {model_max} tokens: "
            f"set max_length <= {model_max}"
        )
    rows = list(range(len(dataset))) if indices is None else list(indices)
    if not rows:
        raise ValueError(
            f"calibration set is empty: dataset {dataset.name!r} has {len(dataset)} examples and "
            f"{len(rows)} were selected; give it some examples"
        )
    texts_a = [dataset.texts_a[i] for i in rows]
    texts_b = None if dataset.texts_b is None else [dataset.texts_b[i] for i in rows]
    encoded = tokenizer(
        texts_a,
        texts_b,
        padding="max_length",
        truncation=True,  # pairs: trims the longer text first, so both keep some tokens
        max_length=max_length,
        return_tensors="pt",
    )
    return {k: encoded[k] for k in _MODEL_INPUTS if k in encoded}


def make_batches(
    encoded: dict[str, torch.Tensor],
    batch_size: int,
    labels: Sequence[float | int] | torch.Tensor | None = None,
    drop_last: bool = False,
) -> list[Batch]:
    """Cut tokenized rows into batches in order (shuffling across steps is the engine's job).

    labels, when given, must be aligned with the rows of `encoded` (select them with the same
    indices as tokenize). drop_last drops a smaller final batch so every batch has the same shape.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}: set e.g. batch_size=8")
    n = int(encoded["input_ids"].shape[0]) if "input_ids" in encoded else 0
    if n == 0:
        raise ValueError("calibration set is empty: there are no tokenized examples to batch")
    label_tensor: torch.Tensor | None = None
    if labels is not None:
        if isinstance(labels, torch.Tensor):
            label_tensor = labels
        else:
            is_float = any(isinstance(v, float) for v in labels)
            label_tensor = torch.tensor(list(labels), dtype=torch.float32 if is_float else torch.long)
        if label_tensor.shape[0] != n:
            raise ValueError(
                f"got {label_tensor.shape[0]} labels for {n} tokenized examples: select the labels "
                f"with the same indices passed to tokenize"
            )
    stop = n - n % batch_size if drop_last else n
    if stop == 0:
        raise ValueError(
            f"calibration set has {n} examples, fewer than batch_size={batch_size}, and drop_last "
            f"is on: lower batch_size or add examples"
        )
    batches = []
    for start in range(0, stop, batch_size):
        part = slice(start, min(start + batch_size, stop))
        batches.append(
            Batch(
                input_ids=encoded["input_ids"][part],
                attention_mask=encoded["attention_mask"][part],
                token_type_ids=encoded["token_type_ids"][part] if "token_type_ids" in encoded else None,
                labels=None if label_tensor is None else label_tensor[part],
            )
        )
    return batches
