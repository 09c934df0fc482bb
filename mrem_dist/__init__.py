"""mrem-dist: distributed post-training quantization of pre-trained language models (MREM)."""

__version__ = "0.1.0"
