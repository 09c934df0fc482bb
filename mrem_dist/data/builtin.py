"""Real English text that ships with every CPython: the pydoc topic help (pydoc_data.topics).

It is the default calibration/evaluation data when no dataset is configured, so a quantization run
works offline with nothing downloaded. The text is reference documentation rendered as plain text
(reST output): prose paragraphs mixed with grammar rules, code examples, tables and headings, which
are filtered out here so that only English prose remains.
"""

from __future__ import annotations

import hashlib
import re
from functools import lru_cache

_SPLITS = ("calibration", "evaluation")
# Share of topics (by stable hash of the topic name) that go to calibration; the rest evaluate.
_CALIBRATION_PERCENT = 80

# A sentence ends at . ! or ? (maybe followed by a closing quote or parenthesis) and the next one
# starts with a capital letter, a digit or an opening quote/parenthesis.
# Only the whitespace is consumed, so the closing quote stays with its sentence.
_SENTENCE_END = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)\]]))\s+(?=[A-Z0-9\"“‘(])")
# A paragraph or chunk must end like a sentence; what does not (signatures like "class dict(**kw)",
# headings, code fragments such as "except E as N: foo") is not prose.
_ENDS_LIKE_PROSE = re.compile(r"[.!?:][\"'”’)\]]*$")
_FOOTNOTE_REF = re.compile(r"\s*\[\d+\]")
_BULLET = re.compile(r"^(?:[*\-•+]|\d+\.|\(\d+\))\s+")
_UNDERLINE = re.compile(r"^\s*([*=\-^~#])\1{2,}\s*$")
# Interactive prompts (Python, pdb, shell), grammar rules and table borders/rows.
_CODE_LINE = re.compile(r"^\s*(?:>>>|\.\.\.(?:\s|$)|\(Pdb\)|->\s|>\s|\$\s|\||\+[-=])|::=")


def _is_code_block(lines: list[str]) -> bool:
    """True for blocks that are not prose: examples, grammar rules, tables, symbol lists."""
    if any(_CODE_LINE.search(ln) for ln in lines):
        return True
    # Judged on the whole block, not per line: a wrapped prose line can be all quotes and symbols
    # ('"<", or "^").'), but prose as a whole is mostly letters while code is not.
    visible = [c for ln in lines for c in ln if not c.isspace()]
    letters = sum(c.isalpha() for c in visible)
    return letters < 0.6 * len(visible)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip(" "))


def _paragraphs(text: str) -> list[str]:
    """Prose paragraphs of one topic, whitespace-normalised, code-like blocks removed."""
    out: list[str] = []
    prev_indent, prev_ended_colon = 0, False
    for block in re.split(r"\n\s*\n", text):
        # Heading underlines ("*****", "=====") go; the heading itself is dropped later because it
        # does not end like a sentence.
        lines = [ln.rstrip() for ln in block.split("\n") if ln.strip() and not _UNDERLINE.match(ln)]
        if not lines:
            continue
        indent = min(_indent(ln) for ln in lines)
        # In the rendered reST a literal/code block is a deeper-indented block after a paragraph
        # that ends with ':' ("... is equivalent to:"), even when its lines look like words.
        is_literal = prev_ended_colon and indent > prev_indent
        prev_indent, prev_ended_colon = indent, lines[-1].endswith(":")
        if is_literal or _is_code_block(lines):
            continue
        # Line wrapping split hyphenated words ("non-\nnumeric"); rejoin them without a space.
        para = re.sub(r"(?<=[A-Za-z]-)\n\s*", "", "\n".join(ln.strip() for ln in lines))
        para = _BULLET.sub("", para)
        para = _FOOTNOTE_REF.sub("", para)
        para = re.sub(r"\s+", " ", para).strip()
        if para:
            out.append(para)
    return out


def _chunks(paragraph: str, min_chars: int, max_chars: int) -> list[str]:
    """Cut a paragraph at sentence boundaries into pieces of min_chars..max_chars characters."""
    pieces: list[str] = []
    current = ""
    for sentence in _SENTENCE_END.split(paragraph):
        if len(sentence) > max_chars:
            # A single sentence longer than max_chars cannot be cut at a sentence boundary; drop it
            # rather than emit a truncated fragment.
            if current:
                pieces.append(current)
            current = ""
            continue
        candidate = f"{current} {sentence}" if current else sentence
        if len(candidate) <= max_chars:
            current = candidate
        else:
            pieces.append(current)
            current = sentence
    if current:
        pieces.append(current)
    return [p for p in pieces if len(p) >= min_chars and _ENDS_LIKE_PROSE.search(p)]


def topic_split(topic: str) -> str:
    """'calibration' or 'evaluation' for a pydoc topic, from a hash that is stable across runs."""
    # md5 rather than hash(): str hashes are salted per process (PYTHONHASHSEED).
    bucket = int(hashlib.md5(topic.encode("utf-8")).hexdigest(), 16) % 100
    return "calibration" if bucket < _CALIBRATION_PERCENT else "evaluation"


@lru_cache(maxsize=8)
def _builtin_texts(split: str, min_chars: int, max_chars: int) -> tuple[str, ...]:
    from pydoc_data.topics import topics

    seen: set[str] = set()
    selected: list[str] = []
    # Deduplicate over ALL topics before splitting, so a text repeated in two topics lands only in
    # the split of the first topic (by name) that holds it and the splits never overlap.
    for topic in sorted(topics):
        for paragraph in _paragraphs(topics[topic]):
            for text in _chunks(paragraph, min_chars, max_chars):
                if text in seen:
                    continue
                seen.add(text)
                if topic_split(topic) == split:
                    selected.append(text)
    return tuple(selected)


def builtin_texts(split: str, min_chars: int = 40, max_chars: int = 400) -> list[str]:
    """English prose from CPython's pydoc topics, for 'calibration' or 'evaluation'.

    The two splits come from disjoint sets of topics, so the evaluation texts are held out from
    calibration. The order is deterministic (topics by name, then position in the topic).
    """
    if split not in _SPLITS:
        raise ValueError(f"unknown builtin split {split!r}: use one of {', '.join(_SPLITS)}")
    if not 0 < min_chars <= max_chars:
        raise ValueError(
            f"need 0 < min_chars <= max_chars, got min_chars={min_chars}, max_chars={max_chars}: "
            f"raise max_chars or lower min_chars"
        )
    return list(_builtin_texts(split, min_chars, max_chars))
