"""How tests/data/legacy_artifact_v1/ was made (run once, on commit 7d6ec1f, before the artifact schema
of issue 16): a tiny BERT encoder with a 64-word WordPiece vocabulary, PTQ at W4-E4-A8 with static
activations, exported by that commit's export_quantized; `expected.json` holds the loaded model's
mean-pooled outputs on two sentences. test_artifact_schema.py checks that today's loader still reads
it and gives the same outputs. Kept for the record; rerunning it on newer code makes a new-format
artifact, which is not what the test is for."""

import json
import sys
from pathlib import Path

import torch
from transformers import BertConfig, BertModel, BertTokenizerFast

from mrem_dist.artifact import export_quantized, load_quantized
from mrem_dist.config import QuantConfig
from mrem_dist.data import mean_pool
from mrem_dist.models import adapter_for
from mrem_dist.quantize import calibrate_activations, quantize_model

WORDS = ("the film is a delight from start to finish dull lifeless and overlong exercise one of best performances "
         "year i want my two hours back warm funny beautifully shot plot makes no sense at all an instant classic "
         "that rewards repeat viewing tedious predictable").split()
SENTENCES = ["the film is a delight", "tedious and predictable plot"]


def main(out: Path) -> None:
    work = out.parent / "work"
    work.mkdir(parents=True, exist_ok=True)
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + sorted(set(WORDS))
    (work / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tok = BertTokenizerFast(vocab_file=str(work / "vocab.txt"), do_lower_case=True)
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=64, max_position_embeddings=32)
    model = BertModel(cfg, add_pooling_layer=False).eval()
    adapter = adapter_for("bert")
    scheme = QuantConfig(name="w4e4a8", w_bits=4, e_bits=4, a_bits=8)
    quantize_model(model, adapter, scheme, learnable=False)
    enc = tok(SENTENCES * 4, padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    calibrate_activations(model, lambda m, b: m(**b), [dict(enc)])
    export_quantized(model, tok, scheme, "encoder", out, source=None)
    art = load_quantized(out)
    enc = tok(SENTENCES, padding="max_length", max_length=8, truncation=True, return_tensors="pt")
    with torch.no_grad():
        pooled = mean_pool(art.model(**enc).last_hidden_state, enc["attention_mask"])
    (out / "expected.json").write_text(json.dumps({"sentences": SENTENCES, "max_length": 8,
                                                   "mean_pooled": pooled.tolist()}) + "\n")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
