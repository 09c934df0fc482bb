"""The data protocol of decoder-LLM post-training quantization, as GPTQ, AWQ and AutoRound report it.

Text is one token stream: the documents are joined with a separator ("\\n\\n", as GPTQ joins
WikiText-2) and tokenized once, without the tokenizer's special tokens at the ends. Calibration
draws n windows of seq_len tokens at seeded random offsets of that stream (GPTQ's sampling: 128
windows of 2048 tokens in the papers); perplexity runs over its first non-overlapping windows of
seq_len tokens, the trailing partial window dropped. No padding anywhere: every token is real text
and every window is full, so perplexities of two models on the same stream compare exactly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

SUFFIXES = (".txt", ".jsonl", ".json")
MAX_UNKNOWN_FRACTION = 0.01  # more unknown tokens than this: the tokenizer does not cover the text


def load_text_file(path: str | Path, text_field: str = "text") -> list[str]:
    """The documents of a local text file.

    .txt: the whole file is ONE document (the text as written, blank lines and all: the stream is
    tokenized as one piece anyway, so cutting it would only change where separators go).
    .jsonl: one JSON object per line, its text under `text_field`; blank lines are skipped.
    .json: a list of such objects, or an object holding exactly one such list (e.g. {"data": [...]}).
    Documents that are empty or only whitespace are skipped; a file that leaves none is an error.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"the text file {path} does not exist: give the path of a .txt, .jsonl or .json file")
    suffix = path.suffix.lower()
    if suffix not in SUFFIXES:
        raise ValueError(f"{path}: unknown extension {path.suffix or '(none)'!r}: use a .txt file (plain text), a "
                         f".jsonl file (one JSON object per line with a {text_field!r} field) or a .json file (a "
                         "list of such objects)")
    try:
        raw = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path} is not UTF-8 text ({e}): save it as UTF-8") from e
    if not raw.strip():
        raise ValueError(f"{path} is empty: put the text to calibrate or evaluate on into it")

    if suffix == ".txt":
        return [raw]
    if suffix == ".jsonl":
        records: list[tuple[str, object]] = []
        for n, line in enumerate(raw.splitlines(), 1):
            if line.strip():
                records.append((f"{path}:{n}", _parse_json(line, f"{path}:{n}", "one JSON object per line")))
    else:
        records = [(f"{path} record {k}", r) for k, r in enumerate(_json_list(path, _parse_json(raw, str(path), "JSON")))]

    texts = [_text_of(record, where, text_field) for where, record in records]
    texts = [t for t in texts if t.strip()]
    if not texts:
        raise ValueError(f"{path} holds no text: every {text_field!r} field is empty")
    return texts


def _parse_json(raw: str, where: str, expected: str) -> object:
    try:
        return json.loads(raw)
    except json.JSONDecodeError as e:
        raise ValueError(f"{where} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): "
                         f"the file must hold {expected}") from e


def _json_list(path: Path, data: object) -> list:
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = [key for key, value in data.items() if isinstance(value, list)]
        if len(lists) == 1:
            return data[lists[0]]
        raise ValueError(f"{path} holds a JSON object with {len(lists)} lists (keys: {', '.join(map(str, data)) or 'none'}): "
                         "it must be a list of objects, or an object holding exactly one such list")
    raise ValueError(f"{path} holds a JSON {type(data).__name__}, not a list of objects: write [{{\"text\": ...}}, ...]")


def _text_of(record: object, where: str, text_field: str) -> str:
    if not isinstance(record, dict):
        raise ValueError(f"{where} is a JSON {type(record).__name__}, not an object: write {{\"{text_field}\": ...}}")
    if text_field not in record:
        keys = ", ".join(map(str, record)) or "none"
        raise ValueError(f"{where} has no field {text_field!r} (its keys: {keys}): name the field holding the text "
                         "(the text_field setting) or add it")
    text = record[text_field]
    if not isinstance(text, str):
        raise ValueError(f"{where}: the field {text_field!r} holds a JSON {type(text).__name__}, not a string")
    return text


def tokenize_corpus(texts: list[str], tokenizer, separator: str = "\n\n") -> torch.LongTensor:
    """One 1-D token stream: the documents joined with `separator`, tokenized in ONE call.

    One call on the joined text (as GPTQ does) rather than per document: tokenizers that mark word
    starts (SentencePiece's "▁", byte-level BPE's leading space) would tokenize a document start
    differently when cut out of the stream. add_special_tokens=False: no BOS/EOS/CLS/SEP inside the
    stream; a model that wants a BOS gets it per window from its caller. verbose=False silences the
    "sequence longer than model_max_length" warning: the stream is cut into windows afterwards.
    """
    if isinstance(texts, str):
        raise TypeError("tokenize_corpus takes a list of documents, not one string: pass [text]")
    documents = [t for t in texts if t.strip()]
    if not documents:
        raise ValueError("there is no text to tokenize: every document is empty")
    ids = tokenizer(separator.join(documents), add_special_tokens=False, verbose=False)["input_ids"]
    stream = torch.tensor(ids, dtype=torch.long)
    unk = getattr(tokenizer, "unk_token_id", None)
    if unk is not None and stream.numel():
        fraction = (stream == unk).double().mean().item()
        if fraction > MAX_UNKNOWN_FRACTION:
            raise ValueError(f"the tokenizer of this model does not cover the characters of this text "
                             f"({100 * fraction:.1f}% unknown tokens): use text in the model's language/script or "
                             "another model")
    return stream


def _check_stream(ids: Tensor, seq_len: int, what: str) -> None:
    if ids.dim() != 1:
        raise ValueError(f"the {what} token ids must be one 1-D stream, not shape {tuple(ids.shape)}: "
                         "use tokenize_corpus")
    if seq_len < 1:
        raise ValueError(f"data.seq_len={seq_len} must be at least 1")
    if ids.numel() < seq_len:
        raise ValueError(f"the {what} text has {ids.numel()} tokens, fewer than one window of data.seq_len={seq_len}: "
                         "give more text or lower data.seq_len")


def calibration_sequences(ids: Tensor, n: int, seq_len: int, seed: int) -> Tensor:
    """[n, seq_len] windows of the stream at random start offsets drawn from a seeded generator.

    GPTQ's calibration sampling: each window starts anywhere (uniform over the len - seq_len + 1
    full windows), windows may overlap, the same seed gives the same windows on every machine."""
    _check_stream(ids, seq_len, "calibration")
    if n < 1:
        raise ValueError(f"the number of calibration sequences must be at least 1, got {n}")
    generator = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, ids.numel() - seq_len + 1, (n,), generator=generator)
    return ids.unfold(0, seq_len, 1)[starts].clone()


def eval_windows(ids: Tensor, seq_len: int, max_windows: int) -> Tensor:
    """[k, seq_len]: the first k = min(max_windows, len // seq_len) non-overlapping windows.

    The perplexity protocol of GPTQ/AWQ: consecutive windows from the start of the stream, each
    scored on its own; the trailing partial window is dropped so every window has the same length."""
    _check_stream(ids, seq_len, "evaluation")
    if max_windows < 1:
        raise ValueError(f"the number of evaluation windows must be at least 1, got {max_windows}")
    k = min(max_windows, ids.numel() // seq_len)
    return ids[: k * seq_len].reshape(k, seq_len).clone()
