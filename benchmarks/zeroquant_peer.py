"""The peer, side by side: DeepSpeed's own ZeroQuant (deepspeed==0.19.6, `deepspeed.compression`)
against mrem-dist on the real MiniLM, same calibration and evaluation batches as `python -m mrem_dist`.

ZeroQuant's scheme for both sides: W<b> symmetric in 48 groups of consecutive output rows, 8-bit
symmetric token-wise dynamic activations at the input of every Linear of the transformer layers,
word embeddings in full precision (DeepSpeed's `range_calibration: dynamic` is one range per token:
`num_groups = tokens` in `LinearLayer_Compress.forward`).

Cells per bit width:
- ds_ptq: `deepspeed.compression.compress.init_compression` with that config, nothing trained;
- ds_lkd: ZeroQuant's layer-by-layer distillation on DeepSpeed's compressed layers. DeepSpeed ships
  the quantizer (with its straight-through gradient) but not the LKD loop (that lives in
  DeepSpeedExamples), so the loop is written here: layer i, fed the full-precision input of layer i,
  is trained to the full-precision output (masked MSE), Adam on the Linear weights, cosine-decayed,
  with the same steps, learning rate and batch order as mrem-dist's LKD;
- ptq, lkd: mrem-dist's `method=ptq` / `method=lkd` with `quant=w4a8_fg quant.w_bits=<b>
  quant.e_bits=null` (mrem-dist's LKD also learns the quantizer step sizes, as it always does);
- ptq_full_range, lkd_full_range: the same with `quant.w_full_range=true`, DeepSpeed's grid (all 2^b
  codes, step max|w| / 2^(b-1)) instead of mrem-dist's default restricted one: the ablation that
  separates the grid from the rest of the two implementations.

    python benchmarks/zeroquant_peer.py --bits 8 4 2 --steps 200
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time
from pathlib import Path

import torch
from common import RESULTS, compose_config, hydra_configs, write_results

from mrem_dist.engine import epoch_order
from mrem_dist.engine.reconstruct import masked_mse
from mrem_dist.context import RunContext
from mrem_dist.scoring import score
from mrem_dist.runner import execute

TARGETS = ["attention.self", "intermediate", "output.dense"]  # every Linear of a BERT layer, once


def ds_config(bits: int, groups: int) -> dict:
    modules = {"modules": TARGETS}
    return {"compression_training": {
        "weight_quantization": {
            "shared_parameters": {"enabled": True, "quantizer_kernel": False, "schedule_offset": 0,
                                  "quantize_groups": groups, "quantize_verbose": False, "quantization_type": "symmetric",
                                  "rounding": "nearest", "quantize_weight_in_forward": True,
                                  "fp16_mixed_quantize": {"enabled": False, "quantize_change_ratio": 0.001}},
            "different_groups": {"wq": {"params": {"start_bits": bits, "target_bits": bits, "quantization_period": 0},
                                        **modules}}},
        "activation_quantization": {
            "shared_parameters": {"enabled": True, "quantization_type": "symmetric", "range_calibration": "dynamic",
                                  "schedule_offset": 0},
            "different_groups": {"aq": {"params": {"bits": 8}, **modules}}},
    }}


def ds_quantize(model, bits: int, groups: int):
    from deepspeed.compression.compress import init_compression
    from deepspeed.compression.config import get_compression_config
    from deepspeed.compression.scheduler import compression_scheduler

    config = ds_config(bits, groups)
    q = init_compression(copy.deepcopy(model), config)
    # init_compression only attaches the quantizers; DeepSpeed's scheduler switches them on once
    # training reaches schedule_offset (0 here): one step_zero_check does that, as in its examples.
    compression_scheduler(q, get_compression_config(config)).step(step_zero_check=True)
    # Every Linear of the transformer layers must now quantize (a config pattern that matches
    # nothing would otherwise leave it silently in full precision).
    linears = sum(isinstance(m, torch.nn.Linear) for layer in q.encoder.layer for m in layer.modules())
    enabled = sum(bool(getattr(m, "weight_quantization_enabled", False)) for m in q.modules())
    if enabled != linears:
        raise RuntimeError(f"DeepSpeed enabled weight quantization on {enabled} Linears, expected {linears}")
    q.eval()
    return q


def ds_lkd(fp, q, family, batches, steps: int, lr: float, seed: int) -> float:
    """ZeroQuant's LKD on DeepSpeed's compressed layers (see the module docstring); returns seconds."""
    start = time.perf_counter()
    config = family.config(fp)
    with torch.no_grad():
        hidden = [family.embed(family.embeddings(fp), b) for b in batches]
    masks = [family.layer_context(config, h, b) for h, b in zip(hidden, batches)]
    for fp_layer, q_layer in zip(family.layers(fp), family.layers(q)):
        with torch.no_grad():
            targets = [family.run_layer(fp_layer, h, m) for h, m in zip(hidden, masks)]
        weights = [mod.weight for mod in q_layer.modules() if isinstance(mod, torch.nn.Linear)]
        for w in weights:
            w.requires_grad_(True)
        opt = torch.optim.Adam(weights, lr=lr)
        for t, i in enumerate(epoch_order(len(batches), steps, seed)):
            for g in opt.param_groups:
                g["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * t / steps))
            out = family.run_layer(q_layer, hidden[i], masks[i])
            loss = masked_mse(out, targets[i], batches[i].attention_mask)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        for w in weights:
            w.requires_grad_(False)
        hidden = targets  # LKD: the next layer learns from full-precision inputs
    return time.perf_counter() - start


def peer_rows(bits_list: list[int], steps: int, groups: int, tmp: Path, data: list[str] = (),
              grids: tuple[str, ...] = ("restricted", "full"), lkd_grids: tuple[str, ...] = ("full",)
              ) -> tuple[list[dict], dict]:
    """Every cell of the comparison (module docstring) at each bit width; returns (rows, setup).
    `data`: Hydra overrides of the data (sample counts) shared by every cell. `grids`: mrem-dist's
    symmetric weight grids for PTQ, restricted (its default) and/or full (all 2^b codes, DeepSpeed's);
    `lkd_grids`: those for LKD (by default only DeepSpeed's: the benchmark report's time budget)."""
    import deepspeed

    rows = []
    # One absolute weight lr for both LKDs (DeepSpeed's optimizer takes no per-tensor rule).
    base = ["quant=w4a8_fg", f"quant.w_groups={groups}", "quant.e_bits=null", "export.enabled=false", "checkpoint.dir=null",
            "method.lr_weight=1e-3", *data]
    cfg = compose_config(base, tmp / "inputs")
    ctx = RunContext.begin(cfg)
    loaded = ctx.load()
    fp, family, calib = loaded.model, loaded.family, ctx.data.calib

    def fidelity(q) -> dict:  # of the mean-pooled embeddings, scored by mrem-dist's evaluator
        return score(fp, q, family, loaded.task, ctx.data.evalset).compute()[1]

    lr = cfg.method.lr_weight
    for bits in bits_list:
        q = ds_quantize(fp, bits, groups)
        rows.append({"bits": bits, "cell": "ds_ptq", "seconds": 0.0,
                     **fidelity(q)})
        seconds = ds_lkd(fp, q, family, calib, steps, lr, cfg.seed)
        rows.append({"bits": bits, "cell": "ds_lkd", "seconds": round(seconds, 1),
                     **fidelity(q)})
        for grid in dict.fromkeys([*grids, *lkd_grids]):
            for method in [m for m in ("ptq", "lkd") if grid in (grids if m == "ptq" else lkd_grids)]:
                extra = [f"method={method}", f"quant.w_bits={bits}", f"quant.w_full_range={grid == 'full'}"]
                extra += [f"method.steps={steps}"] if method == "lkd" else []
                report, _ = execute(compose_config(base + extra, tmp / f"{method}{bits}{grid}"))
                cell = method + ("_full_range" if grid == "full" else "")
                rows.append({"bits": bits, "cell": cell, "seconds": report["timings_s"].get("reconstruct", 0.0),
                             **report["metrics"]["quantized"]})
        for r in rows[-2 - len(grids) - len(lkd_grids):]:
            print(r, flush=True)
    setup = (f"all-MiniLM-L6-v2 (real weights), built-in text ({len(calib)} calibration batches of "
             f"{cfg.data.batch_size}, {len(ctx.data.evalset.batches)} evaluation batches), W<b> in {groups} row groups + token-wise "
             f"dynamic A8, FP embeddings; LKD {steps} steps per layer, lr {lr}, same batch order on both sides. "
             f"DeepSpeed {deepspeed.__version__} (`deepspeed.compression`, CPU accelerator); ds_lkd's loop is "
             "written in this script (DeepSpeed ships the quantizer, not the LKD loop). ptq/lkd: mrem-dist on its "
             "default restricted grid; *_full_range: on all 2^b codes (`quant.w_full_range=true`), DeepSpeed's grid. "
             f"Grids run: PTQ {', '.join(grids)}; LKD {', '.join(lkd_grids)}. "
             "Fidelity of mean-pooled sentence embeddings to FP32.")
    return rows, {"setup": setup, "deepspeed": deepspeed.__version__, "steps": steps, "groups": groups}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[8, 4, 2])
    p.add_argument("--steps", type=int, default=200, help="LKD steps per layer, both sides")
    p.add_argument("--groups", type=int, default=48)
    p.add_argument("--grids", nargs="+", default=["restricted", "full"], choices=["restricted", "full"],
                   help="mrem-dist's weight grids to run")
    p.add_argument("--out", default=str(RESULTS / "zeroquant_peer"))
    args = p.parse_args()

    with hydra_configs(), tempfile.TemporaryDirectory() as tmp:
        rows, setup = peer_rows(args.bits, args.steps, args.groups, Path(tmp), grids=tuple(args.grids),
                                lkd_grids=tuple(args.grids))
    table = ["| W bits | cell | cosine | cosine_min | rank_agreement | rel_error | training s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        table.append(f"| {r['bits']} | {r['cell']} | {r['cosine']:.4f} | {r['cosine_min']:.4f} | {r['rank_agreement']:.4f} "
                     f"| {r['rel_error']:.4f} | {r['seconds']} |")
    write_results(args.out, "zeroquant_peer.py", setup["setup"], rows, table)


if __name__ == "__main__":
    main()
