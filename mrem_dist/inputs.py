"""The run's inputs: the data splits a config names, tokenized for the loaded model.

Calibration batches (seeded sample), the evaluation set (its labels, when the data has them, travel
in the batches; checked against the model's task) and, for fine-tuning, the labeled training set.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Optional

import torch

from mrem_dist import data as D
from mrem_dist.config import BUILTIN_DATA, MOVIE_REVIEWS, WIKI
from mrem_dist.engine.finetune import TrainSet
from mrem_dist.log import get_logger
from mrem_dist.models import LoadedModel
from mrem_dist.models.tasks import CausalLM, EvalSet, SequenceClassification

log = get_logger(__name__)


@dataclass
class PreparedData:
    calib: list[D.Batch]
    evalset: EvalSet
    description: dict
    # Calibration samples drawn after `calib` from the same seeded order and never trained on: the
    # reconstruction methods measure every module on them (the never-worse check). Empty otherwise.
    holdout: list[D.Batch] = dataclasses.field(default_factory=list)

    def to(self, device) -> "PreparedData":
        """The batches on `device` (labels travel with the evaluation batches)."""
        return PreparedData([b.to(device) for b in self.calib],
                            dataclasses.replace(self.evalset, batches=[b.to(device) for b in self.evalset.batches]),
                            self.description, [b.to(device) for b in self.holdout])


def split_holdout(n_calib: int, n_total: int, holdout: int, what: str, warn: bool = True) -> int:
    """How many held-out samples follow the n_calib calibration ones among n_total drawable ones
    (ValueError when none is left; a warning when fewer than asked)."""
    left = n_total - n_calib
    if holdout and left <= 0:
        raise ValueError(f"{what} leaves no sample for the held-out check of the reconstruction (data.holdout_samples="
                         f"{holdout}): lower data.calib_samples, or give more calibration data")
    if holdout > left and warn:
        log.warning("%s leaves %d samples for the held-out check, fewer than data.holdout_samples=%d: using them",
                    what, left, holdout)
    return min(holdout, max(left, 0))


def load_splits(cfg_data, calibration: bool = True) -> tuple[Optional[D.TextDataset], D.TextDataset, Optional[D.TaskSpec]]:
    """(calibration split or None when not wanted, evaluation split, task spec or None)."""
    if cfg_data.name == BUILTIN_DATA:
        return (D.load_builtin("calibration") if calibration else None), D.load_builtin("evaluation"), None
    if cfg_data.name == MOVIE_REVIEWS:
        return (D.load_movie_reviews("train") if calibration else None), D.load_movie_reviews("validation"), None
    if cfg_data.name == WIKI:
        from mrem_dist.data.wiki import load_wiki

        def articles(split: str) -> D.TextDataset:
            return D.TextDataset(texts_a=load_wiki(split), texts_b=None, labels=None, name=f"wiki/{split}")

        return (articles("calibration") if calibration else None), articles("evaluation"), None
    if cfg_data.name == "local":
        fields, label = list(cfg_data.text_fields), cfg_data.label_field or None
        train_path = cfg_data.train_file or cfg_data.validation_file
        eval_path = cfg_data.validation_file or cfg_data.train_file
        train = D.load_local(train_path, fields, label) if calibration else None
        return train, D.load_local(eval_path, fields, label), None
    spec = D.get_task(cfg_data.name)
    return (D.load_glue(cfg_data.name, "train") if calibration else None), D.load_glue(cfg_data.name, "eval"), spec


def load_texts(cfg_data, calibration: bool = True) -> tuple[Optional[list[str]], list[str]]:
    """Plain documents for a causal LM: (calibration texts or None, evaluation texts). data=local
    reads .txt / .jsonl / .json files (data.text_fields[0] names the JSON text field) and the
    table formats (that column); every other source gives its texts, labels dropped."""
    from mrem_dist.data.corpus import load_text_file

    if cfg_data.name != "local":
        train, evaluation, _ = load_splits(cfg_data, calibration)
        return (None if train is None else list(train.texts_a)), list(evaluation.texts_a)
    field = cfg_data.text_fields[0]

    def read(path: str) -> list[str]:
        if path.lower().endswith((".txt", ".json", ".jsonl")):
            return load_text_file(path, field)
        return list(D.load_local(path, [field], None).texts_a)

    train_path = cfg_data.train_file or cfg_data.validation_file
    eval_path = cfg_data.validation_file or cfg_data.train_file
    return (read(train_path) if calibration else None), read(eval_path)


def prepare_lm_data(cfg_data, loaded: LoadedModel, calibration: bool = True, holdout: int = 0) -> PreparedData:
    """The LLM protocol: calib_samples windows of seq_len tokens at seeded offsets of the
    concatenated calibration text; perplexity over the first eval_samples non-overlapping windows
    of the evaluation text. Every window is full: no padding, the attention mask is all ones.
    `holdout` more windows at the next offsets of the same generator (the calibration windows do
    not depend on it; a held-out window may overlap a calibration one, as calibration windows may)."""
    from mrem_dist.data.corpus import calibration_sequences, eval_windows, tokenize_corpus

    def batches(ids: torch.Tensor) -> list[D.Batch]:
        return D.make_batches({"input_ids": ids, "attention_mask": torch.ones_like(ids)}, cfg_data.batch_size)

    train, evaluation = load_texts(cfg_data, calibration)
    calib: list[D.Batch] = []
    held: list[D.Batch] = []
    if train is not None:
        ids = tokenize_corpus(train, loaded.tokenizer)
        n = cfg_data.calib_samples
        windows = calibration_sequences(ids, n + holdout, cfg_data.seq_len, cfg_data.seed)
        calib, held = batches(windows[:n]), (batches(windows[n:]) if holdout else [])
    eval_ids = tokenize_corpus(evaluation, loaded.tokenizer)
    windows = eval_windows(eval_ids, cfg_data.seq_len, cfg_data.eval_samples)
    if windows.shape[0] < cfg_data.eval_samples:
        log.warning("the evaluation text has %d windows of %d tokens, fewer than data.eval_samples=%d: using all",
                    windows.shape[0], cfg_data.seq_len, cfg_data.eval_samples)
    description = {
        "name": cfg_data.name,
        "calibration_samples": sum(b.input_ids.shape[0] for b in calib),
        "evaluation_samples": int(windows.shape[0]),
        "seq_len": cfg_data.seq_len,
        "calibration_tokens": sum(b.input_ids.numel() for b in calib),
        "holdout_samples": sum(b.input_ids.shape[0] for b in held),
        "evaluation_tokens": int(windows.numel()),
        "labeled": False,
    }
    return PreparedData(calib, EvalSet(batches(windows)), description, held)


def model_label_names(model) -> Optional[list[str]]:
    """The class names of a fine-tuned head (config.id2label), None when they are transformers'
    placeholders (LABEL_0, LABEL_1, ...: the head's labels were never named)."""
    id2label = getattr(getattr(model, "config", None), "id2label", None) or {}
    names = [str(id2label[i]) for i in sorted(id2label)]
    return None if not names or names == [f"LABEL_{i}" for i in range(len(names))] else names


def align_labels(splits: list[Optional[D.TextDataset]], model=None) -> list[Optional[D.TextDataset]]:
    """String labels mapped to one set of ids for every split: the model's own label names when it
    has them, else the sorted union of the splits' names (a split that holds only some of the labels
    must not renumber them)."""
    named = [s for s in splits if s is not None and s.label_names is not None and s.labels is not None]
    if not named:
        return splits
    names = model_label_names(model) or sorted(set().union(*(s.label_names for s in named)))
    return [D.relabel(s, names) if any(s is n for n in named) else s for s in splits]


def prepare_data(cfg_data, loaded: LoadedModel, calibration: bool = True, holdout: int = 0) -> PreparedData:
    """Tokenized calibration batches (none with calibration=False: evaluating a saved artifact),
    `holdout` held-out calibration samples after them, and the evaluation set, checked against the
    model (labels for a classifier); a causal LM's follow the LLM protocol (prepare_lm_data)."""
    if isinstance(loaded.task, CausalLM):
        return prepare_lm_data(cfg_data, loaded, calibration, holdout)
    train, evaluation, spec = load_splits(cfg_data, calibration)
    if cfg_data.name == "local" and isinstance(loaded.task, SequenceClassification):
        # Files name their labels; GLUE's ids are the hub's own and fixed.
        train, evaluation = align_labels([train, evaluation], loaded.model)
    calib: list[D.Batch] = []
    held: list[D.Batch] = []
    n_calib = 0
    if train is not None:
        if len(train) == 0:
            raise ValueError(f"the calibration source of data={cfg_data.name} is empty: give it at least one row")
        n_calib = min(cfg_data.calib_samples, len(train))
        if n_calib < cfg_data.calib_samples:
            log.warning("data has %d calibration rows, fewer than data.calib_samples=%d: using all", n_calib, cfg_data.calib_samples)
        n_held = split_holdout(n_calib, len(train), holdout, f"data.calib_samples={n_calib} of {len(train)} rows")
        # One seeded permutation: the calibration rows are its first n_calib whatever the holdout.
        order = D.sample_indices(len(train), n_calib + n_held, cfg_data.seed)
        calib = D.make_batches(D.tokenize(train, loaded.tokenizer, cfg_data.max_length, order[:n_calib]), cfg_data.batch_size)
        if n_held:
            held = D.make_batches(D.tokenize(train, loaded.tokenizer, cfg_data.max_length, order[n_calib:]),
                                  cfg_data.batch_size)

    eval_idx = D.sample_indices(len(evaluation), min(cfg_data.eval_samples, len(evaluation)), cfg_data.seed + 1)
    labels = [evaluation.labels[i] for i in eval_idx] if evaluation.labels is not None else None
    metric_names: tuple[str, ...] = ()
    regression = False
    task = loaded.task
    if isinstance(task, SequenceClassification):
        if labels is None:
            raise ValueError(
                f"model {loaded.path} is a classifier but data={cfg_data.name} has no labels: give labeled evaluation "
                "data (data.label_field=<column>) or use model.kind=encoder to measure fidelity instead"
            )
        n_labels = spec.num_labels if spec else len(set(labels))
        if spec is not None and spec.num_labels != task.num_labels:
            raise ValueError(
                f"model {loaded.path} has {task.num_labels} output labels but task {spec.name} has {spec.num_labels}: "
                "use a checkpoint fine-tuned on this task"
            )
        if spec is None and n_labels > task.num_labels:
            raise ValueError(
                f"the evaluation labels take {n_labels} values but model {loaded.path} predicts {task.num_labels}: "
                "use a checkpoint fine-tuned on these labels"
            )
        regression = task.num_labels == 1
        metric_names = spec.metrics if spec else (("pearson", "spearman") if regression else ("accuracy",))
    encoded = D.tokenize(evaluation, loaded.tokenizer, cfg_data.max_length, eval_idx)
    eval_batches = D.make_batches(encoded, cfg_data.batch_size, labels)
    description = {
        "name": cfg_data.name,
        "calibration_samples": n_calib,
        "holdout_samples": sum(b.input_ids.shape[0] for b in held),
        "evaluation_samples": len(eval_idx),
        "max_length": cfg_data.max_length,
        "labeled": labels is not None,
    }
    return PreparedData(calib, EvalSet(eval_batches, metric_names, regression), description, held)


def task_train_split(cfg_data) -> tuple[D.TextDataset, int]:
    """The labeled training split, and the outputs a classifier for it needs: the GLUE table's,
    else the label names' count, 1 for float labels (regression), or the largest class id + 1."""
    train, evaluation, spec = load_splits(cfg_data)
    if cfg_data.name == "local":
        train, _ = align_labels([train, evaluation])
    if train.labels is None:
        raise ValueError(f"data={cfg_data.name} has no labels to fine-tune on: set data.label_field=<the label column>")
    if spec is not None:
        return train, spec.num_labels
    if train.label_names:
        return train, len(train.label_names)
    if any(isinstance(v, float) for v in train.labels):
        return train, 1
    return train, int(max(train.labels)) + 1


def prepare_train(train: D.TextDataset, cfg_data, loaded: LoadedModel) -> TrainSet:
    """data.train_samples (0 = all) labeled examples of `train`, tokenized for `loaded`."""
    n = len(train) if cfg_data.train_samples == 0 else min(cfg_data.train_samples, len(train))
    if n < cfg_data.train_samples:
        log.warning("data has %d training rows, fewer than data.train_samples=%d: using all", n, cfg_data.train_samples)
    if train.label_names and model_label_names(loaded.model) is None:
        # A new head: name its classes, so that the fine-tuned model maps labels the same way later.
        loaded.model.config.id2label = dict(enumerate(train.label_names))
        loaded.model.config.label2id = {name: i for i, name in enumerate(train.label_names)}
    idx = D.sample_indices(len(train), n, cfg_data.seed + 2)
    labels = [train.labels[i] for i in idx]
    num_labels = loaded.task.num_labels
    regression = num_labels == 1
    if not regression and (min(labels) < 0 or max(labels) >= num_labels):
        raise ValueError(f"training labels span {min(labels)}..{max(labels)} but the model has {num_labels} outputs: "
                         "use class ids 0..num_labels-1")
    target = torch.tensor(labels, dtype=torch.float32 if regression else torch.long)
    return TrainSet(D.tokenize(train, loaded.tokenizer, cfg_data.max_length, idx), target)
