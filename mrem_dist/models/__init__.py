from mrem_dist.models.adapters import ADAPTERS, ModelAdapter, adapter_for
from mrem_dist.models.loading import LoadedModel, load_model, resolve_model_path

__all__ = ["ADAPTERS", "LoadedModel", "ModelAdapter", "adapter_for", "load_model", "resolve_model_path"]
