"""The shipped default pair, models/tinybard (target) and models/tinybard-draft: loadable, sane, stable.

The golden continuation below is a regression fixture: minipipe's greedy output for GOLDEN_PROMPT,
recorded when the weights were trained (tools/train_tinybard.py). Every step of it has a clear
top-1/top-2 logit margin (the smallest is given next to it), so float rounding cannot flip it; a
change means the weights, the tokenizer or the numerics changed. The transformers cross-check
(marked slow) compares the same continuation with Hugging Face's on the same checkpoint.
"""

from __future__ import annotations

import importlib.util
import json
import unicodedata
from pathlib import Path

import numpy as np
import pytest

from minipipe.batch import Batch
from minipipe.config import load_config
from minipipe.greedy import generate_greedy, prefill
from minipipe.model import load_stage
from minipipe.tokenizer import Tokenizer

REPO = Path(__file__).resolve().parents[1]
MODELS = REPO / "models"
TARGET = MODELS / "tinybard"
DRAFT = MODELS / "tinybard-draft"
MAX_MODELS_BYTES = 20_000_000  # models/ stays under 20 MB in total (issue 3)

GOLDEN_PROMPT = "HAMLET:\nTo be, or not to be: that is the question:\n"
GOLDEN_PROMPT_IDS = [1, 1137, 28, 201, 416, 307, 14, 516, 323, 292, 307, 28, 328, 324, 270, 558, 1931, 28, 201]
GOLDEN_IDS = [43, 458, 307, 261, 434, 14, 297, 307, 261, 434, 14, 297, 261, 434, 201,
              1289, 261, 434, 329, 271, 542, 16, 201, 201, 1137, 28, 201, 43, 446, 261]
GOLDEN_TEXT = "I'll be a man, and be a man, and a man\nof a man's bond.\n\nHAMLET:\nI am a"
# The smallest top-1/top-2 logit margin along GOLDEN_IDS is 0.069 (minipipe, float32); minipipe
# and transformers differ by ~2e-5 on these logits, so no step is a near-tie.

COMMON_WORDS = {"the", "and", "i", "to", "of", "a", "my", "you", "that", "in", "is", "not", "me", "it", "with",
                "his", "be", "your", "this", "for", "thy", "thou", "he", "have", "will", "what", "so", "but",
                "her", "him", "shall", "our", "do", "no", "are", "all", "as", "by", "lord", "good", "sir"}


@pytest.fixture(scope="module")
def target():
    return load_stage(TARGET)


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer(TARGET, load_config(TARGET).eos_ids)


def test_configs_are_a_target_draft_pair():
    t, d = load_config(TARGET), load_config(DRAFT)
    assert t.n_layers >= 8, "the target must split into 2-8 pipeline stages"
    assert t.n_heads > t.n_kv_heads > 0 and t.n_heads % t.n_kv_heads == 0, "the target uses GQA"
    assert t.dim >= 256
    assert d.vocab_size == t.vocab_size and d.bos_id == t.bos_id and d.eos_ids == t.eos_ids
    assert d.n_layers * d.dim ** 2 * 10 < t.n_layers * t.dim ** 2, "the draft is much smaller"
    assert (TARGET / "tokenizer.json").read_bytes() == (DRAFT / "tokenizer.json").read_bytes()
    assert (TARGET / "tokenizer_config.json").read_bytes() == (DRAFT / "tokenizer_config.json").read_bytes()
    for model_dir in (TARGET, DRAFT):
        raw = json.loads((model_dir / "config.json").read_text())
        assert raw["model_type"] == "llama" and raw["dtype"] == "float16"
        header_len = int.from_bytes((model_dir / "model.safetensors").read_bytes()[:8], "little")
        header = json.loads((model_dir / "model.safetensors").read_bytes()[8:8 + header_len])
        assert {v["dtype"] for k, v in header.items() if k != "__metadata__"} == {"F16"}


def test_models_dir_is_small():
    total = sum(p.stat().st_size for p in MODELS.rglob("*") if p.is_file())
    assert total < MAX_MODELS_BYTES, f"models/ holds {total / 1e6:.1f} MB"


@pytest.mark.parametrize("text", [
    "To be, or not to be: that is the question:\n",
    "HAMLET:\nO, that this too too solid flesh would melt\n\nHORATIO:\n",
    "  spaces,\ttabs\n\n\nand 'quotes' -- 1599!",
    "Naïve café — ☃ 日本語 🙂",
])
def test_tokenizer_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert ids[0] == tokenizer.bos_id == 1 and tokenizer.bos_id not in ids[1:]
    assert tokenizer.decode(ids) == text
    stream = tokenizer.stream(ids[:2])
    assert "".join(stream.push(i) for i in ids[2:]) + stream.flush() == tokenizer.decode(ids)[len(tokenizer.decode(ids[:2])):]


def test_golden_greedy_continuation(target, tokenizer):
    prompt = tokenizer.encode(GOLDEN_PROMPT)
    assert prompt == GOLDEN_PROMPT_IDS
    result = generate_greedy(target, prompt, len(GOLDEN_IDS))
    assert result.tokens == GOLDEN_IDS
    assert tokenizer.decode(result.tokens) == GOLDEN_TEXT


def test_greedy_text_is_readable(target, tokenizer):
    prompt = tokenizer.encode("MACBETH:\nIs this a dagger which I see before me,\n")
    text = tokenizer.decode(generate_greedy(target, prompt, 40).tokens)
    assert all(c == "\n" or unicodedata.category(c)[0] in "LPZ" for c in text), repr(text)
    words = [w.strip(".,;:!?'-").lower() for w in text.split()]
    assert sum(w in COMMON_WORDS for w in words) >= 3, repr(text)


def test_two_stage_split_gives_the_same_logits(target, tokenizer):
    """The shipped target split at layer 4: stage 0 then stage 1 reproduces the whole model."""
    prompt = tokenizer.encode(GOLDEN_PROMPT)
    whole = prefill(target, target.new_cache(), prompt)  # [V]
    first, second = load_stage(TARGET, 0, 4), load_stage(TARGET, 4, None)
    batch = Batch.chain(prompt, 0, want_logits="last", prefill=True)
    hidden = first.forward(first.new_cache(), batch)  # [T, D]
    split = second.forward(second.new_cache(), batch, hidden)[-1]  # [V]
    np.testing.assert_array_equal(split, whole)


def test_draft_generates(tokenizer):
    draft = load_stage(DRAFT)
    tokens = generate_greedy(draft, tokenizer.encode(GOLDEN_PROMPT), 10).tokens
    assert len(tokens) == 10 and all(0 <= t < draft.config.vocab_size for t in tokens)


@pytest.mark.slow
def test_transformers_greedy_matches_minipipe(tokenizer):
    """Hugging Face transformers (float32, eager attention) continues GOLDEN_PROMPT as minipipe does."""
    if importlib.util.find_spec("torch") is None or importlib.util.find_spec("transformers") is None:
        pytest.skip("torch and transformers are not installed")
    import torch
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    hf = transformers.LlamaForCausalLM.from_pretrained(
        str(TARGET), attn_implementation="eager", **{dtype_kw: torch.float32}).eval()
    ids = torch.tensor([tokenizer.encode(GOLDEN_PROMPT)])
    with torch.no_grad():
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=len(GOLDEN_IDS),
                          min_new_tokens=len(GOLDEN_IDS), eos_token_id=None, pad_token_id=0)
    assert out[0, ids.shape[1]:].tolist() == GOLDEN_IDS
