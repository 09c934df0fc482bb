"""The GLUE task table: which columns hold the text, how many labels, which metrics."""

from __future__ import annotations

from dataclasses import dataclass


# kw_only lets the fields keep their natural order although defaults sit in the middle.
@dataclass(frozen=True, kw_only=True)
class TaskSpec:
    """How to read and score one GLUE task."""

    name: str
    text_fields: tuple[str, ...]
    label_field: str = "label"
    num_labels: int  # 1 means regression (stsb)
    metrics: tuple[str, ...]
    train_split: str = "train"
    eval_split: str = "validation"
    hub_path: str = "nyu-mll/glue"
    hub_name: str


def _spec(name: str, text_fields: tuple[str, ...], num_labels: int, metrics: tuple[str, ...],
          eval_split: str = "validation") -> TaskSpec:
    # On the hub every GLUE task is a config of nyu-mll/glue named like the task itself.
    return TaskSpec(name=name, text_fields=text_fields, num_labels=num_labels, metrics=metrics,
                    hub_name=name, eval_split=eval_split)


_PAIR = ("sentence1", "sentence2")

GLUE_TASKS: dict[str, TaskSpec] = {
    spec.name: spec
    for spec in (
        _spec("cola", ("sentence",), 2, ("mcc",)),
        _spec("sst2", ("sentence",), 2, ("accuracy",)),
        _spec("mrpc", _PAIR, 2, ("accuracy", "f1")),
        _spec("qqp", ("question1", "question2"), 2, ("accuracy", "f1")),
        _spec("stsb", _PAIR, 1, ("pearson", "spearman")),
        # MNLI has two dev sets; matched (same genres as train) is the one usually reported.
        _spec("mnli", ("premise", "hypothesis"), 3, ("accuracy",), eval_split="validation_matched"),
        _spec("qnli", ("question", "sentence"), 2, ("accuracy",)),
        _spec("rte", _PAIR, 2, ("accuracy",)),
        _spec("wnli", _PAIR, 2, ("accuracy",)),
    )
}


def get_task(name: str) -> TaskSpec:
    """The spec of GLUE task `name` (case-insensitive, e.g. 'sst2' or 'SST-2')."""
    key = name.strip().lower().replace("-", "")
    if key not in GLUE_TASKS:
        known = ", ".join(sorted(GLUE_TASKS))
        raise ValueError(
            f"unknown GLUE task {name!r}: choose one of {known}, "
            f"or data=local for your own files"
        )
    return GLUE_TASKS[key]
