"""Typed configs: unknown keys and wrong types are errors, presets, and checkpoint config round-trips."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dlm.config import (
    FORMAT_VERSION,
    MODEL_PRESETS,
    CheckpointConfig,
    ConfigError,
    ModelConfig,
    ProcessConfig,
    SamplingConfig,
    TrainConfig,
)

PROPS = settings(max_examples=50, deadline=None)
ALL_CONFIGS = [ModelConfig, ProcessConfig, TrainConfig, SamplingConfig]


@pytest.mark.parametrize("cls", ALL_CONFIGS)
def test_from_dict_rejects_unknown_keys_by_name(cls):
    with pytest.raises(ConfigError, match="d_modle") as e:
        cls.from_dict({"d_modle": 3})
    assert cls.__name__ in str(e.value)
    assert "known keys" in str(e.value)


@pytest.mark.parametrize(("cls", "key", "value"), [
    (ModelConfig, "d_model", "128"),
    (ModelConfig, "n_layers", 2.0),
    (ModelConfig, "n_layers", True),  # a bool is not an int here
    (ModelConfig, "d_model", None),
    (ModelConfig, "d_ff", "wide"),
    (ModelConfig, "arch", 3),
    (ModelConfig, "dropout", "0.1"),
    (ProcessConfig, "antithetic", 1),
    (ProcessConfig, "eps", False),
    (TrainConfig, "lr", "1e-3"),
    (SamplingConfig, "seed", 1.5),
])
def test_from_dict_rejects_wrong_types(cls, key, value):
    with pytest.raises(ConfigError, match=rf"{cls.__name__}\.{key} must be"):
        cls.from_dict({key: value})


def test_from_dict_accepts_and_converts_compatible_values():
    cfg = ModelConfig.from_dict({"rope_theta": 500, "d_ff": None, "dropout": 0})
    assert cfg.rope_theta == 500.0 and isinstance(cfg.rope_theta, float)
    assert isinstance(cfg.dropout, float)
    assert cfg.d_ff is None
    assert ModelConfig.from_dict({"d_ff": 96}).ff_width == 96
    assert SamplingConfig.from_dict({"seed": None}).seed is None
    assert SamplingConfig.from_dict({"seed": 7}).seed == 7


def test_replace_is_type_checked():
    cfg = SamplingConfig()
    assert cfg.replace(steps=8).steps == 8 and cfg.steps == 64
    with pytest.raises(ConfigError, match="steps"):
        cfg.replace(steps="8")
    with pytest.raises(ConfigError, match="stepz"):
        cfg.replace(stepz=8)


def test_ff_width_default_is_llama_rounding():
    assert ModelConfig(d_model=128, n_heads=2).ff_width == 384  # 8/3 * 128 = 341 -> 384
    assert ModelConfig(d_model=256).ff_width == 704  # 682 -> 704


def test_model_config_validates_heads():
    with pytest.raises(ConfigError, match="divisible"):
        ModelConfig(d_model=100, n_heads=3)
    with pytest.raises(ConfigError, match="even"):
        ModelConfig(d_model=6, n_heads=2)


@pytest.mark.parametrize("name", sorted(MODEL_PRESETS))
def test_presets_build(name):
    cfg = ModelConfig.preset(name, arch="dit", vocab_size=300)
    assert cfg.arch == "dit" and cfg.vocab_size == 300
    for k, v in MODEL_PRESETS[name].items():
        assert getattr(cfg, k) == v


def test_preset_unknown_name_or_key():
    with pytest.raises(ConfigError, match="unknown model preset 'huge'"):
        ModelConfig.preset("huge")
    with pytest.raises(ConfigError, match="layers"):
        ModelConfig.preset("tiny", layers=3)


def _custom_checkpoint_config() -> CheckpointConfig:
    return CheckpointConfig(
        model=ModelConfig.preset("tiny", arch="dit", vocab_size=300, d_ff=96),
        process=ProcessConfig(schedule="cosine", eps=0.01, antithetic=False, infill_prob=0.25),
        sampling=SamplingConfig(steps=16, block_length=8, temperature=0.5, seed=3),
        extra={"tokenizer": "bpe:300", "step": 1200},
    )


def test_checkpoint_config_dict_roundtrip():
    cfg = _custom_checkpoint_config()
    d = cfg.to_dict()
    assert d["model"]["arch"] == "dit" and d["format_version"] == FORMAT_VERSION
    json.dumps(d)  # plain JSON types only
    back = CheckpointConfig.from_dict(d)
    assert back == cfg
    assert isinstance(back.model, ModelConfig) and isinstance(back.sampling, SamplingConfig)


def test_checkpoint_config_save_load_roundtrip(tmp_path):
    cfg = _custom_checkpoint_config()
    path = tmp_path / "config.json"
    cfg.save(path)
    assert json.loads(path.read_text())["process"]["schedule"] == "cosine"
    assert CheckpointConfig.load(path) == cfg


@PROPS
@given(preset=st.sampled_from(sorted(MODEL_PRESETS)), arch=st.sampled_from(["llada", "dit", "ar"]),
       steps=st.integers(1, 512), temperature=st.floats(0, 2, allow_nan=False),
       seed=st.none() | st.integers(0, 2**31), eps=st.floats(0, 0.5, allow_nan=False))
def test_checkpoint_config_roundtrip_property(preset, arch, steps, temperature, seed, eps):
    cfg = CheckpointConfig(model=ModelConfig.preset(preset, arch=arch), process=ProcessConfig(eps=eps),
                           sampling=SamplingConfig(steps=steps, temperature=temperature, seed=seed))
    assert CheckpointConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_checkpoint_config_missing_sections_take_defaults():
    cfg = CheckpointConfig.from_dict({"model": {"d_model": 128, "n_heads": 2}})
    assert cfg.model.d_model == 128 and cfg.process == ProcessConfig() and cfg.sampling == SamplingConfig()


def test_future_format_version_is_refused(tmp_path):
    d = CheckpointConfig().to_dict()
    d["format_version"] = FORMAT_VERSION + 1
    with pytest.raises(ConfigError, match="newer than this dlm understands"):
        CheckpointConfig.from_dict(d)
    path = tmp_path / "config.json"
    path.write_text(json.dumps(d))
    with pytest.raises(ConfigError, match="upgrade dlm"):
        CheckpointConfig.load(path)


def test_checkpoint_config_unknown_keys_are_refused():
    with pytest.raises(ConfigError, match="optimizer"):
        CheckpointConfig.from_dict({"optimizer": {}})
    with pytest.raises(ConfigError, match="ModelConfig.*width"):
        CheckpointConfig.from_dict({"model": {"width": 3}})


def test_corrupt_checkpoint_config_is_a_config_error(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"model": ')
    with pytest.raises(ConfigError, match="corrupt"):
        CheckpointConfig.load(path)


@pytest.mark.parametrize("content", ["[]", "42", '{"model": null}'])
def test_non_object_checkpoint_config_is_a_config_error(tmp_path, content):
    path = tmp_path / "config.json"
    path.write_text(content)
    with pytest.raises(ConfigError):
        CheckpointConfig.load(path)
