"""Pipeline-parallel inference, pico version: S stages, one token per trip through all of them.

The baseline that PipeInfer, SpecInfer (distributed) and SpecPipe all start from. The model's
layers are cut into S consecutive ranges, one per device; a micro-batch travels stage 0 -> 1 ->
... -> S-1 and the last stage hands logits back to the head. Pipelining (as in GPipe, Huang et
al., 2019) keeps every stage busy when many independent micro-batches are waiting: here, only the
prompt's chunks. Decoding one request has no such supply: token t+1 needs the logits of token t,
so one micro-batch is in flight and S-1 stages idle at every tick (the "pipeline bubble"). A
token costs S stage-steps; the speculative strategies fill the idle stages with guesses.

Terms:
  stage        layers [lo, hi) of the target (a StageModel) with its own KV cache
  micro-batch  the rows of one forward pass (a Batch: tokens, positions, sequence ids) and the
               hidden states [T, D] that carry them from stage to stage
  tick         one unit of time: every stage holding a micro-batch runs it through its layers
               and hands it to the next stage

Simplified compared with minipipe/strategies/pipeline.py on minipipe/runtime/: one process, a
clock where every stage step takes one tick (no rings, no messages, no cost model), exactly
n_new tokens (no end-of-text rule), greedy only.

    python examples/pico/pipeline.py    # the text, a tick-by-tick timeline, the check against greedy
"""

from __future__ import annotations

import sys
from collections import deque
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from minipipe import kernels  # noqa: E402
from minipipe.batch import Batch  # noqa: E402
from minipipe.greedy import generate_greedy  # noqa: E402
from minipipe.model import StageModel, load_stage  # noqa: E402
from minipipe.paths import resolve_model  # noqa: E402
from minipipe.tokenizer import Tokenizer  # noqa: E402

N_STAGES, N_TOKENS = 4, 16  # the demo's knobs


def generate(stages: list[StageModel], prompt: list[int], n_new: int, timeline: list[str] | None = None) -> list[int]:
    """Greedy decoding of `n_new` tokens through the pipeline `stages` (consecutive layer ranges).

    `timeline`, if given (one string per stage), gets one character per tick: what each stage ran.
    """
    S = len(stages)
    caches = [stage.new_cache(capacity=len(prompt) + n_new) for stage in stages]
    inbox: list[deque] = [deque() for _ in range(S)]  # inbox[s]: micro-batches (batch, hidden) waiting for stage s
    answers: deque = deque()  # logits [T, V] that left the last stage, for the head

    # Prefill: the prompt's chunks are independent micro-batches, so they pipeline (stage 0 takes
    # chunk 2 while stage 1 runs chunk 1); only the last chunk asks for logits.
    chunks = kernels.prefill_chunks(len(prompt))
    for start, end in chunks:
        want = "last" if end == len(prompt) else "none"
        inbox[0].append((Batch.chain(prompt[start:end], start, want_logits=want, prefill=True), None))

    tokens: list[int] = []
    while len(tokens) < n_new:
        # One tick. The last stage goes first, so a micro-batch moves exactly one stage per tick.
        for s in reversed(range(S)):
            label = "."  # an idle stage: the bubble
            if inbox[s]:
                batch, hidden = inbox[s].popleft()
                out = stages[s].forward(caches[s], batch, hidden)  # [T, D] hidden, or [T', V] logits at the last stage
                (inbox[s + 1] if s + 1 < S else answers).append((batch, out))
                label = "p" if batch.prefill else str(int(batch.positions[0]) % 10)
            if timeline is not None:
                timeline[s] += label

        # The head: the greedy choice after the last row; it becomes the next micro-batch, alone.
        while answers:
            batch, logits = answers.popleft()
            if logits.shape[0] == 0:
                continue  # a prompt chunk before the last: no logits wanted
            tokens.append(int(kernels.argmax_rows(logits)[-1]))
            if len(tokens) < n_new:
                position = len(prompt) + len(tokens) - 1
                inbox[0].append((Batch.chain([tokens[-1]], position), None))  # one row, sequence 0
    return tokens


def main() -> None:
    """The shipped tinybard model on 4 stages after "ROMEO:"; the result is checked against greedy."""
    model_dir = resolve_model(None)
    tokenizer, whole = Tokenizer(model_dir), load_stage(model_dir)
    L, S = whole.config.n_layers, N_STAGES
    stages = [load_stage(model_dir, L * s // S, L * (s + 1) // S) for s in range(S)]  # layers [lo, hi) per stage
    prompt = tokenizer.encode("ROMEO:")
    timeline = [""] * S
    tokens = generate(stages, prompt, N_TOKENS, timeline)
    print(tokenizer.decode(prompt + tokens))
    print("\ntimeline (one column per tick; p: prompt, digit: position of the decoded row, .: idle)")
    for s, row in enumerate(timeline):
        print(f"stage {s} |{row}|")
    busy = sum(len(row) - row.count(".") for row in timeline)
    ticks = len(timeline[0])
    print(f"{ticks} ticks for {len(tokens)} tokens; the stages were busy {busy / (S * ticks):.0%} of the time")
    same = tokens == generate_greedy(whole, prompt, N_TOKENS).tokens
    print(f"same as greedy: {same}")
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
