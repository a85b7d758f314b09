"""Regenerate tests/fixtures/hf_crosscheck.json (needs torch + transformers): `python tools/make_hf_fixtures.py`.

For each named configuration in `CASES` this builds a small random checkpoint with
`minipipe.synthetic.make_random_checkpoint` (a seed names the weights), loads it with Hugging Face
`transformers.LlamaForCausalLM` in float32 with eager attention, and records

* the logits of the last `N_LOGIT_ROWS` rows of a forward pass over `PROMPT`,
* HF greedy generation of `MAX_NEW_TOKENS` ids (eos disabled, so the length is fixed), and
* for each generated step, HF's margin between the top-1 and top-2 logit (to tell a real
  mismatch from a near-tie that float rounding may legitimately break either way).

tests/test_hf_crosscheck.py rebuilds the same checkpoints and compares minipipe against these
numbers without needing torch; it also imports `hf_reference` from here for its live checks.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
FIXTURE_PATH = REPO / "tests" / "fixtures" / "hf_crosscheck.json"
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

PROMPT = [1, 17, 42, 5, 33, 8, 61, 20, 11, 47, 3, 29]  # ids < 64, the smallest vocab below
MAX_NEW_TOKENS = 24
N_LOGIT_ROWS = 4
SIG_DIGITS = 6

# name -> seed, storage dtype, shard count, and the keyword arguments of synthetic.hf_config.
# Dimensions are small on purpose (the fixture file stays well under 300 KB).
CASES: list[dict] = [
    dict(name="gqa_default_new_f32", seed=101, dtype="F32", n_shards=1,
         config=dict(dim=32, ffn_dim=48, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=64,
                     rope_type="default", rope_style="new")),
    dict(name="mha_tied_default_old_f32", seed=102, dtype="F32", n_shards=1,
         config=dict(dim=32, ffn_dim=64, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=96,
                     tie_embeddings=True, rope_type="default", rope_style="old")),
    dict(name="mqa_linear_new_f16", seed=103, dtype="F16", n_shards=1,
         config=dict(dim=48, ffn_dim=96, n_layers=2, n_heads=6, n_kv_heads=1, vocab_size=80,
                     rope_type="linear", rope_style="new")),
    dict(name="gqa_linear_old_type_key_bf16", seed=104, dtype="BF16", n_shards=1,
         config=dict(dim=32, ffn_dim=48, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64,
                     rope_type="linear", rope_style="old", rope_theta=500.0)),
    # head_dim 16 with original_max_position_embeddings 32 (= 256 // 8): the rotated pairs fall
    # in all three llama3 bands (wavelengths 6.3 < 8 kept, 19.9 smoothed, >= 62.8 divided by
    # factor), and the generation runs to position 35, past 32.
    dict(name="gqa_llama3_new_bf16", seed=105, dtype="BF16", n_shards=1,
         config=dict(dim=64, ffn_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=128,
                     max_positions=256, rope_type="llama3", rope_style="new")),
    # original_max_position_embeddings 8: every logged logits row and generated step lies past it.
    dict(name="mha_tied_llama3_old_type_key_f32", seed=106, dtype="F32", n_shards=1,
         config=dict(dim=32, ffn_dim=48, n_layers=2, n_heads=2, n_kv_heads=2, vocab_size=64,
                     max_positions=64, tie_embeddings=True, rope_type="llama3", rope_style="old")),
    dict(name="gqa_explicit_head_dim_f32", seed=107, dtype="F32", n_shards=1,
         config=dict(dim=48, ffn_dim=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, vocab_size=64,
                     rope_type="default", rope_style="new")),
    dict(name="mqa_explicit_head_dim_tied_f16", seed=108, dtype="F16", n_shards=1,
         config=dict(dim=32, ffn_dim=48, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=6, vocab_size=72,
                     tie_embeddings=True, rope_type="default", rope_style="old")),
    dict(name="gqa_attention_and_mlp_bias_f32", seed=109, dtype="F32", n_shards=1,
         config=dict(dim=32, ffn_dim=48, n_layers=3, n_heads=4, n_kv_heads=2, vocab_size=64,
                     attention_bias=True, mlp_bias=True, rope_type="default", rope_style="new")),
    dict(name="mha_attention_bias_linear_old_bf16", seed=110, dtype="BF16", n_shards=1,
         config=dict(dim=32, ffn_dim=48, n_layers=2, n_heads=4, n_kv_heads=4, vocab_size=64,
                     attention_bias=True, rope_type="linear", rope_style="old")),
    dict(name="gqa_sharded3_mlp_bias_f32", seed=111, dtype="F32", n_shards=3,
         config=dict(dim=64, ffn_dim=128, n_layers=3, n_heads=8, n_kv_heads=2, vocab_size=128,
                     mlp_bias=True, rope_type="default", rope_style="new", rope_theta=100000.0)),
    dict(name="mqa_tied_sharded3_llama3_bf16", seed=112, dtype="BF16", n_shards=3,
         config=dict(dim=64, ffn_dim=96, n_layers=2, n_heads=4, n_kv_heads=1, vocab_size=96,
                     max_positions=256, tie_embeddings=True, rope_type="llama3", rope_style="old")),
]


def round_sig(x, digits: int = SIG_DIGITS):
    """Nested lists of floats rounded to `digits` significant digits (as JSON-friendly floats)."""
    if isinstance(x, (list, tuple, np.ndarray)):
        return [round_sig(v, digits) for v in x]
    return float(f"{float(x):.{digits}g}")


def load_hf_model(model_dir: str | Path):
    """LlamaForCausalLM in float32 with eager attention (`dtype=`; `torch_dtype=` before 4.56)."""
    import torch
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = transformers.LlamaForCausalLM.from_pretrained(
        str(model_dir), attn_implementation="eager", **{dtype_kw: torch.float32})
    model.eval()
    if model.dtype != torch.float32:
        raise RuntimeError(f"transformers loaded the model as {model.dtype}, expected float32")
    model.generation_config.eos_token_id = None  # fixed-length generation
    model.generation_config.pad_token_id = 0
    return model


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()


def hf_reference(model_dir: str | Path, prompt: list[int], max_new_tokens: int = MAX_NEW_TOKENS,
                 n_logit_rows: int = N_LOGIT_ROWS) -> dict:
    """HF's logits (last rows of the prompt), greedy ids and per-step top-1/top-2 margins."""
    import torch

    model = load_hf_model(model_dir)
    ids = torch.tensor([list(prompt)], dtype=torch.long)
    with torch.no_grad():
        logits = model(ids).logits[0, -n_logit_rows:].float().numpy()  # [rows, V]
        # An explicit all-ones mask: otherwise generate() infers one from pad_token_id and would
        # mask prompt ids that happen to equal it.
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens,
                             eos_token_id=None, pad_token_id=0, output_logits=True,
                             return_dict_in_generate=True)
    tokens = out.sequences[0, len(prompt):].tolist()
    steps = torch.stack(out.logits)[:, 0].float().numpy()  # [steps, V] raw logits
    top2 = np.sort(steps, axis=-1)[:, -2:]
    margins = top2[:, 1] - top2[:, 0]
    if len(tokens) != max_new_tokens:
        raise RuntimeError(f"HF generated {len(tokens)} ids, expected {max_new_tokens}")
    return {"logits_last_rows": logits, "tokens": [int(t) for t in tokens], "margins": margins}


def check_llama3_exercised(case: dict, n_positions: int) -> None:
    """A llama3 case must reach past original_max_position_embeddings and hit the smoothed band."""
    from minipipe.config import ModelConfig
    from minipipe.synthetic import hf_config

    cfg = ModelConfig.from_hf(hf_config(**case["config"]))
    if cfg.rope.rope_type != "llama3":
        return
    r = cfg.rope
    hd = cfg.head_dim
    inv_freq = 1.0 / r.theta ** (np.arange(0, hd, 2) / hd)
    wavelen = 2 * np.pi / inv_freq
    medium = (wavelen >= r.original_max_positions / r.high_freq_factor) & (
        wavelen <= r.original_max_positions / r.low_freq_factor)
    if n_positions <= r.original_max_positions or not medium.any():
        raise ValueError(f"{case['name']}: llama3 scaling is not exercised "
                         f"({n_positions} positions, original max {r.original_max_positions})")


def build_case(case: dict, work_dir: Path) -> Path:
    from minipipe.synthetic import make_random_checkpoint

    return make_random_checkpoint(work_dir / case["name"], seed=case["seed"], dtype=case["dtype"],
                                  n_shards=case["n_shards"], **case["config"])


def dump_fixture(data: dict) -> str:
    """JSON with one line per top-level key and per case: small, and readable in a diff."""
    compact = dict(separators=(",", ":"))
    lines = [f"  {json.dumps(k)}: {json.dumps(v, **compact)}" for k, v in data.items() if k != "cases"]
    cases = ",\n".join(f"    {json.dumps(c, **compact)}" for c in data["cases"])
    return "{\n" + ",\n".join(lines) + ',\n  "cases": [\n' + cases + "\n  ]\n}\n"


def main() -> int:
    import torch
    import transformers
    from tqdm import tqdm

    quiet_transformers()
    torch.manual_seed(0)
    records = []
    with tempfile.TemporaryDirectory(prefix="minipipe-hf-fixtures-") as tmp:
        for case in tqdm(CASES, desc="cases", unit="case", file=sys.stderr):
            check_llama3_exercised(case, len(PROMPT) + MAX_NEW_TOKENS)
            model_dir = build_case(case, Path(tmp))
            ref = hf_reference(model_dir, PROMPT)
            records.append({
                **case,
                "logits_last_rows": round_sig(ref["logits_last_rows"]),
                "tokens": ref["tokens"],
                "margins": round_sig(ref["margins"]),
            })
    data = {
        "regenerate": "python tools/make_hf_fixtures.py",
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "numpy": np.__version__},
        "reference": "transformers.LlamaForCausalLM, float32, attn_implementation='eager'",
        "prompt": PROMPT,
        "max_new_tokens": MAX_NEW_TOKENS,
        "n_logit_rows": N_LOGIT_ROWS,
        "cases": records,
    }
    FIXTURE_PATH.parent.mkdir(parents=True, exist_ok=True)
    FIXTURE_PATH.write_text(dump_fixture(data))
    print(f"wrote {len(records)} cases to {FIXTURE_PATH.relative_to(REPO)} "
          f"({FIXTURE_PATH.stat().st_size / 1024:.1f} KB)")
    return 0


def require(*modules: str) -> None:
    """Stop with one line naming what to install when an optional module is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"{Path(__file__).name} needs {' and '.join(missing)} (not installed here): "
                 "pip install -e '.[hf]'")


if __name__ == "__main__":
    require("torch", "transformers")
    raise SystemExit(main())
