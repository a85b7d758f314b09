"""Structured events: what the engine and the strategies decide, as data.

Strategies never print, count or draw. Each decision is an event, and whoever wants to know
subscribes: the metrics count them (`stats_of`), the narrator turns them into sentences for
step-through examples, the trace marks them on the head's timeline. So an algorithm reads as
the algorithm, without its bookkeeping.

| event       | when                                                                  |
|-------------|-----------------------------------------------------------------------|
| `Admitted`  | a request leaves the queue and starts (its sequence block is given)   |
| `Launched`  | a strategy sends rows into the pipeline (a part of a micro-batch)     |
| `Answered`  | a part's answer reached the strategy (`cancelled`: a stub, no tokens) |
| `Committed` | tokens became final (the user sees them)                              |
| `Drafted`   | the draft proposed tokens, with its probabilities and the cutoff used |
| `Verified`  | drafted tokens were checked against the target's tokens               |
| `Cancelled` | the strategy cancelled a part, or pruned tree nodes (SpecPipe)        |
| `KVEdited`  | KV edits sent, labelled view / commit / release                       |
| `Stepped`   | SpecPipe: an answer held the tip; `hit` says whether a child matched  |
| `Finished`  | a request's stop rule fired (or it was aborted); its cells are freed  |
| `Batched`   | the engine sent a micro-batch: which requests' parts share it         |

Every event carries the head's time `t` (virtual on the local runtime) and the request's id.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True)
class Event:
    t: float
    request: str | int


@dataclass(frozen=True)
class Admitted(Event):
    seqs: range  # the request's sequence block
    queued_s: float


@dataclass(frozen=True)
class Launched(Event):
    part: int  # the part's id (also its rows' cancellation key unless nodes carry their own)
    kind: str  # "prefill", "plain", "speculative", "verify", "tree layer"
    tokens: tuple[int, ...]
    positions: tuple[int, ...]
    seqs: tuple[tuple[int, ...], ...]  # per row
    in_flight: int = 1  # the request's parts in flight, this one included


@dataclass(frozen=True)
class Answered(Event):
    part: int
    tokens: tuple[int, ...]  # the target's token per wanted row ( () when cancelled)
    cancelled: bool = False
    layers_skipped: int = 0  # stage-layers the pipeline skipped for it
    too_late: bool = False  # the strategy had cancelled it, but every stage had computed it already


@dataclass(frozen=True)
class Committed(Event):
    tokens: tuple[int, ...]
    part: int | None = None  # the part whose answer proved them


@dataclass(frozen=True)
class Drafted(Event):
    tokens: tuple[int, ...]  # proposed tokens (in the order they were added to the tree)
    probs: tuple[float, ...]  # the draft's probability of each
    cutoff: float | None = None  # the confidence below which drafting stopped (PipeInfer)
    stopped_at: float | None = None  # the probability that fell below the cutoff, if one did
    draft_rows: int = 0  # draft-model rows computed for it while the head waited (the drafting cost)
    ahead: int = 0  # questions to the draft it asked that were answered ahead of need, on the draft's lane


@dataclass(frozen=True)
class Verified(Event):
    part: int
    drafted: int  # tokens drafted in the verified run
    depth: int  # its deepest drafted position (1-based)
    accepted: int  # drafted tokens the target confirmed
    outcome: str = "ok"  # PipeInfer: "ok", or why the answer was not used: "stale", "diverged", "cancelled"
    coupled_accepted: int | None = None  # --verify mss: what coupled verification would have accepted


@dataclass(frozen=True)
class Cancelled(Event):
    ids: tuple[int, ...]  # parts (or SpecPipe tree nodes) whose rows the stages drop
    reason: str


@dataclass(frozen=True)
class KVEdited(Event):
    label: str  # "view", "commit", "release", "free"
    edits: tuple = ()  # the KVRemove / KVCopy edits


@dataclass(frozen=True)
class Stepped(Event):
    token: int  # the target's token at the tip
    hit: bool  # a child of the tip carried it
    pruned: int  # tree nodes pruned by this step


@dataclass(frozen=True)
class Finished(Event):
    stop_reason: str
    n_tokens: int


@dataclass(frozen=True)
class Batched(Event):
    """The engine's, not a request's (`request` is "*")."""

    run: int  # the micro-batch's run id
    parts: tuple[tuple[str | int, int, int], ...]  # (request, part, rows) for each part in it
    prefill: bool = False


Listener = Callable[[Event], None]


@dataclass
class EventBus:
    """Delivers every event to every listener, in order."""

    listeners: list[Listener] = field(default_factory=list)

    def subscribe(self, listener: Listener) -> None:
        self.listeners.append(listener)

    def emit(self, event: Event) -> None:
        for listener in self.listeners:
            listener(event)


class Narrator:
    """Turns events into one sentence each, for step-through examples and teaching.

    `text(token)` may give each token's text (shown next to its id). Requests are named only
    when there are several (`show_request`).
    """

    def __init__(self, say: Callable[[str], None] = print, text: Callable[[int], str] | None = None,
                 show_request: bool = False):
        self.say, self.text, self.show_request = say, text, show_request

    def tok(self, tokens) -> str:
        if self.text is None:
            return str(list(tokens))
        return "[" + ", ".join(f"{t} {self.text(t)!r}" for t in tokens) + "]"

    def __call__(self, e: Event) -> None:
        line = self.sentence(e)
        if line:
            self.say((f"[{e.request}] " if self.show_request and not isinstance(e, Batched) else "") + line)

    def sentence(self, e: Event) -> str | None:
        if isinstance(e, Admitted):
            return f"admitted after {e.queued_s * 1e3:.1f} ms in the queue; sequences {e.seqs.start}..{e.seqs.stop - 1}"
        if isinstance(e, Launched):
            where = (f"positions {e.positions[0]}..{e.positions[-1]}" if len(e.positions) > 1
                     else f"position {e.positions[0]}")
            seqs = sorted({s for row in e.seqs for s in row})
            return f"launch {e.kind} run {e.part}: tokens {self.tok(e.tokens)} at {where}, sequences {seqs}"
        if isinstance(e, Answered):
            if e.cancelled:
                return f"run {e.part} comes back as a cancelled stub ({e.layers_skipped} stage-layers skipped)"
            late = " (cancelled too late: every stage had computed it)" if e.too_late else ""
            return f"run {e.part} answers {self.tok(e.tokens)}{late}"
        if isinstance(e, Committed):
            return f"commit {self.tok(e.tokens)}"
        if isinstance(e, Drafted):
            stop = "" if e.stopped_at is None else f"the next guess has p={e.stopped_at:.3f} < cutoff {e.cutoff:.3f}"
            if not e.tokens:
                return f"draft nothing: {stop or 'no guess'}"
            probs = ", ".join(f"{p:.2f}" for p in e.probs)
            cut = "" if e.cutoff is None else f" (cutoff {e.cutoff:.3f})"
            return f"draft {self.tok(e.tokens)} with p = [{probs}]{cut}" + (f"; {stop}" if stop else "")
        if isinstance(e, Verified):
            why = {"stale": "the committed text has already moved past it: ignored",
                   "diverged": "it assumed a token the target did not choose: ignored",
                   "cancelled": "it was cancelled: ignored"}
            if e.outcome in why:
                return f"verify run {e.part}: {why[e.outcome]}"
            return f"verify run {e.part}: {e.accepted} of {e.drafted} drafted token(s) accepted"
        if isinstance(e, Cancelled):
            return f"cancel {list(e.ids)}: {e.reason}"
        if isinstance(e, KVEdited):
            return f"KV {e.label}: " + "; ".join(kv_label(x) for x in e.edits)
        if isinstance(e, Stepped):
            what = "hit" if e.hit else "miss"
            pruned = f", {e.pruned} node(s) pruned" if e.pruned else ""
            return f"{what}: the target chose {self.tok([e.token])} at the tip{pruned}"
        if isinstance(e, Finished):
            return f"finished ({e.stop_reason}) after {e.n_tokens} token(s); its cells are freed"
        if isinstance(e, Batched):
            shares = " + ".join(f"{r}:part {p} ({n} row{'s' * (n != 1)})" for r, p, n in e.parts)
            return f"micro-batch {e.run} = {shares}"
        return None


def kv_label(edit) -> str:
    """`seq_rm(3, 0, ∞)` / `seq_cp(0->3, 0, 7)`: a KV edit as the cache call it makes."""
    p1 = "∞" if edit.p1 is None else edit.p1
    if hasattr(edit, "src"):
        return f"seq_cp({edit.src}->{edit.dst}, {edit.p0}, {p1})"
    return f"seq_rm({'all' if edit.seq is None else edit.seq}, {edit.p0}, {p1})"
