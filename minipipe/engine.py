"""The engine: many requests through one pipeline, each decoded exactly as it would be alone.

The engine owns the pipeline. Strategies own nothing but one request's decisions (a decoder
per request, `minipipe.strategies.base`). Each turn of the loop:

    1. admit    — requests that have arrived start, first come first served, while a running
                  slot and the KV budget allow; each gets a block of sequence ids
    2. launch   — the decoders' parts go out: a request's KV edits before its next part;
                  parts of several requests merged into one micro-batch (a `Run`)
    3. offer    — while the pipeline has room, decoders that speculate are asked for one more
                  part each, round by round, merged the same way
    4. wait     — for the oldest micro-batch's answer (or the next arrival), and route each
                  part's rows back to its decoder, which commits tokens and records new actions
    5. retire   — a request whose stop rule fired (or that was aborted) cancels what it has
                  in flight and frees every cell of its block; its slot and budget are free

**Sharing the pipeline (continuous batching).** A micro-batch carries at most one part per
request (two parts of one request in one batch could not see each other's cells, because KV
edits apply between runs). Prompt chunks travel alone (their GEMM bits depend on their rows).
For strategies whose requests wait for each answer before launching again (`pipeline`,
`speculative`, `tree`), the engine holds parts until fewer than `n_stages` micro-batches are in
flight and puts at most ⌈running / n_stages⌉ requests in each, so the running requests form
about `n_stages` groups, one per stage (vLLM's way of batching over pipeline stages): every
stage works, and each group's rows share the weights the stage streams. Strategies that keep
many parts in flight per request (`pipeinfer`, `specpipe`) put every request's next part into
each micro-batch: SpecPipe-DB is exactly that, one tree layer of every request per step.

**Exactness.** Rows are independent under the kernels' policy and each request's rows see only
its own sequences, so sharing a micro-batch changes no bits; KV edits of one request travel in
order with its runs; answers return in launch order. Every request's tokens equal greedy
decoding of that request alone.

**Admission.** A request reserves the cells it may hold at most: its prompt and token budget
(within the context) plus its strategy's speculation in flight (`Strategy.speculative_cells`).
Requests wait while the reservations of running requests leave no room (`kv_cells`) or every
running slot is taken (`max_running`), in arrival order: a waiting request is never overtaken,
so none starves, and none is truncated. A request that could never fit is refused when added.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import numpy as np

from .batch import Batch
from .draft import prefetch_by_pool
from .errors import InputError
from .events import Admitted, Batched, Committed, Event, EventBus, Finished, KVEdited, Launched
from .events import Cancelled as CancelledEvent
from .request import FINISHED, Request
from .runtime.base import Pipeline
from .strategies.base import Answer, Cancel, Decoder, Edit, Head, Part, Strategy
from .transport.messages import Cancelled, Result, Run


@dataclass
class Flight:
    """A micro-batch in flight: its run id, the parts it carries, and its rows' cancellation keys
    not yet cancelled (when none is left, the whole run is cancelled by its id too, so stages
    skip it at once)."""

    run_id: int
    parts: list[Part]
    live_keys: set[int]


def _fork(drafter):
    """The draft-model fork behind a request's drafter (a traced draft's own)."""
    return getattr(drafter.source, "inner", drafter.source)


class Engine:
    """Serves requests through `pipe` with `strategy` (see the module docstring).

    max_running: requests decoded at once (each needs a block of `strategy.seqs_per_request`
    sequence ids in every stage's cache: the pipeline must hold `n_seqs(strategy, max_running)`);
    kv_cells: the KV budget in cells per stage (None: no limit); max_positions: the model's
    context; listeners: called with every event (narrators, tracers, recorders).
    """

    def __init__(self, pipe: Pipeline, strategy: Strategy, max_running: int = 16, kv_cells: int | None = None,
                 max_positions: int = 1 << 30, listeners: Iterable[Callable[[Event], None]] = ()):
        self.pipe, self.strategy = pipe, strategy
        self.max_running, self.kv_cells, self.max_positions = max_running, kv_cells, max_positions
        self.bus = EventBus()
        self.bus.subscribe(self._count)
        for listener in listeners:
            self.bus.subscribe(listener)
        if getattr(pipe, "tracer", None) is not None and pipe.tracer.enabled:
            self.bus.subscribe(self._trace)
        self.head = Head(n_stages=pipe.n_stages, new_id=pipe.new_run_id, now=pipe.now, answer_waiting=pipe.poll,
                         draft_work=pipe.draft_work, emit=self.bus.emit, draft_wait=pipe.draft_wait,
                         draft_ahead=pipe.has_draft_lane, ahead_batch=[],
                         n_running=lambda: len(self.running), answered=lambda: self.answered)
        self.t0 = pipe.now()  # arrival times count from here
        self.waiting: deque[Request] = deque()  # in arrival order
        self.running: list[Decoder] = []  # in admission order
        self.finished: list[Request] = []
        self.free_blocks = deque(range(max_running))  # sequence blocks not held by a request
        self.block_of: dict[int, int] = {}  # id(request) -> its block
        self.reserved = 0  # KV cells reserved by running requests
        self.stats_of: dict = {}  # request id -> its strategy counters (while it runs)
        self.queue: dict[Decoder, deque] = {}  # per decoder: its launches and edits not yet sent
        self.inflight: deque[Flight] = deque()  # micro-batches in flight, oldest first
        self.flight_of: dict[int, Flight] = {}  # cancellation key -> the micro-batch carrying it
        self._ready_order = 0  # stamps parts in the order they became ready
        self.answered = 0  # micro-batches answered so far

    @staticmethod
    def n_seqs(strategy: Strategy, max_running: int) -> int:
        """Sequence ids every stage's cache needs for `max_running` requests."""
        return strategy.seqs_per_request * max_running

    def reservation(self, request: Request) -> int:
        """KV cells `request` may hold at most while it runs."""
        text = min(len(request.prompt) + request.max_new_tokens, self.max_positions)
        return text + self.strategy.speculative_cells()

    # ------------------------------------------------------------------------------------------
    # the API

    def add(self, request: Request) -> Request:
        """Queue a request (it starts when it has arrived and fits)."""
        need = self.reservation(request)
        if self.kv_cells is not None and need > self.kv_cells:
            raise InputError(f"request {request.id} needs up to {need} KV cells (prompt, token budget and "
                             f"{self.strategy.name}'s speculation) but the budget is {self.kv_cells}; "
                             "raise --kv-cells or lower its max_new_tokens")
        if any(r.id == request.id for r in self.waiting) or any(d.request.id == request.id for d in self.running):
            raise InputError(f"request id {request.id!r} is already in use")
        request.arrived_at = self.t0 + request.arrival_s
        position = len(self.waiting)
        while position and self.waiting[position - 1].arrival_s > request.arrival_s:
            position -= 1  # keep arrival order (stable for equal times)
        self.waiting.insert(position, request)
        return request

    def abort(self, request_id) -> bool:
        """Stop a request now: its runs are cancelled and its cells freed. False if unknown or over."""
        for request in self.waiting:
            if request.id == request_id:
                self.waiting.remove(request)
                request.start(self.pipe.now(), self.max_positions, self.pipe.now)
                request.sink.stop("aborted")
                self._finish_request(request)
                return True
        for decoder in self.running:
            if decoder.request.id == request_id:
                decoder.sink.stop("aborted")
                self._retire(decoder)
                self._launch()
                return True
        return False

    def run(self) -> list[Request]:
        """Serve until every added request has finished; returns them in the order they finished."""
        while self.waiting or self.running:
            self.step()
        self._drain()
        return self.finished

    def step(self, timeout: float | None = None) -> None:
        """One turn: admit, launch, then wait for one answer (or the next arrival, or `timeout`)."""
        self._admit()
        self._launch()
        if self.inflight:
            wait = self._until_next_arrival()
            if timeout is not None:
                wait = timeout if wait is None else min(wait, timeout)
            if wait is None or self.pipe.wait(wait):
                self._route(self.pipe.receive())
                self._launch()
        elif self.waiting:
            arrival = self.waiting[0].arrived_at
            if arrival > self.pipe.now():  # nothing to do until the next request arrives
                self.pipe.idle_until(arrival if timeout is None else min(arrival, self.pipe.now() + timeout))
            elif not self.running and not self._fits(self.waiting[0]):
                raise RuntimeError("a request waits for room that nothing will free")  # (add() refuses these)
            # else it arrived while this turn launched (sending KV edits takes stage steps when time
            # counts them): the next turn admits it
        elif self.running:
            raise RuntimeError(f"requests {[d.request.id for d in self.running]} have nothing in flight")

    # ------------------------------------------------------------------------------------------
    # 1. admission

    def _until_next_arrival(self) -> float | None:
        """Seconds until the next waiting request can start (0: now); None when it waits for room,
        which only an answer can make."""
        if not self.waiting or not self._fits(self.waiting[0]):
            return None
        return max(0.0, self.waiting[0].arrived_at - self.pipe.now())

    def _fits(self, request: Request) -> bool:
        """A running slot and the KV budget have room for `request`."""
        return bool(self.free_blocks) and (self.kv_cells is None
                                           or self.reserved + self.reservation(request) <= self.kv_cells)

    def _admit(self) -> None:
        now = self.pipe.now()
        while self.waiting and self.waiting[0].arrived_at <= now and self._fits(self.waiting[0]):
            request = self.waiting.popleft()  # (one that does not fit waits; so does everyone behind it)
            need = self.reservation(request)
            request.start(now, self.max_positions, self.pipe.now)
            request.stats = self.strategy.stats()
            if request.stats is not None:
                self.stats_of[request.id] = request.stats
            block = self.free_blocks.popleft()
            self.block_of[id(request)] = block
            self.reserved += need
            B = self.strategy.seqs_per_request
            seqs = range(block * B, (block + 1) * B)
            self.bus.emit(Admitted(now, request.id, seqs, request.queued_s))
            decoder = self.strategy.decoder(request, seqs, self.head)
            self.running.append(decoder)
            self.queue[decoder] = deque()
            if request.sink.done:  # nothing to generate (max_new_tokens 0)
                self._retire(decoder)
                continue
            decoder.admit()
            self._collect(decoder)

    # ------------------------------------------------------------------------------------------
    # 2-3. launching

    def _collect(self, decoder: Decoder) -> None:
        """Take a decoder's new actions: cancellations now, launches and edits into its queue."""
        for action in decoder.take_actions():
            if isinstance(action, Cancel):
                for key in action.ids:
                    self.pipe.cancel(key)
                    flight = self.flight_of.pop(key, None)
                    if flight is not None:
                        flight.live_keys.discard(key)
                        if not flight.live_keys:
                            self.pipe.cancel(flight.run_id)
            else:
                if isinstance(action, Part):
                    action.ready = self._ready_order
                    self._ready_order += 1
                self.queue[decoder].append(action)

    def _launch(self) -> None:
        """Send what the decoders have queued and optional work (`_launch_parts`); then draft
        ahead of need for every request at once (`_draft_together`), while the micro-batches
        travel, if the draft's lane is free: a busy lane takes them with the next turn's
        drafting, in the same forward (each forward streams the draft's weights once)."""
        try:
            self._launch_parts()
        finally:
            if not self.pipe.draft_busy():
                self._draft_together([])

    def _launch_parts(self) -> None:
        """Send what the decoders have queued, and optional work while the pipeline has room.

        Each micro-batch takes at most one part per request: the part it has queued, or else
        (strategies that speculate) one it offers now. So the requests' parts travel together,
        step after step (SpecPipe-DB's rhythm), and a request whose rhythm was broken (a new
        root after a miss, a newcomer) joins the common micro-batches at once.
        """
        while True:
            self._send_edits()
            prefill = [d for d, q in self.queue.items() if q and q[0].kind == "prefill"]
            if prefill:  # prompt chunks travel alone (their GEMM bits depend on their rows)
                for d in prefill:
                    self._submit([self.queue[d].popleft()])
                continue
            if self._live_flights() >= self._max_flights():
                return  # hold: the pipeline is full; the parts go together when a micro-batch returns
            ready = [d for d, q in self.queue.items() if q]  # their next action is a part
            if self.strategy.one_part_in_flight:
                ready.sort(key=lambda d: self.queue[d][0].ready)
                ready = ready[: math.ceil(len(self.running) / self.pipe.n_stages)]
            elif self.strategy.offer_while_answer_waits or not self.pipe.poll():
                asked = [d for d in self.running if d not in ready and d.started]
                self._prefetch_drafts(asked)
                for decoder in asked:  # optional work joins the same micro-batch
                    if decoder.offer():
                        self._collect(decoder)
                        self._send_edits(decoder)
                        ready.append(decoder)
            if not ready:
                return
            self._submit([self.queue[d].popleft() for d in ready])

    def _prefetch_drafts(self, decoders: list[Decoder]) -> None:
        """Batched drafting before the decoders' offers: what they will ask their drafts about
        (`Decoder.draft_needs`), with the questions asked ahead of need, computed for every
        request in one forward per draft pool (one pass over the draft's weights)."""
        needs = []
        for decoder in decoders:
            if decoder.draft is not None and decoder.draft.pool is not None:
                needs.extend((decoder.draft, c) for c in decoder.draft_needs())
        self._draft_together(needs)

    def _draft_together(self, needs: list) -> None:
        """One forward per draft pool on the draft's lane for `needs` ((drafter, context) pairs the
        head waits for) and the questions decoders asked ahead of need (`Head.ahead_batch`:
        SpecPipe-DB's next layer under every request's newest nodes), each of which gets its
        answers with the time they are ready."""
        jobs = [job for job in self.head.ahead_batch or [] if not job[0].closed]
        if self.head.ahead_batch:
            self.head.ahead_batch.clear()
        queries = [(_fork(drafter), context) for drafter, context in needs]
        queries += [(_fork(drafter), c) for drafter, contexts, _ in jobs for c in contexts]
        rows = prefetch_by_pool(queries)  # {id(pool): rows}
        ready = {key: self.pipe.draft_work(n, 1, wait=False) if n else self.pipe.now() for key, n in rows.items()}
        for drafter, contexts, k in jobs:
            drafter.answer_ahead(contexts, k, ready.get(id(drafter.pool), self.pipe.now()))
        for key in {id(drafter.pool) for drafter, _ in needs}:
            self.pipe.draft_wait(ready[key])

    def _send_edits(self, decoder: Decoder | None = None) -> None:
        """Send the KV edits queued ahead of each decoder's next part (or of one decoder's)."""
        for queue in self.queue.values() if decoder is None else [self.queue[decoder]]:
            while queue and isinstance(queue[0], Edit):
                self.pipe.submit_edits(queue.popleft().edits)

    def _max_flights(self) -> float:
        """Micro-batches with live rows allowed in flight (`n_stages` for strategies whose
        requests wait for each answer; the strategy's own cap otherwise)."""
        if self.strategy.one_part_in_flight:
            return self.pipe.n_stages
        cap = self.strategy.max_inflight_runs(self.pipe.n_stages)
        return math.inf if cap is None else cap

    def _live_flights(self) -> int:
        """Decode micro-batches in flight with some row not cancelled. Prompt chunks do not count
        (they are not part of the decoders' rhythm), nor do fully cancelled ones (stubs on their
        way back, taking no stage time worth waiting for)."""
        return sum(1 for f in self.inflight if f.live_keys and not f.parts[0].batch.prefill)

    def _submit(self, parts: list[Part]) -> None:
        """One micro-batch: the parts' rows, concatenated, as one run through every stage."""
        batches = [p.batch for p in parts]
        batch = Batch(tokens=np.concatenate([b.tokens for b in batches]),
                      positions=np.concatenate([b.positions for b in batches]),
                      seq_ids=tuple(s for b in batches for s in b.seq_ids),
                      want_logits=np.concatenate([b.want_logits for b in batches]),
                      prefill=batches[0].prefill,
                      row_ids=np.concatenate([b.row_ids for b in batches]),
                      **self._sampling_rows(parts))
        run_id = self.pipe.new_run_id()
        speculative = any(p.kind not in ("prefill", "plain") for p in parts)
        self.pipe.submit(Run(run_id, batch, return_logits=any(p.return_logits for p in parts), speculative=speculative))
        self.bus.emit(Batched(self.pipe.now(), "*", run_id, tuple((p.decoder.request.id, p.id, p.batch.n_rows)
                                                                   for p in parts), batch.prefill))
        flight = Flight(run_id, parts, set(int(k) for k in batch.row_ids))
        self.inflight.append(flight)
        for key in flight.live_keys:
            self.flight_of[key] = flight

    @staticmethod
    def _sampling_rows(parts: list[Part]) -> dict:
        """Each row's seed and sampling settings, its request's (none when every row is greedy)."""
        requests = [p.decoder.request for p in parts]
        if not any(r.samples for r in requests):
            return {}
        seeds = [np.full(p.batch.n_rows, r.sampling.seed if r.samples else 0, dtype=np.uint64)
                 for p, r in zip(parts, requests)]
        rows = [np.tile(r.sampling.row() if r.samples else np.zeros(4, np.float32), (p.batch.n_rows, 1))
                for p, r in zip(parts, requests)]
        return {"seeds": np.concatenate(seeds), "sampling": np.concatenate(rows)}

    # ------------------------------------------------------------------------------------------
    # 4. routing answers

    def _route(self, answer: Result | Cancelled) -> None:
        flight = self.inflight.popleft()
        self.answered += 1
        assert answer.run_id == flight.run_id, f"answers out of order: {answer.run_id} != {flight.run_id}"
        for key in flight.live_keys:
            self.flight_of.pop(key, None)
        for part, part_answer in zip(flight.parts, self._split(flight, answer)):
            decoder = part.decoder
            if decoder.retired:
                continue  # the request is over; this answer is of no use
            decoder.answer(part, part_answer)
            self._collect(decoder)
            if decoder.done:
                self._retire(decoder)

    @staticmethod
    def _split(flight: Flight, answer: Result | Cancelled) -> list[Answer]:
        """Each part's share of a micro-batch's answer (a stub where every row was dropped)."""
        if isinstance(answer, Cancelled):
            return [Answer(None, layers_skipped=answer.layers_skipped) for _ in flight.parts]
        owner = {int(key): i for i, part in enumerate(flight.parts) for key in part.batch.row_ids}
        rows: list[list[int]] = [[] for _ in flight.parts]
        for j, key in enumerate(answer.row_ids):
            rows[owner[int(key)]].append(j)
        out = []
        for part, mine in zip(flight.parts, rows):
            if not mine and part.batch.want_logits.any():
                out.append(Answer(None))  # its rows were dropped on the way
            else:
                out.append(Answer(answer.tokens[mine], answer.row_ids[mine],
                                  logits=None if answer.logits is None else answer.logits[mine]))
        return out

    # ------------------------------------------------------------------------------------------
    # 5. retiring

    def _retire(self, decoder: Decoder) -> None:
        decoder.retire()
        self._collect(decoder)
        self.running.remove(decoder)
        queue = self.queue.pop(decoder)
        for action in queue:  # its last edits still go out, in order; its unsent parts never will
            if isinstance(action, Edit):
                self.pipe.submit_edits(action.edits)
        request = decoder.request
        self.free_blocks.append(self.block_of.pop(id(request)))
        self.reserved -= self.reservation(request)
        self._finish_request(request)
        self.stats_of.pop(request.id, None)

    def _finish_request(self, request: Request) -> None:
        request.state, request.finished_s = FINISHED, self.pipe.now()
        self.finished.append(request)
        self.bus.emit(Finished(request.finished_s, request.id, request.sink.stop_reason or "length",
                               len(request.sink.tokens)))

    def _drain(self) -> None:
        """Wait out what is still in flight (parts of finished requests), so the pipeline can
        serve another engine; nothing of it is used."""
        while self.inflight:
            self._route(self.pipe.receive())

    # ------------------------------------------------------------------------------------------
    # listeners

    def _count(self, event: Event) -> None:
        """Each request's strategy counters see that request's events."""
        stats = self.stats_of.get(event.request)
        if stats is not None:
            stats.observe(event)

    def _trace(self, event: Event) -> None:
        """Commits, cancellations and KV edits on the head's track of the trace."""
        if isinstance(event, Committed):
            self.pipe.mark(f"commit {list(event.tokens)}", "commit")
        elif isinstance(event, CancelledEvent):
            self.pipe.mark(f"cancel {list(event.ids)}: {event.reason}", "cancel")
        elif isinstance(event, KVEdited):
            self.pipe.mark(f"KV {event.label}", "kv")
        elif isinstance(event, Launched):
            self.pipe.mark(f"launch {event.kind} {event.part}", "submit", event.part)

    # ------------------------------------------------------------------------------------------
    # reporting

    def summary(self) -> dict:
        """Aggregate figures over the finished requests (see `summarize`)."""
        return summarize(self.finished)

    def idle(self) -> bool:
        return not (self.waiting or self.running or self.inflight)


def summarize(requests: list[Request]) -> dict:
    """Aggregate figures over finished requests: throughput over the span from the first arrival
    to the last finish, and percentiles of time to first token, inter-token latency, latency
    (arrival to finish) and queueing delay. Seconds on the head's clock."""
    done = [r for r in requests if r.sink is not None and r.finished_s is not None]
    tokens = sum(len(r.sink.tokens) for r in done)
    span = (max(r.finished_s for r in done) - min(r.arrived_at for r in done)) if done else 0.0
    ttft = [r.sink.metrics.token_times[0] for r in done if r.sink.metrics.token_times]
    gaps = [float(g) for r in done for g in np.diff(r.sink.metrics.token_times)]
    latency = [r.finished_s - r.arrived_at for r in done]
    queued = [r.queued_s for r in done]

    def pct(values, q):
        return round(float(np.percentile(values, q)), 6) if values else None

    return {
        "requests": len(done),
        "generated_tokens": tokens,
        "span_s": round(span, 6),
        "tokens_per_s": round(tokens / span, 3) if span > 0 else None,
        "requests_per_s": round(len(done) / span, 3) if span > 0 else None,
        "time_to_first_token_s": {"p50": pct(ttft, 50), "p95": pct(ttft, 95)},
        "inter_token_latency_s": {"mean": round(float(np.mean(gaps)), 6) if gaps else None,
                                  "p50": pct(gaps, 50), "p95": pct(gaps, 95)},
        "latency_s": {"p50": pct(latency, 50), "p95": pct(latency, 95)},
        "queued_s": {"p50": pct(queued, 50), "p95": pct(queued, 95)},
    }
