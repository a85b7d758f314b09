"""Convert a llama.cpp GGUF file into a Hugging Face Llama checkpoint directory.

The GGUF container itself is read by llama.cpp's own `gguf` package (the optional extra
`minipipe[import]`); what is ours is the mapping to the HF layout:

    GGUF                                   HF checkpoint
    token_embd.weight                      model.embed_tokens.weight   (and the tied head)
    blk.{i}.attn_norm / ffn_norm           model.layers.{i}.input_layernorm / post_attention_layernorm
    blk.{i}.attn_q / attn_k                self_attn.q_proj / k_proj   rows un-permuted (see below)
    blk.{i}.attn_v / attn_output           self_attn.v_proj / o_proj
    blk.{i}.ffn_gate / ffn_up / ffn_down   mlp.gate_proj / up_proj / down_proj
    output_norm.weight                     model.norm.weight
    output.weight (often absent: tied)     lm_head.weight
    llama.* metadata                       config.json, generation_config.json
    tokenizer.ggml.* metadata              tokenizer.json (built with `tokenizers`), tokenizer_config.json

Facts the mapping relies on (checked on the published file; docs/smollm2.md):

* Shapes: GGUF lists dimensions fastest-first, so a GGUF shape [576, 1536] is the NumPy array
  (1536, 576) = (out, in), the HF orientation.
* Quantized tensors (Q4_1, Q8_0, ...) are dequantized to float32 exactly (`gguf.quants.dequantize`
  where present; our own NumPy decoding of F32/F16/Q8_0/Q4_1 otherwise):
      Q8_0 block, 34 bytes = fp16 d, 32 x int8 q:              value = d * q
      Q4_1 block, 20 bytes = fp16 d, fp16 m, 16 bytes nibbles:  value = d * q + m
                             (low nibbles are elements 0-15, high nibbles elements 16-31)
* llama.cpp stores attn_q / attn_k rows in the interleaved (Meta) RoPE order: within each head the
  pair (2j, 2j+1) rotates together. HF's rotate-half order pairs (j, j + HD/2). `unpermute_qk`
  undoes llama.cpp's permutation, `permute_qk` applies it (for tests and for writing GGUFs).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .errors import MinipipeError

INSTALL_HINT = "pip install 'minipipe[import]'"

# llama.cpp token types (llama_token_type / gguf.TokenType)
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# tokenizer.ggml.pre values whose pre-tokenizer is "each digit alone, then GPT-2 byte-level"
# (llama.cpp's LLAMA_VOCAB_PRE_TYPE_STARCODER / _SMOLLM / _REFACT use the regex \p{N} + GPT-2's)
DIGIT_SPLIT_PRE = ("smollm", "starcoder", "refact")
PLAIN_GPT2_PRE = ("default", "gpt2", "gpt-2")


class GGUFImportError(MinipipeError):
    """A GGUF file cannot be converted (not GGUF, unsupported architecture or tensor type)."""


class MissingDependencyError(MinipipeError):
    """An optional dependency of the importer is not installed."""


def require_gguf():
    """Import llama.cpp's `gguf` package, or raise a one-line error saying what to install."""
    try:
        import gguf
        import gguf.quants  # the submodule too: dequantize / quantize live there
    except ImportError as e:
        raise MissingDependencyError(
            f"importing GGUF models needs the 'gguf' package ({e}): {INSTALL_HINT}") from None
    return gguf


# ----------------------------------------------------------------------------------------------
# q/k row order

def unpermute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """Interleaved (llama.cpp / Meta) RoPE row order -> HF rotate-half order.  [rows, ...] -> same

    Within each head, llama.cpp row 2j + s (s = 0, 1) holds HF row j + s·HD/2.
    """
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, half, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def permute_qk(w: np.ndarray, n_heads: int) -> np.ndarray:
    """HF rotate-half row order -> interleaved order (llama.cpp's `permute`; inverse of `unpermute_qk`)."""
    rows = w.shape[0]
    half = rows // n_heads // 2
    return w.reshape(n_heads, 2, half, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# ----------------------------------------------------------------------------------------------
# dequantization

def _dequantize_numpy(data: np.ndarray, type_name: str, n_cols: int) -> np.ndarray:
    """Our own decoding of the block types SmolLM2 uses, for gguf versions without `dequantize`.

    `data` is one row per tensor row (uint8 bytes for block types).  -> [rows, n_cols] float32
    """
    if type_name == "F32":
        return np.asarray(data, dtype=np.float32)
    if type_name == "F16":
        return np.asarray(data).view(np.float16).astype(np.float32)
    raw = np.ascontiguousarray(data, dtype=np.uint8).reshape(-1, n_cols // 32, 34 if type_name == "Q8_0" else 20)
    if type_name == "Q8_0":
        d = raw[..., :2].copy().view("<f2").astype(np.float32)  # [rows, blocks, 1]
        q = raw[..., 2:].view(np.int8).astype(np.float32)  # [rows, blocks, 32]
        return (d * q).reshape(-1, n_cols)
    if type_name == "Q4_1":
        d = raw[..., 0:2].copy().view("<f2").astype(np.float32)  # [rows, blocks, 1]
        m = raw[..., 2:4].copy().view("<f2").astype(np.float32)  # [rows, blocks, 1]
        nibbles = raw[..., 4:]  # [rows, blocks, 16]
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1).astype(np.float32)  # [rows, blocks, 32]
        return (d * q + m).reshape(-1, n_cols)
    raise GGUFImportError(f"tensor type {type_name} needs a newer gguf package: pip install -U gguf")


def dequantize(tensor) -> np.ndarray:
    """A `gguf.ReaderTensor` as a float32 NumPy array in HF orientation (reversed GGUF shape)."""
    gguf = require_gguf()
    shape = tuple(int(n) for n in reversed(tensor.shape))  # GGUF [in, out] -> NumPy (out, in)
    type_name = tensor.tensor_type.name
    if hasattr(gguf.quants, "dequantize"):
        try:
            values = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
        except NotImplementedError:
            raise GGUFImportError(f"tensor {tensor.name}: gguf cannot dequantize type {type_name}") from None
    else:
        values = _dequantize_numpy(tensor.data, type_name, shape[-1])
    values = np.asarray(values, dtype=np.float32)
    if values.size != int(np.prod(shape)):
        raise GGUFImportError(f"tensor {tensor.name}: {values.size} values for shape {shape}")
    return np.array(values.reshape(shape), dtype=np.float32, copy=True)  # own the memory (the file is mapped)


# ----------------------------------------------------------------------------------------------
# metadata

def _field_value(field, gguf):
    """A metadata field as a Python value (str, int, float, bool or list of them)."""
    if hasattr(field, "contents"):  # gguf >= 0.17
        return field.contents()
    vtype = gguf.GGUFValueType
    main = field.types[0]

    def scalar(part, t):
        return bytes(part).decode("utf-8") if t == vtype.STRING else part.tolist()[0]

    if main == vtype.ARRAY:
        return [scalar(field.parts[i], field.types[-1]) for i in field.data]
    return scalar(field.parts[field.data[0]], main)


def read_metadata(reader, skip: tuple[str, ...] = ()) -> dict:
    """All key/value metadata of a `gguf.GGUFReader` as plain Python values."""
    gguf = require_gguf()
    return {name: _field_value(f, gguf) for name, f in reader.fields.items()
            if not name.startswith("GGUF.") and name not in skip}


def _float32_literal(x: float) -> float:
    """GGUF stores float32: 9.999999747378752e-06 -> 1e-05 (the shortest float32 repr)."""
    return float(str(np.float32(x)))


def hf_config_from_metadata(meta: dict, has_output: bool) -> dict:
    """config.json for a Llama GGUF, from its `llama.*` keys."""
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise GGUFImportError(f"GGUF architecture {arch!r} is not supported (minipipe imports 'llama')")

    def need(key: str):
        if f"llama.{key}" not in meta:
            raise GGUFImportError(f"GGUF metadata lacks llama.{key}")
        return meta[f"llama.{key}"]

    dim, n_heads = int(need("embedding_length")), int(need("attention.head_count"))
    n_kv_heads = int(meta.get("llama.attention.head_count_kv", n_heads))
    head_dim = int(meta.get("llama.attention.key_length", dim // n_heads))
    rope_dims = int(meta.get("llama.rope.dimension_count", head_dim))
    if rope_dims != head_dim:
        raise GGUFImportError(f"partial rotary embeddings (rope.dimension_count {rope_dims} != head_dim "
                              f"{head_dim}) are not supported")
    scaling = meta.get("llama.rope.scaling.type", "none")
    if scaling not in ("none", "linear"):
        raise GGUFImportError(f"RoPE scaling {scaling!r} is not supported by the importer")
    vocab_size = meta.get("llama.vocab_size") or len(meta.get("tokenizer.ggml.tokens", ()))
    if not vocab_size:
        raise GGUFImportError("GGUF metadata gives no vocabulary size")
    config = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_act": "silu",
        "hidden_size": dim,
        "intermediate_size": int(need("feed_forward_length")),
        "num_hidden_layers": int(need("block_count")),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "vocab_size": int(vocab_size),
        "max_position_embeddings": int(meta.get("llama.context_length", 2048)),
        "rms_norm_eps": _float32_literal(need("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32_literal(meta.get("llama.rope.freq_base", 10000.0)),
        "rope_scaling": None,
        "tie_word_embeddings": not has_output,
        "attention_bias": False,
        "mlp_bias": False,
        "torch_dtype": "float32",
    }
    if scaling == "linear":
        config["rope_scaling"] = {"rope_type": "linear", "factor": _float32_literal(meta["llama.rope.scaling.factor"])}
    for key in ("bos", "eos", "padding"):
        if f"tokenizer.ggml.{key}_token_id" in meta:
            config[f"{'pad' if key == 'padding' else key}_token_id"] = int(meta[f"tokenizer.ggml.{key}_token_id"])
    return config


# ----------------------------------------------------------------------------------------------
# tokenizer

def build_tokenizer(meta: dict):
    """A `tokenizers.Tokenizer` for a byte-level BPE vocabulary stored in GGUF metadata.

    Mirrors the HF tokenizer.json of SmolLM2 / StarCoder-style models: BPE over GPT-2's byte
    alphabet, pre-tokenizer Sequence[Digits(individual_digits), ByteLevel(no prefix space, GPT-2
    regex)], ByteLevel decoder; control tokens (type 3) become special added tokens, user-defined
    tokens (type 4) plain added tokens, so both are matched whole in any text.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    kind = meta.get("tokenizer.ggml.model")
    if kind != "gpt2":
        raise GGUFImportError(f"tokenizer model {kind!r} is not supported (the importer builds byte-level BPE, 'gpt2')")
    pre = meta.get("tokenizer.ggml.pre", "default")
    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    types: list[int] = meta.get("tokenizer.ggml.token_type") or [TOKEN_NORMAL] * len(tokens)
    merges = []
    for m in meta.get("tokenizer.ggml.merges", ()):
        left, sep, right = m.partition(" ")
        if not sep or not left or not right:
            raise GGUFImportError(f"malformed BPE merge {m!r} in tokenizer.ggml.merges")
        merges.append((left, right))
    vocab = {tok: i for i, tok in enumerate(tokens)}
    if len(vocab) != len(tokens):
        raise GGUFImportError("tokenizer.ggml.tokens holds duplicate tokens")

    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, dropout=None, unk_token=None, fuse_unk=False,
                               byte_fallback=False))
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in DIGIT_SPLIT_PRE:
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre in PLAIN_GPT2_PRE:
        tok.pre_tokenizer = byte_level
    else:
        raise GGUFImportError(f"pre-tokenizer {pre!r} is not supported (supported: "
                              f"{', '.join(DIGIT_SPLIT_PRE + PLAIN_GPT2_PRE)})")
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.decoder = decoders.ByteLevel()
    special = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == TOKEN_USER_DEFINED]
    tok.add_special_tokens(special)
    if user:
        tok.add_tokens(user)
    return tok


def tokenizer_config_from_metadata(meta: dict, max_positions: int) -> dict:
    """tokenizer_config.json: special tokens, add_bos_token and the chat template."""
    tokens = meta["tokenizer.ggml.tokens"]

    def token(key: str):
        i = meta.get(f"tokenizer.ggml.{key}_token_id")
        return tokens[i] if isinstance(i, int) and 0 <= i < len(tokens) else None

    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": bool(meta.get("tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "add_prefix_space": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": max_positions,
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
    }
    cfg = {k: v for k, v in cfg.items() if v is not None}
    template = meta.get("tokenizer.chat_template")
    if template:
        cfg["chat_template"] = template
    return cfg


# ----------------------------------------------------------------------------------------------
# tensors

_LAYER_NAMES = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight",
    "attn_k.weight": "self_attn.k_proj.weight",
    "attn_v.weight": "self_attn.v_proj.weight",
    "attn_output.weight": "self_attn.o_proj.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight",
    "ffn_up.weight": "mlp.up_proj.weight",
    "ffn_down.weight": "mlp.down_proj.weight",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}


def hf_tensor_name(gguf_name: str) -> str:
    """GGUF tensor name -> HF name (raises GGUFImportError for tensors with no HF counterpart)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".", 2)
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{int(parts[1])}.{_LAYER_NAMES[parts[2]]}"
    raise GGUFImportError(f"GGUF tensor {gguf_name!r} has no Hugging Face Llama counterpart")


def hf_tensors(reader, config: dict, progress: bool = False) -> dict[str, np.ndarray]:
    """Every tensor of the GGUF, dequantized to float32, HF-named, q/k rows in rotate-half order.

    Names and shapes are checked against `config` before anything is decoded; a missing tensor,
    an extra one or a wrong shape is a GGUFImportError.
    """
    expected = expected_shapes(config)
    named = []
    for t in reader.tensors:
        name = hf_tensor_name(t.name)
        _check_tensor(name, tuple(int(n) for n in reversed(t.shape)), expected)
        named.append((name, t))
    missing = sorted(set(expected) - {name for name, _ in named})
    if missing:
        raise GGUFImportError(f"the GGUF lacks {len(missing)} tensor(s) of the model, e.g. {missing[0]}")
    rank = {name: i for i, name in enumerate(expected)}  # embedding, final norm, then layer by layer
    named.sort(key=lambda p: rank[p[0]])
    items = named
    if progress:
        from tqdm import tqdm
        items = tqdm(named, desc="converting", unit="tensor", leave=False)
    out: dict[str, np.ndarray] = {}
    for name, tensor in items:
        w = dequantize(tensor)  # [out, in] float32
        if name.endswith("self_attn.q_proj.weight"):
            w = unpermute_qk(w, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            w = unpermute_qk(w, config["num_key_value_heads"])
        out[name] = w
    return out


# ----------------------------------------------------------------------------------------------
# the whole conversion

@dataclass
class ConversionSummary:
    """What `convert_gguf` wrote."""

    out_dir: Path
    n_tensors: int
    n_params: int
    tensor_types: dict[str, int] = field(default_factory=dict)
    gguf_sha256: str = ""


def sha256_of(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def open_gguf(path: Path):
    """A `gguf.GGUFReader` for `path`, with a one-line error for files that are not GGUF."""
    gguf = require_gguf()
    try:
        return gguf.GGUFReader(str(path))
    except (ValueError, OSError, KeyError, IndexError, EOFError) as e:
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise GGUFImportError(f"{path} is not a readable GGUF file ({reason})") from None


def convert_gguf(gguf_path: str | Path, out_dir: str | Path, progress: bool = False) -> ConversionSummary:
    """Write an F32 Hugging Face Llama checkpoint for the GGUF file into `out_dir`.

    Files: config.json, generation_config.json, model.safetensors (exact float32 values of the
    dequantized tensors), tokenizer.json, tokenizer_config.json.
    """
    from .synthetic import write_safetensors

    gguf_path, out_dir = Path(gguf_path), Path(out_dir)
    reader = open_gguf(gguf_path)
    meta = read_metadata(reader)
    names = {t.name for t in reader.tensors}
    config = hf_config_from_metadata(meta, has_output="output.weight" in names)
    _check_config(config)
    tensors = hf_tensors(reader, config, progress=progress)

    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(meta)
    tokenizer.save(str(out_dir / "tokenizer.json"))
    tok_cfg = tokenizer_config_from_metadata(meta, config["max_position_embeddings"])
    (out_dir / "tokenizer_config.json").write_text(json.dumps(tok_cfg, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    (out_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    gen = {k: config[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id") if k in config}
    (out_dir / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    write_safetensors(out_dir / "model.safetensors", tensors, "F32")

    types: dict[str, int] = {}
    for t in reader.tensors:
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
    return ConversionSummary(out_dir=out_dir, n_tensors=len(tensors),
                             n_params=int(sum(t.size for t in tensors.values())), tensor_types=types)


def expected_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """HF tensor name -> shape implied by config.json (the names `weights.load_stage_weights` reads)."""
    D, F, V = config["hidden_size"], config["intermediate_size"], config["vocab_size"]
    q_rows = config["num_attention_heads"] * config["head_dim"]
    kv_rows = config["num_key_value_heads"] * config["head_dim"]
    shapes = {"model.embed_tokens.weight": (V, D), "model.norm.weight": (D,)}
    if not config["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (V, D)
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update({
            p + "input_layernorm.weight": (D,), p + "post_attention_layernorm.weight": (D,),
            p + "self_attn.q_proj.weight": (q_rows, D), p + "self_attn.k_proj.weight": (kv_rows, D),
            p + "self_attn.v_proj.weight": (kv_rows, D), p + "self_attn.o_proj.weight": (D, q_rows),
            p + "mlp.gate_proj.weight": (F, D), p + "mlp.up_proj.weight": (F, D), p + "mlp.down_proj.weight": (D, F),
        })
    return shapes


def _check_config(config: dict) -> None:
    """Refuse metadata that describes a model minipipe cannot run (before any tensor is decoded)."""
    from .config import ModelConfig

    try:
        ModelConfig.from_hf(config)
    except MinipipeError as e:
        raise GGUFImportError(f"the GGUF describes a model minipipe cannot run: {e}") from None


def _check_tensor(name: str, shape: tuple[int, ...], expected: dict[str, tuple[int, ...]]) -> None:
    if name not in expected:
        raise GGUFImportError(f"the GGUF has an unexpected tensor {name} (not in a {len(expected)}-tensor Llama)")
    if shape != expected[name]:
        raise GGUFImportError(f"tensor {name} has shape {shape}, the metadata implies {expected[name]}")


# ----------------------------------------------------------------------------------------------
# the inverse, for tests and tools

_HF_TO_GGUF = {hf: g for g, hf in _GLOBAL_NAMES.items()}
_HF_LAYER_TO_GGUF = {hf: g for g, hf in _LAYER_NAMES.items()}


def gguf_tensor_name(hf_name: str) -> str:
    """HF tensor name -> GGUF name (inverse of `hf_tensor_name`)."""
    if hf_name in _HF_TO_GGUF:
        return _HF_TO_GGUF[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)  # model.layers.{i}.{rest}
    return f"blk.{layer}.{_HF_LAYER_TO_GGUF[rest]}"


def write_gguf(path: str | Path, config: dict, tensors: dict[str, np.ndarray], vocab: dict,
               qtype: str = "F32") -> Path:
    """Write an HF-layout Llama as a llama.cpp GGUF file: the inverse of `convert_gguf`.

    For tests and tools (e.g. a tiny GGUF made from `minipipe.synthetic.random_tensors`).

    Args:
        config: a config.json dict (tie_word_embeddings decides whether output.weight is written).
        tensors: HF-named float32 tensors, q/k rows in HF rotate-half order (they are permuted
            into llama.cpp's interleaved order here).
        vocab: {"tokens": [...], "token_types": [...], "merges": ["a b", ...], "pre": "smollm",
            "bos_id", "eos_id", "unk_id", "pad_id", "add_bos": bool, "chat_template": str | None}.
        qtype: storage of the 2-D weights: F32, F16, Q8_0 or Q4_1 (1-D norms stay F32).
    """
    gguf = require_gguf()
    path = Path(path)
    qt = gguf.GGMLQuantizationType[qtype]
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("minipipe test model")
    w.add_context_length(config["max_position_embeddings"])
    w.add_embedding_length(config["hidden_size"])
    w.add_block_count(config["num_hidden_layers"])
    w.add_feed_forward_length(config["intermediate_size"])
    w.add_head_count(config["num_attention_heads"])
    w.add_head_count_kv(config["num_key_value_heads"])
    w.add_rope_dimension_count(config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"])
    w.add_rope_freq_base(float(config.get("rope_theta", 10000.0)))
    w.add_layer_norm_rms_eps(float(config["rms_norm_eps"]))
    if hasattr(w, "add_vocab_size"):
        w.add_vocab_size(config["vocab_size"])
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(vocab.get("pre", "smollm"))
    w.add_token_list(vocab["tokens"])
    w.add_token_types(vocab["token_types"])
    w.add_token_merges(vocab["merges"])
    for key, add in (("bos_id", w.add_bos_token_id), ("eos_id", w.add_eos_token_id),
                     ("unk_id", w.add_unk_token_id), ("pad_id", w.add_pad_token_id)):
        if vocab.get(key) is not None:
            add(vocab[key])
    w.add_add_bos_token(bool(vocab.get("add_bos", False)))
    if vocab.get("chat_template"):
        w.add_chat_template(vocab["chat_template"])
    for name, t in tensors.items():
        t = np.asarray(t, dtype=np.float32)
        if name.endswith("self_attn.q_proj.weight"):
            t = permute_qk(t, config["num_attention_heads"])
        elif name.endswith("self_attn.k_proj.weight"):
            t = permute_qk(t, config["num_key_value_heads"])
        gname = gguf_tensor_name(name)
        if t.ndim == 1 or qtype == "F32":
            w.add_tensor(gname, t)
        elif qtype == "F16":
            w.add_tensor(gname, t.astype(np.float16))
        else:
            w.add_tensor(gname, gguf.quants.quantize(t, qt), raw_dtype=qt)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
