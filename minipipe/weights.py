"""Checkpoint weights: memory-mapped safetensors in the Hugging Face Llama layout.

A checkpoint directory holds `model.safetensors`, or shards `model-0000x-of-0000y.safetensors`
listed in `model.safetensors.index.json` (`weight_map`: tensor name -> file). minipipe reads the
safetensors format itself (an 8-byte header length, a JSON header, then raw little-endian data)
so that it can memory-map every tensor and widen bfloat16, which NumPy lacks:

    F32  -> a zero-copy view of the mapped file
    F16  -> astype(float32)                      (exact)
    BF16 -> uint16 bits shifted into the high half of a uint32, viewed as float32 (exact)

A pipeline stage asks only for the layers `[lo, hi)` it owns (plus the embedding on the first
stage and the final norm and head on the last); nothing else is read from disk.

Checkpoint names are translated to minipipe's short names in one place, `load_stage_weights`:
q/k/v projections are fused into one `wqkv` matrix and gate/up into one `w_gate_up`, so a decode
row costs four matrix-vector products per layer instead of seven. Weights stay in the checkpoint's
`[out, in]` orientation: a linear layer is `W @ x`.
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .config import ModelConfig, read_json
from .errors import CheckpointError

_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}


class SafetensorsFile:
    """One memory-mapped `.safetensors` file: its header, and tensors read on demand."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > 100_000_000:
                    raise ValueError("header length is implausible")
                header = json.loads(f.read(header_len))
        except (OSError, struct.error, ValueError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{path} has a malformed safetensors header")
        header.pop("__metadata__", None)
        self.data_start = 8 + header_len
        self.entries: dict[str, dict] = header
        self._mapped: np.memmap | None = None

    def _map(self) -> np.memmap:
        if self._mapped is None:
            self._mapped = np.memmap(self.path, dtype=np.uint8, mode="r")
        return self._mapped

    def tensor(self, name: str) -> np.ndarray:
        """Return tensor `name` as float32 (a read-only view of the file for F32 data)."""
        entry = self.entries[name]
        dtype_name, shape = entry.get("dtype"), tuple(entry.get("shape", ()))
        if dtype_name not in _DTYPES:
            raise CheckpointError(
                f"{self.path.name}: tensor {name} has dtype {dtype_name}; minipipe reads F32, F16 and BF16")
        start, end = entry["data_offsets"]
        n_bytes = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype_name].itemsize
        raw = self._map()[self.data_start + start: self.data_start + end]
        if end - start != n_bytes or raw.size != n_bytes:
            raise CheckpointError(f"{self.path.name}: tensor {name} is truncated or mis-sized")
        data = raw.view(_DTYPES[dtype_name]).reshape(shape)
        if dtype_name == "F32":
            return data
        if dtype_name == "F16":
            return data.astype(np.float32)
        return (data.astype(np.uint32) << 16).view(np.float32)  # BF16: exact widening


class Checkpoint:
    """The safetensors files of one checkpoint directory, addressed by tensor name."""

    def __init__(self, model_dir: str | Path):
        self.dir = Path(model_dir)
        index_path = self.dir / "model.safetensors.index.json"
        single_path = self.dir / "model.safetensors"
        if index_path.is_file():
            index = read_json(index_path, "model.safetensors.index.json")
            weight_map = index.get("weight_map") if isinstance(index, dict) else None
            if not isinstance(weight_map, dict) or not weight_map:
                raise CheckpointError(f"{index_path} has no weight_map")
            files = {}
            for file_name in sorted(set(weight_map.values())):
                path = self.dir / file_name
                if not path.is_file():
                    raise CheckpointError(f"shard {file_name} listed in {index_path.name} is missing")
                files[file_name] = SafetensorsFile(path)
            self._where = {name: files[f] for name, f in weight_map.items()}
        elif single_path.is_file():
            only = SafetensorsFile(single_path)
            self._where = {name: only for name in only.entries}
        else:
            hint = " (PyTorch .bin checkpoints are not read; convert to safetensors)" if any(
                self.dir.glob("*.bin")) else ""
            raise CheckpointError(f"no model.safetensors or model.safetensors.index.json in {self.dir}{hint}")

    def has(self, name: str) -> bool:
        return name in self._where

    def tensor(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """Tensor `name` as float32, checked against the shape the config implies."""
        if name not in self._where:
            raise CheckpointError(f"checkpoint {self.dir} lacks tensor {name}")
        source = self._where[name]
        if name not in source.entries:
            raise CheckpointError(f"{source.path.name} lacks tensor {name} (named in the index)")
        t = source.tensor(name)
        if t.shape != tuple(shape):
            raise CheckpointError(f"tensor {name} has shape {t.shape}, config implies {tuple(shape)}")
        return t


@dataclass
class LayerWeights:
    """One decoder layer, in `[out, in]` orientation; biases are None unless the config has them."""

    attn_norm: np.ndarray  # [D]
    wqkv: np.ndarray  # [(H + 2·KVH)·HD, D]  rows: q heads, then k heads, then v heads
    bqkv: np.ndarray | None  # [(H + 2·KVH)·HD]
    wo: np.ndarray  # [D, H·HD]
    bo: np.ndarray | None  # [D]
    mlp_norm: np.ndarray  # [D]
    w_gate_up: np.ndarray  # [2·F, D]  rows: gate, then up
    b_gate_up: np.ndarray | None  # [2·F]
    w_down: np.ndarray  # [D, F]
    b_down: np.ndarray | None  # [D]


@dataclass
class StageWeights:
    """The weights one pipeline stage owns: layers [lo, hi), plus embedding / final norm / head."""

    config: ModelConfig
    lo: int
    hi: int
    layers: list[LayerWeights]
    embed: np.ndarray | None  # [V, D]   first stage only
    final_norm: np.ndarray | None  # [D]  last stage only
    head: np.ndarray | None  # [V, D]   last stage only (the embedding itself when tied)

    @property
    def n_bytes(self) -> int:
        """Bytes of weights a decode step reads (the head once; a tied head is the embedding)."""
        arrays = [a for lw in self.layers for a in vars(lw).values() if a is not None]
        arrays += [a for a in (self.final_norm, self.head) if a is not None]
        return sum(a.nbytes for a in arrays)


def load_stage_weights(checkpoint: Checkpoint, config: ModelConfig, lo: int = 0, hi: int | None = None,
                       with_embed: bool | None = None, with_head: bool | None = None,
                       progress: bool = False) -> StageWeights:
    """Load layers [lo, hi) and, by default, the embedding iff lo == 0 and the head iff hi == L."""
    hi = config.n_layers if hi is None else hi
    if not 0 <= lo <= hi <= config.n_layers:
        raise CheckpointError(f"layer range [{lo}, {hi}) is outside the model's {config.n_layers} layers")
    with_embed = lo == 0 if with_embed is None else with_embed
    with_head = hi == config.n_layers if with_head is None else with_head
    c = config
    D, F, V = c.dim, c.ffn_dim, c.vocab_size
    q_rows, kv_rows = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim

    def get(name, shape):
        return checkpoint.tensor(name, shape)

    def bias(name, rows, enabled):
        return get(name, (rows,)) if enabled else None

    layer_ids = range(lo, hi)
    if progress:
        from tqdm import tqdm
        layer_ids = tqdm(layer_ids, desc="loading layers", unit="layer", leave=False)
    layers = []
    for i in layer_ids:
        p = f"model.layers.{i}."
        a = p + "self_attn."
        m = p + "mlp."
        qkv_bias = None
        if c.attention_bias:
            qkv_bias = np.concatenate([bias(a + f"{x}_proj.bias", r, True)
                                       for x, r in (("q", q_rows), ("k", kv_rows), ("v", kv_rows))])
        gate_up_bias = None
        if c.mlp_bias:
            gate_up_bias = np.concatenate([bias(m + "gate_proj.bias", F, True), bias(m + "up_proj.bias", F, True)])
        layers.append(LayerWeights(
            attn_norm=get(p + "input_layernorm.weight", (D,)),
            wqkv=np.concatenate([get(a + "q_proj.weight", (q_rows, D)),
                                 get(a + "k_proj.weight", (kv_rows, D)),
                                 get(a + "v_proj.weight", (kv_rows, D))]),
            bqkv=qkv_bias,
            wo=get(a + "o_proj.weight", (D, q_rows)),
            bo=bias(a + "o_proj.bias", D, c.attention_bias),
            mlp_norm=get(p + "post_attention_layernorm.weight", (D,)),
            w_gate_up=np.concatenate([get(m + "gate_proj.weight", (F, D)), get(m + "up_proj.weight", (F, D))]),
            b_gate_up=gate_up_bias,
            w_down=get(m + "down_proj.weight", (D, F)),
            b_down=bias(m + "down_proj.bias", D, c.mlp_bias),
        ))
    embed = get("model.embed_tokens.weight", (V, D)) if with_embed or (with_head and c.tie_embeddings) else None
    head = None
    if with_head:
        if c.tie_embeddings:
            head = embed
        elif checkpoint.has("lm_head.weight"):
            head = get("lm_head.weight", (V, D))
        else:
            raise CheckpointError("checkpoint lacks lm_head.weight and tie_word_embeddings is false")
    return StageWeights(
        config=c, lo=lo, hi=hi, layers=layers,
        embed=embed if with_embed else None,
        final_norm=get("model.norm.weight", (D,)) if with_head else None,
        head=head,
    )
