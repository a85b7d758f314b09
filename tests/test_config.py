"""config.json parsing: both generations, the RoPE variants, and refusals by name."""

from __future__ import annotations

import json

import pytest

from minipipe.config import ModelConfig, load_config
from minipipe.errors import CheckpointError, UnsupportedConfigError
from minipipe.synthetic import hf_config


def test_new_and_old_styles_agree():
    for rope_type in ("default", "linear", "llama3"):
        new = ModelConfig.from_hf(hf_config(rope_type=rope_type, rope_style="new", rope_theta=5e5))
        old = ModelConfig.from_hf(hf_config(rope_type=rope_type, rope_style="old", rope_theta=5e5))
        assert new == old
        assert new.rope.rope_type == rope_type and new.rope.theta == 5e5


def test_fields():
    c = ModelConfig.from_hf(hf_config(dim=64, n_heads=8, n_kv_heads=2, head_dim=16, eos_token_id=[2, 7]),
                            extra_eos=(7, 9))
    assert (c.dim, c.n_heads, c.n_kv_heads, c.head_dim, c.n_groups) == (64, 8, 2, 16, 4)
    assert c.eos_ids == (2, 7, 9)
    assert c.qkv_dim == (8 + 4) * 16
    default_head_dim = ModelConfig.from_hf({k: v for k, v in hf_config(dim=64, n_heads=8).items()})
    assert default_head_dim.head_dim == 8


def test_rope_scaling_with_rope_type_key():
    raw = hf_config(rope_style="old")
    raw["rope_scaling"] = {"rope_type": "linear", "factor": 4.0}
    assert ModelConfig.from_hf(raw).rope.factor == 4.0


@pytest.mark.parametrize("change, message", [
    ({"model_type": "gpt2"}, "model_type 'gpt2' is not supported"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}, "RoPE type 'yarn'"),
    ({"rope_parameters": {"rope_type": "dynamic", "factor": 2.0, "rope_theta": 1e4}}, "RoPE type 'dynamic'"),
    ({"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}}, "needs 'factor'"),
    ({"num_key_value_heads": 3}, "multiple of num_key_value_heads"),
    ({"hidden_size": -4}, "positive integer"),
])
def test_unsupported_configs_are_refused_by_name(change, message):
    raw = hf_config()
    raw.update(change)
    with pytest.raises(UnsupportedConfigError, match=message):
        ModelConfig.from_hf(raw)


def test_missing_field_and_bad_json(tmp_path):
    raw = hf_config()
    del raw["intermediate_size"]
    with pytest.raises(CheckpointError, match="intermediate_size"):
        ModelConfig.from_hf(raw)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_config(tmp_path)
    with pytest.raises(CheckpointError, match="not found"):
        load_config(tmp_path / "absent")


def test_generation_config_adds_eos(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(hf_config(eos_token_id=2)))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 5]}))
    assert load_config(tmp_path).eos_ids == (2, 5)


@pytest.mark.parametrize("rope_type", ["default", "linear", "llama3"])
def test_both_rope_generations_accepted_when_they_agree(rope_type):
    new = hf_config(rope_type=rope_type, rope_style="new", rope_theta=5e5)
    old = hf_config(rope_type=rope_type, rope_style="old", rope_theta=5e5)
    both = {**new, **{k: old[k] for k in ("rope_theta", "rope_scaling") if k in old}}
    assert ModelConfig.from_hf(both) == ModelConfig.from_hf(new)
    both["rope_scaling"] = None if rope_type == "default" else both["rope_scaling"]
    assert ModelConfig.from_hf(both) == ModelConfig.from_hf(new)


@pytest.mark.parametrize("legacy, message", [
    ({"rope_scaling": {"type": "linear", "factor": 4.0}},
     r"rope_parameters \(linear, factor 2\) and rope_scaling \(linear, factor 4\) disagree"),
    ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                       "original_max_position_embeddings": 32}},
     r"rope_parameters \(linear, factor 2\) and rope_scaling \(llama3, .*\) disagree"),
    ({"rope_theta": 10000.0}, r"rope_parameters.rope_theta \(500000\) and rope_theta \(10000.0\) disagree"),
])
def test_conflicting_rope_generations_are_refused_by_name(legacy, message):
    raw = {**hf_config(rope_type="linear", rope_style="new", rope_theta=5e5), **legacy}
    with pytest.raises(UnsupportedConfigError, match=message):
        ModelConfig.from_hf(raw)


@pytest.mark.parametrize("change, message", [
    ({"rope_theta": "1e4"}, "rope_theta must be a finite number, got '1e4'"),
    ({"rope_theta": float("inf")}, "rope_theta must be a finite number"),
    ({"rope_scaling": {"type": "linear", "factor": [2]}}, "RoPE factor must be a finite number"),
    ({"rope_scaling": {"type": "linear", "factor": 10 ** 400}}, "RoPE factor must be a finite number"),
    ({"rope_scaling": "linear"}, "rope_scaling must be a JSON object or null"),
    ({"rms_norm_eps": "small"}, "rms_norm_eps must be a finite number"),
])
def test_non_numeric_rope_values_are_refused_by_name(change, message):
    raw = {**hf_config(rope_style="old"), **change}
    with pytest.raises(UnsupportedConfigError, match=message):
        ModelConfig.from_hf(raw)
