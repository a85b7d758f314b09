"""Checkpoint weights: memory-mapped safetensors in the Hugging Face Llama layout.

A checkpoint directory holds `model.safetensors`, or shards `model-0000x-of-0000y.safetensors`
listed in `model.safetensors.index.json` (`weight_map`: tensor name -> file). minipipe reads the
safetensors format itself (an 8-byte header length, a JSON header, then raw little-endian data)
so that it can memory-map every tensor and widen bfloat16, which NumPy lacks:

    F32  -> a zero-copy view of the mapped file
    F16  -> widened to float32                   (exact)
    BF16 -> uint16 bits shifted into the high half of a uint32, viewed as float32 (exact)

A stage's weights are laid out for decoding (the exactness policy of `minipipe.kernels`):

    linear layers     transposed to [IN, OUT] in 64-byte-aligned row slots
                      (`kernels.linear_weight`), so a decode row is `x @ W` (OpenBLAS streams
                      that about 1.6x faster than `W @ x` over the checkpoint's [OUT, IN]);
                      q/k/v are fused into one `wqkv` and gate/up into one `w_gate_up`, so a
                      decode row costs four GEMVs per layer instead of seven
    LM head           the same, [D, V]; a tied embedding is a view of it ([V, D], strided)
    embedding         (untied, first stage) as it lies in the file for F32: a zero-copy view
    norms, biases     1-D; biases fused and 64-byte aligned

So the linear layers are not memory-mapped: a stage holds one transposed copy of its own
weights (about the size of its part of the checkpoint), built layer by layer from the mapped
file, which the page cache may then drop.

A pipeline stage asks only for the layers `[lo, hi)` it owns (plus the embedding on the first
stage and the final norm and head on the last); nothing else is read from disk.

Checkpoint names are translated to minipipe's short names in one place, `load_stage_weights`.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import kernels
from .config import ModelConfig, read_json
from .errors import CheckpointError

_DTYPES = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2")}  # the dtypes minipipe reads

# Bytes per element of every whole-byte dtype of the safetensors format. A tensor of one of these
# dtypes is size-checked when its file is opened even if minipipe cannot read it (an unused I64
# buffer, say); a dtype absent here (a sub-byte F4, a future type) is checked when it is read.
_ITEMSIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
              "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}

MAX_HEADER_BYTES = 100_000_000  # the safetensors format's own limit
MAX_DIMS = 32  # NumPy 1.x's limit; real checkpoints use 1 or 2
_MAX_EXTENT_BYTES = 1 << 62  # a shape whose nonzero dims multiply past this cannot be an ndarray


@dataclass(frozen=True)
class TensorEntry:
    """One tensor's record in a safetensors header, checked when its file is opened.

    dtype: the safetensors dtype name ("F32", "BF16", ...), not necessarily one minipipe reads.
    shape: the dimensions (`()` for a scalar).
    start, end: the tensor's bytes, `[start, end)`, counted from the first byte after the header.
    """

    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int


class SafetensorsFile:
    """One memory-mapped `.safetensors` file: its header, and tensors read on demand.

    The whole header is checked when the file is opened: the 8-byte header length fits the file,
    the header is a UTF-8 JSON object without duplicate keys, `__metadata__` (if present) maps
    strings to strings, and every other key names a tensor whose entry has a string `dtype`, a
    `shape` of non-negative integers and `data_offsets` `[start, end]` of integers inside the
    file, with `end - start` equal to the shape's byte count and no two tensors sharing bytes.
    Anything else is a `CheckpointError` naming the file and the tensor, raised at once.

    Attributes:
        entries: tensor name -> TensorEntry.
        metadata: the header's `__metadata__` (free-form strings), empty when absent.
        data_start: file offset of the data section (8 + the header length).
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        try:
            with open(self.path, "rb") as f:
                file_size = os.fstat(f.fileno()).st_size
                if file_size < 8:
                    raise _Malformed(f"it has {file_size} bytes, fewer than the 8-byte header length")
                (header_len,) = struct.unpack("<Q", f.read(8))
                if header_len > min(MAX_HEADER_BYTES, file_size - 8):
                    raise _Malformed(f"its header length {header_len} runs past the end of the file "
                                     f"({file_size} bytes)" if header_len <= MAX_HEADER_BYTES else
                                     f"its header length {header_len} is over the format's limit of "
                                     f"{MAX_HEADER_BYTES} bytes")
                header_bytes = f.read(header_len)
        except OSError as e:
            raise CheckpointError(f"{self.path} cannot be read ({e.strerror or e})") from None
        except _Malformed as e:
            raise CheckpointError(f"{self.path} is not a readable safetensors file ({e})") from None
        try:
            header = json.loads(header_bytes.decode("utf-8"), object_pairs_hook=_refuse_duplicate_keys)
        except UnicodeDecodeError as e:
            raise CheckpointError(f"{self.path} is not a readable safetensors file (its header is not UTF-8: "
                                  f"{e.reason} at byte {e.start})") from None
        except _Malformed as e:
            raise CheckpointError(f"{self.path} is not a readable safetensors file ({e})") from None
        except (ValueError, RecursionError) as e:  # JSONDecodeError is a ValueError; so is a 5000-digit int
            reason = "nested too deeply" if isinstance(e, RecursionError) else _show(str(e), 80)
            raise CheckpointError(f"{self.path} is not a readable safetensors file (its header is not JSON: "
                                  f"{reason})") from None
        if not isinstance(header, dict):
            raise CheckpointError(f"{self.path} is not a readable safetensors file (its header is a JSON "
                                  f"{type(header).__name__}, not an object)")
        self.data_start = 8 + header_len
        data_len = file_size - self.data_start
        self.metadata = self._check_metadata(header.pop("__metadata__", None))
        self.entries: dict[str, TensorEntry] = {
            name: self._check_entry(name, entry, data_len) for name, entry in header.items()}
        self._check_no_overlap()
        self._mapped: np.memmap | None = None

    def _check_metadata(self, metadata) -> dict[str, str]:
        if metadata is None:
            return {}
        if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
            raise CheckpointError(f"{self.path}: __metadata__ must map strings to strings, got {_show(metadata)}")
        return metadata

    def _check_entry(self, name: str, entry, data_len: int) -> TensorEntry:
        """Validate one header entry against the data section's length `data_len` (bytes)."""
        where = f"{self.path}: tensor {_show(name)}"
        if not isinstance(entry, dict):
            raise CheckpointError(f"{where}: its header entry must be an object, got {_show(entry)}")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in entry:
                raise CheckpointError(f"{where}: its header entry lacks {key!r}")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not isinstance(dtype, str) or not dtype:
            raise CheckpointError(f"{where}: dtype must be a dtype name such as \"F32\", got {_show(dtype)}")
        if not isinstance(shape, list) or not all(_is_int(d) and d >= 0 for d in shape):
            raise CheckpointError(f"{where}: shape must be a list of non-negative integers, got {_show(shape)}")
        if len(shape) > MAX_DIMS:
            raise CheckpointError(f"{where}: shape has {len(shape)} dimensions, more than {MAX_DIMS}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)):
            raise CheckpointError(f"{where}: data_offsets must be two integers [start, end], got {_show(offsets)}")
        start, end = offsets
        if not 0 <= start <= end:
            raise CheckpointError(f"{where}: data_offsets {_show(offsets)} must satisfy 0 <= start <= end")
        if end > data_len:
            raise CheckpointError(f"{where}: data_offsets {_show(offsets)} run past the end of the file's "
                                  f"{data_len} data bytes (the file is truncated or mis-sized)")
        itemsize = _ITEMSIZES.get(dtype)
        extent = 1  # the product of the nonzero dims: bounded even for an empty tensor
        for d in shape:
            extent *= max(d, 1)
        if extent * (itemsize or 1) > _MAX_EXTENT_BYTES:
            raise CheckpointError(f"{where}: shape {_show(shape)} is implausibly large")
        if itemsize is not None:
            n_bytes = itemsize
            for d in shape:
                n_bytes *= d
            if end - start != n_bytes:
                raise CheckpointError(f"{where}: shape {_show(shape)} of {dtype} needs {n_bytes} bytes but "
                                      f"data_offsets {_show(offsets)} hold {end - start} (the file is mis-sized)")
        return TensorEntry(dtype, tuple(shape), start, end)

    def _check_no_overlap(self) -> None:
        """No two tensors may share a byte (the format lays them end to end)."""
        spans = sorted((e.start, e.end, name) for name, e in self.entries.items() if e.end > e.start)
        for (_, prev_end, prev), (start, _, name) in zip(spans, spans[1:]):
            if start < prev_end:
                raise CheckpointError(f"{self.path}: tensors {_show(prev)} and {_show(name)} share data bytes")

    def _map(self) -> np.memmap:
        if self._mapped is None:
            try:
                self._mapped = np.memmap(self.path, dtype=np.uint8, mode="r")
            except (OSError, ValueError) as e:
                raise CheckpointError(f"{self.path} cannot be mapped ({e})") from None
        return self._mapped

    def tensor(self, name: str) -> np.ndarray:
        """Return tensor `name` as float32 (a read-only view of the file for F32 data)."""
        entry = self.entries[name]
        if entry.dtype not in _DTYPES:
            raise CheckpointError(f"{self.path.name}: tensor {_show(name)} has dtype {_show(entry.dtype)}; "
                                  "minipipe reads F32, F16 and BF16")
        raw = self._map()[self.data_start + entry.start: self.data_start + entry.end]
        if raw.size != entry.end - entry.start:  # the file shrank after it was opened
            raise CheckpointError(f"{self.path.name}: tensor {_show(name)} is truncated or mis-sized")
        data = raw.view(_DTYPES[entry.dtype]).reshape(entry.shape)
        if entry.dtype == "F32":
            return data
        if entry.dtype == "F16":
            return data.astype(np.float32)
        return (data.astype(np.uint32) << 16).view(np.float32)  # BF16: exact widening


def _is_plain_file_name(name) -> bool:
    """A shard name from an index: a string naming a file in the checkpoint directory itself
    (no path separator, not `.` or `..`), so an index cannot point outside its directory."""
    return (isinstance(name, str) and name not in ("", ".", "..") and "\0" not in name
            and not any(sep in name for sep in ("/", "\\", os.sep, os.altsep) if sep))


class _Malformed(ValueError):
    """Internal: why a file is not safetensors, caught and reported as a CheckpointError."""


def _refuse_duplicate_keys(pairs: list[tuple[str, object]]) -> dict:
    """json.loads hook: build an object, refusing a key given twice (which one would win?)."""
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Malformed(f"its header gives the key {_show(duplicate)} twice")
    return obj


def _is_int(value) -> bool:
    """A JSON integer (Python's bool is an int, but JSON's true is not a number)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _show(value, limit: int = 60) -> str:
    """repr(value) on one line, cut to about `limit` characters, for error messages."""
    try:
        text = repr(value)
    except RecursionError:
        return "(a deeply nested value)"
    return text if len(text) <= limit else text[:limit - 3] + "..."


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
                raise CheckpointError(f"{index_path} has no weight_map (an object: tensor name -> shard file)")
            for name, file_name in weight_map.items():
                if not _is_plain_file_name(file_name):
                    raise CheckpointError(f"{index_path}: tensor {_show(name)} is mapped to {_show(file_name)}, "
                                          "not a file name in the checkpoint directory")
            files = {}
            for file_name in sorted(set(weight_map.values())):
                path = self.dir / file_name
                try:
                    present = path.is_file()
                except OSError:  # e.g. a name too long for the file system
                    present = False
                if not present:
                    raise CheckpointError(f"shard {_show(file_name)} listed in {index_path.name} is missing")
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


def fused(parts: list[np.ndarray]) -> np.ndarray:
    """Matrices (or vectors) stacked along their first axis into one canonical array: C-contiguous
    and 64-byte aligned, as the exactness policy wants every array a BLAS call reads."""
    out = kernels.aligned_empty((sum(p.shape[0] for p in parts),) + parts[0].shape[1:])
    np.concatenate(parts, out=out)
    return out


@dataclass
class LayerWeights:
    """One decoder layer. Linear weights are [in, out] row slots (`kernels.linear_weight`): a
    row's output is `x @ w`. Biases are None unless the config has them."""

    attn_norm: np.ndarray  # [D]
    wqkv: np.ndarray  # [D, (H + 2·KVH)·HD]  columns: q heads, then k heads, then v heads
    bqkv: np.ndarray | None  # [(H + 2·KVH)·HD]
    wo: np.ndarray  # [H·HD, D]
    bo: np.ndarray | None  # [D]
    mlp_norm: np.ndarray  # [D]
    w_gate_up: np.ndarray  # [D, 2·F]  columns: gate, then up
    b_gate_up: np.ndarray | None  # [2·F]
    w_down: np.ndarray  # [F, D]
    b_down: np.ndarray | None  # [D]


@dataclass
class StageWeights:
    """The weights one pipeline stage owns: layers [lo, hi), plus embedding / final norm / head."""

    config: ModelConfig
    lo: int
    hi: int
    layers: list[LayerWeights]
    embed: np.ndarray | None  # [V, D]   first stage only (tied, with the head: a view of head.T)
    final_norm: np.ndarray | None  # [D]  last stage only
    head: np.ndarray | None  # [D, V]   last stage only, row slots (`kernels.linear_weight`)

    @property
    def n_bytes(self) -> int:
        """Bytes of weights a decode step reads (the head once; a tied head is the embedding)."""
        arrays = [a for lw in self.layers for a in vars(lw).values() if a is not None]
        arrays += [a for a in (self.final_norm, self.head) if a is not None]  # a tied embed is head.T
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
        return vector(name, (rows,)) if enabled else None

    layer_ids = range(lo, hi)
    if progress:
        from tqdm import tqdm
        layer_ids = tqdm(layer_ids, desc="loading layers", unit="layer", leave=False)
    # every linear weight of the stage in one allocation, in the order a decode step reads them
    shapes = [(D, q_rows + 2 * kv_rows), (q_rows, D), (D, 2 * F), (F, D)] * (hi - lo) + ([(D, V)] if with_head else [])
    arena = kernels.WeightArena(shapes)

    def linear(parts):  # checkpoint [OUT, IN] matrices -> one [IN, OUT] row-slot weight
        return kernels.linear_weight(parts, arena)

    def vector(name, shape):  # norms and biases: small, copied (no view keeps the file mapped)
        return fused([get(name, shape)])

    layers = []
    for i in layer_ids:  # one layer at a time: the mapped pages of a layer are read once, then dropped
        p = f"model.layers.{i}."
        a = p + "self_attn."
        m = p + "mlp."
        qkv_bias = None
        if c.attention_bias:
            qkv_bias = fused([bias(a + f"{x}_proj.bias", r, True)
                              for x, r in (("q", q_rows), ("k", kv_rows), ("v", kv_rows))])
        gate_up_bias = None
        if c.mlp_bias:
            gate_up_bias = fused([bias(m + "gate_proj.bias", F, True), bias(m + "up_proj.bias", F, True)])
        layers.append(LayerWeights(
            attn_norm=vector(p + "input_layernorm.weight", (D,)),
            wqkv=linear([get(a + "q_proj.weight", (q_rows, D)),
                         get(a + "k_proj.weight", (kv_rows, D)),
                         get(a + "v_proj.weight", (kv_rows, D))]),
            bqkv=qkv_bias,
            wo=linear([get(a + "o_proj.weight", (D, q_rows))]),
            bo=bias(a + "o_proj.bias", D, c.attention_bias),
            mlp_norm=vector(p + "post_attention_layernorm.weight", (D,)),
            w_gate_up=linear([get(m + "gate_proj.weight", (F, D)), get(m + "up_proj.weight", (F, D))]),
            b_gate_up=gate_up_bias,
            w_down=linear([get(m + "down_proj.weight", (D, F))]),
            b_down=bias(m + "down_proj.bias", D, c.mlp_bias),
        ))
    embed = head = None
    if with_head:
        if c.tie_embeddings:
            head = linear([get("model.embed_tokens.weight", (V, D))])  # [D, V]
            embed = head.T if with_embed else None  # [V, D] view: rows gathered with a stride
        elif checkpoint.has("lm_head.weight"):
            head = linear([get("lm_head.weight", (V, D))])  # [D, V]
        else:
            raise CheckpointError("checkpoint lacks lm_head.weight and tie_word_embeddings is false")
    if with_embed and embed is None:
        embed = get("model.embed_tokens.weight", (V, D))  # [V, D]; F32: a view of the mapped file
    return StageWeights(
        config=c, lo=lo, hi=hi, layers=layers,
        embed=embed,
        final_norm=vector("model.norm.weight", (D,)) if with_head else None,
        head=head,
    )
