"""A request's draft as its decoder sees it: where the draft runs, what it computed ahead of
need, and how far its confidence is to be trusted.

Terms:

* **lane** — the draft's own processor. On the local runtime's virtual clock it is a track of
  its own: drafting starts when the lane is free and the head asks, and the head waits for it
  only when it needs the answer (`Head.draft_work`, `Head.draft_wait`). With a draft server
  (`minipipe.draft_server`) it is a real process. Without either, the draft runs in the head,
  and asking is waiting.
* **drafting ahead** — `Drafter.ahead(job, *args)` runs a drafting job before its answers are
  needed, e.g. SpecPipe's next tree layer under every leaf it just sent, or PipeInfer's next
  run after the one it just launched, while the head waits for the pipeline. Every question the
  job asks (`top(context, k)`) is answered and remembered with the time its answer is ready; when
  the decoder later asks the same question it waits only for that time. An answer the decoder
  never asks for (the leaf was pruned, the run cancelled) cost the lane, not the head.
* **calibrated confidence** — a draft's probability is its own claim: an n-gram seen once claims
  2/3, a weak draft model may be sure and wrong. `Calibration` measures, for this request, how
  often guesses made with each claimed probability turned out to be the target's token, and the
  decoder sees that measured rate instead. So speculation backs off by itself when drafts stop
  being accepted, and returns when they are: guesses the decoder asked for but did not send are
  checked against the committed text too (they cost nothing more), so the measurement goes on
  while speculation is off.

Exactness is untouched: a draft only decides what is verified, never what is committed.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

from .draft import DraftSource, Guess, merge_guesses

BUCKETS = np.array([0.0, 0.05, 0.15, 0.3, 0.45, 0.6, 0.75, 0.9, 0.97, 1.01])  # edges of claimed probability
TAIL = 16  # tokens of context a pending guess keeps to tell whether it was on the committed track


class Calibration:
    """How often this request's draft was right when it claimed probability p.

    Claims are grouped in buckets of p (`BUCKETS`). For a bucket with `hits` right guesses out of
    `tries` (both fading by `memory` per new observation, so the measure follows the text as it
    changes), a claim p is worth

        calibrated(p) = (hits + prior · p) / (tries + prior)

    — the claim itself until evidence arrives, the measured rate once it has. A guess counts
    when the committed text reaches its position *along the guess's own context* (a guess after
    a wrong earlier guess says nothing about this one): right iff the committed token there is
    the guessed one. Every guess of a `top(context, k)` counts, not only the first: their claims
    are all probabilities of being the target's token.
    """

    def __init__(self, prior: float = 1.0, memory: float = 0.9):
        self.prior, self.memory = prior, memory
        self.hits = np.zeros(len(BUCKETS) - 1)
        self.tries = np.zeros(len(BUCKETS) - 1)
        self.pending: dict[tuple, int] = {}  # (position, context tail, token) -> bucket

    @staticmethod
    def bucket(p: float) -> int:
        return int(np.searchsorted(BUCKETS, p, side="right")) - 1

    def value(self, p: float) -> float:
        """The calibrated probability of a guess whose draft claimed `p`."""
        b = self.bucket(p)
        return float((self.hits[b] + self.prior * p) / (self.tries[b] + self.prior))

    def guessed(self, context: Sequence[int], guesses: Sequence[Guess]) -> None:
        """Remember guesses for the token after `context`, to be checked once it is committed."""
        pos, tail = len(context), tuple(context[-TAIL:])
        for token, p in guesses:
            self.pending.setdefault((pos, tail, int(token)), self.bucket(p))

    def settle(self, committed: Sequence[int]) -> None:
        """Check every pending guess whose position the committed text has reached."""
        n = len(committed)
        for key in [key for key in self.pending if key[0] < n]:
            pos, tail, token = key
            bucket = self.pending.pop(key)
            if tuple(committed[max(0, pos - len(tail)): pos]) != tail:
                continue  # its context was not the committed text: it says nothing
            self.hits[bucket] = self.memory * self.hits[bucket] + (committed[pos] == token)
            self.tries[bucket] = self.memory * self.tries[bucket] + 1

    def snapshot(self) -> "Calibration":
        """A copy without pending guesses (what a draft server needs to draft as the head would)."""
        copy = Calibration(self.prior, self.memory)
        copy.hits, copy.tries = self.hits.copy(), self.tries.copy()
        return copy


class Drafter(DraftSource):
    """One request's draft source behind its lane, its answers computed ahead, and its
    calibration (see the module docstring).

    `source`: the request's fork of the strategy's draft (or a `RemoteDraft` on a draft server).
    `head`: the engine's `Head` (`draft_work(rows, forwards, wait) -> ready time`,
    `draft_wait(t)`, `draft_ahead`). `calibration`: None to see the draft's own claims.
    """

    def __init__(self, source: DraftSource, head, calibration: Calibration | None = None):
        self.source, self.head, self.calibration = source, head, calibration
        self.name = source.name
        self.sampling = source.sampling
        # a merged source: one Drafter per source (each calibrated on its own), answers merged
        self.parts = [Drafter(s, head, None if calibration is None else Calibration(calibration.prior,
                                                                                    calibration.memory))
                      for s in getattr(source, "sources", [])]
        self.memo: dict[tuple, tuple[list[Guess], float, bool]] = {}  # (context, k) -> (raw guesses, ready, ahead)
        self._rows = 0  # draft rows computed for this request (ahead or not)
        self.asked = 0  # questions the decoder asked
        self._ready_ahead = 0  # ... answered by drafting ahead of need
        self._ahead = False  # inside `ahead`: compute and remember, do not wait, do not calibrate
        self.closed = False  # released: questions still queued for a batched forward are dropped

    @property
    def rows(self) -> int:
        """Draft rows computed for this request (ahead or not)."""
        return self._rows + sum(p.rows for p in self.parts)

    @property
    def ready_ahead(self) -> int:
        """Questions the decoder asked whose answers were computed ahead of need."""
        return self._ready_ahead + sum(p.ready_ahead for p in self.parts)

    @property
    def pool(self):
        """The draft model's shared pool, if the source has one (the engine batches requests on it)."""
        return getattr(self.source, "pool", None)

    @property
    def can_draft_ahead(self) -> bool:
        return bool(getattr(self.head, "draft_ahead", False)) or hasattr(self.source, "submit_ahead")

    # ------------------------------------------------------------------------------------------
    # questions

    def top(self, context: Sequence[int], k: int) -> list[Guess]:
        return self.top_many([context], k)[0]

    def top_many(self, contexts: Sequence[Sequence[int]], k: int) -> list[list[Guess]]:
        """The guesses after each context: remembered answers (waiting until they are ready), the
        rest computed now in one batch on the lane."""
        if self.parts:
            for part in self.parts:
                part._ahead = self._ahead
            answers = [part.top_many(contexts, k) for part in self.parts]  # [sources][contexts]
            return [merge_guesses([a[i] for a in answers], k) for i in range(len(contexts))]
        keys = [(tuple(int(t) for t in c), k) for c in contexts]
        missing = [i for i, key in enumerate(keys) if key not in self.memo]
        if missing:
            rows0, forwards0 = self.source.tokens_computed, self.source.forwards_computed
            hits0 = getattr(self.source, "ahead_hits", 0)  # (a draft server's answers computed ahead)
            answers = self.source.top_many([contexts[i] for i in missing], k)
            self._ready_ahead += getattr(self.source, "ahead_hits", 0) - hits0
            ready = self.charge(self.source.tokens_computed - rows0, self.source.forwards_computed - forwards0,
                                wait=not self._ahead)
            for i, guesses in zip(missing, answers):
                self.memo[keys[i]] = (guesses, ready, self._ahead)
        out = []
        for context, key in zip(contexts, keys):
            guesses, ready, ahead = self.memo[key]
            if not self._ahead:
                self.asked += 1
                if ahead:
                    self._ready_ahead += 1
                    self.memo[key] = (guesses, ready, False)  # counted once
                self.head.draft_wait(ready)
                if self.calibration is not None:
                    self.calibration.guessed(context, guesses)
            out.append(self.calibrated(guesses))
        return out

    def knows(self, context: Sequence[int], k: int) -> bool:
        """The answer to `top(context, k)` was computed already (ahead, or asked before)."""
        if self.parts:
            return all(part.knows(context, k) for part in self.parts)
        return (tuple(int(t) for t in context), k) in self.memo

    def calibrated(self, guesses: list[Guess]) -> list[Guess]:
        if self.calibration is None:
            return guesses
        return [(t, self.calibration.value(p)) for t, p in guesses]

    def charge(self, rows: int, forwards: int, wait: bool = True) -> float:
        """Drafting work done on the lane; returns when it is done (the head waits if `wait`)."""
        self._rows += rows
        return self.head.draft_work(rows, forwards, wait)

    # ------------------------------------------------------------------------------------------
    # ahead of need

    def ahead(self, job: Callable, *args) -> None:
        """Run `job(drafter, *args)` now, off the head's critical path, when the draft has a lane
        of its own (else do nothing: drafting in the head ahead of need only moves its cost).
        `job` must be a module-level function of plain arguments (a draft server runs it too)."""
        if hasattr(self.source, "submit_ahead"):
            self.source.submit_ahead(job, args, None if self.calibration is None else self.calibration.snapshot())
        elif getattr(self.head, "draft_ahead", False):
            self._ahead = True
            try:
                job(self, *args)
            finally:
                self._ahead = False

    def ahead_questions(self, contexts: Sequence[Sequence[int]], k: int) -> None:
        """`top_many(contexts, k)` ahead of need (SpecPipe's next layer under the nodes just sent).

        Where the engine batches drafting (`Head.ahead_batch`, a list) and the source is a fork of
        a draft model's shared pool on the draft's lane, the questions join that list, and the
        engine computes every request's in one forward (`answer_ahead`): a step of SpecPipe-DB
        then costs the lane one pass over the draft's weights, not one per request. Otherwise
        they run as a job now (`ahead`)."""
        batch = getattr(self.head, "ahead_batch", None)
        if (batch is not None and not self.parts and self.pool is not None and getattr(self.head, "draft_ahead", False)
                and not hasattr(self.source, "submit_ahead")):
            batch.append((self, [[int(t) for t in c] for c in contexts], k))
        else:
            self.ahead(top_many_job, contexts, k)

    def answer_ahead(self, contexts: Sequence[Sequence[int]], k: int, ready: float) -> None:
        """Remember the answers to questions whose rows the engine computed ahead on the pool (a
        batched forward finishing on the lane at `ready`); anything the batch left out (a long
        new suffix) is computed and charged here."""
        keys = [(tuple(c), k) for c in contexts]
        missing = [i for i, key in enumerate(keys) if key not in self.memo]
        if not missing:
            return
        rows0, forwards0 = self.source.tokens_computed, self.source.forwards_computed
        answers = self.source.top_many([contexts[i] for i in missing], k)  # from the pool's memory
        if self.source.tokens_computed > rows0:
            ready = max(ready, self.charge(self.source.tokens_computed - rows0,
                                           self.source.forwards_computed - forwards0, wait=False))
        for i, guesses in zip(missing, answers):
            self.memo[keys[i]] = (guesses, ready, True)

    # ------------------------------------------------------------------------------------------
    # the request's progress

    def settle(self, committed: Sequence[int]) -> None:
        """The committed text grew: check pending guesses, forget answers it has passed."""
        for part in self.parts:
            part.settle(committed)
        if self.calibration is not None:
            self.calibration.settle(committed)
        n = len(committed)
        if hasattr(self.source, "forget_before"):
            self.source.forget_before(n)
        if self.memo and any(len(key[0]) < n for key in self.memo):
            self.memo = {key: v for key, v in self.memo.items() if len(key[0]) >= n}

    def release(self) -> None:
        self.memo, self.closed = {}, True
        self.source.release()  # (a merged source releases every part's)

    @property
    def tokens_computed(self) -> int:
        return self.source.tokens_computed

    @property
    def forwards_computed(self) -> int:
        return self.source.forwards_computed


class Backoff:
    """How often a decoder asks its draft while the drafts are not worth sending.

    Each chance to draft (a verification, an offer) first asks `ready()`. After a draft that
    came out empty — its calibrated confidence below the strategy's cutoff — the decoder lets
    1, then 2, 4, ... up to `most` chances pass before asking again; a draft worth sending makes
    it ask at every chance again. Asking costs a draft row for a draft model (and records the
    guess, so the calibration keeps learning); not asking costs nothing.
    """

    def __init__(self, most: int = 8):
        self.most, self.wait, self.skip = most, 0, 0

    def ready(self) -> bool:
        """Whether to ask the draft at this chance."""
        if self.skip > 0:
            self.skip -= 1
            return False
        return True

    def drafted(self, worth_sending: bool) -> None:
        """What the draft gave when it was asked."""
        self.wait = 0 if worth_sending else min(self.most, max(1, 2 * self.wait))
        self.skip = self.wait


def top_many_job(draft: DraftSource, contexts: list[list[int]], k: int) -> None:
    """A drafting job: the guesses after each of `contexts` (SpecPipe's next layer)."""
    draft.top_many(contexts, k)
