"""What every strategy shares about a generation: the prompt check, the stop rules, the result.

`TokenSink` receives the tokens a strategy commits, in order, and decides when to stop:

* at an end-of-sequence id (which is emitted),
* after `max_new_tokens`,
* when the next token would not fit the model's context: a token is fed back at position
  `len(prompt) + index`, so generation stops once that position reaches `max_positions`.

Every strategy stops by the same rule, so their outputs can be compared token for token.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import InputError
from .metrics import GenerationMetrics


@dataclass
class Generation:
    tokens: list[int]  # generated ids only (an eos that stopped generation is included)
    stop_reason: str  # "eos", "length" (token budget), "context" (model's context is full), "aborted"
    metrics: GenerationMetrics


def check_prompt(prompt_ids: Sequence[int], vocab_size: int, max_positions: int) -> list[int]:
    """Validate a prompt for a model; raise InputError with a one-line reason."""
    ids = [int(i) for i in prompt_ids]
    if not ids:
        raise InputError("the prompt is empty (give some text or --prompt-ids)")
    bad = [i for i in ids if not 0 <= i < vocab_size]
    if bad:
        raise InputError(f"token id {bad[0]} is outside the vocabulary (0..{vocab_size - 1})")
    if len(ids) > max_positions:
        raise InputError(f"the prompt has {len(ids)} tokens but the model's context holds {max_positions}")
    return ids


class TokenSink:
    """Collects committed tokens, applies the stop rules, reports each token as it arrives."""

    def __init__(self, n_prompt: int, max_new_tokens: int, eos_ids: Sequence[int], max_positions: int,
                 on_token: Callable[[int], None] | None = None, metrics: GenerationMetrics | None = None,
                 clock: Callable[[], float] | None = None):
        if max_new_tokens < 0:
            raise InputError("--max-new-tokens must be >= 0")
        self.n_prompt, self.max_new_tokens, self.max_positions = n_prompt, max_new_tokens, max_positions
        self.eos = set(eos_ids)
        self.on_token = on_token
        self.metrics = metrics if metrics is not None else GenerationMetrics(n_prompt_tokens=n_prompt)
        self.clock = clock  # a virtual clock (local runtime) instead of wall time, if given
        self.tokens: list[int] = []
        self.stop_reason: str | None = None if max_new_tokens > 0 else "length"

    @property
    def done(self) -> bool:
        return self.stop_reason is not None

    @property
    def next_position(self) -> int:
        """Where the latest token goes when it is fed back to the model."""
        return self.n_prompt + len(self.tokens) - 1

    def add(self, tokens: Sequence[int]) -> bool:
        """Commit tokens in order (up to the first stop); return True once generation is over."""
        for token in tokens:
            if self.done:
                break
            token = int(token)
            self.tokens.append(token)
            if self.clock is None:
                self.metrics.token()
            else:
                self.metrics.token_at(self.clock())
            if self.on_token is not None:
                self.on_token(token)
            if token in self.eos:
                self.stop_reason = "eos"
            elif len(self.tokens) >= self.max_new_tokens:
                self.stop_reason = "length"
            elif self.next_position >= self.max_positions:
                self.stop_reason = "context"
        return self.done

    def stop(self, reason: str) -> None:
        """End generation now for `reason` (e.g. "aborted"), unless it has ended already."""
        if self.stop_reason is None:
            self.stop_reason = reason

    def result(self) -> Generation:
        if self.clock is None:
            self.metrics.finish()
        else:
            self.metrics.finish_at(self.clock())
        return Generation(tokens=self.tokens, stop_reason=self.stop_reason or "length", metrics=self.metrics)
