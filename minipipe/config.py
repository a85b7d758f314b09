"""Model configuration: the facts about a Llama checkpoint, read from its `config.json`.

`ModelConfig` is the only place that knows Hugging Face's config key names. It accepts both
generations of the file (docs/model.md): older files with top-level `rope_theta` + `rope_scaling`,
newer ones (transformers >= 5) with `rope_parameters`. Anything minipipe does not implement is
refused by name with an `UnsupportedConfigError` rather than run wrongly.

Dimension names used across minipipe (the glossary; see docs/model.md):

    D    dim            hidden size                      (hidden_size)
    F    ffn_dim        MLP inner size                   (intermediate_size)
    H    n_heads        query heads                      (num_attention_heads)
    KVH  n_kv_heads     key/value heads (GQA: H % KVH == 0, MQA: KVH == 1)
    G    H // KVH       query heads sharing one KV head
    HD   head_dim       size of one head                 (head_dim, else D // H)
    V    vocab_size     vocabulary size
    L    n_layers       decoder layers (a stage owns a range [lo, hi) of them)
    T    rows           tokens in one forward call (prompt chunk, decode row, speculative rows)
    N    visible keys   KV cells one query attends to
    C    cells          KV-cache cells held by a stage
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

from .errors import CheckpointError, UnsupportedConfigError

SUPPORTED_MODEL_TYPES = ("llama",)
SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")


@dataclass(frozen=True, slots=True)
class RopeConfig:
    """Rotary position embedding parameters (docs/model.md).

    rope_type: "default" (plain), "linear" (positions divided by `factor`) or "llama3"
    (frequency-dependent scaling with `low_freq_factor`, `high_freq_factor` and
    `original_max_positions`).
    """

    rope_type: str = "default"
    theta: float = 10000.0
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_positions: int = 8192


@dataclass(frozen=True, slots=True)
class ModelConfig:
    """Architecture of a Llama-family model. Field comments give the glossary letter."""

    dim: int  # D
    ffn_dim: int  # F
    n_layers: int  # L
    n_heads: int  # H
    n_kv_heads: int  # KVH
    head_dim: int  # HD
    vocab_size: int  # V
    norm_eps: float = 1e-5
    max_positions: int = 2048
    rope: RopeConfig = RopeConfig()
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_id: int | None = None
    eos_ids: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        for name in ("dim", "ffn_dim", "n_layers", "n_heads", "n_kv_heads", "head_dim",
                     "vocab_size", "max_positions"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise UnsupportedConfigError(f"config field {name} must be a positive integer, got {value!r}")
        if self.n_heads % self.n_kv_heads:
            raise UnsupportedConfigError(
                f"num_attention_heads ({self.n_heads}) must be a multiple of num_key_value_heads ({self.n_kv_heads})")
        if self.head_dim % 2:
            raise UnsupportedConfigError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if not self.norm_eps > 0:
            raise UnsupportedConfigError(f"rms_norm_eps must be positive, got {self.norm_eps}")

    @property
    def n_groups(self) -> int:
        """G: query heads per KV head."""
        return self.n_heads // self.n_kv_heads

    @property
    def qkv_dim(self) -> int:
        """Rows of the fused q/k/v projection: (H + 2·KVH)·HD."""
        return (self.n_heads + 2 * self.n_kv_heads) * self.head_dim

    @classmethod
    def from_hf(cls, raw: dict, extra_eos: tuple[int, ...] = ()) -> "ModelConfig":
        """Build from a parsed Hugging Face `config.json` (either generation)."""
        if not isinstance(raw, dict):
            raise CheckpointError("config.json must hold a JSON object")
        model_type = raw.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedConfigError(
                f"model_type {model_type!r} is not supported (minipipe runs model_type 'llama')")
        act = raw.get("hidden_act", "silu")
        if act != "silu":
            raise UnsupportedConfigError(f"hidden_act {act!r} is not supported (Llama uses 'silu')")

        def need(key: str):
            if key not in raw:
                raise CheckpointError(f"config.json lacks the field {key!r}")
            return raw[key]

        dim = need("hidden_size")
        n_heads = need("num_attention_heads")
        n_kv_heads = raw.get("num_key_value_heads") or n_heads
        head_dim = raw.get("head_dim") or (dim // n_heads if isinstance(dim, int) and isinstance(n_heads, int) else 0)
        return cls(
            dim=dim,
            ffn_dim=need("intermediate_size"),
            n_layers=need("num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            vocab_size=need("vocab_size"),
            norm_eps=_number(raw.get("rms_norm_eps", 1e-6), "rms_norm_eps"),
            max_positions=raw.get("max_position_embeddings", 2048),
            rope=_parse_rope(raw),
            tie_embeddings=bool(raw.get("tie_word_embeddings", False)),
            attention_bias=bool(raw.get("attention_bias", False)),
            mlp_bias=bool(raw.get("mlp_bias", False)),
            bos_id=raw.get("bos_token_id"),
            eos_ids=_merge_ids(raw.get("eos_token_id"), extra_eos),
        )


def _merge_ids(value, extra: tuple[int, ...]) -> tuple[int, ...]:
    """eos_token_id may be absent, an int or a list; keep first-seen order, no duplicates."""
    ids = [] if value is None else [value] if isinstance(value, int) else list(value)
    merged: list[int] = []
    for i in ids + list(extra):
        if not isinstance(i, int) or isinstance(i, bool):
            raise CheckpointError(f"eos_token_id must be an integer or a list of integers, got {value!r}")
        if i not in merged:
            merged.append(i)
    return tuple(merged)


def _parse_rope(raw: dict) -> RopeConfig:
    """Read RoPE settings from `rope_parameters` (newer files) or `rope_theta`/`rope_scaling`.

    A file may carry both generations (e.g. edited by hand after an upgrade). Where the legacy
    keys are present (`rope_scaling` not null, `rope_theta`) they must say the same as
    `rope_parameters`; if they disagree the file is refused, naming both keys, rather than one
    silently winning.
    """
    params = raw.get("rope_parameters")
    legacy_theta = raw.get("rope_theta")
    legacy_scaling = raw.get("rope_scaling")
    if legacy_scaling is not None and not isinstance(legacy_scaling, dict):
        raise UnsupportedConfigError("rope_scaling must be a JSON object or null")
    if params is None:
        return _rope_from(legacy_scaling or {}, 10000.0 if legacy_theta is None else legacy_theta, "rope_theta")
    if not isinstance(params, dict):
        raise UnsupportedConfigError("rope_parameters must be a JSON object")
    theta_key = "rope_parameters.rope_theta" if "rope_theta" in params else "rope_theta"
    theta = params.get("rope_theta", 10000.0 if legacy_theta is None else legacy_theta)
    rope = _rope_from(params, theta, theta_key)
    if legacy_theta is not None and _number(legacy_theta, "rope_theta") != rope.theta:
        raise UnsupportedConfigError(
            f"config.json's rope_parameters.rope_theta ({rope.theta:g}) and rope_theta ({legacy_theta!r}) "
            "disagree; keep one of them")
    if legacy_scaling:  # null or {}: no claim
        legacy = _rope_from(legacy_scaling, theta, theta_key)
        if legacy != rope:
            raise UnsupportedConfigError(
                f"config.json's rope_parameters ({_describe(rope)}) and rope_scaling ({_describe(legacy)}) "
                "disagree; keep one of them")
    return rope


def _rope_from(params: dict, theta, theta_key: str) -> RopeConfig:
    """A RopeConfig from one generation's scaling object and the theta that goes with it."""
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise UnsupportedConfigError(
            f"RoPE type {rope_type!r} is not supported (supported: {', '.join(SUPPORTED_ROPE_TYPES)})")
    theta = _number(theta, theta_key)
    rope = RopeConfig(rope_type=rope_type, theta=theta)
    if rope_type == "linear":
        rope = RopeConfig("linear", theta, factor=_number(_rope_field(params, "factor"), "RoPE factor"))
    elif rope_type == "llama3":
        original = _rope_field(params, "original_max_position_embeddings")
        if not isinstance(original, int) or isinstance(original, bool) or original <= 0:
            raise UnsupportedConfigError(
                f"RoPE original_max_position_embeddings must be a positive integer, got {original!r}")
        rope = RopeConfig(
            "llama3", theta,
            factor=_number(_rope_field(params, "factor"), "RoPE factor"),
            low_freq_factor=_number(_rope_field(params, "low_freq_factor"), "RoPE low_freq_factor"),
            high_freq_factor=_number(_rope_field(params, "high_freq_factor"), "RoPE high_freq_factor"),
            original_max_positions=original,
        )
    if not (rope.theta > 0 and rope.factor > 0):
        raise UnsupportedConfigError(f"RoPE theta and factor must be positive, got {rope}")
    if rope_type == "llama3" and not rope.high_freq_factor > rope.low_freq_factor:
        raise UnsupportedConfigError("llama3 RoPE needs high_freq_factor > low_freq_factor")
    return rope


def _number(value, key: str) -> float:
    """A finite JSON number as a float, else refused by the key's name."""
    number = float("nan")
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            number = float(value)
        except OverflowError:  # an integer past float range
            pass
    if not math.isfinite(number):
        raise UnsupportedConfigError(f"config.json's {key} must be a finite number, got {value!r}")
    return number


def _describe(rope: RopeConfig) -> str:
    """The RoPE settings that matter for its type, for a message."""
    if rope.rope_type == "default":
        return "default"
    if rope.rope_type == "linear":
        return f"linear, factor {rope.factor:g}"
    return (f"llama3, factor {rope.factor:g}, low_freq_factor {rope.low_freq_factor:g}, high_freq_factor "
            f"{rope.high_freq_factor:g}, original_max_position_embeddings {rope.original_max_positions}")


def _rope_field(params: dict, key: str):
    if key not in params:
        raise UnsupportedConfigError(f"RoPE type {params.get('rope_type', params.get('type'))!r} needs {key!r}")
    return params[key]


def read_json(path: Path, what: str) -> dict:
    """Parse a JSON file, turning every failure into a one-line CheckpointError."""
    if not path.is_file():
        raise CheckpointError(f"{what} not found: {path}")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except OSError as e:
        raise CheckpointError(f"{what} cannot be read: {path} ({e.strerror or e})") from None
    except RecursionError:
        raise CheckpointError(f"{path} is not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError is a ValueError; so is a 5000-digit int
        raise CheckpointError(f"{path} is not valid JSON ({e})") from None


def load_config(model_dir: str | Path) -> ModelConfig:
    """Read `config.json` (plus the eos ids of `generation_config.json`, if present)."""
    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise CheckpointError(f"model directory not found: {model_dir}")
    raw = read_json(model_dir / "config.json", "config.json")
    extra_eos: tuple[int, ...] = ()
    gen_path = model_dir / "generation_config.json"
    if gen_path.is_file():
        gen = read_json(gen_path, "generation_config.json")
        extra_eos = _merge_ids(gen.get("eos_token_id") if isinstance(gen, dict) else None, ())
    return ModelConfig.from_hf(raw, extra_eos)
