"""Models: the architecture families (where the parts live, how to run them piece by piece), the
tasks they are scored on, and loading a checkpoint."""

from mrem_dist.models.families import FAMILIES, ModelFamily, family_for
from mrem_dist.models.tasks import CausalLM, EmbeddingFidelity, EvalSet, SequenceClassification, Task, task_for
from mrem_dist.models.loading import LoadedModel, load_model, resolve_model_path

__all__ = ["FAMILIES", "CausalLM", "EmbeddingFidelity", "EvalSet", "LoadedModel", "ModelFamily", "SequenceClassification", "Task",
           "family_for", "load_model", "resolve_model_path", "task_for"]
