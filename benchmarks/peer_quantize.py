"""One LLM quantization peer, in its own process and its own Python environment, through its public
API as its documentation shows it: quantize a Hugging Face causal LM on given calibration token ids
and save a compressed-tensors folder (the format both peers write for vLLM). benchmarks/llm_peers.py
starts this script and scores the folder with mrem-dist's evaluator; nothing here measures quality.

Imports torch, transformers and the peer only, never mrem_dist: llm-compressor pins transformers,
compressed-tensors and auto-round to versions that cannot share an environment with mrem-dist or
with auto-round 0.16.1 (benchmarks/peers.md says how each environment is made).

    python benchmarks/peer_quantize.py autoround --model DIR --calib calib.pt --bits 3 --group-size 64 \\
        --asym [--iters N] --out DIR --result peer.json
    python benchmarks/peer_quantize.py llmcompressor --model DIR --calib calib.pt --bits 3 --group-size 64 \\
        --asym --out DIR --result peer.json

--calib: a torch-saved int64 tensor [samples, seq_len] of token ids (mrem-dist's calibration windows).
--iters: AutoRound's tuning steps per block (0: its RTN mode); left out, AutoRound's default.
Writes --result: {tool, version, settings, folder (the compressed-tensors folder written under --out),
seconds (load, quantize and save, in this process), peak_rss_gb}.
"""

from __future__ import annotations

import argparse
import json
import resource
import time
from importlib.metadata import version
from pathlib import Path

import torch


def load(model_dir: str):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32), AutoTokenizer.from_pretrained(model_dir)


def autoround(args, calib: torch.Tensor) -> dict:
    """SignRound (AutoRound's algorithm): per block, signed-gradient descent on rounding offsets and
    weight clipping ranges against the block's full-precision output, one block after another."""
    from auto_round import AutoRound

    model, tokenizer = load(args.model)
    # A list of tokenized samples is one of AutoRound's documented `dataset` inputs; every window is
    # a full seq_len of real tokens (no padding), so the attention mask is all ones.
    dataset = [{"input_ids": row[None], "attention_mask": torch.ones(1, row.numel(), dtype=torch.long)} for row in calib]
    tuning = {} if args.iters is None else {"iters": args.iters}
    rounder = AutoRound(model, tokenizer, bits=args.bits, group_size=args.group_size, sym=not args.asym,
                        dataset=dataset, nsamples=calib.shape[0], seqlen=calib.shape[1], device_map="cpu",
                        seed=args.seed, **tuning)
    # AutoRound saves into a sub-folder named after the model and scheme and returns its path (a
    # list of paths only when several formats are asked for).
    _, folder = rounder.quantize_and_save(args.out, format="llm_compressor")
    if not isinstance(folder, str):
        raise RuntimeError(f"AutoRound saved {folder}: expected the path of one llm_compressor folder")
    settings = {"nsamples": calib.shape[0], "seqlen": calib.shape[1], "iters": 0}
    if args.iters != 0:  # the tuning settings in effect, read back (iters=0 runs its RTN, which has none)
        settings.update({k: getattr(rounder, k) for k in ("iters", "lr", "minmax_lr")},
                        batch_size=rounder.calibration_context.batch_size)
    return {**settings, "folder": str(Path(folder).resolve())}


def llmcompressor(args, calib: torch.Tensor) -> dict:
    """GPTQ through llm-compressor's `oneshot` with a `GPTQModifier` recipe (its defaults: block
    size 128, dampening 0.01, static activation ordering), the LM head left in full precision."""
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    model, tokenizer = load(args.model)
    # Already tokenized: oneshot skips its own tokenization for a dataset with input_ids.
    dataset = Dataset.from_dict({"input_ids": calib.tolist(), "attention_mask": torch.ones_like(calib).tolist()})
    weights = {"num_bits": args.bits, "type": "int", "symmetric": not args.asym, "strategy": "group",
               "group_size": args.group_size}
    recipe = GPTQModifier(config_groups={"group_0": {"targets": ["Linear"], "weights": weights}}, ignore=["lm_head"])
    oneshot(model=model, dataset=dataset, recipe=recipe, num_calibration_samples=calib.shape[0],
            max_seq_length=calib.shape[1])
    model.save_pretrained(args.out, save_compressed=True)
    tokenizer.save_pretrained(args.out)
    return {"folder": str(Path(args.out).resolve()), "block_size": recipe.block_size, "dampening_frac": recipe.dampening_frac, "actorder": str(recipe.actorder),
            "nsamples": calib.shape[0], "seqlen": calib.shape[1]}


TOOLS = {"autoround": ("auto-round", autoround), "llmcompressor": ("llmcompressor", llmcompressor)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tool", choices=sorted(TOOLS))
    p.add_argument("--model", required=True, help="Hugging Face folder of the full-precision model")
    p.add_argument("--calib", required=True, help="torch-saved int64 [samples, seq_len] calibration token ids")
    p.add_argument("--bits", type=int, required=True)
    p.add_argument("--group-size", type=int, required=True)
    p.add_argument("--asym", action="store_true", help="asymmetric weights (integer zero points)")
    p.add_argument("--iters", type=int, default=None, help="AutoRound only: tuning steps per block (default: its own)")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--out", required=True, help="the compressed-tensors folder to write")
    p.add_argument("--result", required=True, help="JSON file for the run's settings, time and memory")
    args = p.parse_args()
    if args.iters is not None and args.tool != "autoround":
        p.error("--iters is AutoRound's setting")
    package, quantize = TOOLS[args.tool]
    calib = torch.load(args.calib)
    if calib.dtype != torch.int64 or calib.dim() != 2:
        raise SystemExit(f"--calib {args.calib}: expected an int64 [samples, seq_len] tensor, got {calib.dtype} "
                         f"{tuple(calib.shape)}")
    start = time.perf_counter()
    settings = quantize(args, calib)
    seconds = time.perf_counter() - start
    result = {"tool": args.tool, "package": package, "version": version(package), "settings": settings,
              "bits": args.bits, "group_size": args.group_size, "symmetric": not args.asym,
              "seconds": round(seconds, 1), "threads": torch.get_num_threads(),
              "peak_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 3),
              "versions": {p: version(p) for p in ("torch", "transformers", "compressed-tensors")},
              "folder": settings.pop("folder")}
    Path(args.result).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
