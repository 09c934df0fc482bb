"""The Hydra config tree composes against the typed schema, and validate() rejects bad values
with a message naming the key and the fix."""

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf

from conftest import REPO
from mrem_dist.config import ConfigError, RunConfig, register_configs, validate

register_configs()


def _compose(*overrides: str) -> RunConfig:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        dcfg = compose("config", overrides=["run_dir=/tmp/x", *overrides])
    return OmegaConf.to_object(dcfg)


def test_default_composes_and_validates():
    cfg = _compose()
    assert isinstance(cfg, RunConfig)
    assert cfg.model.path == "builtin:all-MiniLM-L6-v2" and cfg.data.name == "builtin"
    assert (cfg.quant.w_bits, cfg.quant.e_bits, cfg.quant.a_bits) == (4, 8, 8)
    validate(cfg)


@pytest.mark.parametrize("preset,bits", [("w8a8", (8, 8, 8)), ("w2a8", (2, 8, 8)), ("w4e4a8", (4, 4, 8)),
                                         ("w2e2a8", (2, 2, 8)), ("w3a8", (3, 8, 8))])
def test_quant_presets(preset, bits):
    q = _compose(f"quant={preset}").quant
    assert (q.w_bits, q.e_bits, q.a_bits) == bits and q.name == preset


def test_clip_group_sets_quant_fields():
    assert _compose("clip=aciq").quant.w_clip == "aciq"
    q = _compose("clip=ocs").quant
    assert q.w_clip == "minmax" and q.ocs_ratio == 0.02
    # A direct override wins over the group.
    assert _compose("clip=ocs", "quant.ocs_ratio=0.05").quant.ocs_ratio == 0.05


def test_every_glue_task_has_a_data_option():
    from mrem_dist.data import GLUE_TASKS

    for task in GLUE_TASKS:
        assert _compose(f"data={task}").data.name == task


def test_schema_rejects_unknown_keys_and_wrong_types():
    with pytest.raises(ConfigCompositionException):
        _compose("quant.w_bitz=4")
    with pytest.raises(ConfigCompositionException):
        _compose("quant.w_bits=four")


@pytest.mark.parametrize(
    "overrides,match",
    [
        (["quant.w_bits=9"], r"quant.w_bits=9 is outside 2..8"),
        (["quant.w_bits=1"], r"quant.w_bits=1 is outside 2..8"),
        (["quant.a_bits=16"], r"quant.a_bits=16 is outside 2..8.*null"),
        (["quant.w_granularity=group"], r"needs quant.w_groups > 0"),
        (["quant.ternary=true"], r"needs quant.w_bits=2"),
        (["quant.w_full_range=true", "quant.w_symmetric=false"], r"w_full_range=true .* needs quant.w_symmetric=true"),
        (["quant.w_clip=percentile"], r"quant.w_clip='percentile' is not one of minmax, aciq, mse"),
        (["quant.ocs_ratio=1.5"], r"ocs_ratio"),
        (["quant.a_mode=dynamic", "quant.a_symmetric=false"], r"symmetric only"),
        (["data=local"], r"data=local needs files"),
        (["data.calib_samples=0"], r"must not be empty"),
        (["method.name=awq"], r"method.name='awq' is not one of"),
        (["data.seq_len=1"], r"data.seq_len=1 leaves no next token to predict"),
        (["method=gptq"], r"method=gptq is weight-only"),
        (["method=gptq", "quant=w4a16_g64", "quant.w_granularity=group", "quant.w_groups=4"], r"w_group_size=64 is read only with quant.w_granularity=input_group"),
        (["method=ptq", "quant=w4a16_g64", "quant.w_group_size=0"], r"input_group needs quant.w_group_size > 0"),
        (["method=rem", "method.init=mse", "quant.w_clip=aciq"], r"method.init=mse sets the weight clipping itself"),
        (["method=ptq", "method.init=gptq"], r"method.init=gptq initialises a reconstruction method"),
    ],
)
def test_validate_rejects_bad_values(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate(_compose(*overrides))
