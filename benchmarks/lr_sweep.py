"""Learning-rate sweep for reconstruction, on one module of the real MiniLM at W2A8.

Trains layer `--layer` on full-precision inputs (an LKD module: the cheapest setting that still
shows how fast the error falls) for each (lr_weight, lr_scale) and prints the module error
after training. Writes benchmarks/results/lr_sweep.{md,json}.

    python benchmarks/lr_sweep.py --steps 60
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
from mrem_dist.quantize import calibrate_activations, quantize_model  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--layer", type=int, default=2)
    p.add_argument("--w-bits", type=int, default=2)
    p.add_argument("--lr-weight", type=float, nargs="+", default=[0.0, 3e-5, 1e-4, 3e-4])
    p.add_argument("--lr-scale", type=float, nargs="+", default=[1e-3])
    p.add_argument("--out", default=str(RESULTS / "lr_sweep"))
    args = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    torch.manual_seed(0)
    loaded = load_model("builtin:all-MiniLM-L6-v2")
    model, family = loaded.model, loaded.family
    texts = D.load_builtin("calibration")
    batches = D.make_batches(D.tokenize(texts, loaded.tokenizer, 64, D.sample_indices(len(texts), 512, 0)), 32)
    scheme = QuantScheme(name="sweep", w_bits=args.w_bits, w_clip="mse")
    base = quantize_model(copy.deepcopy(model), family, scheme, learnable=True)
    calibrate_activations(base, lambda m, b: run_batch(m, family, b), batches)
    spec = ModuleSpec(1, 3, args.layer, args.layer + 1)  # a middle module: no embeddings, no head
    with torch.no_grad():  # full-precision input of the layer, for every batch
        inputs = []
        for b in batches:
            h = family.embed(family.embeddings(model), b)
            context = family.layer_context(family.config(model), h, b)
            for layer in list(family.layers(model))[: args.layer]:
                h = family.run_layer(layer, h, context)
            inputs.append(h)
    teacher = Stage(model, family, spec)
    probe = [(batches[i], inputs[i], None) for i in range(4)]
    rows = []
    for lr_w in args.lr_weight:
        for lr_s in args.lr_scale:
            q = copy.deepcopy(base)
            student = Stage(q, family, spec)
            before = module_error(student, teacher, probe, 1.0, "every_layer")
            feed = ((batches[i], inputs[i], None) for i in epoch_order(len(batches), args.steps, 0))
            settings = ReconSettings(steps=args.steps, lam="one", lr_weight=lr_w, lr_scale=lr_s, log_every=10**9)
            start = time.perf_counter()
            reconstruct_module(student, teacher, feed, settings)
            after = module_error(student, teacher, probe, 1.0, "every_layer")
            row = {"lr_weight": lr_w, "lr_scale": lr_s, "error_before": before, "error_after": after,
                   "seconds": round(time.perf_counter() - start, 1)}
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = f"layer {args.layer}, W{args.w_bits}A8 (mse init), {args.steps} steps, batch 32, 512 samples, lam=1"
    table = ["| lr_weight | lr_scale | error before | error after |", "|---|---|---|---|"]
    table += [f"| {r['lr_weight']:g} | {r['lr_scale']:g} | {r['error_before']:.4g} | {r['error_after']:.4g} |" for r in rows]
    write_results(args.out, "lr_sweep.py", header, rows, table)

if __name__ == "__main__":
    main()
