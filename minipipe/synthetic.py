"""Random Llama models: small, seeded, in memory or written as real Hugging Face checkpoints.

Tests, `minipipe doctor` and the cross-check tools use these to exercise every config variant
(GQA/MHA/MQA, tied or untied head, RoPE types, biases, float16/bfloat16 storage, sharded files,
both config.json generations) without a model hub. Weights are drawn with `Generator.random`
(uniform floats), whose stream is stable across NumPy versions, so a seed names a model.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

from .config import ModelConfig
from .model import StageModel
from .weights import load_stage_weights


def hf_config(dim: int = 32, ffn_dim: int = 48, n_layers: int = 2, n_heads: int = 4, n_kv_heads: int = 2,
              head_dim: int | None = None, vocab_size: int = 64, max_positions: int = 256,
              rope_type: str = "default", rope_theta: float = 10000.0, rope_style: str = "new",
              tie_embeddings: bool = False, attention_bias: bool = False, mlp_bias: bool = False,
              norm_eps: float = 1e-5, dtype: str = "float32", eos_token_id=2) -> dict:
    """A config.json dict in either generation: rope_style "new" (rope_parameters) or "old"."""
    rope = {"rope_type": rope_type}
    if rope_type == "linear":
        rope["factor"] = 2.0
    elif rope_type == "llama3":
        rope.update(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                    original_max_position_embeddings=max(8, max_positions // 8))
    cfg = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": dim, "intermediate_size": ffn_dim, "num_hidden_layers": n_layers,
        "num_attention_heads": n_heads, "num_key_value_heads": n_kv_heads,
        "vocab_size": vocab_size, "max_position_embeddings": max_positions, "rms_norm_eps": norm_eps,
        "tie_word_embeddings": tie_embeddings, "attention_bias": attention_bias, "mlp_bias": mlp_bias,
        "bos_token_id": 1, "eos_token_id": eos_token_id, "initializer_range": 0.02,
    }
    if head_dim is not None:
        cfg["head_dim"] = head_dim
    if rope_style == "new":
        cfg["rope_parameters"] = {"rope_theta": rope_theta, **rope}
        cfg["dtype"] = dtype
    else:
        cfg["rope_theta"] = rope_theta
        if rope_type != "default":
            legacy = dict(rope)
            legacy["type"] = legacy.pop("rope_type")  # the oldest files say "type"
            cfg["rope_scaling"] = legacy
        cfg["torch_dtype"] = dtype
    return cfg


def random_tensors(config: ModelConfig, seed: int, scale: float = 1.0) -> dict[str, np.ndarray]:
    """HF-named float32 tensors for `config`, uniform and seeded."""
    rng = np.random.default_rng(seed)
    c = config

    def uniform(shape, fan_in):  # ±sqrt(3/fan_in): unit-variance outputs for unit-variance inputs
        bound = scale * np.sqrt(3.0 / fan_in)
        return ((rng.random(shape) * 2 - 1) * bound).astype(np.float32)

    def norm_weight():
        return (1.0 + 0.2 * (rng.random(c.dim) * 2 - 1)).astype(np.float32)

    q_rows, kv_rows = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    t = {"model.embed_tokens.weight": uniform((c.vocab_size, c.dim), 3.0)}
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"] = norm_weight()
        t[p + "post_attention_layernorm.weight"] = norm_weight()
        for name, rows, cols in (("q", q_rows, c.dim), ("k", kv_rows, c.dim), ("v", kv_rows, c.dim),
                                 ("o", c.dim, q_rows)):
            t[p + f"self_attn.{name}_proj.weight"] = uniform((rows, cols), cols)
            if c.attention_bias:
                t[p + f"self_attn.{name}_proj.bias"] = uniform((rows,), 4 * cols)
        for name, rows, cols in (("gate", c.ffn_dim, c.dim), ("up", c.ffn_dim, c.dim), ("down", c.dim, c.ffn_dim)):
            t[p + f"mlp.{name}_proj.weight"] = uniform((rows, cols), cols)
            if c.mlp_bias:
                t[p + f"mlp.{name}_proj.bias"] = uniform((rows,), 4 * cols)
    t["model.norm.weight"] = norm_weight()
    if not c.tie_embeddings:
        t["lm_head.weight"] = uniform((c.vocab_size, c.dim), c.dim / 4)
    return t


class TensorDict:
    """An in-memory tensor source with the same interface as `weights.Checkpoint`."""

    def __init__(self, tensors: dict[str, np.ndarray]):
        self.tensors = tensors

    def has(self, name: str) -> bool:
        return name in self.tensors

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        t = self.tensors[name]
        assert t.shape == tuple(shape), f"{name}: {t.shape} != {shape}"
        return t


def random_model(seed: int = 0, lo: int = 0, hi: int | None = None, **config_kwargs) -> StageModel:
    """A random StageModel held in memory (layers [lo, hi), all by default)."""
    config = ModelConfig.from_hf(hf_config(**config_kwargs))
    source = TensorDict(random_tensors(config, seed))
    return StageModel(load_stage_weights(source, config, lo, hi))


# ----------------------------------------------------------------------------------------------
# writing checkpoints

def to_storage(t: np.ndarray, dtype: str) -> tuple[str, bytes]:
    """float32 -> safetensors dtype name and little-endian bytes (bf16 rounds to nearest even)."""
    t = np.ascontiguousarray(t, dtype=np.float32)
    if dtype == "F32":
        return "F32", t.astype("<f4").tobytes()
    if dtype == "F16":
        return "F16", t.astype("<f2").tobytes()
    if dtype == "BF16":
        bits = t.view(np.uint32).astype(np.uint64)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return "BF16", rounded.astype("<u2").tobytes()
    raise ValueError(f"unknown storage dtype {dtype}")


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], dtype: str = "F32") -> None:
    """Write tensors in the safetensors format (8-byte header length, JSON header, data)."""
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        dtype_name, blob = to_storage(t, dtype)
        header[name] = {"dtype": dtype_name, "shape": list(t.shape), "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = {"format": "pt"}
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # keep the data 8-byte aligned
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)))
        f.write(raw)
        for blob in blobs:
            f.write(blob)


def write_word_tokenizer(model_dir: Path, vocab_size: int) -> None:
    """A word-level tokenizer: ids 0-2 are <unk> <s> </s>, id i >= 3 is the word `w{i}`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2, **{f"w{i}": i for i in range(3, vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.save(str(model_dir / "tokenizer.json"))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "add_bos_token": True}))


def write_checkpoint(model_dir: str | Path, config: dict, tensors: dict[str, np.ndarray], dtype: str = "F32",
                     n_shards: int = 1, tokenizer: bool = True) -> Path:
    """Write a checkpoint directory in the Hugging Face layout."""
    model_dir = Path(model_dir)
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    names = list(tensors)
    if n_shards == 1:
        write_safetensors(model_dir / "model.safetensors", tensors, dtype)
    else:
        weight_map = {}
        for k, part in enumerate(np.array_split(np.arange(len(names)), n_shards)):
            file_name = f"model-{k + 1:05d}-of-{n_shards:05d}.safetensors"
            write_safetensors(model_dir / file_name, {names[i]: tensors[names[i]] for i in part}, dtype)
            weight_map.update({names[i]: file_name for i in part})
        index = {"metadata": {"total_size": int(sum(t.nbytes for t in tensors.values()))}, "weight_map": weight_map}
        (model_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if tokenizer:
        write_word_tokenizer(model_dir, config["vocab_size"])
    return model_dir


def make_random_checkpoint(model_dir: str | Path, seed: int = 0, dtype: str = "F32", n_shards: int = 1,
                           **config_kwargs) -> Path:
    """A random model written as a checkpoint; returns its directory."""
    raw = hf_config(**config_kwargs)
    tensors = random_tensors(ModelConfig.from_hf(raw), seed)
    return write_checkpoint(model_dir, raw, tensors, dtype=dtype, n_shards=n_shards)
