"""Learning-rate sweep for reconstruction, on one module of the real MiniLM, at several bit widths.

Trains layer `--layer` on full-precision inputs (an LKD module: the cheapest setting that still
shows how fast the error falls) for each weight learning rate, absolute (`--lr-weight`, the same
for every tensor) and relative to each weight's mean quantization step (`--lr-weight-rel`, the
default rule, method.lr_weight_rel), at each `--w-bits` (8-bit activations, MSE-clipped weights),
and prints the module error before and after training on held-out calibration sentences (drawn
after the 512 training ones, as data.holdout_samples are). Writes benchmarks/results/lr_sweep.{md,json}.

    python benchmarks/lr_sweep.py --w-bits 8 4 3 2 --steps 60
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import time

from common import RESULTS, write_results

import torch  # noqa: E402

from mrem_dist import data as D  # noqa: E402
from mrem_dist.scheme import QuantScheme  # noqa: E402
from mrem_dist.engine import ModuleSpec, ReconSettings, Stage, module_error, reconstruct_module  # noqa: E402
from mrem_dist.engine.sequential import epoch_order  # noqa: E402
from mrem_dist.scoring import run_batch  # noqa: E402
from mrem_dist.models import load_model  # noqa: E402
from mrem_dist.quant import QuantLinear  # noqa: E402
from mrem_dist.quantize import calibrate_activations, quantize_model  # noqa: E402

CALIB, HELD_OUT, BATCH = 512, 128, 32


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--w-bits", type=int, nargs="+", default=[8, 4, 3, 2])
    p.add_argument("--lr-weight", type=float, nargs="*", default=[1e-3], help="absolute weight lrs (0: weights frozen)")
    p.add_argument("--lr-weight-rel", type=float, nargs="*", default=[0.003, 0.01, 0.03, 0.1],
                   help="weight lrs relative to each weight's mean quantization step")
    p.add_argument("--lr-scale", type=float, default=1e-3)
    p.add_argument("--out", default=str(RESULTS / "lr_sweep"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    loaded = load_model("builtin:all-MiniLM-L6-v2")
    model, family = loaded.model, loaded.family
    texts = D.load_builtin("calibration")
    order = D.sample_indices(len(texts), CALIB + HELD_OUT, 0)
    batches = D.make_batches(D.tokenize(texts, loaded.tokenizer, 64, order[:CALIB]), BATCH)
    held = D.make_batches(D.tokenize(texts, loaded.tokenizer, 64, order[CALIB:]), BATCH)
    spec = ModuleSpec(1, 3, args.layer, args.layer + 1)  # a middle module: no embeddings, no head
    inputs = layer_inputs(model, family, batches, args.layer)
    held_inputs = layer_inputs(model, family, held, args.layer)
    teacher = Stage(model, family, spec)
    probe = [(b, h, None) for b, h in zip(held, held_inputs)]
    lrs = [("absolute", lr) for lr in args.lr_weight] + [("relative", lr) for lr in args.lr_weight_rel]
    rows = []
    for bits in args.w_bits:
        base = quantize_model(copy.deepcopy(model), family, QuantScheme(name="sweep", w_bits=bits, w_clip="mse"),
                              learnable=True)
        calibrate_activations(base, lambda m, b: run_batch(m, family, b), batches)
        steps = [m.weight_quantizer.scale.abs().mean().item() for m in Stage(base, family, spec).modules()
                 if isinstance(m, QuantLinear)]
        mean_step = sum(steps) / len(steps)  # the layer's Linears: what a relative lr is measured on
        for kind, lr in lrs:
            q = copy.deepcopy(base)
            student = Stage(q, family, spec)
            before = module_error(student, teacher, probe, 1.0, "every_layer")
            feed = ((batches[i], inputs[i], None) for i in epoch_order(len(batches), args.steps, 0))
            settings = ReconSettings(steps=args.steps, lam="one", lr_weight=lr if kind == "absolute" else None,
                                     lr_weight_rel=lr, lr_scale=args.lr_scale, log_every=10**9)
            start = time.perf_counter()
            reconstruct_module(student, teacher, feed, settings)
            after = module_error(student, teacher, probe, 1.0, "every_layer")
            row = {"w_bits": bits, "lr": kind, "lr_weight": lr, "mean_weight_step": mean_step,
                   "absolute_lr": lr if kind == "absolute" else lr * mean_step, "lr_scale": args.lr_scale,
                   "error_before": before,
                   "error_after": after, "ratio": after / before, "seconds": round(time.perf_counter() - start, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = (f"layer {args.layer}, W<b>A8 (MSE-clipped weights), {args.steps} steps, batch {BATCH}, {CALIB} training "
              f"sentences; error on {HELD_OUT} held-out sentences (after / before: lower is better)")
    table = ["| bits | mean weight step | weight lr | = absolute | error before | error after | after / before |",
             "|---|---|---|---|---|---|---|"]
    table += [f"| W{r['w_bits']} | {r['mean_weight_step']:.3g} | {r['lr_weight']:g}"
              f"{' x step' if r['lr'] == 'relative' else ' (absolute)'} | {r['absolute_lr']:.3g} | "
              f"{r['error_before']:.4g} | {r['error_after']:.4g} | {r['ratio']:.3f} |" for r in rows]
    write_results(args.out, "lr_sweep.py", header, rows, table)


@torch.no_grad()
def layer_inputs(model, family, batches, layer: int) -> list[torch.Tensor]:
    """The full-precision input of `layer` for every batch."""
    inputs = []
    for b in batches:
        h = family.embed(family.embeddings(model), b)
        context = family.layer_context(family.config(model), h, b)
        for block in list(family.layers(model))[:layer]:
            h = family.run_layer(block, h, context)
        inputs.append(h)
    return inputs


if __name__ == "__main__":
    main()
