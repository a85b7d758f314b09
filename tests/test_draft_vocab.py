"""A draft that knows more token ids than the target (padded vocabularies are common) never
proposes one the target cannot embed: every speculative strategy still emits greedy's tokens.

The draft here is built to prefer exactly those ids: its output rows for ids past the target's
vocabulary are scaled up, so unmasked it would propose them first.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from minipipe.config import ModelConfig
from minipipe.draft import DraftModel
from minipipe.greedy import generate_greedy
from minipipe.model import StageModel
from minipipe.runtime import LocalPipeline, split_layers
from minipipe.strategies import PipeInferStrategy, SpecPipeStrategy, SpeculativeStrategy, TreeStrategy, generate
from minipipe.synthetic import TensorDict, hf_config, random_model, random_tensors, write_checkpoint
from minipipe.weights import load_stage_weights

TARGET = dict(dim=32, ffn_dim=48, n_layers=4, n_heads=4, n_kv_heads=2, vocab_size=29, max_positions=80)
EXTRA = 20  # ids the draft knows and the target does not
DRAFT = dict(dim=16, ffn_dim=24, n_layers=1, n_heads=2, n_kv_heads=1, vocab_size=29 + EXTRA, max_positions=80)
PROMPT = [3, 1, 4, 1, 5]
N = 16

STRATEGIES = {
    "speculative": lambda draft: SpeculativeStrategy(draft, k=4),
    "tree": lambda draft: TreeStrategy(draft, schedule=[2, 2, 1]),
    "pipeinfer": lambda draft: PipeInferStrategy(draft, p_accept=0.0, n_draft=4, branches=2, max_inflight=4),
    "specpipe": lambda draft: SpecPipeStrategy(draft, width=3),
}


def draft_tensors(seed: int = 11) -> tuple[dict, dict]:
    raw = hf_config(**DRAFT)
    tensors = random_tensors(ModelConfig.from_hf(raw), seed)
    tensors["lm_head.weight"][TARGET["vocab_size"]:] *= 8  # its favourite guesses: ids the target lacks
    return raw, tensors


def draft_model() -> StageModel:
    raw, tensors = draft_tensors()
    config = ModelConfig.from_hf(raw)
    return StageModel(load_stage_weights(TensorDict(tensors), config, 0, config.n_layers))


def test_the_draft_would_propose_ids_the_target_lacks():
    """The premise: unmasked, its top guesses are out of the target's vocabulary."""
    unmasked = DraftModel(draft_model())
    assert all(unmasked.top(PROMPT + [t], 1)[0][0] >= TARGET["vocab_size"] for t in range(TARGET["vocab_size"]))
    masked = DraftModel(draft_model(), target_vocab=TARGET["vocab_size"])
    for t in range(TARGET["vocab_size"]):
        guesses = masked.top(PROMPT + [t], 5)
        assert len(guesses) == 5 and all(token < TARGET["vocab_size"] for token, _ in guesses)
    assert masked.distribution(PROMPT).shape == (TARGET["vocab_size"],)


@pytest.mark.parametrize("name", sorted(STRATEGIES))
def test_every_strategy_equals_greedy_with_a_larger_draft_vocabulary(name):
    expected = generate_greedy(random_model(seed=2, **TARGET), PROMPT, N).tokens
    strategy = STRATEGIES[name](DraftModel(draft_model(), target_vocab=TARGET["vocab_size"]))
    stages = [random_model(seed=2, lo=lo, hi=hi, **TARGET) for lo, hi in split_layers(TARGET["n_layers"], 2)]
    got = generate(strategy, LocalPipeline(stages, n_seqs=strategy.n_seqs), PROMPT, N,
                   max_positions=TARGET["max_positions"])
    assert got.tokens == expected


@pytest.mark.timeout(120)
def test_cli_masks_the_draft_on_the_process_runtime(tmp_path):
    """pipeinfer through real processes (where the crash was timing-dependent), via the CLI."""
    target = write_checkpoint(tmp_path / "target", hf_config(**TARGET),
                              random_tensors(ModelConfig.from_hf(hf_config(**TARGET)), 2), tokenizer=False)
    draft = write_checkpoint(tmp_path / "draft", *draft_tensors(), tokenizer=False)

    def run(*args):
        out = subprocess.run([sys.executable, "-m", "minipipe", "generate", "--prompt-ids", "3,1,4,1,5", "--model",
                              str(target), "--max-new-tokens", str(N), "--json", *args],
                             capture_output=True, text=True, timeout=90)
        assert out.returncode == 0, out.stderr
        return json.loads(out.stdout)["tokens"]

    assert run("--strategy", "pipeinfer", "--stages", "2", "--draft-model", str(draft), "--p-accept", "0") \
        == run("--strategy", "greedy")

