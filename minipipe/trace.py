"""Traces: what each stage and the head did, and when — as Chrome trace JSON or a text timeline.

An event is one slice of work on one track ("head", "stage 0", ...):

    kind       what it marks
    run        a run's whole visit to a stage (or a head phase such as drafting, verifying)
    layer      one layer of a run (local runtime, which steps layer by layer)
    cancel     a run skipped or stopped by early cancellation (instant or slice)
    kv         a KV edit applied (instant)
    commit     tokens committed by the head (instant)

`write_chrome(path)` writes the Chrome trace-event format (open it in https://ui.perfetto.dev or
chrome://tracing); `timeline()` renders the same events as text for a terminal.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

RUN_GLYPHS = "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


@dataclass
class Event:
    track: str  # "head", "stage 0", ...
    name: str
    start: float  # seconds
    end: float  # seconds (== start for an instant)
    kind: str = "run"
    run_id: int | None = None
    args: dict = field(default_factory=dict)


class Tracer:
    def __init__(self, enabled: bool = True):
        self.enabled = enabled
        self.events: list[Event] = []

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
        def order(track: str):
            return (0, 0) if track == "head" else (1, int(track.split()[-1])) if track.startswith("stage") else (2, 0)
        return sorted({e.track for e in self.events}, key=order)

    def write_chrome(self, path: str | Path) -> None:
        """Chrome trace-event JSON: one thread per track, slices for work, instants for edits."""
        tracks = self.tracks()
        t0 = min((e.start for e in self.events), default=0.0)
        out = [{"name": "process_name", "ph": "M", "pid": 1, "args": {"name": "minipipe"}}]
        for tid, track in enumerate(tracks):
            out.append({"name": "thread_name", "ph": "M", "pid": 1, "tid": tid, "args": {"name": track}})
            out.append({"name": "thread_sort_index", "ph": "M", "pid": 1, "tid": tid, "args": {"sort_index": tid}})
        for e in self.events:
            common = {"name": e.name, "cat": e.kind, "pid": 1, "tid": tracks.index(e.track),
                      "ts": round((e.start - t0) * 1e6, 3),
                      "args": {**({"run_id": e.run_id} if e.run_id is not None else {}), **e.args}}
            if e.end > e.start:
                out.append({**common, "ph": "X", "dur": round((e.end - e.start) * 1e6, 3)})
            else:
                out.append({**common, "ph": "i", "s": "t"})
        Path(path).write_text(json.dumps({"traceEvents": out, "displayTimeUnit": "ms"}))

    def timeline(self, width: int = 100, kinds: tuple[str, ...] = ("run",)) -> str:
        """A text timeline: one row per track, one column per time bucket.

        A busy bucket shows the run id's last glyph (0-9a-zA-Z, cycling), `x` marks a
        cancellation, `K` a KV edit, `C` a commit; `.` is idle.
        """
        if not self.events:
            return "(no events)"
        t0 = min(e.start for e in self.events)
        t1 = max(e.end for e in self.events)
        span = max(t1 - t0, 1e-12)
        step = span / width
        rows = []
        label_width = max(len(t) for t in self.tracks())
        for track in self.tracks():
            cells = ["."] * width
            for e in self.events:
                if e.track != track:
                    continue
                a = min(width - 1, int((e.start - t0) / step))
                b = min(width - 1, max(a, int((e.end - t0) / step - 1e-9)))
                if e.kind in kinds and e.end > e.start:
                    glyph = RUN_GLYPHS[e.run_id % len(RUN_GLYPHS)] if e.run_id is not None else "#"
                    for c in range(a, b + 1):
                        cells[c] = glyph
                elif e.kind == "cancel":
                    cells[a] = "x"
                elif e.kind == "kv":
                    cells[a] = "K" if cells[a] == "." else cells[a]
                elif e.kind == "commit":
                    cells[a] = "C"
            rows.append(f"{track:>{label_width}} |{''.join(cells)}|")
        unit, scale = ("ms", 1e3) if span < 10 else ("s", 1.0)
        rows.append(f"{'':>{label_width}}  0{'':<{width - 12}}{span * scale:>10.2f} {unit}")
        return "\n".join(rows)
