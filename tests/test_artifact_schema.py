"""The artifact schema is mrem-dist's own, versioned, and independent of the Hydra config classes:
an artifact written by the code before the schema existed (tests/data/legacy_artifact_v1, made by
tests/data/make_legacy_artifact.py on commit 7d6ec1f) still loads and gives the outputs it gave then."""

import json
from pathlib import Path

import torch

from mrem_dist.artifact import load_quantized
from mrem_dist.data import mean_pool

LEGACY = Path(__file__).parent / "data" / "legacy_artifact_v1"


def test_an_artifact_written_before_the_schema_loads_and_gives_its_outputs():
    expected = json.loads((LEGACY / "expected.json").read_text())
    art = load_quantized(LEGACY)
    enc = art.tokenizer(expected["sentences"], padding="max_length", max_length=expected["max_length"],
                        truncation=True, return_tensors="pt")
    with torch.no_grad():
        pooled = mean_pool(art.model(**enc).last_hidden_state, enc["attention_mask"])
    # Bit-equal on the machine that wrote it; other CPUs may round the float GEMMs differently.
    torch.testing.assert_close(pooled, torch.tensor(expected["mean_pooled"]), rtol=1e-5, atol=1e-6)
