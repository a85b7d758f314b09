"""What strategies share: the interface, prefill through the pipeline, and the generation driver.

A strategy is the head's scheduler. It decides what to send into the pipeline (runs, KV edits),
what to cancel, and which answers to commit; `TokenSink` applies the stop rules. Terms used by
every strategy:

* **committed tokens** — tokens emitted to the user; each one is the target's greedy choice
  after the prompt and the committed tokens before it.
* **sequence 0** — the committed text in every stage's KV cache; other sequence ids hold
  speculation.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence

from .. import kernels
from ..batch import Batch
from ..generation import Generation, TokenSink
from ..runtime.base import Pipeline
from ..transport.messages import KVRemove, Result, Run


class Strategy(ABC):
    name: str = "?"
    n_seqs: int = 1  # sequence ids each stage's cache needs

    @abstractmethod
    def decode(self, pipe: Pipeline, prompt: list[int], first_token: int, sink: TokenSink) -> None:
        """Commit tokens into `sink` until it is done. `first_token` follows the prompt."""


def prefill_pipeline(pipe: Pipeline, prompt: Sequence[int], seq_ids: tuple[int, ...] = (0,)) -> int:
    """Send the prompt through the pipeline in the canonical chunks; return the first token."""
    chunks = kernels.prefill_chunks(len(prompt))
    for start, end in chunks:
        batch = Batch.chain(prompt[start:end], start, seq_ids, want_logits="last" if end == len(prompt) else "none",
                            prefill=True)
        pipe.submit(Run(pipe.new_run_id(), batch))
    answer = None
    for _ in chunks:
        answer = pipe.receive()
    assert isinstance(answer, Result), f"prefill was cancelled: {answer}"
    return int(answer.tokens[-1])


def generate(strategy: Strategy, pipe: Pipeline, prompt: Sequence[int], max_new_tokens: int,
             eos_ids: Sequence[int] = (), max_positions: int = 1 << 30,
             on_token: Callable[[int], None] | None = None) -> Generation:
    """Prefill, then let the strategy decode; the same stop rules as greedy decoding."""
    prompt = [int(t) for t in prompt]
    sink = TokenSink(len(prompt), max_new_tokens, eos_ids, max_positions, on_token, clock=pipe.now)
    sink.metrics.start_at(pipe.now())
    if not sink.done:
        pipe.submit(KVRemove(None))  # a pipeline may serve several generations: start empty
        first = prefill_pipeline(pipe, prompt)
        if not sink.add([first]):
            strategy.decode(pipe, prompt, first, sink)
    result = sink.result()
    if getattr(strategy, "stats", None) is not None:
        result.metrics.extra["speculation"] = strategy.stats
    stats = pipe.stats()
    if stats:
        result.metrics.extra["stages"] = stats
    return result
