"""Checkpoint loading: dtypes, shards, memory mapping, per-stage loading, malformed files (and a
fuzzer: whatever the bytes, only CheckpointError may come out)."""

from __future__ import annotations

import copy
import json
import struct

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from minipipe import kernels
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
    assert np.array_equal(model.weights.layers[1].w_down, stored.reshape(expected.shape).T)  # stored [in, out]
    assert len(generate_greedy(model, [1, 2, 3], 5).tokens) == 5


@pytest.mark.parametrize("tie", [False, True])
def test_linear_weights_are_transposed_row_slots_and_the_embedding_stays_mapped(tmp_path, tie):
    """Linear layers are copied into [in, out] 64-byte row slots (the decode GEMV's layout); an
    untied float32 embedding stays a read-only view of the mapped file."""
    d = make_random_checkpoint(tmp_path / "m", seed=1, tie_embeddings=tie, **SMALL)
    w = load_stage(d).weights
    reference = random_tensors(load_config(d), 1)
    for lw in w.layers:
        for a in (lw.wqkv, lw.wo, lw.w_gate_up, lw.w_down):
            assert kernels.has_row_slots(a) and a.flags.writeable
    assert np.array_equal(w.layers[0].wo, reference["model.layers.0.self_attn.o_proj.weight"].T)
    assert kernels.has_row_slots(w.head) and w.head.shape == (SMALL["dim"], SMALL["vocab_size"])
    if not tie:
        assert not w.embed.flags.owndata and not w.embed.flags.writeable  # a view of the mapped file
        assert np.array_equal(w.head, reference["lm_head.weight"].T)
    assert np.array_equal(w.embed, reference["model.embed_tokens.weight"])


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
    assert np.shares_memory(w.embed, w.head) and np.array_equal(w.embed, w.head.T)  # one copy: embed is head.T


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


# ----------------------------------------------------------------------------------------------
# malformed safetensors headers: refused when the file is opened, naming the file and the tensor

# a small valid file: every dtype minipipe reads, a scalar, an empty tensor, one it cannot read
BASE_HEADER = {
    "a": {"dtype": "F32", "shape": [2, 3], "data_offsets": [0, 24]},
    "b": {"dtype": "BF16", "shape": [4], "data_offsets": [24, 32]},
    "c": {"dtype": "F16", "shape": [], "data_offsets": [32, 34]},
    "d": {"dtype": "F32", "shape": [0, 5], "data_offsets": [34, 34]},
    "e": {"dtype": "I32", "shape": [2], "data_offsets": [34, 42]},
    "__metadata__": {"format": "pt"},
}
BASE_DATA = bytes(np.random.default_rng(7).integers(0, 256, 42, dtype=np.uint8))
READABLE = {"F32": "<f4", "F16": "<f2", "BF16": "<u2"}


def safetensors_bytes(header, data: bytes = BASE_DATA, header_len: int | None = None) -> bytes:
    """A file: the header (a dict to dump as JSON, or raw bytes), its length (default: the true
    one), then `data`."""
    raw = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(raw) if header_len is None else header_len) + raw + data


def decode_like_the_format(file: bytes) -> dict[str, np.ndarray]:
    """The oracle: every readable tensor of a well-formed file, decoded straight from its bytes."""
    (n,) = struct.unpack("<Q", file[:8])
    header = json.loads(file[8:8 + n])
    out = {}
    for name, entry in header.items():
        if name == "__metadata__" or entry["dtype"] not in READABLE:
            continue
        start, end = entry["data_offsets"]
        raw = file[8 + n + start: 8 + n + end]
        values = np.frombuffer(raw, READABLE[entry["dtype"]])
        assert values.size == int(np.prod(entry["shape"])), "opened a file whose sizes disagree"
        values = values.reshape(entry["shape"])
        out[name] = (values.astype(np.uint32) << 16).view(np.float32) if entry["dtype"] == "BF16" \
            else values.astype(np.float32)
    return out


def _with(name: str, key: str, value) -> dict:
    header = copy.deepcopy(BASE_HEADER)
    header[name][key] = value
    return header


MALFORMED = {  # case -> (file bytes, what the one-line message says)
    "entry not an object":
        (safetensors_bytes({**BASE_HEADER, "a": [0, 24]}),
         "tensor 'a': its header entry must be an object"),
    "dtype not a string": (safetensors_bytes(_with("a", "dtype", 4)), "tensor 'a': dtype must be"),
    "shape a string": (safetensors_bytes(_with("a", "shape", "2x3")), "tensor 'a': shape must be"),
    "shape of floats": (safetensors_bytes(_with("a", "shape", [2.0, 3])), "tensor 'a': shape must be"),
    "shape of booleans": (safetensors_bytes(_with("b", "shape", [True] * 4)), "tensor 'b': shape must be"),
    "negative shape": (safetensors_bytes(_with("a", "shape", [-2, -3])), "tensor 'a': shape must be"),
    "huge shape":
        (safetensors_bytes(_with("a", "shape", [2 ** 40, 2 ** 40])),
         "tensor 'a': shape .* is implausibly large"),
    "huge empty shape":
        (safetensors_bytes(_with("d", "shape", [0, 2 ** 62, 2 ** 62])),
         "tensor 'd': shape .* is implausibly"),
    "too many dims": (safetensors_bytes(_with("d", "shape", [0] * 70)), "tensor 'd': shape has 70 dimensions"),
    "shape of the wrong size":
        (safetensors_bytes(_with("a", "shape", [2, 2])),
         "tensor 'a': shape .* needs 16 bytes"),
    "offsets a string":
        (safetensors_bytes(_with("a", "data_offsets", "0-24")),
         "tensor 'a': data_offsets must be two"),
    "three offsets":
        (safetensors_bytes(_with("a", "data_offsets", [0, 12, 24])),
         "tensor 'a': data_offsets must be two"),
    "fractional offsets":
        (safetensors_bytes(_with("a", "data_offsets", [0, 24.0])),
         "tensor 'a': data_offsets must be two"),
    "reversed offsets":
        (safetensors_bytes(_with("b", "data_offsets", [32, 24])),
         "tensor 'b': data_offsets .* start <= end"),
    "negative offsets":
        (safetensors_bytes(_with("a", "data_offsets", [-24, 0])),
         "tensor 'a': data_offsets .* start <= end"),
    "offsets past the end":
        (safetensors_bytes(_with("e", "data_offsets", [34, 50])),
         "tensor 'e': data_offsets .* past the end"),
    "missing data_offsets":
        (safetensors_bytes({**BASE_HEADER, "a": {"dtype": "F32", "shape": [2, 3]}}),
         "tensor 'a': .* lacks 'data_offsets'"),
    "overlapping tensors":
        (safetensors_bytes({**BASE_HEADER, "f": {"dtype": "F16", "shape": [2], "data_offsets": [20, 24]}}),
         "tensors 'a' and 'f' share"),
    "metadata not an object":
        (safetensors_bytes({**BASE_HEADER, "__metadata__": ["pt"]}),
         "__metadata__ must map strings to strings"),
    "metadata not strings":
        (safetensors_bytes({**BASE_HEADER, "__metadata__": {"format": 1}}),
         "__metadata__ must map strings"),
    "header length past the file":
        (safetensors_bytes(BASE_HEADER, header_len=10_000),
         "header length 10000 runs past the end"),
    "header length over the limit":
        (safetensors_bytes(BASE_HEADER, header_len=2 ** 64 - 1),
         "over the format's limit"),
    "shorter than 8 bytes": (b"\x05\x00\x00", "fewer than the 8-byte header length"),
    "header not UTF-8": (safetensors_bytes(b'{"\xff\xfe": 1}'), "not UTF-8"),
    "header not JSON": (safetensors_bytes(b"{'a': 1}"), "not JSON"),
    "header nested too deeply": (safetensors_bytes(b"[" * 100_000 + b"]" * 100_000, b""), "nested too deeply"),
    "header a list": (safetensors_bytes([1, 2]), "header is a JSON list, not an object"),
    "duplicate keys": (safetensors_bytes(json.dumps(BASE_HEADER).replace('"b":', '"a":').encode()), "key 'a' twice"),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_headers_are_refused_on_opening(tmp_path, case):
    file, message = MALFORMED[case]
    path = tmp_path / "model.safetensors"
    path.write_bytes(file)
    with pytest.raises(CheckpointError, match=message) as e:
        SafetensorsFile(path)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


def test_the_valid_base_file_reads_like_the_oracle(tmp_path):
    """The fuzzer's starting point is well-formed: every readable tensor decodes as the oracle does."""
    file = safetensors_bytes(BASE_HEADER)
    (tmp_path / "m.safetensors").write_bytes(file)
    f = SafetensorsFile(tmp_path / "m.safetensors")
    expected = decode_like_the_format(file)
    assert set(expected) == {"a", "b", "c", "d"} and f.metadata == {"format": "pt"}
    for name, want in expected.items():
        assert f.tensor(name).dtype == np.float32 and f.tensor(name).tobytes() == want.tobytes()
    with pytest.raises(CheckpointError, match="tensor 'e' has dtype 'I32'"):
        f.tensor("e")


# -- the fuzzer: random and mutated headers, random lengths

JSON_LEAVES = (st.none() | st.booleans() | st.integers(-2 ** 70, 2 ** 70) | st.floats() | st.text(max_size=6)
               | st.sampled_from([-1, 0, 1, 24, 2 ** 31, 2 ** 63, 2 ** 64, 10 ** 30, 1.5, 24.0, "24", "F32", "BF16"]))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=6), inner, max_size=4), max_leaves=10)
DTYPE_NAMES = st.sampled_from([*READABLE, "I32", "I64", "U8", "BOOL", "F64", "F4", "XYZ", ""])
FIELDS = ("dtype", "shape", "data_offsets")


@st.composite
def mutated_header(draw) -> dict:
    """BASE_HEADER after a few random mutations: wrong types, odd numbers, missing or extra keys."""
    header = copy.deepcopy(BASE_HEADER)
    for _ in range(draw(st.integers(0, 4))):
        name = draw(st.sampled_from(sorted(header) + ["new"]))
        entry = header.get(name)
        how = draw(st.sampled_from(["set", "element", "nudge", "delete", "replace", "swap", "dtype", "extra"]))
        if how == "replace" or not isinstance(entry, dict):
            header[name] = draw(JSON_VALUES | st.fixed_dictionaries(
                {k: JSON_VALUES for k in FIELDS}) | st.fixed_dictionaries(
                {"dtype": DTYPE_NAMES, "shape": st.lists(st.integers(-2, 9), max_size=3),
                 "data_offsets": st.lists(st.integers(-2, 50), min_size=2, max_size=2)}))
            continue
        key = draw(st.sampled_from(sorted(entry) or ["dtype"]))
        value = entry.get(key)
        if how == "set":
            entry[key] = draw(JSON_VALUES)
        elif how in ("element", "nudge") and isinstance(value, list) and value:
            i = draw(st.integers(0, len(value) - 1))
            if how == "element":
                value[i] = draw(JSON_LEAVES)
            elif isinstance(value[i], int):
                value[i] += draw(st.integers(-3, 3))
        elif how == "delete":
            entry.pop(key, None)
        elif how == "swap" and isinstance(value, list):
            value.reverse()
        elif how == "dtype" and name != "__metadata__":
            entry["dtype"] = draw(DTYPE_NAMES)
        elif how == "extra":
            entry[draw(st.text(max_size=6))] = draw(JSON_VALUES)
    return header


@st.composite
def safetensors_files(draw) -> bytes:
    """Whole files: a mutated, random or raw-bytes header; a true or random length; cut or padded data."""
    kind = draw(st.sampled_from(["mutated", "mutated", "mutated", "random", "bytes", "tiny"]))
    if kind == "tiny":
        return draw(st.binary(max_size=12))
    if kind == "bytes":
        raw = draw(st.binary(max_size=40))
    else:
        header = draw(mutated_header() if kind == "mutated" else
                      st.dictionaries(st.text(max_size=4), JSON_VALUES, max_size=4) | JSON_VALUES)
        raw = json.dumps(header, ensure_ascii=draw(st.booleans())).encode("utf-8", "surrogatepass")
        raw += b" " * draw(st.integers(0, 3))
    header_len = draw(st.sampled_from([None, None, None, "near", "any"]))
    if header_len == "near":
        header_len = max(0, len(raw) + draw(st.integers(-3, 3)))
    elif header_len == "any":
        header_len = draw(st.integers(0, 2 ** 64 - 1))
    cut = draw(st.sampled_from([0, 0, 0, 1]) | st.integers(-len(BASE_DATA), 8))
    data = BASE_DATA[:len(BASE_DATA) + cut] if cut < 0 else BASE_DATA + bytes(cut)
    return safetensors_bytes(raw, data, header_len)


@pytest.fixture(scope="module")
def fuzz_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


@given(file=safetensors_files())
def test_fuzzed_safetensors_read_correctly_or_raise_checkpoint_error(fuzz_dir, file):
    """Opening the file and reading every tensor either gives the oracle's float32 array of the
    declared shape or raises CheckpointError with a one-line message: nothing else comes out."""
    path = fuzz_dir / "model.safetensors"
    path.write_bytes(file)
    try:
        f = SafetensorsFile(path)
    except CheckpointError as e:
        assert type(e) is CheckpointError and "\n" not in str(e)
        return
    expected = decode_like_the_format(file)
    (n,) = struct.unpack("<Q", file[:8])
    assert set(f.entries) == set(json.loads(file[8:8 + n])) - {"__metadata__"}
    for name, entry in f.entries.items():
        try:
            t = f.tensor(name)
        except CheckpointError as e:
            assert entry.dtype not in READABLE and "\n" not in str(e)  # the one reason a read may fail
            continue
        assert t.dtype == np.float32 and t.shape == expected[name].shape
        assert t.tobytes() == expected[name].tobytes()


# ----------------------------------------------------------------------------------------------
# malformed shard indexes

SHARD_NAMES = ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]


@pytest.fixture(scope="module")
def sharded(tmp_path_factory):
    """A two-shard checkpoint, a valid safetensors file just outside it and one in a subdirectory;
    returns (directory, tensor name -> array)."""
    root = tmp_path_factory.mktemp("sharded")
    d = make_random_checkpoint(root / "m", seed=4, n_shards=2, **SMALL)
    (root / "outside.safetensors").write_bytes((d / SHARD_NAMES[0]).read_bytes())
    (d / "sub").mkdir()
    (d / "sub" / "inner.safetensors").write_bytes((d / SHARD_NAMES[1]).read_bytes())
    index = json.loads((d / "model.safetensors.index.json").read_text())
    arrays = {name: SafetensorsFile(d / f).tensor(name) for name, f in index["weight_map"].items()}
    return d, arrays


@pytest.mark.parametrize("shard", ["../outside.safetensors", "sub/inner.safetensors", "sub\\inner.safetensors",
                                   "..", "", None, 3])
def test_index_may_name_only_files_in_the_directory(tmp_path, sharded, shard):
    d, arrays = sharded
    name = next(iter(arrays))
    index_dir = tmp_path / "m"
    index_dir.mkdir()
    for f in SHARD_NAMES:
        (index_dir / f).symlink_to(d / f)
    (tmp_path / "outside.safetensors").symlink_to(d.parent / "outside.safetensors")
    (index_dir / "sub").symlink_to(d / "sub")
    weight_map = {n: SHARD_NAMES[0] for n in arrays}
    weight_map[name] = shard
    (index_dir / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    with pytest.raises(CheckpointError, match="is mapped to .*, not a file name in the checkpoint directory"):
        Checkpoint(index_dir)


SHARD_VALUES = st.sampled_from([*SHARD_NAMES, "../outside.safetensors", "sub/inner.safetensors", "..", ".", "",
                                "/etc/hostname", "config.json", "sub", "a\0b", "x" * 300]) | JSON_LEAVES


@st.composite
def indexes(draw, names: list[str]) -> bytes:
    """model.safetensors.index.json text: right or wrong shard names, wrong types, wrong shapes."""
    kind = draw(st.sampled_from(["map", "map", "map", "random", "bytes"]))
    if kind == "bytes":
        return draw(st.binary(max_size=40))
    if kind == "random":
        weight_map = draw(JSON_VALUES)
    else:
        keys = st.sampled_from(names) | st.text(max_size=6)
        weight_map = draw(st.dictionaries(keys, SHARD_VALUES, max_size=6))
    index = draw(st.sampled_from([{"weight_map": weight_map}, {"metadata": {}, "weight_map": weight_map},
                                  weight_map, [weight_map]]))
    return json.dumps(index).encode()


@given(data=st.data())
def test_fuzzed_indexes_load_correctly_or_raise_checkpoint_error(sharded, fuzz_dir, data):
    """A checkpoint opened through any index reads each tensor as its shard holds it, or raises
    CheckpointError; when it opens, the index named only files inside the directory."""
    d, arrays = sharded
    index_bytes = data.draw(indexes(sorted(arrays)))
    index_dir = fuzz_dir / "index"
    if not index_dir.exists():
        index_dir.mkdir()
        for f in [*SHARD_NAMES, "config.json", "sub"]:
            (index_dir / f).symlink_to(d / f)
        (fuzz_dir / "outside.safetensors").symlink_to(d.parent / "outside.safetensors")
    (index_dir / "model.safetensors.index.json").write_bytes(index_bytes)
    try:
        checkpoint = Checkpoint(index_dir)
    except CheckpointError as e:
        assert "\n" not in str(e)
        return
    weight_map = json.loads(index_bytes)["weight_map"]
    assert all(isinstance(f, str) and "/" not in f and "\\" not in f and f not in ("", ".", "..")
               for f in weight_map.values())
    for name in weight_map:
        try:
            t = checkpoint.tensor(name, arrays[name].shape if name in arrays else (1,))
        except CheckpointError as e:
            assert "\n" not in str(e)
            continue
        assert np.array_equal(t, arrays[name])
