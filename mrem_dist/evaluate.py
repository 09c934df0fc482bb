"""Score a saved artifact as it will be shipped:

    python -m mrem_dist.evaluate artifact=runs/.../model [data=sst2] [kernel=int8] [reference=<fp model>]
    python -m mrem_dist.evaluate artifact=runs/.../model-compressed-tensors data=wiki

The artifact is loaded with `load_quantized` (kernel float or int8), a compressed-tensors folder with
transformers alone (`from_pretrained`, as its users load it), and run on the evaluation split
of `data`. With compare=true (the default) the full-precision model it was quantized from (recorded
in the artifact, or `reference=`) runs on the same batches, so the result carries the same metrics as
the run's report: the task metric of both (labeled data) and the fidelity of the artifact to full
precision. Writes `evaluation.json` to the Hydra run directory (runs/evaluate/...).

Exit codes: 0 done, 2 invalid configuration or input (the data, checked first), 1 any other error
(an unreadable or edited artifact included).
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import hydra
from omegaconf import DictConfig

from mrem_dist.artifact import ArtifactError, load_quantized
from mrem_dist.config import ConfigError, EvaluateConfig, config_dir, entry_config, register_configs, validate_evaluate
from mrem_dist.log import get_logger

log = get_logger("mrem_dist.evaluate")


def evaluate_artifact(cfg: EvaluateConfig) -> dict:
    """Evaluate the artifact `cfg.artifact`; returns the result (also written to cfg.run_dir)."""
    from mrem_dist.context import RunContext, environment
    from mrem_dist.models import LoadedModel, load_model
    from mrem_dist.models.tasks import ClassificationState, PerplexityState
    from mrem_dist.quant.int8 import Int8Linear
    from mrem_dist.scoring import score

    from mrem_dist.preflight import check_data

    from mrem_dist.artifact.compressed_tensors import folder_kind, load_compressed_tensors, read_quantization_config
    from mrem_dist.artifact.schema import read_meta

    compressed = read_quantization_config(cfg.artifact) is not None
    if compressed and cfg.kernel != "float":
        raise ConfigError(f"kernel={cfg.kernel} runs mrem-dist's own artifact; {cfg.artifact} is a compressed-tensors "
                          "folder, which transformers runs: set kernel=float")
    # The data is checked before the artifact and the reference are loaded, for the artifact's task
    # (a causal LM reads documents); unreadable metadata is load_quantized's error, reported next.
    try:
        kind = folder_kind(cfg.artifact) if compressed else read_meta(Path(cfg.artifact)).kind
    except (ArtifactError, OSError):
        kind = "encoder"
    check_data(cfg.data, kind)
    ctx = RunContext.begin(cfg)
    timer, device = ctx.timer, ctx.device
    with timer("load"):
        art = (load_compressed_tensors(cfg.artifact, device) if compressed
               else load_quantized(cfg.artifact, cfg.kernel, cfg.backend, device))
    size = sum(f.stat().st_size for f in Path(cfg.artifact).iterdir() if f.is_file())
    ctx.use(LoadedModel(art.model, art.tokenizer, art.family, art.task, str(cfg.artifact), 0), calibration=False)
    prepared = ctx.data
    log.info("loaded %s (%s, kernel %s) and %d evaluation samples of data=%s", cfg.artifact, art.task.kind, cfg.kernel,
             prepared.description["evaluation_samples"], cfg.data.name)

    reference, ref_model = None, None
    if cfg.compare:
        reference = cfg.reference or art.source
        if not reference:
            raise ValueError(
                f"{cfg.artifact} does not record the model it was quantized from: pass reference=<full-precision model "
                "path> to compare against it, or compare=false to score the artifact alone"
            )
        with timer("reference"):
            ref_model = load_model(reference, art.task.kind).model.to(device)
    elif not isinstance(art.task.metric(prepared.evalset), (ClassificationState, PerplexityState)):
        raise ValueError(
            f"compare=false on data={cfg.data.name} leaves nothing to measure: the artifact is an encoder "
            "(scored by fidelity to full precision) or the data has no labels; set compare=true"
        )
    with timer("evaluate"):
        state = score(ref_model, art.model, art.family, art.task, prepared.evalset)
    try:
        fp_metrics, q_metrics = state.compute()
    except ValueError as e:  # outputs of another shape: not the model it was quantized from
        raise ValueError(f"reference={reference}: {e}") from e
    n = prepared.description["evaluation_samples"]
    result = {
        "artifact": str(cfg.artifact),
        "kernel": cfg.kernel,
        "backend": next((m.backend for m in art.model.modules() if isinstance(m, Int8Linear)), None),
        "kind": art.task.kind,
        "format": "compressed-tensors" if compressed else "mrem",
        "quant": art.quant,
        "artifact_bytes": size,
        "reference": reference,
        "data": prepared.description,
        "metrics": {"full_precision": fp_metrics, "quantized": q_metrics},
        "timings_s": timer.seconds,
        "samples_per_s": round(n / timer.seconds["evaluate"], 2),
        "environment": environment(device),
    }
    out = Path(cfg.run_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "evaluation.json").write_text(json.dumps(result, indent=1) + "\n")
    return result


register_configs()


@hydra.main(config_path=config_dir(), config_name="evaluate", version_base=None)
def _hydra_main(dcfg: DictConfig) -> None:
    cfg: EvaluateConfig = entry_config(dcfg, validate_evaluate, log)
    start = time.perf_counter()
    try:
        result = evaluate_artifact(cfg)
    except ArtifactError as e:
        log.error("cannot load the artifact: %s", e)
        raise SystemExit(1) from e
    except ConfigError as e:
        log.error("invalid input: %s", e)
        raise SystemExit(2) from e
    q = result["metrics"]["quantized"]
    log.info("done in %.1f s: %s -> %s/evaluation.json", time.perf_counter() - start,
             ", ".join(f"{k}={v:.4f}" for k, v in q.items()), cfg.run_dir)


def main() -> None:
    _hydra_main()


if __name__ == "__main__":
    main()
