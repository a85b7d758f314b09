"""What every runtime offers the head: the `Pipeline` interface, and how layers are split.

The head (tokenizer, drafts, scheduler, verifier) talks to the stages only through this
interface, so a strategy runs unchanged on the process runtime (real OS processes, rings) and on
the local runtime (one process, steppable, virtual clock).

Terms: a **run** is one batch sent through all stages under a run id; its answer is a `Result`
(or a `Cancelled` stub), and answers come back in launch order, because every stage processes
its input in order.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod

from ..errors import InputError, MinipipeError
from ..transport.messages import Cancelled, KVCopy, KVEdits, KVRemove, Result, Run


class StageCrashed(MinipipeError):
    """A stage process died or reported an error."""


def split_layers(n_layers: int, n_stages: int | None = None, split: list[int] | None = None) -> list[tuple[int, int]]:
    """Layer ranges [lo, hi) per stage: as given by `split` (layers per stage), or even.

    An even split gives the first `n_layers % n_stages` stages one layer more.
    """
    if split is not None:
        if n_stages is not None and len(split) != n_stages:
            raise InputError(f"--split has {len(split)} entries but --stages is {n_stages}")
        if any(n < 1 for n in split) or sum(split) != n_layers:
            raise InputError(f"--split {','.join(map(str, split))} must be positive layer counts "
                             f"summing to the model's {n_layers} layers")
        sizes = list(split)
    else:
        n_stages = 1 if n_stages is None else n_stages
        if not 1 <= n_stages <= n_layers:
            raise InputError(f"--stages must be between 1 and the model's {n_layers} layers, got {n_stages}")
        sizes = [n_layers // n_stages + (1 if i < n_layers % n_stages else 0) for i in range(n_stages)]
    bounds, lo = [], 0
    for n in sizes:
        bounds.append((lo, lo + n))
        lo += n
    return bounds


class Pipeline(ABC):
    """The stages as the head sees them."""

    splits: list[tuple[int, int]]
    next_run_id: int = 1

    @property
    def n_stages(self) -> int:
        return len(self.splits)

    def new_run_id(self) -> int:
        run_id = self.next_run_id
        self.next_run_id += 1
        return run_id

    @abstractmethod
    def submit(self, msg: Run | KVRemove | KVCopy | KVEdits) -> None:
        """Send a run or KV edits into stage 0 (they travel through every stage in order)."""

    def submit_edits(self, edits: list) -> None:
        """Send KV edits as one message (nothing if there are none)."""
        if edits:
            self.submit(KVEdits(list(edits)) if len(edits) > 1 else edits[0])

    @abstractmethod
    def cancel(self, run_id: int) -> None:
        """Mark a run cancelled; stages skip what they have not computed of it yet."""

    @abstractmethod
    def poll(self) -> bool:
        """True if the oldest answer (a Result or Cancelled stub) has arrived. Never blocks."""

    @abstractmethod
    def receive(self) -> Result | Cancelled:
        """The oldest answer, waiting for it if needed."""

    def wait(self, timeout: float) -> bool:
        """Wait up to `timeout` seconds for the oldest answer; True once it is there (then
        `receive` returns at once). Runtimes with a better way to wait override this."""
        deadline = time.monotonic() + timeout
        while not self.poll():
            if time.monotonic() >= deadline:
                return False
            time.sleep(min(1e-3, max(0.0, deadline - time.monotonic())))
        return True

    def idle_until(self, t: float) -> None:
        """Nothing is in flight: let the head's clock reach `t` (a request arrives then)."""
        delay = t - self.now()
        if delay > 0:
            time.sleep(delay)

    has_draft_lane = False  # drafting runs off the head's critical path (the local runtime's virtual clock)

    def draft_work(self, n_rows: int, forwards: int | None = None, wait: bool = True) -> float:
        """The draft computed `n_rows` rows in `forwards` forward calls (default: one per row);
        returns when that work is done. The local runtime charges it on the draft's lane (the head
        waiting for it if `wait`); here it ran in the head, so it is done now."""
        return self.now()

    def draft_wait(self, t: float) -> None:
        """The head needs a draft answer that is ready at `t` (local runtime: its clock waits)."""

    def draft_busy(self) -> bool:
        """The draft's lane is still computing what it was given (only the local runtime has one)."""
        return False

    def now(self) -> float:
        """The head's clock (seconds; virtual in the local runtime)."""
        return time.perf_counter()

    def mark(self, name: str, kind: str, run_id: int | None = None) -> None:
        """Record an instant on the head's trace track (commits, launches, verifications)."""
        tracer = getattr(self, "tracer", None)
        if tracer is not None:
            tracer.instant("head", name, self.now(), kind, run_id)

    def stats(self) -> dict:
        """Per-stage counters (runs, layers computed and skipped, KV edits); the local runtime
        has them at any time, the process runtime reports none (they stay in the stages)."""
        return {}

    def close(self) -> None:
        pass

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()
