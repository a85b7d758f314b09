"""Requests: what a user asks the engine for, and what the engine keeps about each one.

Terms:

* **request** — a prompt (token ids), limits (`max_new_tokens`, stop ids), and an arrival time
  (seconds after the engine starts; the local runtime counts virtual seconds). Each request is
  decoded exactly as greedy decoding would decode it alone, whatever else shares the pipeline.
* **life of a request**

      waiting ──admit──▶ running ──stop rule / abort──▶ finished
      (queued: KV budget or        (prefill, then decode: its runs share micro-batches
       running slots are full)      with other requests' runs)

* **sequence block** — while running, a request owns a contiguous block of sequence ids in
  every stage's KV cache: the first is its committed text, the others hold its speculation.
  When it finishes, every cell of the block is freed and the block goes back to the pool.
* **reservation** — the KV cells a running request may hold at most (its prompt, its token
  budget, and its strategy's speculation in flight); admission keeps the sum within the budget.

Metrics per request (seconds): queueing delay (arrival to admission), time to first token (from
arrival, queueing included, as serving systems report it), inter-token latencies, and the
generation's own counters (`minipipe.metrics`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from .generation import Generation, TokenSink
from .metrics import GenerationMetrics
from .sampling import Sampling

WAITING, RUNNING, FINISHED = "waiting", "running", "finished"


@dataclass
class Request:
    """One generation request.  `id` names it in outputs; `arrival_s` is when it may start."""

    id: str | int
    prompt: Sequence[int]
    max_new_tokens: int = 64
    stop_ids: Sequence[int] = ()
    arrival_s: float = 0.0
    on_token: Callable[[int], None] | None = None  # called with each committed token, in order
    sampling: Sampling | None = None  # None (or temperature 0): greedy
    # --- kept by the engine (times on the head's clock) ----------------------------------------
    state: str = WAITING
    arrived_at: float = 0.0  # when it arrived (the engine's start + arrival_s)
    admitted_s: float | None = None
    finished_s: float | None = None
    sink: TokenSink | None = field(default=None, repr=False)
    stats: object = field(default=None, repr=False)  # the strategy's counters for this request

    def __post_init__(self) -> None:
        self.prompt = [int(t) for t in self.prompt]

    @property
    def samples(self) -> bool:
        """True when the request samples (temperature > 0) instead of decoding greedily."""
        return self.sampling is not None and not self.sampling.greedy

    @property
    def done(self) -> bool:
        return self.state == FINISHED

    @property
    def queued_s(self) -> float | None:
        """Queueing delay: arrival to admission."""
        return None if self.admitted_s is None else self.admitted_s - self.arrived_at

    def start(self, now: float, max_positions: int, clock: Callable[[], float]) -> None:
        """Admitted at `now`: its tokens go into a fresh sink whose times count from arrival."""
        self.state, self.admitted_s = RUNNING, now
        self.sink = TokenSink(len(self.prompt), self.max_new_tokens, self.stop_ids, max_positions, self.on_token,
                              GenerationMetrics(n_prompt_tokens=len(self.prompt)), clock=clock)
        self.sink.metrics.start_at(self.arrived_at)

    def result(self) -> Generation:
        """Tokens, stop reason and metrics (with the queueing delay and the strategy's counters)."""
        assert self.sink is not None, f"request {self.id} was never admitted"
        result = self.sink.result()
        result.metrics.extra["queued_s"] = round(self.queued_s, 6)
        if self.samples:
            result.metrics.extra["sampling"] = self.sampling.to_dict()
        if self.stats is not None:
            result.metrics.extra["speculation"] = self.stats
        return result
