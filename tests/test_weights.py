"""Checkpoint loading: dtypes, shards, memory mapping, per-stage loading, malformed files."""

from __future__ import annotations

import json

import numpy as np
import pytest

from minipipe.config import ModelConfig, load_config
from minipipe.errors import CheckpointError
from minipipe.greedy import generate_greedy
from minipipe.model import load_stage
from minipipe.synthetic import hf_config, make_random_checkpoint, random_tensors, to_storage
from minipipe.weights import Checkpoint, SafetensorsFile, load_stage_weights

SMALL = dict(dim=32, ffn_dim=48, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=50)


def test_bf16_and_f16_widen_exactly():
    x = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    for dtype, np_type in (("F16", "<f2"), ("BF16", None)):
        _, blob = to_storage(x, dtype)
        if np_type:
            expected = np.frombuffer(blob, np_type).astype(np.float32)
        else:  # bfloat16: the high 16 bits of a float32
            expected = (np.frombuffer(blob, "<u2").astype(np.uint32) << 16).view(np.float32)
            assert np.allclose(expected, x, rtol=2 ** -8)
        assert np.allclose(expected, x, rtol=1e-2)


@pytest.mark.parametrize("dtype", ["F32", "F16", "BF16"])
@pytest.mark.parametrize("n_shards", [1, 3])
def test_dtypes_and_shards_load_the_same_model(tmp_path, dtype, n_shards):
    d = make_random_checkpoint(tmp_path / "m", seed=3, dtype=dtype, n_shards=n_shards, **SMALL)
    model = load_stage(d)
    config = load_config(d)
    reference = random_tensors(config, 3)
    expected = reference["model.layers.1.mlp.down_proj.weight"]
    _, blob = to_storage(expected, dtype)  # what the file holds, widened back
    stored = {"F32": lambda b: np.frombuffer(b, "<f4"), "F16": lambda b: np.frombuffer(b, "<f2").astype(np.float32),
              "BF16": lambda b: (np.frombuffer(b, "<u2").astype(np.uint32) << 16).view(np.float32)}[dtype](blob)
    assert np.array_equal(model.weights.layers[1].w_down, stored.reshape(expected.shape))
    assert len(generate_greedy(model, [1, 2, 3], 5).tokens) == 5


def test_f32_tensors_are_memory_mapped(tmp_path):
    d = make_random_checkpoint(tmp_path / "m", seed=1, **SMALL)
    w = load_stage(d).weights.layers[0].w_down
    assert not w.flags.owndata and not w.flags.writeable  # a read-only view of the mapped file


def test_a_stage_reads_only_its_own_tensors(tmp_path, monkeypatch):
    d = make_random_checkpoint(tmp_path / "m", seed=1, **SMALL)
    read: list[str] = []
    original = SafetensorsFile.tensor

    def spy(self, name):
        read.append(name)
        return original(self, name)

    monkeypatch.setattr(SafetensorsFile, "tensor", spy)
    config = load_config(d)
    stage = load_stage_weights(Checkpoint(d), config, 1, 2)
    assert stage.embed is None and stage.head is None and len(stage.layers) == 1
    assert read and all(name.startswith("model.layers.1.") for name in read)
    read.clear()
    last = load_stage_weights(Checkpoint(d), config, 2, 3)
    assert {n for n in read if not n.startswith("model.layers.2.")} == {"model.norm.weight", "lm_head.weight"}
    assert last.head is not None and last.embed is None


def test_tied_head_is_the_embedding(tmp_path):
    d = make_random_checkpoint(tmp_path / "m", seed=2, tie_embeddings=True, **SMALL)
    w = load_stage(d).weights
    assert w.head is w.embed


@pytest.mark.parametrize("damage, message", [
    ("delete_weights", "no model.safetensors"),
    ("truncate", "truncated or mis-sized"),
    ("garbage_header", "not a readable safetensors file"),
    ("drop_tensor", "lacks tensor model.layers.0.self_attn.q_proj.weight"),
    ("missing_shard", "missing"),
    ("wrong_shape", "has shape"),
    ("int_dtype", "minipipe reads F32, F16 and BF16"),
])
def test_malformed_checkpoints_are_refused(tmp_path, damage, message):
    n_shards = 2 if damage == "missing_shard" else 1
    d = make_random_checkpoint(tmp_path / "m", seed=1, n_shards=n_shards, **SMALL)
    f = d / "model.safetensors"
    if damage == "delete_weights":
        f.unlink()
    elif damage == "truncate":
        f.write_bytes(f.read_bytes()[:-100])
    elif damage == "garbage_header":
        f.write_bytes(b"\xff" * 64)
    elif damage == "missing_shard":
        next(d.glob("model-00002-*")).unlink()
    else:
        raw = bytearray(f.read_bytes())
        n = int.from_bytes(raw[:8], "little")
        header = json.loads(raw[8:8 + n])
        name = "model.layers.0.self_attn.q_proj.weight"
        if damage == "drop_tensor":
            header[name.replace("q_proj", "x_proj")] = header.pop(name)
        elif damage == "wrong_shape":
            header[name]["shape"] = [16, 64]  # same byte count, wrong shape
        else:
            header[name]["dtype"] = "I32"
        new = json.dumps(header, separators=(",", ":")).encode()
        new += b" " * (n - len(new)) if len(new) <= n else b""
        assert len(new) == n, "test setup: header must keep its length"
        f.write_bytes(bytes(raw[:8]) + new + bytes(raw[8 + n:]))
    with pytest.raises(CheckpointError, match=message):
        load_stage(d)


def test_untied_checkpoint_without_head_is_refused(tmp_path):
    raw = hf_config(**SMALL)
    tensors = random_tensors(ModelConfig.from_hf(raw), 0)
    del tensors["lm_head.weight"]
    from minipipe.synthetic import write_checkpoint
    d = write_checkpoint(tmp_path / "m", raw, tensors)
    with pytest.raises(CheckpointError, match="lm_head.weight"):
        load_stage(d)
