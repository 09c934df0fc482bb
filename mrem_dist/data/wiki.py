"""Real English Wikipedia prose for decoder-LLM calibration and perplexity (data=wiki), offline
after one fetch from PyPI.

Source: the wheels of `gensim==4.4.0` on PyPI ship, as test data,
gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2: a
shortened English Wikipedia XML export (MediaWiki export schema 0.10, 2016) of 206 pages, ~106 of
them full articles (Anarchism, Autism, Albedo, Alabama, Aristotle, ...). The first use downloads ONE
pinned wheel with `pip download --no-deps` (24.4 MB; gensim is not installed, nothing of it is
imported), checks its SHA-256, keeps only that 1.7 MB .bz2 member (as is, also SHA-checked) in the
cache ($MREM_DIST_DATA/wiki, else ~/.cache/mrem_dist/wiki), and every later use reads the cache.
One fixed wheel, gensim-4.4.0-cp311-cp311-win_amd64.whl, is selected on every machine
(`--only-binary=:all: --platform win_amd64 --python-version 3.11 ...`) so that its pinned SHA-256
holds everywhere; it is never installed, only opened as a zip. Not the sdist: `pip download` of
an sdist runs gensim's build backend just to read its metadata (with `--no-binary :all:` it builds
Cython and numpy from source first): minutes of CPU, and it failed on this project's machine.

Licence: Wikipedia text is CC BY-SA (3.0 at the time of the dump; attribution: the Wikipedia
contributors of each article). gensim itself is LGPL-2.1; only its test data file is used.

Kept: pages of the article namespace (ns 0) that are not redirects, not disambiguation pages, not
"List of ..." pages, not tagged as stubs ({{...-stub}}) and with at least MIN_WORDS words of prose
after stripping. Each article becomes one plain-text string: its title on the first line, then its
prose; section headings ("== History ==") are kept as a line of their own ("History"), paragraphs
are separated by one blank line. Stripped: HTML comments; <ref>...</ref> and self-closing refs;
the content of <math>, <gallery>, <timeline>, <score>, <syntaxhighlight>, <source>, <imagemap>;
every other tag (its content kept); templates {{...}} (nested ones and {{{parameters}}} included),
tables {|...|}; file/image/media, category and interlanguage links; [[target|text]] -> text,
[[target]] -> target; [url text] -> text; '''bold''' and ''italic'' quotes; list markers; magic
words (__TOC__); whole "See also", "References", "Notes", "External links", "Further reading",
"Bibliography", "Sources" sections (lists of links and citations, not prose); then HTML entities
are unescaped, non-breaking spaces become spaces, empty brackets left by removed templates are
dropped and runs of blank lines collapse to one.

Splits, by article: a stable hash of the title (md5 of the UTF-8 title, % 100) sends 40% of the
buckets to "calibration" and 60% to "evaluation"; the articles are long and few, and 40/60 is what
balances the words (measured: 94 articles, 433K words; calibration 44 articles / 223.5K words,
evaluation 50 articles / 209.5K words, near the 245K words of WikiText-2's test split). No
article, and so no sentence of one, is on both sides.

This is the domain of WikiText-2 (Good and Featured Wikipedia articles) but not its text, and it is
stripped differently: perplexities on it compare with each other (FP16 against quantized, method
against method), not with the WikiText-2 numbers of papers.
"""

from __future__ import annotations

import bz2
import hashlib
import html
import io
import re
import tempfile
import xml.etree.ElementTree as ET
import zipfile
from functools import lru_cache
from pathlib import Path

from mrem_dist.io import atomic_write_bytes, cache_root, pip_download
from mrem_dist.log import get_logger

log = get_logger(__name__)

PACKAGE = "gensim==4.4.0"
WHEEL = "gensim-4.4.0-cp311-cp311-win_amd64.whl"
WHEEL_SHA256 = "5e2c1d584d1c7d16b2a0fe7d2f6f59a451422df7b5edb7e3ca46c8e462782127"
_PIP_SELECT = ["--only-binary=:all:", "--platform", "win_amd64", "--python-version", "3.11",
               "--implementation", "cp", "--abi", "cp311"]
_MEMBER = "gensim/test/test_data/enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
FILE = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
FILE_SHA256 = "a53f4648dec40467ebdcbc7a1307eddb51fe6e28e9309f6ebde81ba0d04bea2d"
SPLITS = ("calibration", "evaluation")
_CALIBRATION_PERCENT = 40
MIN_WORDS = 100  # fewer words of prose after stripping: a stub, not an article

_NS = "{http://www.mediawiki.org/xml/export-0.10/}"
_DROP_SECTIONS = {"see also", "references", "notes", "notes and references", "footnotes", "external links",
                  "further reading", "bibliography", "sources", "citations", "works cited"}


def cache_dir() -> Path:
    """$MREM_DIST_DATA/wiki, else ~/.cache/mrem_dist/wiki."""
    return cache_root() / "wiki"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(folder: Path | None = None) -> Path:
    """The Wikipedia XML export (.bz2), downloaded from PyPI on first use; returns its path."""
    folder = folder or cache_dir()
    target = folder / FILE
    if target.is_file():
        return target
    log.info("data=wiki: downloading the %s wheel from PyPI once into %s", PACKAGE, folder)
    with tempfile.TemporaryDirectory() as tmp:
        blob = pip_download(PACKAGE, WHEEL, Path(tmp), _PIP_SELECT, WHEEL_SHA256,
                            fix=f"put {FILE} (the member {_MEMBER} of that wheel, a zip file) into {folder}").read_bytes()
    with zipfile.ZipFile(io.BytesIO(blob)) as whl:
        data = whl.read(_MEMBER)
    if _sha256(data) != FILE_SHA256:
        raise RuntimeError(f"{_MEMBER} in {WHEEL} does not have the expected SHA-256 {FILE_SHA256}")
    atomic_write_bytes(target, data)  # a concurrent or interrupted fetch never leaves half a file
    return target


# --- wiki markup -> plain prose -------------------------------------------------------------------

_BRACE = re.compile(r"\{\{|\}\}|\{\||\|\}")
_COMMENT = re.compile(r"<!--.*?(?:-->|\Z)", re.S)
_REF = re.compile(r"<ref\b[^>]*/\s*>|<ref\b(?:[^>]*[^/>])?>.*?</ref\s*>", re.S | re.I)  # <ref name="a/b"/> too
_DROP_TAGS = re.compile(r"<(math|gallery|timeline|score|syntaxhighlight|source|imagemap|chem|ce|hiero)\b[^>]*>"
                        r".*?</\1\s*>", re.S | re.I)
_TAG = re.compile(r"</?[A-Za-z][^<>]*>")
_INNER_LINK = re.compile(r"\[\[((?:[^\[\]]|\[(?!\[)|\](?!\]))*)\]\]")  # holds no [[ or ]]
# File/Image/Media/Category links vanish (their captions too); so do interlanguage links ([[de:...]]).
_DROP_LINK = re.compile(r"(?i:\s*(?:file|image|media|category)\s*:)|[a-z]{2,3}(?:-[a-z]+)*:")
_EXTERNAL = re.compile(r"\[(?:https?:|ftp:)?//[^\s\]]*\s*([^\]]*)\]")
_BARE_URL = re.compile(r"https?://\S+")
_QUOTES = re.compile(r"'{2,}")
_HEADING = re.compile(r"^(=+)\s*(.*?)\s*\1\s*$")
_MAGIC = re.compile(r"__[A-Z]+__")
_EMPTY_BRACKETS = re.compile(r"\s*\(\s*[,;:]?\s*\)|\s*\[\s*\]")
_HEADING_MARK = "\x00"
_SPACES = re.compile(r"[ \t]+")
_SPACE_BEFORE_PUNCT = re.compile(r" +([,.;:])")


def _strip_braces(text: str) -> str:
    """Remove templates ({{...}} and {{{...}}}, nested) and tables ({|...|}, nested), one scan.

    A depth counter rather than a regex: templates nest inside templates and tables inside both. A
    table opens with "{|" and closes with "|}" at the start of a line (MediaWiki's rule), which keeps
    "{{x|}}" from reading as a table end. An opener that is never closed (broken markup) drops only
    itself."""
    out: list[str] = []  # kept pieces of text
    stack: list[tuple[str, int]] = []  # (opener, len(out) when it opened)
    pos = 0
    while True:
        found = _BRACE.search(text, pos)
        if found is None:
            out.append(text[pos:])
            break
        i = found.start()
        out.append(text[pos:i])
        line_start = text[text.rfind("\n", 0, i) + 1:i].strip() == ""
        top = stack[-1][0] if stack else ""
        if text.startswith("{{{", i):
            stack.append(("{{{", len(out)))
            pos = i + 3
        elif text.startswith("{{", i):
            stack.append(("{{", len(out)))
            pos = i + 2
        elif text.startswith("{|", i) and line_start:
            stack.append(("{|", len(out)))
            pos = i + 2
        elif top == "{{{" and text.startswith("}}}", i):
            del out[stack.pop()[1]:]
            pos = i + 3
        elif top in ("{{", "{{{") and text.startswith("}}", i):
            del out[stack.pop()[1]:]
            pos = i + 2
        elif text.startswith("|}", i) and line_start and any(k == "{|" for k, _ in stack):
            while stack[-1][0] != "{|":  # templates left open inside the table end with it
                stack.pop()
            del out[stack.pop()[1]:]
            pos = i + 2
        else:
            out.append(text[i])
            pos = i + 1
    # Openers never closed (broken markup): keep what followed them, drop only the opener itself.
    return "".join(out)


def _link_text(match: re.Match) -> str:
    inner = match.group(1)
    target, _, label = inner.partition("|")
    if target.startswith(":"):  # [[:Category:X]] is a visible link to that page
        target = target[1:]
    elif _DROP_LINK.match(target):
        return ""
    if "|" in label:  # only File links take several parameters; keep the last as the text
        label = label.rsplit("|", 1)[1]
    if inner.endswith("|") and not label:  # the pipe trick: [[Paris, Texas|]] -> Paris
        return re.sub(r"\s*\(.*?\)\s*$", "", target.split(",")[0]).strip()
    return (label or target).strip()


def _links(text: str) -> str:
    """[[target|text]] -> text, [[target]] -> target, file/category/interlanguage links removed.

    Innermost first, so that a link inside a file caption resolves before the file link vanishes."""
    while True:
        new = _INNER_LINK.sub(_link_text, text)
        if new == text:
            return new
        text = new


def strip_markup(wikitext: str) -> str:
    """Plain prose from MediaWiki markup (what is removed: see the module docstring).

    Headings stay as a line of their own without the "=" signs; the sections in _DROP_SECTIONS go
    whole; paragraphs are separated by exactly one blank line."""
    text = _COMMENT.sub("", wikitext)
    text = _REF.sub("", text)
    text = _DROP_TAGS.sub("", text)
    text = _strip_braces(text)
    text = _links(text)
    text = _EXTERNAL.sub(r"\1", text)
    text = _TAG.sub("", text)
    text = _BARE_URL.sub("", text)
    text = _MAGIC.sub("", text)
    text = _QUOTES.sub("", text)
    text = text.replace("[[", "").replace("]]", "")  # unbalanced leftovers of broken markup

    lines: list[str] = []
    dropping_level = 0  # > 0: inside a dropped section of that heading level
    for raw in text.split("\n"):
        line = raw.strip()
        heading = _HEADING.match(line)
        if heading:
            level, title = len(heading.group(1)), heading.group(2).strip()
            if dropping_level and level > dropping_level:
                continue
            dropping_level = level if title.lower() in _DROP_SECTIONS else 0
            if not dropping_level and title:
                lines.extend(["", f"{_HEADING_MARK}{level}{title}", ""])  # marked until empty sections go
            continue
        if dropping_level:
            continue
        if line.startswith("----"):
            line = line.lstrip("-")
        lines.append(line.lstrip("*#:;").strip())

    text = html.unescape("\n".join(lines)).replace("\xa0", " ").replace("\u200b", "")
    text = _EMPTY_BRACKETS.sub("", text)
    text = _SPACES.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    paragraphs = ["\n".join(s.strip() for s in p.split("\n") if s.strip()) for p in re.split(r"\n\s*\n", text)]
    paragraphs = [p for p in paragraphs if p]

    def level(paragraph: str) -> int:  # heading level, 0 for prose
        return int(paragraph[1]) if paragraph.startswith(_HEADING_MARK) else 0

    # A heading whose section turned out empty (it was all a table, a gallery, a list of links) goes.
    kept = [p[2:].strip() if level(p) else p for k, p in enumerate(paragraphs)
            if not level(p) or (k + 1 < len(paragraphs) and not 0 < level(paragraphs[k + 1]) <= level(p))]
    return "\n\n".join(p for p in kept if p)


# --- pages, articles, splits ----------------------------------------------------------------------

_REDIRECT = re.compile(r"\s*#redirect", re.I)
_STUB = re.compile(r"\{\{[^{}|]*stub\s*(?:\||\}\})", re.I)
_DISAMBIGUATION = re.compile(r"\{\{\s*(?:disambig|disambiguation|dab|hndis|geodis|surname|given name)\b", re.I)


def split_of(title: str) -> str:
    """'calibration' or 'evaluation': md5 of the title, the same on every machine and Python."""
    bucket = int(hashlib.md5(title.encode("utf-8")).hexdigest(), 16) % 100
    return "calibration" if bucket < _CALIBRATION_PERCENT else "evaluation"


def _is_article(title: str, namespace: str, redirect: bool, wikitext: str) -> bool:
    if namespace != "0" or redirect or _REDIRECT.match(wikitext):
        return False
    if title.endswith("(disambiguation)") or title.startswith("List of") or _DISAMBIGUATION.search(wikitext):
        return False
    return not _STUB.search(wikitext)


def parse_export(path: Path) -> dict[str, str]:
    """Title -> plain text ("title\\n\\nprose") of every kept article of a MediaWiki XML export
    (.xml or .xml.bz2), streamed with iterparse."""
    articles: dict[str, str] = {}
    opener = bz2.open if str(path).endswith(".bz2") else open
    with opener(path, "rb") as stream:
        for _, element in ET.iterparse(stream, events=("end",)):
            if element.tag != f"{_NS}page":
                continue
            title = (element.findtext(f"{_NS}title") or "").strip()
            namespace = (element.findtext(f"{_NS}ns") or "").strip()
            redirect = element.find(f"{_NS}redirect") is not None
            wikitext = element.findtext(f"{_NS}revision/{_NS}text") or ""
            element.clear()
            if not title or not _is_article(title, namespace, redirect, wikitext):
                continue
            prose = strip_markup(wikitext)
            if len(prose.split()) >= MIN_WORDS:
                articles[title] = f"{title}\n\n{prose}"
    return articles


@lru_cache(maxsize=4)
def _parse(path: str) -> dict[str, list[str]]:
    data = Path(path).read_bytes()
    if _sha256(data) != FILE_SHA256:
        raise ValueError(f"{path} does not have the expected SHA-256 {FILE_SHA256} (a partial or different file): "
                         f"delete it to fetch it again")
    articles = parse_export(Path(path))
    out: dict[str, list[str]] = {s: [] for s in SPLITS}
    for title in sorted(articles):
        out[split_of(title)].append(articles[title])
    return out


def load_wiki(split: str, folder: Path | None = None) -> list[str]:
    """The 'calibration' or 'evaluation' articles, one plain-text string each, sorted by title."""
    if split not in SPLITS:
        raise ValueError(f"unknown wiki split {split!r}: use one of {', '.join(SPLITS)}")
    return list(_parse(str(fetch(folder)))[split])
