"""minipipe against Hugging Face transformers: logits and greedy tokens on the same checkpoints.

Three layers of checks:

* **fixtures** (always run, no torch needed): tests/fixtures/hf_crosscheck.json holds HF's
  logits and greedy ids for a dozen seeded random checkpoints (GQA/MHA/MQA, tied/untied, RoPE
  default/linear/llama3, both config.json generations, explicit head_dim, biases, F32/F16/BF16,
  a sharded checkpoint). The same seed rebuilds the same weights, so minipipe is compared with
  HF without importing torch. Regenerate with `python tools/make_hf_fixtures.py`.
* **live** (skipped unless torch and transformers import): the same comparison run directly
  against transformers, on configurations and a prompt that the fixtures do not hold.
* **stories260k** (skipped without transformers, or without the reference checkpoint stories260k, which
  the development machine keeps beside the repository and a clone lacks): 40 greedy
  tokens from a real checkpoint must equal HF's.

Logits must agree to 1e-4 of the logit scale. Greedy ids must be equal step by step; a step
whose HF top-1/top-2 margin is below NEAR_TIE may differ through float rounding alone, so a
mismatch there ends the comparison instead of failing it.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from minipipe.batch import Batch
from minipipe.greedy import generate_greedy, prefill
from minipipe.model import StageModel, load_stage
from minipipe.synthetic import make_random_checkpoint

REPO = Path(__file__).resolve().parents[1]
FIXTURE = REPO / "tests" / "fixtures" / "hf_crosscheck.json"
STORIES260K = REPO.parent / "shared" / "models" / "stories260k"

RTOL_SCALE = 1e-4  # allowed |minipipe - HF| as a fraction of max(1, max |HF logit|)
NEAR_TIE = 1e-3  # HF top-1/top-2 margin below which the greedy choice may flip either way

FIXTURES = json.loads(FIXTURE.read_text())
CASES = FIXTURES["cases"]


def _tools_module():
    spec = importlib.util.spec_from_file_location("make_hf_fixtures", REPO / "tools" / "make_hf_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------
# minipipe's side and the comparison rules


def minipipe_logits(model: StageModel, prompt: list[int], n_rows: int) -> dict[str, np.ndarray]:
    """Logits of the last `n_rows` prompt positions, three ways.  -> each [n_rows, V] (or [V])

    prefill_last: `greedy.prefill` on a fresh cache (the oracle's own path)
    prefill_rows: the prompt as one prefill batch (GEMM kernels) with logits for the last rows
    decode_rows:  the prompt head prefilled, then the last rows as one-row decode batches (GEMV)
    """
    last = prefill(model, model.new_cache(), prompt)  # [V]

    want = np.zeros(len(prompt), dtype=bool)
    want[-n_rows:] = True
    chain = Batch.chain(prompt, 0, prefill=True)
    batch = Batch(tokens=chain.tokens, positions=chain.positions, seq_ids=chain.seq_ids, want_logits=want,
                  prefill=True)
    rows = model.forward(model.new_cache(), batch)  # [n_rows, V]

    cache = model.new_cache()
    head = len(prompt) - n_rows
    prefill(model, cache, prompt[:head])
    decode = np.stack([model.forward(cache, Batch.chain([t], head + i))[0]
                       for i, t in enumerate(prompt[head:])])  # [n_rows, V]
    return {"prefill_last": last, "prefill_rows": rows, "decode_rows": decode}


def assert_logits_close(mine: dict[str, np.ndarray], hf_rows: np.ndarray, what: str) -> None:
    hf_rows = np.asarray(hf_rows, dtype=np.float64)
    atol = RTOL_SCALE * max(1.0, float(np.abs(hf_rows).max()))
    for name, got, want in (("prefill_last", mine["prefill_last"], hf_rows[-1]),
                            ("prefill_rows", mine["prefill_rows"], hf_rows),
                            ("decode_rows", mine["decode_rows"], hf_rows)):
        assert got.shape == want.shape, f"{what} {name}: shape {got.shape} != HF {want.shape}"
        err = float(np.abs(got - want).max())
        assert err <= atol, f"{what} {name}: max |minipipe - HF| = {err:.3g} > {atol:.3g}"
    # The oracle's prefill and a want-logits batch over the same single chunk are the same calls.
    np.testing.assert_array_equal(mine["prefill_last"], mine["prefill_rows"][-1])


def compare_greedy(hf_tokens: list[int], hf_margins: list[float], mine: list[int], what: str) -> int:
    """Require equal ids up to the first near-tie step where they differ; return steps compared."""
    assert len(mine) == len(hf_tokens), f"{what}: minipipe made {len(mine)} ids, HF {len(hf_tokens)}"
    for step, (a, b, margin) in enumerate(zip(hf_tokens, mine, hf_margins)):
        if a != b:
            assert margin < NEAR_TIE, (
                f"{what}: greedy step {step}: HF chose {a}, minipipe {b}, HF top-1/top-2 margin {margin:.3g} "
                f"(not a near-tie)\n  HF       {hf_tokens}\n  minipipe {mine}")
            return step  # a genuine near-tie broke differently: the contexts differ from here
    return len(hf_tokens)


def check_against(model_dir: Path, prompt: list[int], ref: dict, n_new: int, what: str) -> None:
    model = load_stage(model_dir)
    n_rows = len(ref["logits_last_rows"])
    assert_logits_close(minipipe_logits(model, prompt, n_rows), ref["logits_last_rows"], what)
    gen = generate_greedy(model, prompt, n_new)
    assert gen.stop_reason == "length"
    compare_greedy(ref["tokens"], list(ref["margins"]), gen.tokens, what)


# ----------------------------------------------------------------------------------------------
# fixtures (no torch)


def test_fixture_file_is_consistent():
    assert FIXTURE.stat().st_size < 300_000
    n_new, n_rows = FIXTURES["max_new_tokens"], FIXTURES["n_logit_rows"]
    names = [c["name"] for c in CASES]
    assert len(set(names)) == len(names) >= 10
    for c in CASES:
        assert len(c["tokens"]) == len(c["margins"]) == n_new, c["name"]
        assert np.asarray(c["logits_last_rows"]).shape == (n_rows, c["config"]["vocab_size"]), c["name"]
    covered = {(k, str(c["config"].get(k))) for c in CASES for k in ("rope_type", "rope_style", "tie_embeddings")}
    assert {("rope_type", t) for t in ("default", "linear", "llama3")} <= covered
    assert {("rope_style", "new"), ("rope_style", "old"), ("tie_embeddings", "True")} <= covered
    assert {c["dtype"] for c in CASES} == {"F32", "F16", "BF16"}
    assert any(c["n_shards"] > 1 for c in CASES)


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_hf_fixture(case, tmp_path):
    model_dir = make_random_checkpoint(tmp_path / case["name"], seed=case["seed"], dtype=case["dtype"],
                                       n_shards=case["n_shards"], **case["config"])
    check_against(model_dir, FIXTURES["prompt"], case, FIXTURES["max_new_tokens"], case["name"])


def test_near_tie_rule():
    margins = [1.0, 1.0, 1e-5, 1.0]
    assert compare_greedy([1, 2, 3, 4], margins, [1, 2, 3, 4], "same") == 4
    assert compare_greedy([1, 2, 3, 4], margins, [1, 2, 9, 9], "tie") == 2
    with pytest.raises(AssertionError, match="not a near-tie"):
        compare_greedy([1, 2, 3, 4], margins, [1, 7, 3, 4], "real mismatch")


# ----------------------------------------------------------------------------------------------
# live against transformers (configurations and prompt not in the fixtures)

LIVE_PROMPT = [1, 9, 30, 4, 55, 0, 12,  # 0 = the pad id generate() is given
               40, 7, 63, 21, 2, 35, 18, 50, 6, 27, 44]
LIVE_CASES = [
    dict(name="live_gqa_llama3_bf16", seed=201, dtype="BF16", n_shards=1,
         config=dict(dim=64, ffn_dim=80, n_layers=2, n_heads=8, n_kv_heads=2, head_dim=16, vocab_size=100,
                     max_positions=256, rope_type="llama3", rope_style="new")),
    dict(name="live_mha_sharded3_linear_old_bias_f16", seed=202, dtype="F16", n_shards=3,
         config=dict(dim=32, ffn_dim=64, n_layers=3, n_heads=4, n_kv_heads=4, vocab_size=64,
                     attention_bias=True, mlp_bias=True, rope_type="linear", rope_style="old")),
    dict(name="live_mqa_head_dim_10_f32", seed=203, dtype="F32", n_shards=1,
         config=dict(dim=40, ffn_dim=56, n_layers=2, n_heads=4, n_kv_heads=1, head_dim=10, vocab_size=70,
                     rope_type="default", rope_style="old", rope_theta=50000.0)),
]


@pytest.mark.slow
@pytest.mark.parametrize("case", LIVE_CASES, ids=[c["name"] for c in LIVE_CASES])
def test_matches_transformers_live(case, tmp_path):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    tools = _tools_module()
    tools.quiet_transformers()
    model_dir = make_random_checkpoint(tmp_path / case["name"], seed=case["seed"], dtype=case["dtype"],
                                       n_shards=case["n_shards"], **case["config"])
    n_new = 24
    ref = tools.hf_reference(model_dir, LIVE_PROMPT, max_new_tokens=n_new, n_logit_rows=4)
    check_against(model_dir, LIVE_PROMPT, ref, n_new, case["name"])


@pytest.mark.slow
@pytest.mark.skipif(not STORIES260K.is_dir(), reason="the reference checkpoint stories260k is not beside this checkout (a clone lacks it)")
def test_stories260k_greedy_matches_transformers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    tools = _tools_module()
    tools.quiet_transformers()
    prompt, n_new = [1, 403, 407, 261, 378], 40  # "Once upon a time" with BOS
    hf = tools.load_hf_model(STORIES260K)
    with torch.no_grad():
        ids = torch.tensor([prompt])
        out = hf.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n_new, min_new_tokens=n_new,
                          eos_token_id=None, pad_token_id=0)
    hf_tokens = out[0, len(prompt):].tolist()
    mine = generate_greedy(load_stage(STORIES260K), prompt, n_new).tokens
    assert mine == hf_tokens
