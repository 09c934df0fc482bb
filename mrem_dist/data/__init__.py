"""Data layer: GLUE task table, dataset loading, built-in texts, the movie-review task, calibration
batches, metrics."""

from .builtin import builtin_texts
from .calibration import Batch, make_batches, sample_indices, tokenize
from .metrics import compute_metrics, fidelity_metrics, mean_pool
from .movie_reviews import load_movie_reviews
from .sources import TextDataset, load_builtin, load_glue, load_local, relabel
from .glue import GLUE_TASKS, TaskSpec, get_task

__all__ = [
    "GLUE_TASKS",
    "Batch",
    "TaskSpec",
    "TextDataset",
    "builtin_texts",
    "compute_metrics",
    "fidelity_metrics",
    "get_task",
    "load_builtin",
    "load_glue",
    "load_local",
    "relabel",
    "load_movie_reviews",
    "make_batches",
    "mean_pool",
    "sample_indices",
    "tokenize",
]
