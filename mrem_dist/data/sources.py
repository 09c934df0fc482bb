"""Load GLUE tasks, local files or the built-in texts into one uniform form, TextDataset."""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from .builtin import builtin_texts
from .glue import get_task

# Extension -> (datasets packaged builder, extra builder kwargs). These builders are part of the
# datasets package, so loading local files never touches the network.
_LOCAL_FORMATS: dict[str, tuple[str, dict[str, Any]]] = {
    ".csv": ("csv", {}),
    ".tsv": ("csv", {"delimiter": "\t"}),
    ".json": ("json", {}),
    ".jsonl": ("json", {}),
    ".parquet": ("parquet", {}),
}


@dataclass
class TextDataset:
    """Single sentences (texts_b None) or sentence pairs, with optional labels.

    labels are int class ids, or floats for regression; label_names[i] is the original name of
    class id i when the file had string labels.
    """

    texts_a: list[str]
    texts_b: list[str] | None
    labels: list[float | int] | None
    name: str
    label_names: list[str] | None = None

    def __post_init__(self) -> None:
        n = len(self.texts_a)
        for field, values in (("texts_b", self.texts_b), ("labels", self.labels)):
            if values is not None and len(values) != n:
                raise ValueError(
                    f"dataset {self.name!r}: {field} has {len(values)} entries but texts_a has {n}: "
                    f"every example needs one of each"
                )

    def __len__(self) -> int:
        return len(self.texts_a)


def _columns_to_dataset(
    columns: dict[str, list[Any]],
    text_fields: Sequence[str],
    label_field: str | None,
    source: str,
    name: str,
    class_names: list[str] | None = None,
) -> TextDataset:
    """Validate and convert loaded columns; `source` names the file or hub task in errors."""
    available = ", ".join(columns) or "(none)"
    for field in text_fields:
        if field not in columns:
            raise ValueError(
                f"text column {field!r} not found in {source}; available columns: {available}. "
                f"Set data.text_fields=[...] to the column(s) holding the text"
            )
    if label_field and label_field not in columns:
        raise ValueError(
            f"label column {label_field!r} not found in {source}; available columns: {available}. "
            f"Set data.label_field=... to the label column, or data.label_field='' for unlabeled data"
        )

    texts: list[list[str]] = []
    for field in text_fields:
        values = columns[field]
        # Whitespace is no text either: a row of spaces tokenizes to nothing but special tokens.
        missing = [i for i, v in enumerate(values) if v is None or (isinstance(v, str) and not v.strip())]
        if missing:
            raise ValueError(
                f"text column {field!r} in {source} is empty or whitespace only in {len(missing)} row(s), first at "
                f"row {missing[0]}: fill or remove those rows"
            )
        # Numbers-only texts come back from csv as ints; the tokenizer wants strings.
        texts.append([v if isinstance(v, str) else str(v) for v in values])

    labels: list[float | int] | None = None
    label_names = class_names
    if label_field:
        raw = columns[label_field]
        missing = [i for i, v in enumerate(raw) if v is None]
        if missing:
            raise ValueError(
                f"label column {label_field!r} in {source} is empty in {len(missing)} row(s), first "
                f"at row {missing[0]}: fill them, or set data.label_field='' to load without labels"
            )
        if all(isinstance(v, str) for v in raw):
            # Sorted so the same label set always maps to the same ids, whatever the row order.
            label_names = sorted(set(raw))
            ids = {n: i for i, n in enumerate(label_names)}
            labels = [ids[v] for v in raw]
        elif all(isinstance(v, (bool, int)) for v in raw):
            labels = [int(v) for v in raw]
        elif all(isinstance(v, (bool, int, float)) for v in raw):
            labels = [float(v) for v in raw]  # regression targets (e.g. STS-B similarity)
        else:
            kinds = sorted({type(v).__name__ for v in raw})
            raise ValueError(
                f"label column {label_field!r} in {source} mixes value types {kinds}: use only class "
                f"names, only integer ids, or only real numbers"
            )

    return TextDataset(
        texts_a=texts[0],
        texts_b=texts[1] if len(texts) == 2 else None,
        labels=labels,
        name=name,
        label_names=label_names,
    )


def relabel(dataset: TextDataset, names: Sequence[str]) -> TextDataset:
    """The dataset with its string labels mapped to ids by `names` (the model's label2id, or one
    mapping shared by every split) instead of by its own sorted label set."""
    if dataset.label_names is None or dataset.labels is None:
        return dataset
    index = {n: i for i, n in enumerate(names)}
    unknown = sorted(set(dataset.label_names) - set(index))
    if unknown:
        raise ValueError(f"labels {unknown} of {dataset.name} are not among the model's labels {list(names)}: "
                         "use the label names the model was fine-tuned with")
    labels = [index[dataset.label_names[i]] for i in dataset.labels]
    return replace(dataset, labels=labels, label_names=list(names))


def _check_text_fields(text_fields: Sequence[str] | str) -> list[str]:
    # A bare string would otherwise be iterated character by character.
    fields = [text_fields] if isinstance(text_fields, str) else list(text_fields)
    if not 1 <= len(fields) <= 2:
        raise ValueError(
            f"got {len(fields)} text fields {fields}: set data.text_fields to one column (single "
            f"sentences) or two columns (sentence pairs)"
        )
    return fields


def load_local(
    path: str | os.PathLike[str],
    text_fields: Sequence[str] | str,
    label_field: str | None,
    cache_dir: str | None = None,
) -> TextDataset:
    """Load a .csv, .tsv, .json, .jsonl or .parquet file (label_field None or '' = unlabeled)."""
    import datasets
    from datasets.exceptions import DatasetGenerationError

    fields = _check_text_fields(text_fields)
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(
            f"data file not found: {str(file)!r} (resolved to {str(file.resolve())!r}); check "
            f"data.train_file / data.validation_file"
        )
    suffix = file.suffix.lower()
    if suffix not in _LOCAL_FORMATS:
        raise ValueError(
            f"unsupported data file extension {suffix or '(none)'!r} for {str(file)!r}: use one of "
            f"{', '.join(_LOCAL_FORMATS)}"
        )
    if suffix != ".parquet" and not file.read_bytes().strip():
        raise ValueError(f"data file {str(file)!r} is empty: add a header row and examples")

    builder, kwargs = _LOCAL_FORMATS[suffix]
    try:
        ds = datasets.load_dataset(
            builder, data_files=str(file), split="train", cache_dir=cache_dir, **kwargs
        )
    except DatasetGenerationError as e:
        raise ValueError(
            f"could not read {str(file)!r} as {suffix[1:]}: {e.__cause__ or e}; check that the "
            f"file is valid {suffix[1:]} with one example per row"
        ) from e
    except ValueError as e:
        # datasets' wording for a file with a header (csv) or a [] (json) but no rows.
        if "corresponds to no data" not in str(e):
            raise
        raise ValueError(f"data file {str(file)!r} holds no examples: add some rows") from e
    if len(ds) == 0:
        raise ValueError(f"data file {str(file)!r} holds no examples: add some rows")
    return _columns_to_dataset(
        ds.to_dict(), fields, label_field or None, source=f"file {str(file)!r}", name=file.name
    )


def load_glue(task: str, split: str, cache_dir: str | None = None) -> TextDataset:
    """GLUE `task` ('train' or 'eval' split) from the Hugging Face hub or its local cache."""
    import datasets
    from datasets.exceptions import DatasetNotFoundError
    from huggingface_hub.errors import LocalEntryNotFoundError

    spec = get_task(task)
    splits = {"train": spec.train_split, "eval": spec.eval_split}
    if split not in splits:
        raise ValueError(f"unknown split {split!r} for GLUE task {spec.name!r}: use 'train' or 'eval'")
    hub_split = splits[split]
    try:
        ds = datasets.load_dataset(spec.hub_path, spec.hub_name, split=hub_split, cache_dir=cache_dir)
    # ConnectionError covers no network and HF_HUB_OFFLINE (OfflineModeIsEnabled); the other two are
    # what the hub client raises when the dataset is neither reachable nor in the local cache.
    except (ConnectionError, LocalEntryNotFoundError, DatasetNotFoundError) as e:
        fields = ",".join(spec.text_fields)
        raise RuntimeError(
            f"GLUE task {spec.name!r} ({spec.hub_path}/{spec.hub_name}, split {hub_split}) could not "
            f"be downloaded: {e}. To fix: connect to the Hugging Face hub; or set HF_DATASETS_CACHE "
            f"to a datasets cache that already holds it; or export the task to csv/json/parquet and "
            f"use data=local data.train_file=... data.validation_file=... "
            f"data.text_fields=[{fields}] data.label_field={spec.label_field}"
        ) from e
    class_names = getattr(ds.features.get(spec.label_field), "names", None)
    return _columns_to_dataset(
        ds.to_dict(),
        spec.text_fields,
        spec.label_field,
        source=f"GLUE task {spec.name!r} split {hub_split}",
        name=f"glue/{spec.name}/{split}",
        class_names=list(class_names) if class_names else None,
    )


def load_builtin(split: str) -> TextDataset:
    """The built-in pydoc texts ('calibration' or 'evaluation'), unlabeled single sentences."""
    return TextDataset(
        texts_a=builtin_texts(split), texts_b=None, labels=None, name=f"builtin/{split}"
    )
