"""Traces: what each stage and the head did, and when — as Chrome trace JSON or a text timeline.

An event is one slice of work (or an instant) on one track ("head", "stage 0", ...):

    kind       what it marks
    run        a run's whole visit to a stage (or a head phase)
    layer      one layer of a run (local runtime, which steps layer by layer)
    cancel     a run skipped or stopped by early cancellation (instant, or the slice it computed)
    kv         a KV edit applied by a stage, or sent by the head (instant)
    commit     tokens committed by the head (instant)
    submit     the head sent a run, or a strategy launched a part (instant)
    answer     the head received a run's answer (instant; recorded by `TracedPipeline`)
    draft      the head's draft model at work (slice)

Two renderings of the same events:

* `write_chrome(path)` — Chrome trace-event JSON for https://ui.perfetto.dev or chrome://tracing:
  one thread per track, slices for work, instants for edits, **flow arrows for every hop** of a
  run (head → stage 0 → … → last stage → head), stage KV edits named by what they do (view,
  commit, release, free: the labels the strategies gave them, matched in submission order, since
  every stage applies every edit in that order). Times are rounded to whole nanoseconds *before*
  durations are taken, so a slice that lies inside another still does after rounding.
* `timeline(width)` — text for a terminal: one row per track, one column per time bucket, with
  markers that can never be mistaken for a run id (`MARKERS`) and a legend.

`TracedPipeline` wraps a pipeline to record what the head sends and receives (the labels of KV
edits, answers, the messages themselves for `minipipe.viewer`); `TracedDraft` records the
draft's work on the head's track where no virtual clock charges it (the process runtime).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

RUN_GLYPHS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"
# timeline markers: none of them is a run glyph, so `x` is always run 33, never a cancellation
MARKERS = {"cancel": "!", "kv": "~", "commit": "+", "submit": ">", "draft": "="}
_PRIORITY = {"+": 5, "!": 4, ">": 3, "~": 2, "=": 1, ".": 0}  # which instant wins a shared bucket
LEGEND = ("0-9a-zA-Z  work on a run (the run id's last base-62 digit: run 33 is 'x', run 46 is 'K')\n"
          "!  a run cancelled or skipped (on a stage), a cancellation sent (head)\n"
          "~  a KV edit applied (stage) or sent (head)    +  tokens committed    >  a run launched\n"
          "=  the draft model at work                     .  idle")


@dataclass
class Event:
    track: str  # "head", "stage 0", ...
    name: str
    start: float  # seconds
    end: float  # seconds (== start for an instant)
    kind: str = "run"
    run_id: int | None = None
    args: dict = field(default_factory=dict)


def _track_order(track: str):
    return (0, 0) if track == "head" else (1, int(track.split()[-1])) if track.startswith("stage") else (2, 0)


class Tracer:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.events: list[Event] = []
        self.kv_labels: list[str] = []  # what each KV message the head sent does, in submission order

    def record(self, track: str, name: str, start: float, end: float, kind: str = "run",
               run_id: int | None = None, **args) -> None:
        if self.enabled:
            self.events.append(Event(track, name, start, end, kind, run_id, args))

    def instant(self, track: str, name: str, t: float, kind: str, run_id: int | None = None, **args) -> None:
        self.record(track, name, t, t, kind, run_id, **args)

    def extend(self, events: list[dict]) -> None:
        """Add events recorded elsewhere (a stage process sends them as dicts)."""
        if self.enabled:
            self.events.extend(Event(**e) for e in events)

    def as_dicts(self) -> list[dict]:
        return [asdict(e) for e in self.events]

    # ------------------------------------------------------------------------------------------

    def tracks(self) -> list[str]:
        return sorted({e.track for e in self.events}, key=_track_order)

    def stage_kv_labels(self) -> dict[int, str]:
        """id(event) -> "view" / "commit" / ... for every stage KV event whose label is known: the
        n-th KV event of a stage is the n-th KV message the head sent."""
        out, seen = {}, {}
        for e in self.events:  # each track's events are in the order the stage handled them
            if e.kind == "kv" and e.track.startswith("stage"):
                n = seen.get(e.track, 0)
                seen[e.track] = n + 1
                if n < len(self.kv_labels):
                    out[id(e)] = self.kv_labels[n]
        return out

    def write_chrome(self, path: str | Path) -> None:
        """Chrome trace-event JSON (see the module docstring)."""
        Path(path).write_text(json.dumps(self.chrome()))

    def chrome(self) -> dict:
        tracks = self.tracks()
        tid = {track: i for i, track in enumerate(tracks)}
        t0 = min((e.start for e in self.events), default=0.0)

        def ns(t: float) -> int:  # whole nanoseconds since the first event: one grid for starts and ends
            return round((t - t0) * 1e9)

        def us(n: int) -> float:
            return round(n / 1000, 3)

        labels = self.stage_kv_labels()
        out = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "minipipe"}}]
        for track in tracks:
            out.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid[track], "args": {"name": track}})
            out.append({"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": tid[track],
                        "args": {"sort_index": tid[track]}})
        hops: dict[int, list[tuple[int, int, int, int]]] = {}  # run id -> (start ns, end ns, tid, leg)
        for e in self.events:
            a, b = ns(e.start), ns(e.end)
            name = f"{labels[id(e)]}: {e.name}" if id(e) in labels else e.name
            common = {"name": name, "cat": e.kind, "pid": 1, "tid": tid[e.track], "ts": us(a),
                      "args": {**({"run_id": e.run_id} if e.run_id is not None else {}), **e.args}}
            if e.track == "head" and e.kind in ("submit", "answer") and e.run_id is not None \
                    and not e.name.startswith("launch"):
                b = a + 1000  # a 1 µs slice, so the run's arrows have something to attach to
                hops.setdefault(e.run_id, []).append((a, b, tid[e.track], 0 if e.kind == "submit" else 2))
                out.append({**common, "ph": "X", "dur": us(b - a)})
            elif e.end > e.start:
                out.append({**common, "ph": "X", "dur": us(b - a)})
                if e.kind in ("run", "cancel") and e.track.startswith("stage") and e.run_id is not None:
                    hops.setdefault(e.run_id, []).append((a, b, tid[e.track], 1))
            else:
                out.append({**common, "ph": "i", "s": "t"})
                if e.kind == "cancel" and e.track.startswith("stage") and e.run_id is not None:
                    # a skipped run (a stub passed on): a 1 µs slice carries the arrows through
                    out.append({**common, "ph": "X", "dur": 1.0, "name": f"stub {e.run_id}"})
                    hops.setdefault(e.run_id, []).append((a, a + 1000, tid[e.track], 1))
        flow = 0
        for run_id, visits in sorted(hops.items()):
            # in the order the run travels: the head's submission, the stages in order, the answer
            visits.sort(key=lambda v: (v[3], v[2] if v[3] == 1 else 0, v[0]))
            for (a0, b0, t_from, _), (a1, b1, t_to, _) in zip(visits, visits[1:]):
                flow += 1
                # the arrow leaves from inside the source slice and lands inside the next one
                out.append({"name": f"run {run_id}", "cat": "hop", "ph": "s", "id": flow, "pid": 1, "tid": t_from,
                            "ts": us(max(a0, b0 - 1))})
                out.append({"name": f"run {run_id}", "cat": "hop", "ph": "f", "bp": "e", "id": flow, "pid": 1,
                            "tid": t_to, "ts": us(min(b1, a1 + 1))})
        return {"traceEvents": out, "displayTimeUnit": "ms"}

    def timeline(self, width: int = 100, kinds: tuple[str, ...] = ("run",), legend: bool = True) -> str:
        """A text timeline: one row per track, one column per time bucket of the run's span.

        A bucket where a stage works on a run shows the run id's glyph (`RUN_GLYPHS`, cycling);
        markers (`MARKERS`, never a run glyph) show cancellations, KV edits, commits, launches
        and drafting; `.` is idle. `kinds`: the slice kinds drawn as run glyphs.
        """
        if not self.events:
            return "(no events)"
        width = max(10, int(width))
        t0 = min(e.start for e in self.events)
        t1 = max(e.end for e in self.events)
        span = max(t1 - t0, 1e-12)
        step = span / width
        rows = []
        label_width = max(len(t) for t in self.tracks())
        for track in self.tracks():
            cells = ["."] * width

            def bucket(t: float) -> int:
                return min(width - 1, int((t - t0) / step))

            for e in self.events:
                if e.track != track:
                    continue
                a = bucket(e.start)
                b = min(width - 1, max(a, int((e.end - t0) / step - 1e-9)))
                if e.end > e.start and (e.kind in kinds or e.kind == "cancel"):
                    glyph = RUN_GLYPHS[e.run_id % len(RUN_GLYPHS)] if e.run_id is not None else "#"
                    for c in range(a, b + 1):
                        cells[c] = glyph
                    if e.kind == "cancel":
                        cells[b] = MARKERS["cancel"]  # where the stage stopped it
                elif e.end > e.start and e.kind == "draft":
                    for c in range(a, b + 1):
                        if cells[c] == ".":
                            cells[c] = MARKERS["draft"]
                elif e.end == e.start and e.kind in MARKERS:
                    glyph = MARKERS[e.kind]
                    if cells[a] not in _PRIORITY:  # a run glyph: only a cancellation or commit hides it
                        if e.kind in ("cancel", "commit"):
                            cells[a] = glyph
                    elif _PRIORITY[glyph] > _PRIORITY[cells[a]]:
                        cells[a] = glyph
            rows.append(f"{track:>{label_width}} |{''.join(cells)}|")
        unit, scale = ("ms", 1e3) if span < 10 else ("s", 1.0)
        axis = f"{span * scale:.2f} {unit}"
        rows.append(f"{'':>{label_width}}  0{axis:>{width}}")
        if legend:
            rows.append(LEGEND)
        return "\n".join(rows)


class TracedPipeline:
    """A pipeline that also records what the head sends and receives.

    It forwards every call to `pipe` and keeps, in order: each message submitted (`log`: head
    time, the message, and for KV edits their label), each cancellation, each answer received,
    and the label of
    every KV message in `tracer.kv_labels` (so `Tracer.write_chrome` can name the stages' edits).
    Subscribe `observe` to the engine's events: it learns each edit's label from `KVEdited`.
    """

    def __init__(self, pipe, tracer: Tracer | None = None):
        self.pipe = pipe
        self.tracer = tracer if tracer is not None else getattr(pipe, "tracer", None) or Tracer()
        # (head time, "submit" / "cancel" / "answer", the message or run id, a KV message's label)
        self.log: list[tuple[float, str, object, str | None]] = []
        self._labels: dict[int, tuple[object, str]] = {}  # id(edit) -> (edit, label); edits kept alive

    def __getattr__(self, name):
        return getattr(self.pipe, name)

    def observe(self, event) -> None:
        """An engine listener: remember which label each KV edit was sent under."""
        from .events import KVEdited

        if isinstance(event, KVEdited):
            for edit in event.edits:
                self._labels[id(edit)] = (edit, event.label)

    def submit(self, msg) -> None:
        from .transport.messages import KVEdits, Run

        label = None
        if not isinstance(msg, Run):
            edits = msg.edits if isinstance(msg, KVEdits) else [msg]
            label = next((self._labels.pop(id(e))[1] for e in edits if id(e) in self._labels), "edit")
            for e in edits:
                self._labels.pop(id(e), None)
            self.tracer.kv_labels.append(label)
        self.log.append((self.pipe.now(), "submit", msg, label))
        self.pipe.submit(msg)  # (both runtimes mark a run's submission on the head's track themselves)

    def submit_edits(self, edits: list) -> None:
        from .transport.messages import KVEdits

        if edits:
            self.submit(KVEdits(list(edits)) if len(edits) > 1 else edits[0])

    def cancel(self, run_id: int) -> None:
        self.pipe.cancel(run_id)
        self.log.append((self.pipe.now(), "cancel", run_id, None))

    def receive(self):
        answer = self.pipe.receive()
        t = self.pipe.now()
        self.log.append((t, "answer", answer, None))
        self.tracer.instant("head", f"answer {answer.run_id}", t, "answer", answer.run_id)
        return answer

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.pipe.close()


class TracedDraft:
    """A draft source whose work is recorded as `draft` slices on the head's track (real time;
    for the process runtime, where no virtual clock charges drafting). Every draft call goes
    through `top` or `top_many`, and the engine's batched drafting through the source's `pool`; consecutive
    calls merge into one slice. Forks are traced too, and share one traced pool (so the engine
    still batches their requests together)."""

    def __init__(self, inner, tracer: Tracer, now=time.monotonic, pools: dict | None = None):
        self.inner, self.tracer, self.now = inner, tracer, now
        self.pools = {} if pools is None else pools  # id(inner pool) -> its TracedPool

    def __getattr__(self, name):
        return getattr(self.inner, name)

    @property
    def tokens_computed(self) -> int:
        return self.inner.tokens_computed

    @property
    def pool(self):
        inner = getattr(self.inner, "pool", None)
        if inner is None:
            return None
        if id(inner) not in self.pools:
            self.pools[id(inner)] = TracedPool(inner, self)
        return self.pools[id(inner)]

    def fork(self, *args, **kwargs):
        return TracedDraft(self.inner.fork(*args, **kwargs), self.tracer, self.now, self.pools)

    def reset(self, *args, **kwargs) -> None:
        self.inner.reset(*args, **kwargs)

    def timed(self, work, *args, **kwargs):
        """`work(*args, **kwargs)`, recorded as drafting."""
        start = self.now()
        out = work(*args, **kwargs)
        end = self.now()
        last = self.tracer.events[-1] if self.tracer.events else None
        if last is not None and last.track == "head" and last.kind == "draft" and start - last.end < 50e-6:
            last.end = end  # one drafting burst, one slice
        else:
            self.tracer.record("head", "draft", start, end, "draft")
        return out

    def top(self, *args, **kwargs):
        return self.timed(self.inner.top, *args, **kwargs)

    def top_many(self, *args, **kwargs):
        return self.timed(self.inner.top_many, *args, **kwargs)

    def propose_chain(self, *args, **kwargs):
        # the source's own method, run on this wrapper so that its calls to `top` are timed
        return type(self.inner).propose_chain(self, *args, **kwargs)


class TracedPool:
    """A draft pool whose batched forwards (`prefetch`, one for many requests) are recorded as
    drafting, like `TracedDraft.top`."""

    def __init__(self, inner, traced: TracedDraft):
        self.inner, self.traced = inner, traced

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def prefetch(self, queries):
        return self.traced.timed(self.inner.prefetch, queries)

