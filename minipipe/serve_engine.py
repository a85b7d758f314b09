"""The engine behind `minipipe serve`: one thread that owns it, tickets that link HTTP requests
to it, and the metrics it reports.

**Threading model.** The engine stays single-threaded: one dedicated thread (the *engine
thread*) owns it and the pipeline it drives, and loops `engine.step(timeout=tick)`. The HTTP
side (uvicorn's event loop, in the main thread) never calls the engine: it puts commands (add a
request, abort one) into a thread-safe inbox that the engine thread drains between steps. The
engine's events come back the other way: the engine thread's listener posts each committed
group of tokens, and the request's end, into that request's asyncio queue with
`loop.call_soon_threadsafe`, which is the only way another thread may touch the event loop.

| what                               | created by   | used by                 | ended by                    |
|------------------------------------|--------------|-------------------------|-----------------------------|
| pipeline (stage processes, shm)    | main thread  | engine thread only      | main thread, after the join |
| `Engine`, its requests, decoders   | engine thread| engine thread only      | engine thread               |
| inbox (`queue.SimpleQueue`)        | `EngineHost` | HTTP side puts, engine thread takes | —               |
| `Ticket.queue` (`asyncio.Queue`)   | HTTP handler | engine thread puts (via the loop), handler takes | the handler |
| `ServeMetrics`                     | main thread  | both (under its lock)   | —                           |
| `drain_at`, `stopping`             | main thread / signal handler | engine thread reads | —          |

**Life of a request here.** A handler checks the request, makes a `Ticket` and submits it; the
engine thread takes it from the inbox, stamps its arrival and `Engine.add`s it; the engine
admits it when a running slot and the KV budget allow; each `Committed` event posts
`("tokens", ids)`, the `Finished` event posts `("finished", stop_reason)`. A handler whose client
went away (or whose stop string appeared) submits an abort: the engine cancels the request's
runs and frees its cells (`Engine.abort`).

**Shutting down.** `drain(grace_s)`: no new request is taken; those still running after
`grace_s` are aborted (their clients get finish_reason "abort"). `stop()`: abort what is left,
wait out the micro-batches still in flight, end the thread; the main thread then closes the
pipeline (every stage process and shared-memory segment).
"""

from __future__ import annotations

import asyncio
import math
import queue
import threading
import time
from collections import deque
from collections.abc import Callable

from .errors import InputError, MinipipeError
from .events import Committed, Event, Finished
from .request import Request


class Ticket:
    """One HTTP request's link to the engine: the `Request`, and the asyncio queue its events
    arrive on (`("tokens", ids)`, `("finished", stop_reason)`, `("failure", status, message)`).
    Made on the event loop's thread; `post` may be called from any thread."""

    def __init__(self, request: Request, loop: asyncio.AbstractEventLoop, received_s: float):
        self.request = request
        self.id = request.id
        self.loop = loop
        self.queue: asyncio.Queue = asyncio.Queue()
        self.received_s = received_s  # time.monotonic() when the HTTP request came in
        self.first_token_s: float | None = None  # engine thread: when its first token was committed
        self.last_token_s: float | None = None
        self.over = False  # the handler saw its end (finished or failed): nothing to abort

    def post(self, item: tuple) -> None:
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop is closed: nobody is listening any more
            pass


# ----------------------------------------------------------------------------------------------
# metrics


class Histogram:
    """A Prometheus histogram: counts per upper bound `le` (cumulative when rendered), sum, count."""

    def __init__(self, buckets: tuple[float, ...]):
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)  # the last one: +Inf
        self.sum, self.count = 0.0, 0

    def observe(self, value: float) -> None:
        i = next((i for i, b in enumerate(self.buckets) if value <= b), len(self.buckets))
        self.counts[i] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, total = [], 0
        for bound, n in zip([*map(_num, self.buckets), "+Inf"], self.counts):
            total += n
            out.append(f'{name}_bucket{{le="{bound}"}} {total}')
        return out + [f"{name}_sum {_num(self.sum)}", f"{name}_count {self.count}"]


def _num(x: float) -> str:
    return repr(float(x)) if isinstance(x, float) else str(x)


LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
GAP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServeMetrics:
    """What `GET /metrics` reports (Prometheus text format). Definitions:

    * **time to first token** — from the HTTP request's arrival (after its body was read) to the
      commit of its first token by the engine (queueing included).
    * **time between tokens** — per generated token after the first: the time since the token
      before it was committed. Tokens committed together (an accepted draft) count 0 after the
      first of the group, so speculation shows as many near-zero gaps.
    * **tokens per second** — tokens committed over the last `window_s` seconds, divided by it.
    * **acceptance rate** — drafted tokens the target confirmed / drafted tokens, over finished
      requests (speculative strategies; SpecPipe counts tree nodes drafted and tip hits).
    * **KV cells** — per stage: *reserved* is what the engine's admission holds for running
      requests (prompt + token budget + speculation in flight, `Engine.reservation`); *in use*
      is the running requests' committed text (prompt + generated tokens), the cells that hold
      it in every stage's cache. Both return to 0 when no request runs.
    """

    def __init__(self, window_s: float = 10.0, info: dict | None = None):
        self.lock = threading.Lock()
        self.window_s = window_s
        self.info = dict(info or {})
        self.started_s = time.monotonic()
        self.commits: deque[tuple[float, int]] = deque()  # (time, tokens) within the window
        self.ttft = Histogram(LATENCY_BUCKETS)
        self.tbt = Histogram(GAP_BUCKETS)
        self.latency = Histogram(LATENCY_BUCKETS)
        self.counters = {"requests_total": 0, "rejected_total": 0, "prompt_tokens_total": 0,
                         "generation_tokens_total": 0, "draft_tokens_total": 0, "accepted_draft_tokens_total": 0}
        self.finished: dict[str, int] = {}  # stop reason -> requests
        self.gauges = {"requests_running": 0, "requests_waiting": 0, "requests_in_server": 0,
                       "kv_cells_reserved": 0, "kv_cells_in_use": 0}

    def count(self, name: str, n: int = 1) -> None:
        with self.lock:
            self.counters[name] += n

    def set(self, **values) -> None:
        with self.lock:
            self.gauges.update(values)

    def tokens(self, ticket: Ticket, n: int, now: float) -> None:
        with self.lock:
            self.counters["generation_tokens_total"] += n
            self.commits.append((now, n))
            if ticket.first_token_s is None:
                ticket.first_token_s = now
                self.ttft.observe(now - ticket.received_s)
                gaps = [0.0] * (n - 1)
            else:
                gaps = [now - ticket.last_token_s] + [0.0] * (n - 1)
            ticket.last_token_s = now
            for g in gaps:
                self.tbt.observe(g)

    def finish(self, ticket: Ticket, reason: str, now: float) -> None:
        stats = getattr(ticket.request, "stats", None)
        d = stats.to_dict() if stats is not None and hasattr(stats, "to_dict") else {}
        with self.lock:
            self.finished[reason] = self.finished.get(reason, 0) + 1
            self.latency.observe(now - ticket.received_s)
            self.counters["draft_tokens_total"] += int(d.get("drafted") or 0)
            self.counters["accepted_draft_tokens_total"] += int(d.get("accepted") or 0)

    def retry_after_s(self, in_server: int, max_running: int) -> int:
        """Seconds a client refused with 429 should wait: about until the requests ahead of it
        have been served. The server holds `in_server` requests and runs `max_running` at a
        time, so a newcomer waits about ceil(in_server / max_running) rounds of the mean latency
        of the requests finished so far (1 s before any has finished); at least 1, at most 60."""
        with self.lock:
            mean = self.latency.sum / self.latency.count if self.latency.count else 1.0
        rounds = -(-max(1, in_server) // max(1, max_running))
        return int(min(60, max(1, math.ceil(rounds * mean))))

    def tokens_per_s(self, now: float) -> float:
        while self.commits and self.commits[0][0] < now - self.window_s:
            self.commits.popleft()
        span = min(self.window_s, max(now - self.started_s, 1e-9))
        return sum(n for _, n in self.commits) / span

    def render(self) -> str:
        """The Prometheus text exposition (format 0.0.4)."""
        now = time.monotonic()
        out: list[str] = []

        def metric(name: str, kind: str, help_: str, lines: list[str]) -> None:
            out.extend([f"# HELP minipipe_{name} {help_}", f"# TYPE minipipe_{name} {kind}"])
            out.extend(f"minipipe_{line}" for line in lines)

        with self.lock:
            g, c = self.gauges, self.counters
            labels = ",".join(f'{k}="{_escape(v)}"' for k, v in self.info.items())
            metric("info", "gauge", "The served model and how it is decoded.", [f"info{{{labels}}} 1"])
            metric("requests_running", "gauge", "Requests being decoded now.", [f"requests_running {g['requests_running']}"])
            metric("requests_waiting", "gauge", "Requests accepted and waiting for a running slot or KV room.",
                   [f"requests_waiting {g['requests_waiting']}"])
            metric("requests_in_server", "gauge", "HTTP requests accepted and not yet answered (the bounded queue).",
                   [f"requests_in_server {g['requests_in_server']}"])
            metric("requests_total", "counter", "Requests accepted.", [f"requests_total {c['requests_total']}"])
            metric("requests_rejected_total", "counter", "Requests refused with 429 (queue full).",
                   [f"requests_rejected_total {c['rejected_total']}"])
            metric("requests_finished_total", "counter", "Requests finished, by the engine's stop reason.",
                   [f'requests_finished_total{{reason="{r}"}} {n}' for r, n in sorted(self.finished.items())]
                   or ['requests_finished_total{reason="eos"} 0'])
            metric("prompt_tokens_total", "counter", "Prompt tokens of accepted requests.",
                   [f"prompt_tokens_total {c['prompt_tokens_total']}"])
            metric("generation_tokens_total", "counter", "Tokens committed.",
                   [f"generation_tokens_total {c['generation_tokens_total']}"])
            metric("tokens_per_second", "gauge", f"Tokens committed per second over the last {self.window_s:g} s.",
                   [f"tokens_per_second {self.tokens_per_s(now):.3f}"])
            metric("time_to_first_token_seconds", "histogram", "Request arrival to its first committed token.",
                   self.ttft.lines("time_to_first_token_seconds"))
            metric("time_between_tokens_seconds", "histogram",
                   "Per token after the first: time since the previous token's commit (0 within a group).",
                   self.tbt.lines("time_between_tokens_seconds"))
            metric("request_latency_seconds", "histogram", "Request arrival to its end.",
                   self.latency.lines("request_latency_seconds"))
            drafted, accepted = c["draft_tokens_total"], c["accepted_draft_tokens_total"]
            metric("draft_tokens_total", "counter", "Drafted tokens verified (finished requests).",
                   [f"draft_tokens_total {drafted}"])
            metric("accepted_draft_tokens_total", "counter", "Drafted tokens the target confirmed.",
                   [f"accepted_draft_tokens_total {accepted}"])
            metric("acceptance_rate", "gauge", "accepted_draft_tokens_total / draft_tokens_total (NaN: none drafted).",
                   [f"acceptance_rate {accepted / drafted if drafted else math.nan}"])
            metric("kv_cells_reserved", "gauge", "KV cells per stage reserved by running requests.",
                   [f"kv_cells_reserved {g['kv_cells_reserved']}"])
            metric("kv_cells_in_use", "gauge", "KV cells per stage holding running requests' committed text.",
                   [f"kv_cells_in_use {g['kv_cells_in_use']}"])
            if "kv_cells_budget" in g:
                metric("kv_cells_budget", "gauge", "The KV budget per stage (--kv-cells).",
                       [f"kv_cells_budget {g['kv_cells_budget']}"])
        return "\n".join(out) + "\n"


def _escape(value) -> str:
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


# ----------------------------------------------------------------------------------------------
# the engine thread


class EngineHost:
    """Runs an `Engine` over `pipe` in its own thread (see the module docstring).

    tick_s: the longest the engine thread waits for an answer before it looks at its inbox again
    (a new request waits at most about this long to be added). on_failure: called once, on the
    engine thread, if the engine raised (a stage crashed): the server should stop.
    """

    def __init__(self, pipe, strategy, max_running: int, kv_cells: int | None, max_positions: int,
                 metrics: ServeMetrics, on_failure: Callable[[str], None] | None = None, tick_s: float = 0.005):
        self.pipe, self.strategy = pipe, strategy
        self.max_running, self.kv_cells, self.max_positions = max_running, kv_cells, max_positions
        self.metrics, self.on_failure, self.tick_s = metrics, on_failure, tick_s
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.tickets: dict = {}  # engine thread only: request id -> ticket, while the engine has it
        self.in_inbox = 0  # tickets submitted and not yet taken (under `_count_lock`: both threads change it)
        self._count_lock = threading.Lock()
        self.drain_at: float | None = None  # time.monotonic() after which running requests are aborted
        self.stopping = threading.Event()
        self.failure: str | None = None
        self.engine = None
        self.thread = threading.Thread(target=self._main, name="minipipe-engine", daemon=True)
        if kv_cells is not None:
            metrics.set(kv_cells_budget=kv_cells)

    # --- called from other threads ------------------------------------------------------------

    def start(self) -> None:
        self.thread.start()

    def submit(self, ticket: Ticket) -> None:
        with self._count_lock:
            self.in_inbox += 1
        self.inbox.put(("add", ticket))

    def abort(self, request_id) -> None:
        self.inbox.put(("abort", request_id))

    def drain(self, grace_s: float) -> None:
        """Take no new request; abort those still running `grace_s` seconds from now."""
        if self.drain_at is None:
            self.drain_at = time.monotonic() + grace_s
        self.inbox.put(("wake", None))

    def stop(self, timeout: float = 30.0) -> None:
        """Abort what is left, wait for the thread to end (the pipeline is then free to close)."""
        self.stopping.set()
        self.inbox.put(("wake", None))
        if self.thread.is_alive():
            self.thread.join(timeout)

    def reservation(self, prompt_len: int, max_new_tokens: int) -> int:
        """KV cells a request would reserve (as `Engine.reservation`), to refuse one that never fits."""
        return min(prompt_len + max_new_tokens, self.max_positions) + self.strategy.speculative_cells()

    # --- the engine thread ----------------------------------------------------------------------

    def _main(self) -> None:
        from .engine import Engine

        try:
            engine = self.engine = Engine(self.pipe, self.strategy, self.max_running, self.kv_cells,
                                          self.max_positions, [self._on_event])
            while True:
                self._take_commands(engine, block=engine.idle())
                self._gauges(engine)  # (an abort or an admission shows at once)
                ending = self.stopping.is_set() or self.drain_at is not None and time.monotonic() >= self.drain_at
                if ending:
                    for request_id in [r.id for r in engine.waiting] + [d.request.id for d in engine.running]:
                        engine.abort(request_id)
                if not engine.idle():
                    engine.step(timeout=self.tick_s)
                self._gauges(engine)
                if self.stopping.is_set() and engine.idle() and self.inbox.empty():
                    return
        except BaseException as e:  # a stage crashed or stalled; or a bug: end every request
            self.failure = str(e) if isinstance(e, MinipipeError) else f"{type(e).__name__}: {e}"
            for ticket in self.tickets.values():
                ticket.post(("failure", 503, f"the engine stopped: {self.failure}"))
            self.tickets.clear()
            self._refuse_inbox(f"the engine stopped: {self.failure}")
            if self.on_failure is not None:
                self.on_failure(self.failure)
            if not isinstance(e, Exception):
                raise

    def _take_commands(self, engine, block: bool) -> None:
        try:
            command, arg = self.inbox.get(timeout=0.05) if block else self.inbox.get_nowait()
        except queue.Empty:
            return
        while True:
            if command == "add":
                with self._count_lock:
                    self.in_inbox -= 1
                self._add(engine, arg)
            elif command == "abort":
                engine.abort(arg)
            try:
                command, arg = self.inbox.get_nowait()
            except queue.Empty:
                return

    def _add(self, engine, ticket: Ticket) -> None:
        if self.stopping.is_set() or self.drain_at is not None:
            ticket.post(("failure", 503, "the server is shutting down"))
            return
        request = ticket.request
        request.arrival_s = max(0.0, self.pipe.now() - engine.t0)  # it arrives now
        try:
            engine.add(request)
        except InputError as e:
            ticket.post(("failure", 400, str(e)))
            return
        self.tickets[request.id] = ticket

    def _refuse_inbox(self, message: str) -> None:
        while True:
            try:
                command, arg = self.inbox.get_nowait()
            except queue.Empty:
                return
            if command == "add":
                arg.post(("failure", 503, message))

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Committed):
            ticket = self.tickets.get(event.request)
            if ticket is not None:
                self.metrics.tokens(ticket, len(event.tokens), time.monotonic())
                ticket.post(("tokens", tuple(int(t) for t in event.tokens)))
        elif isinstance(event, Finished):
            ticket = self.tickets.pop(event.request, None)
            if ticket is not None:
                self.metrics.finish(ticket, event.stop_reason, time.monotonic())
                ticket.post(("finished", event.stop_reason))

    def _gauges(self, engine) -> None:
        self.metrics.set(requests_running=len(engine.running),
                         requests_waiting=len(engine.waiting) + self.in_inbox,
                         kv_cells_reserved=engine.reserved,
                         kv_cells_in_use=sum(len(d.request.prompt) + len(d.request.sink.tokens)
                                             for d in engine.running))
