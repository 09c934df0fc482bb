"""mrem-dist: distributed post-training quantization of pre-trained language models (MREM)."""

__version__ = "0.1.0"


def __getattr__(name: str):
    # Lazy, so that `python -m mrem_dist --help` and config errors do not import torch.
    if name == "load_quantized":
        from mrem_dist.artifact import load_quantized

        return load_quantized
    raise AttributeError(f"module 'mrem_dist' has no attribute {name!r}")
