"""What strategies share: the strategy (knobs and policy), the decoder (one request's state
machine), parts, and `generate` for a single request.

Terms:

* **strategy** — a decoding algorithm with its knobs (`PipeInferStrategy(draft, p_accept=...)`).
  It makes one *decoder* per request and tells the engine how to share the pipeline.
* **decoder** — one request under one strategy: an event-driven state machine. The engine calls
  it when the request is admitted (`admit`), when one of its answers comes back (`answer`),
  when the pipeline has room for optional work (`offer`), and when the request ends
  (`retire`). It never waits and never touches the pipeline: it *launches* parts, *edits* the
  KV cache and *cancels* parts by recording actions, which the engine carries out, and it
  reports its decisions as events (`minipipe.events`).
* **part** — the rows one decoder sends in one go (a prompt chunk, a plain token, a drafted
  chain or tree, a tree layer). The engine merges the parts of several requests into one
  micro-batch (a `Run` through every stage); each part's answer comes back to its decoder in
  launch order.
* **committed text** — the prompt and the tokens emitted so far. Each committed token is the
  target's greedy choice after the committed text before it, so every strategy emits greedy
  decoding's tokens. In every stage's cache the request's committed text is the first
  sequence of its block (`Decoder.seq`); other sequences of the block hold speculation.
* **cancellation key** — every row carries an id (the part's id, or a tree node's own id);
  cancelling that id makes every stage drop the row, before, during or after its layers.
"""

from __future__ import annotations

from abc import ABC
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from .. import kernels
from ..batch import Batch
from ..draft import DraftSource
from ..drafter import Calibration, Drafter
from ..events import Answered, Cancelled, Committed, Event, KVEdited, Launched
from ..generation import Generation
from ..runtime.base import Pipeline
from ..transport.messages import KVRemove


@dataclass(eq=False)
class Part:
    """Rows of one decoder, sent in one micro-batch; answered once, in launch order."""

    id: int
    decoder: "Decoder"
    batch: Batch  # the rows; row_ids are their cancellation keys
    kind: str  # "prefill", "plain", "speculative", "verify", "tree layer"
    info: object = None  # the decoder's own bookkeeping for this part
    cancelled: bool = False  # the decoder cancelled it (its answer is never used)
    ready: int = 0  # the engine's stamp: parts that became ready earlier go out first
    return_logits: bool = False  # the answer carries the wanted rows' logits (MSS needs distributions)


@dataclass
class Answer:
    """A part's answer: the target's token for each wanted row that survived, or a stub."""

    tokens: np.ndarray | None  # [T'] the target's token per wanted row (None: the part was cancelled)
    row_ids: np.ndarray | None = None  # [T'] those rows' ids
    logits: np.ndarray | None = None  # [T', V] those rows' logits, when the part asked for them
    layers_skipped: int = 0  # stage-layers the pipeline skipped for a cancelled part

    @property
    def cancelled(self) -> bool:
        return self.tokens is None


@dataclass
class Edit:
    edits: list  # KVRemove / KVCopy, applied in order by every stage


@dataclass
class Cancel:
    ids: list[int]


@dataclass
class Head:
    """What the engine offers decoders: ids, time, the pipeline's shape, the draft's lane, and
    the event bus."""

    n_stages: int
    new_id: Callable[[], int]
    now: Callable[[], float]
    answer_waiting: Callable[[], bool]  # an answer is back and waits to be routed
    draft_work: Callable[..., float]  # (rows, forwards, wait) computed on the draft's lane -> when done
    emit: Callable[[Event], None]
    draft_wait: Callable[[float], None] = lambda t: None  # the head waits until the lane's answer at t
    draft_ahead: bool = False  # the draft has a lane of its own: drafting ahead of need pays
    # questions asked ahead of need, (drafter, contexts, k), that the engine answers for every
    # request in one batched draft forward before it next waits (None: answer each at once)
    ahead_batch: list | None = None
    n_running: Callable[[], int] = lambda: 1  # requests decoding now (sharing every micro-batch)
    answered: Callable[[], int] = lambda: 0  # micro-batches answered so far (the pipeline's steps)


class Decoder:
    """One request's decoding under a strategy (see the module docstring).

    Subclasses implement `begin` (the first token is committed: start decoding) and `on_answer`
    (one of their decode parts is answered), and, if they speculate, `offer` and `release_all`.
    """

    def __init__(self, strategy: "Strategy", request, seqs: range, head: Head):
        self.strategy, self.request, self.head = strategy, request, head
        self.sink = request.sink
        self.seqs = seqs  # this request's sequence block
        self.seq = seqs.start  # its committed text
        self.committed: list[int] = list(request.prompt)  # prompt + committed tokens
        self.inflight: deque[Part] = deque()  # launched, not yet answered (launch order)
        self.actions: list = []  # Part launches, Edits and Cancels for the engine, in order
        self.started = False  # the prompt is prefilled and the first token committed
        self.retired = False
        self.draft: Drafter | None = None  # speculating strategies: the request's draft (`open_draft`)

    @property
    def done(self) -> bool:
        return self.sink.done

    # ------------------------------------------------------------------------------------------
    # called by the engine

    def admit(self) -> None:
        """Send the prompt through the pipeline in the canonical chunks (never merged with other
        requests' rows: a chunk's GEMM bits depend on its rows)."""
        prompt = self.request.prompt
        for start, end in kernels.prefill_chunks(len(prompt)):
            last = end == len(prompt)
            self.launch(Batch.chain(prompt[start:end], start, (self.seq,), "last" if last else "none", prefill=True),
                        "prefill")

    def answer(self, part: Part, answer: Answer) -> None:
        oldest = self.inflight.popleft()
        assert oldest is part, f"answers out of order: part {part.id} before {oldest.id}"
        self.emit(Answered, part=part.id, tokens=() if answer.cancelled else tuple(int(t) for t in answer.tokens),
                  cancelled=answer.cancelled, layers_skipped=answer.layers_skipped,
                  too_late=part.cancelled and not answer.cancelled)
        if part.kind == "prefill":
            if answer.tokens is not None and answer.tokens.shape[0]:  # the last chunk: the first token
                self.started = True
                if not self.commit([int(answer.tokens[-1])], part):
                    self.begin()
            return
        self.on_answer(part, answer)

    def offer(self) -> bool:
        """Launch one optional part now if the strategy wants to; True if it did (asked only
        once the request has started decoding)."""
        return False

    def retire(self) -> None:
        """The request is over (stop rule or abort): cancel what is in flight and free every cell
        of the request's block. Later answers to its parts are dropped by the engine."""
        live = [p.id for p in self.inflight if not p.cancelled]
        for p in self.inflight:
            p.cancelled = True
        if live:
            self.cancel(live, "the request is over")
        self.release_all()
        self.edit([KVRemove(self.seq)], "free")
        if self.draft is not None:
            self.draft.release()
        self.retired = True

    # ------------------------------------------------------------------------------------------
    # the strategy's part

    def begin(self) -> None:
        """The first token is committed and the request is not done: start decoding."""
        raise NotImplementedError

    def on_answer(self, part: Part, answer: Answer) -> None:
        raise NotImplementedError

    def release_all(self) -> None:
        """Record the edits that free every speculative sequence this decoder holds."""

    # ------------------------------------------------------------------------------------------
    # helpers for strategies

    def launch(self, batch: Batch, kind: str, info=None, row_ids: np.ndarray | None = None,
               return_logits: bool = False) -> Part:
        """Send `batch` as one part (its rows' cancellation key: the part's id, or `row_ids`)."""
        part_id = self.head.new_id()
        keys = np.full(batch.n_rows, part_id, dtype=np.int64) if row_ids is None else row_ids
        part = Part(part_id, self, Batch(batch.tokens, batch.positions, batch.seq_ids, batch.want_logits,
                                         batch.prefill, keys), kind, info, return_logits=return_logits)
        self.inflight.append(part)
        self.actions.append(part)
        self.emit(Launched, part=part_id, kind=kind, tokens=tuple(int(t) for t in batch.tokens),
                  positions=tuple(int(p) for p in batch.positions), seqs=tuple(batch.seq_ids),
                  in_flight=len(self.inflight))
        return part

    def edit(self, edits: list, label: str) -> None:
        if edits:
            self.actions.append(Edit(list(edits)))
            self.emit(KVEdited, label=label, edits=tuple(edits))

    def cancel(self, ids: Sequence[int], reason: str) -> None:
        if ids:
            self.actions.append(Cancel(list(ids)))
            self.emit(Cancelled, ids=tuple(ids), reason=reason)

    def commit(self, tokens: Sequence[int], part: Part | None = None) -> bool:
        """Emit tokens (up to the first stop) proved by `part`'s answer; True once the request is done."""
        before = len(self.sink.tokens)
        self.sink.add(tokens)
        added = self.sink.tokens[before:]
        self.committed += added
        if added:
            self.emit(Committed, tokens=tuple(added), part=None if part is None else part.id)
            if self.draft is not None:
                self.draft.settle(self.committed)  # the draft's guesses meet the committed text
        return self.sink.done

    def open_draft(self, source: DraftSource, calibrate: bool = True) -> Drafter:
        """The request's draft: `source` (its fork of the strategy's draft) behind the draft's lane,
        with its confidence calibrated by this request's acceptance (`minipipe.drafter`)."""
        self.draft = Drafter(source, self.head, Calibration() if calibrate else None)
        return self.draft

    def draft_mark(self) -> tuple[int, int]:
        """The draft's work for this request so far: (rows computed, questions answered ahead);
        pass it to `draft_since`."""
        return self.draft.rows, self.draft.ready_ahead

    def draft_since(self, mark: tuple[int, int]) -> dict:
        """`Drafted`'s cost fields since `mark`: draft rows computed (the Drafter charges them on the
        lane as it goes) and questions answered ahead of need."""
        return {"draft_rows": self.draft.rows - mark[0], "ahead": self.draft.ready_ahead - mark[1]}

    def draft_needs(self) -> list[list[int]]:
        """Contexts the next `offer` will ask the draft about (the engine may compute them for
        every request in one batched forward first); none by default."""
        return []

    def emit(self, event_type: type, **fields) -> None:
        """Report a decision (`minipipe.events`), stamped with the head's time and this request."""
        self.head.emit(event_type(t=self.head.now(), request=self.request.id, **fields))

    def take_actions(self) -> list:
        actions, self.actions = self.actions, []
        return actions


class Strategy(ABC):
    """A decoding algorithm's knobs, and how its requests share the pipeline.

    Engine policy (class attributes):

    * `seqs_per_request` — sequence ids one request needs (its committed text + speculation).
    * `one_part_in_flight` — a request waits for its answer before it launches again (pipeline,
      speculative, tree). The engine then splits the running requests into `n_stages` groups,
      one micro-batch each, so every stage has work (vLLM's pipeline-parallel batching).
    * `max_inflight_runs` — micro-batches in flight at most (None: `n_stages` for strategies
      with one part in flight, unbounded otherwise).
    * `offer_while_answer_waits` — keep launching optional work while an answer waits to be
      routed (SpecPipe fills its pipeline regardless; PipeInfer verifies first).
    """

    name: str = "?"
    seqs_per_request: int = 1
    one_part_in_flight: bool = True
    offer_while_answer_waits: bool = True

    @property
    def n_seqs(self) -> int:
        """Sequence ids one request's block spans (a pipeline for one request needs this many)."""
        return self.seqs_per_request

    def max_inflight_runs(self, n_stages: int) -> int | None:
        """Micro-batches (with live rows) in flight at most, for strategies that keep several
        parts in flight per request (None: no limit beyond the decoders' own)."""
        return None

    def max_part_rows(self) -> int:
        """The most rows one decode part of one request carries."""
        return 1

    def max_row_seqs(self) -> int:
        """The most sequence ids one row holds (a tree node belongs to every branch through it)."""
        return 1

    def logits_rows(self) -> int:
        """Rows of logits one request's part brings back (0: tokens only, the default)."""
        return 0

    def speculative_cells(self) -> int:
        """KV cells one request may hold beyond its committed text (speculation in flight)."""
        return 0

    def decoder(self, request, seqs: range, head: Head) -> Decoder:
        raise NotImplementedError

    def stats(self):
        """A fresh counters object for one request (None: the strategy keeps none)."""
        return None


def generate(strategy: Strategy, pipe: Pipeline, prompt: Sequence[int], max_new_tokens: int,
             eos_ids: Sequence[int] = (), max_positions: int = 1 << 30,
             on_token: Callable[[int], None] | None = None, listeners: Sequence[Callable[[Event], None]] = (),
             sampling=None) -> Generation:
    """Decode one request through `pipe` with `strategy` (the engine with a single request);
    greedy, or sampled with `sampling` (a `minipipe.sampling.Sampling`)."""
    from ..engine import Engine
    from ..request import Request

    engine = Engine(pipe, strategy, max_running=1, max_positions=max_positions, listeners=listeners)
    request = engine.add(Request("0", prompt, max_new_tokens, tuple(eos_ids), on_token=on_token, sampling=sampling))
    engine.run()
    return request.result()
