"""The pico reading path (examples/pico/): every file emits exactly greedy decoding's tokens.

Each pico file is loaded from its path and its `generate` called on (1) the shipped tinybard pair
and (2) small random targets split into 1-4 stages, with three drafts: an independent random
model (almost never right), an early exit of the target (its first layers and its own head:
right some of the time) and the target itself (always right), under hypothesis-drawn prompts,
lengths and knobs. The oracle is `generate_greedy` on the whole target. Equality alone cannot see
a mechanism that never fires, so counters must show it working on the shipped pair (PipeInfer
cancels and its stages skip, SpecPipe prunes and its stages drop rows, a perfect draft is always
accepted). Each file also runs as a script and must end with "same as greedy: True".
"""

from __future__ import annotations

import importlib.util
import math
import subprocess
import sys
from collections import Counter
from functools import lru_cache
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from minipipe.config import ModelConfig
from minipipe.greedy import generate_greedy
from minipipe.model import StageModel, load_stage
from minipipe.synthetic import TensorDict, hf_config, random_model, random_tensors
from minipipe.weights import load_stage_weights

PICO = Path(__file__).resolve().parents[1] / "examples" / "pico"
NAMES = ["pipeline", "speculative", "tree", "pipeinfer", "specpipe"]
SHIPPED = Path(__file__).resolve().parents[1] / "models"
ROMEO = [1, 1889, 28, 201]  # "ROMEO:\n" in the tinybard tokenizer


def load(name: str):
    """Import examples/pico/<name>.py as a module (registered, so its dataclasses work)."""
    spec = importlib.util.spec_from_file_location(f"pico_{name}", PICO / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


MODULES = {name: load(name) for name in NAMES}


def generate(name: str, stages: list[StageModel], draft: StageModel, prompt: list[int], n_new: int, **knobs):
    if name == "pipeline":  # plain pipelining needs no draft
        return MODULES[name].generate(stages, prompt, n_new, **knobs)
    return MODULES[name].generate(stages, draft, prompt, n_new, **knobs)


def split(n_layers: int, n_stages: int) -> list[tuple[int, int]]:
    return [(n_layers * s // n_stages, n_layers * (s + 1) // n_stages) for s in range(n_stages)]


# ----------------------------------------------------------------------------------------------
# the shipped pair

@lru_cache(maxsize=None)
def shipped(n_stages: int):
    target_dir = SHIPPED / "tinybard"
    whole = load_stage(target_dir)
    stages = [load_stage(target_dir, lo, hi) for lo, hi in split(whole.config.n_layers, n_stages)]
    return whole, stages, load_stage(SHIPPED / "tinybard-draft")


@lru_cache(maxsize=None)
def shipped_truth(n_new: int) -> list[int]:
    return generate_greedy(shipped(1)[0], ROMEO, n_new).tokens


@pytest.mark.parametrize("name", NAMES)
def test_shipped_pair_equals_greedy(name):
    _, stages, draft = shipped(4)
    counts = Counter()
    knobs = {"counts": counts} if name in ("pipeinfer", "specpipe") else {}
    assert generate(name, stages, draft, ROMEO, 24, **knobs) == shipped_truth(24)
    # the mechanisms really happen on this pair (equality alone would not show it)
    if name == "pipeinfer":
        assert counts["speculative runs"] and counts["accepted guesses"] and counts["cancelled runs"], counts
        assert counts["stage steps skipped"], counts  # stages really skip cancelled runs
    if name == "specpipe":
        assert counts["hits"] and counts["misses"] and counts["pruned nodes"], counts
        assert counts["rows dropped"], counts  # stages really drop pruned rows


@pytest.mark.parametrize("name", ["speculative", "tree", "pipeinfer"])
def test_a_perfect_draft_is_always_accepted(name):
    """The target as its own draft: every guess is the target's choice, so all are accepted."""
    _, stages, _ = shipped(2)
    counts, n_new = Counter(), 16
    knobs = {"speculative": {"k": 4}, "tree": {"expansion": (1, 2, 1)}, "pipeinfer": {"p_accept": 0.0}}[name]
    assert generate(name, stages, shipped(1)[0], ROMEO, n_new, counts=counts, **knobs) == shipped_truth(n_new)
    if name == "speculative":  # a chain of 4 per pass, all accepted: 5 tokens per pass
        assert counts["accepted"] == counts["guesses"] == n_new - 1 - counts["passes"], counts
        assert counts["passes"] == math.ceil((n_new - 1) / 5), counts
    if name == "tree":  # depth 3 per pass, the right path always in the tree: 4 tokens per pass
        assert counts["passes"] == math.ceil((n_new - 1) / 4), counts
    if name == "pipeinfer":  # nothing to cancel; speculative runs do the work
        assert counts["cancelled runs"] == 0 and counts["accepted guesses"] > n_new // 2, counts


# ----------------------------------------------------------------------------------------------
# random models

TARGET = dict(n_layers=4, vocab_size=64, max_positions=256)


@lru_cache(maxsize=None)
def random_target(seed: int, n_stages: int) -> list[StageModel]:
    return [random_model(seed, lo, hi, **TARGET) for lo, hi in split(TARGET["n_layers"], n_stages)]


@lru_cache(maxsize=None)
def random_draft(seed: int, kind: str) -> StageModel:
    if kind == "independent":
        return random_model(seed + 1000, n_layers=1, vocab_size=TARGET["vocab_size"])
    if kind == "target":
        return random_model(seed, **TARGET)
    config = ModelConfig.from_hf(hf_config(**TARGET))  # "early exit": layers [0, L-1) and the target's head
    weights = load_stage_weights(TensorDict(random_tensors(config, seed)), config, 0, TARGET["n_layers"] - 1,
                                 with_head=True)
    return StageModel(weights)


@lru_cache(maxsize=None)
def random_truth(seed: int, prompt: tuple[int, ...], n_new: int) -> list[int]:
    return generate_greedy(random_model(seed, **TARGET), list(prompt), n_new).tokens


def at_most_8(widths: list[int]) -> tuple[int, ...]:
    """The longest prefix of an expansion configuration with at most 8 branches."""
    kept: list[int] = []
    for w in widths:
        if math.prod(kept + [w]) > 8:
            break
        kept.append(w)
    return tuple(kept)


KNOBS = {
    "pipeline": st.just({}),
    "speculative": st.fixed_dictionaries({"k": st.integers(1, 5)}),
    "tree": st.fixed_dictionaries({"expansion": st.lists(st.integers(1, 3), min_size=1, max_size=4).map(at_most_8)}),
    "pipeinfer": st.fixed_dictionaries({"n_draft": st.integers(1, 4),
                                        "p_accept": st.sampled_from([0.0, 0.05, 0.2, 0.5])}),
    "specpipe": st.fixed_dictionaries({"width": st.integers(1, 3)}),
}
tokens = st.integers(3, TARGET["vocab_size"] - 1)
prompts = st.one_of(st.lists(tokens, min_size=1, max_size=8),  # short; or over one prefill chunk (128)
                    st.lists(tokens, min_size=129, max_size=132))


@pytest.mark.parametrize("name", NAMES)
@settings(max_examples=8, deadline=None)
@given(seed=st.integers(0, 3), n_stages=st.integers(1, 4), prompt=prompts, n_new=st.integers(1, 24),
       draft_kind=st.sampled_from(["independent", "early exit", "target"]), data=st.data())
def test_random_models_equal_greedy(name, seed, n_stages, prompt, n_new, draft_kind, data):
    knobs = data.draw(KNOBS[name], label="knobs")
    out = generate(name, random_target(seed, n_stages), random_draft(seed, draft_kind), prompt, n_new, **knobs)
    assert out == random_truth(seed, tuple(prompt), n_new)


def test_tree_verification_follows_parents_not_depths():
    """root -> {7, 8}, both with a child 9: the 9 accepted is the one under the token chosen."""
    tokens, parent = [5, 7, 8, 9, 9], [-1, 0, 0, 1, 2]  # nodes 0..4
    verify = MODULES["tree"].verify_greedy
    assert verify(tokens, parent, [8, 0, 9, 0, 3]) == (4, [8, 9, 3])  # target: 8, then 9, then 3
    assert verify(tokens, parent, [7, 9, 0, 4, 0]) == (3, [7, 9, 4])  # target: 7, then 9, then 4
    assert verify(tokens, parent, [6, 9, 9, 0, 0]) == (0, [6])  # no child carries 6: the bonus only


# ----------------------------------------------------------------------------------------------
# as scripts

@pytest.mark.parametrize("name", NAMES)
def test_runs_as_a_script(name):
    r = subprocess.run([sys.executable, str(PICO / f"{name}.py")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("ROMEO:") and r.stdout.rstrip().endswith("same as greedy: True"), r.stdout
