"""The run viewer: one self-contained HTML page that replays a run step by step.

    minipipe generate "ROMEO:" --strategy pipeinfer --stages 3 --runtime local --html run.html

The page needs no network (plain JavaScript and SVG, inline). It shows the stages as lanes over
time (runs coloured by kind: prefill, plain, speculative, cancelled, pruned; hops as arrows;
commits as marks on the head's lane), and a step control (a slider, buttons, the arrow keys)
that shows, at every step, what happened and the state then: the committed text, the runs in
flight, the cancellation map, each stage's KV cells × sequences, and each request's token tree.

Terms:

* **step** — one moment of the replay: an engine event (a decision of the head: launch, draft,
  verify, commit, cancel, KV edits, ...), a message the head sends or an answer it receives,
  or a stage finishing a message (a run computed, skipped or cut short; KV edits applied).
  Steps are ordered by time (the head's clock: virtual on the local runtime, `time.monotonic`
  on the process runtime, which the stages share).
* **KV state of a stage** — reconstructed, not read from the stages: every stage applies every
  message in submission order, so replaying the messages through a plain-Python model of the
  cache's rules (`KVModel`, the same rules as `minipipe.kvcache.KVCache`: lowest free cell
  first, `seq_cp`, `seq_rm`) gives the cells each stage holds after each message. A run places
  a row unless the row (or the run) was cancelled before the stage started the run: the stage
  checks the cancellation map there, and a row dropped later keeps its cell. On the local
  runtime this is exact (`tests/test_viewer.py` compares it with the real caches after every
  message); on the process runtime a cancellation racing a stage's start may be placed on the
  wrong side.
* **token tree** — the head's view of its speculation: every row sent whose cell the head has
  not released yet, under the row whose cell it attends to at the previous position (its
  parent: found in the head's own model of the cache, where every message applies the moment
  it is sent).
"""

from __future__ import annotations

import html as html_lib
import json
from dataclasses import fields
from pathlib import Path

from . import events as ev
from .trace import TracedPipeline
from .transport.messages import KVCopy, KVEdits, KVRemove, Run

from .runtime.sizing import CANCEL_SLOTS as CANCEL_CAPACITY  # slots of the process runtime's cancellation map

# --------------------------------------------------------------------------------------------
# the KV cache's rules, in plain Python


class KVModel:
    """Cells with positions and sequence sets (the rules of `KVCache`, without K/V).

    `cells`: cell index -> [position, token, writer, set of sequences]; a cell no sequence sees
    is free, and `alloc` takes the lowest free index, as `KVCache.alloc` does.
    """

    def __init__(self):
        self.cells: dict[int, list] = {}

    def seen_by(self, seq: int) -> dict[int, int]:
        """position -> cell for the cells `seq` sees."""
        return {c[0]: i for i, c in self.cells.items() if seq in c[3]}

    def visible_at(self, seqs, pos: int) -> int | None:
        """The cell a row of `seqs` sees at `pos` (None: none)."""
        for i, c in self.cells.items():
            if c[0] == pos and c[3] & set(seqs):
                return i
        return None

    def alloc(self, pos: int, seqs, token: int, writer) -> int:
        i = 0
        while i in self.cells:
            i += 1
        self.cells[i] = [int(pos), int(token), writer, set(int(s) for s in seqs)]
        return i

    def apply(self, edit) -> None:
        if isinstance(edit, KVRemove):
            p1 = float("inf") if edit.p1 is None else edit.p1
            for i in list(self.cells):
                c = self.cells[i]
                if edit.p0 <= c[0] < p1:
                    if edit.seq is None:
                        c[3].clear()
                    else:
                        c[3].discard(edit.seq)
                    if not c[3]:
                        del self.cells[i]
        elif isinstance(edit, KVCopy):
            if edit.src == edit.dst:
                return
            p1 = float("inf") if edit.p1 is None else edit.p1
            have = self.seen_by(edit.dst)
            for i, c in self.cells.items():
                if edit.src in c[3] and edit.p0 <= c[0] < p1 and c[0] not in have:
                    c[3].add(edit.dst)

    def apply_message(self, msg) -> None:
        for edit in msg.edits if isinstance(msg, KVEdits) else [msg]:
            self.apply(edit)

    def snapshot(self) -> list[tuple[int, int, int, tuple[int, ...]]]:
        """(cell, position, token, sequences) for every used cell, by cell index."""
        return [(i, c[0], c[1], tuple(sorted(c[3]))) for i, c in sorted(self.cells.items())]


# --------------------------------------------------------------------------------------------
# recording a run


class Recording:
    """An engine listener that keeps everything the page replays.

    `pipe` is the `TracedPipeline` the engine drives (it logs messages and answers); `args` the
    command line's (strategy, runtime, model); `requests` the requests served.
    """

    def __init__(self, pipe: TracedPipeline, args=None, requests=(), decode=None):
        self.pipe, self.args, self.requests = pipe, args, list(requests)
        self.events: list[tuple[int, object]] = []  # (messages logged before it, event)
        self._decode = decode

    def __call__(self, event) -> None:
        self.events.append((len(self.pipe.log), event))

    def decode(self, token: int) -> str:
        if self._decode is None:
            try:
                from .config import load_config
                from .tokenizer import Tokenizer

                tok = Tokenizer(self.args.model, load_config(self.args.model).eos_ids)
                self._decode = lambda t: tok.decode([t])
            except Exception:  # noqa: BLE001 - a model without a tokenizer: show ids only
                self._decode = lambda t: f"<{t}>"
        return self._decode(token)

    def model(self) -> dict:
        """The page's data (see `build`)."""
        return build(self)

    def write_html(self, path) -> None:
        Path(path).write_text(render(self.model()))


def _event_dict(e) -> dict:
    out = {"type": type(e).__name__}
    for f in fields(e):
        value = getattr(e, f.name)
        if isinstance(value, range):
            value = [value.start, value.stop]
        elif f.name == "edits":
            value = [ev.kv_label(x) for x in value]
        elif isinstance(value, tuple):
            value = json.loads(json.dumps(value, default=str))
        out[f.name] = value
    return out


def build(rec: Recording) -> dict:
    """Turn a recording into the page's data: steps in time order, the lanes' slices and arrows,
    the runs, the cancellations, each stage's KV versions and the token tree's rows."""
    pipe, tracer = rec.pipe, rec.pipe.tracer
    n_stages = pipe.n_stages
    texts: dict[int, str] = {}

    def text(token: int) -> str:
        if token not in texts:
            texts[token] = rec.decode(int(token))
        return texts[token]

    narrator = ev.Narrator(say=lambda s: None, text=text, show_request=len(rec.requests) > 1)

    # --- parts and runs -----------------------------------------------------------------------
    launched: dict[int, ev.Launched] = {}
    run_parts: dict[int, list] = {}
    for _, e in rec.events:
        if isinstance(e, ev.Launched):
            launched[e.part] = e
        elif isinstance(e, ev.Batched):
            run_parts[e.run] = list(e.parts)
    runs: dict[int, dict] = {}
    rows: list[dict] = []  # every row sent: run, key, token, position, sequences, part, request, parent
    intent = KVModel()  # the head's view: every message applies when it is sent
    cancel_times: dict[int, float] = {}  # cancellation key -> when the head marked it

    steps: list[dict] = []  # {t, order, who, text, ...}

    def step(t: float, order: tuple, who: str, line: str, **extra) -> int:
        """Add a step; returns its uid (its index before the steps are sorted by time)."""
        steps.append({"t": t, "order": order, "who": who, "text": line, "uid": len(steps), **extra})
        return len(steps) - 1

    run_order: list[int] = []
    for n, (t, what, msg, label) in enumerate(pipe.log):
        order = (0, n, 0)
        if what == "cancel":
            cancel_times.setdefault(msg, t)
            step(t, order, "head", f"the head marks {msg} cancelled: slot {msg % CANCEL_CAPACITY} of the "
                 f"cancellation map now holds {msg}", cancel=msg)
            continue
        if what == "answer":
            info = runs.get(msg.run_id)
            if info is not None:
                info["answered"] = t
            kind = "a cancelled stub" if not hasattr(msg, "tokens") else \
                f"tokens {[int(x) for x in msg.tokens]}"
            step(t, order, "head", f"the head receives run {msg.run_id}'s answer: {kind}", answer=msg.run_id)
            continue
        if isinstance(msg, Run):
            b = msg.batch
            parts = run_parts.get(msg.run_id) or [("?", None, b.n_rows)]
            owner, j = [], 0
            for request, part, n_rows in parts:
                owner += [(request, part)] * n_rows
            kinds = sorted({launched[p].kind for _, p, _ in parts if p in launched}) or ["?"]
            info = {"id": msg.run_id, "sent": t, "rows": b.n_rows, "kinds": kinds,
                    "prefill": bool(b.prefill), "speculative": bool(msg.speculative),
                    "parts": [[str(r), p, n_rows] for r, p, n_rows in parts], "answered": None, "first_row": len(rows)}
            runs[msg.run_id] = info
            run_order.append(msg.run_id)
            for j in range(b.n_rows):
                seqs = tuple(int(s) for s in b.seq_ids[j])
                pos, token = int(b.positions[j]), int(b.tokens[j])
                parent_cell = intent.visible_at(seqs, pos - 1) if pos > 0 else None
                parent = intent.cells[parent_cell][2] if parent_cell is not None else None
                request, part = owner[j] if j < len(owner) else ("?", None)
                kind = launched[part].kind if part in launched else "?"
                key = int(b.row_ids[j]) if b.row_ids is not None else msg.run_id
                index = len(rows)
                rows.append({"run": msg.run_id, "key": key, "token": token, "pos": pos, "seqs": list(seqs),
                             "part": part, "request": str(request), "kind": kind,
                             "parent": parent if isinstance(parent, int) else None,
                             "sent": len(steps), "released": None})  # uids, mapped after sorting
                intent.alloc(pos, seqs, token, index)
            what_rows = f"{b.n_rows} row{'s' * (b.n_rows != 1)}"
            step(t, order, "head", f"the head sends run {msg.run_id} ({', '.join(kinds)}; {what_rows}) into stage 0",
                 sent=msg.run_id)
        else:
            before = {c[2] for c in intent.cells.values()}
            intent.apply_message(msg)
            after = {c[2] for c in intent.cells.values()}
            edits = msg.edits if isinstance(msg, KVEdits) else [msg]
            uid = step(t, order, "head", f"the head sends KV {label}: " + "; ".join(ev.kv_label(x) for x in edits))
            for index in before - after:
                rows[index]["released"] = uid

    # --- engine events ------------------------------------------------------------------------
    committed_events = []
    for k, (logged, e) in enumerate(rec.events):
        line = narrator.sentence(e)
        if line is None:
            continue
        who = "head" if e.request == "*" else f"request {e.request}"
        extra = {}
        if isinstance(e, ev.Committed):
            extra["commit"] = [str(e.request), [int(x) for x in e.tokens]]
            committed_events.append(e)
        if isinstance(e, ev.Cancelled):
            extra["cancel_ids"] = [int(x) for x in e.ids]
        prefix = f"[{e.request}] " if len(rec.requests) > 1 and e.request != "*" else ""
        step(e.t, (0, logged, 1, k), who, prefix + line, event=_event_dict(e), **extra)

    # --- the stages: what each did with each message, and its KV cells after it --------------
    by_stage_run: dict[tuple[int, int], object] = {}
    kv_by_stage: dict[int, list] = {i: [] for i in range(n_stages)}
    for e in tracer.events:
        if not e.track.startswith("stage"):
            continue
        stage = int(e.track.split()[-1])
        if e.kind in ("run", "cancel") and e.run_id is not None:
            by_stage_run.setdefault((stage, e.run_id), e)
        elif e.kind == "kv":
            kv_by_stage[stage].append(e)
    slices, versions = [], []  # versions[stage] = [snapshot after each message]
    for stage in range(n_stages):
        model = KVModel()
        stage_versions = [[]]
        kv_seen = 0
        order_in_stage = []  # (what, message, the stage's record of it, label) in submission order
        for t, what, msg, label in pipe.log:
            if what != "submit":
                continue
            if isinstance(msg, Run):
                record = by_stage_run.get((stage, msg.run_id))
                if record is not None:  # (None: still on its way when the run ended)
                    order_in_stage.append(("run", msg, record, None))
            elif kv_seen < len(kv_by_stage[stage]):  # the stage's n-th edit is the head's n-th
                order_in_stage.append(("kv", msg, kv_by_stage[stage][kv_seen], label or "edit"))
                kv_seen += 1
        for n, (what, msg, record, label) in enumerate(order_in_stage):
            t_start, t_end = record.start, record.end
            if what == "kv":
                model.apply_message(msg)
                edits = msg.edits if isinstance(msg, KVEdits) else [msg]
                line = f"stage {stage} applies KV {label}: " + "; ".join(ev.kv_label(x) for x in edits)
            else:
                b, info = msg.batch, runs[msg.run_id]
                run_cut = msg.run_id in cancel_times and cancel_times[msg.run_id] < t_start
                placed = 0
                if not run_cut:
                    for j in range(b.n_rows):
                        key = int(b.row_ids[j]) if b.row_ids is not None else msg.run_id
                        if key in cancel_times and cancel_times[key] < t_start:
                            continue  # dropped before the stage started the run: no cell
                        model.alloc(int(b.positions[j]), b.seq_ids[j], int(b.tokens[j]), info["first_row"] + j)
                        placed += 1
                stopped = record.kind == "cancel"
                if stopped:
                    kind = "cancelled"
                elif placed < b.n_rows:
                    kind = "pruned"
                else:
                    kind = "prefill" if info["prefill"] else "speculative" if info["speculative"] else "plain"
                slices.append({"stage": stage, "run": msg.run_id, "t0": t_start, "t1": t_end, "kind": kind,
                               "rows": b.n_rows, "placed": placed})
                if record.end == record.start and stopped:
                    line = f"stage {stage} skips run {msg.run_id}: it was cancelled"
                elif stopped:
                    line = f"stage {stage} stops run {msg.run_id}: it was cancelled ({placed} row(s) placed)"
                else:
                    dropped = b.n_rows - placed
                    line = (f"stage {stage} computes run {msg.run_id} ({b.n_rows} row{'s' * (b.n_rows != 1)}"
                            + (f", {dropped} dropped: pruned" if dropped else "") + ")")
            stage_versions.append(model.snapshot())
            step(t_end, (1, stage, n), f"stage {stage}", line, stage=stage, version=len(stage_versions) - 1,
                 **({"run": msg.run_id} if what == "run" else {}))
        versions.append(stage_versions)

    # --- order the steps, and what each panel shows at each ------------------------------------
    steps.sort(key=lambda s: (s["t"], s["order"]))
    t0 = min((s["t"] for s in steps), default=0.0)
    stage_version = [0] * n_stages
    for i, s in enumerate(steps):
        if "stage" in s:
            stage_version[s["stage"]] = s["version"]
        s["versions"] = list(stage_version)
        s["t"] = round(s["t"] - t0, 9)
        s["i"] = i
        s.pop("order")
    # a row appears in the tree when its run is sent, and leaves when the head releases its cell
    sorted_index = {s.pop("uid"): i for i, s in enumerate(steps)}
    for r in rows:
        r["sent"] = sorted_index[r["sent"]]
        r["released"] = None if r["released"] is None else sorted_index[r["released"]]
    for s in slices:
        s["t0"], s["t1"] = round(s["t0"] - t0, 9), round(s["t1"] - t0, 9)
    for r in runs.values():
        r["sent"] = round(r["sent"] - t0, 9)
        if r["answered"] is not None:
            r["answered"] = round(r["answered"] - t0, 9)
    drafts = [[round(e.start - t0, 9), round(e.end - t0, 9)] for e in tracer.events
              if e.track == "head" and e.kind == "draft" and e.end > e.start]
    requests = [{"id": str(r.id), "prompt": [int(x) for x in r.prompt]} for r in rec.requests]
    for r in requests:
        for x in r["prompt"]:
            text(x)
    for r in rows:
        text(r["token"])
    for e in committed_events:
        for x in e.tokens:
            text(x)
    args = rec.args
    return {
        "title": f"minipipe: {getattr(args, 'strategy', '?')} on {n_stages} stage(s), {getattr(args, 'runtime', '?')} "
                 f"runtime",
        "runtime": getattr(args, "runtime", "?"),
        "n_stages": n_stages,
        "span": max([s["t"] for s in steps] + [0.0]),
        "steps": steps,
        "slices": slices,
        "runs": [runs[r] for r in run_order],
        "rows": rows,
        "versions": versions,
        "cancel_capacity": CANCEL_CAPACITY,
        "drafts": drafts,
        "requests": requests,
        "committed_seqs": sorted({e.seqs.start for _, e in rec.events if isinstance(e, ev.Admitted)}),
        "texts": {str(k): v for k, v in texts.items()},
    }


def render(model: dict) -> str:
    """The page: the data as JSON inside a script tag, and the viewer's code."""
    data = json.dumps(model, separators=(",", ":")).replace("</", "<\\/")
    return (_PAGE.replace("%TITLE%", html_lib.escape(model["title"]))
                 .replace("%DATA%", data))


_PAGE = r"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>%TITLE%</title>
<style>
body { font: 14px/1.4 system-ui, sans-serif; margin: 16px; color: #222; }
h1 { font-size: 18px; margin: 0 0 8px; }
h2 { font-size: 14px; margin: 0 0 4px; }
#controls { display: flex; gap: 8px; align-items: center; margin: 8px 0; }
#slider { flex: 1; }
#step-text { font-family: ui-monospace, monospace; background: #f4f4f4; padding: 6px 8px; min-height: 1.4em; }
#lanes { width: 100%; height: auto; border: 1px solid #ddd; margin: 8px 0; }
.grid { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
section { border: 1px solid #ddd; padding: 8px; overflow: auto; max-height: 360px; }
table { border-collapse: collapse; font-family: ui-monospace, monospace; font-size: 12px; }
td, th { border: 1px solid #ddd; padding: 1px 5px; text-align: center; }
.prompt { color: #888; white-space: pre-wrap; }
.gen { font-weight: bold; white-space: pre-wrap; background: #e6f4e6; }
.kvstage { display: inline-block; vertical-align: top; margin: 0 12px 12px 0; }
.seen { background: #f0a030; color: #fff; }
.committedseq { background: #2e8b57; color: #fff; }
ul.tree { list-style: none; padding-left: 16px; margin: 0; font-family: ui-monospace, monospace; font-size: 12px; }
.node { color: #222; font-weight: normal; }  /* each node its own colour, not its parent's */
.node-cancelled { text-decoration: line-through; color: #b22; }
.node-match { color: #1a7a1a; font-weight: bold; }
.k-prefill { fill: #9aa7b8; } .k-plain { fill: #4a7bd0; } .k-speculative { fill: #f0a030; }
.k-cancelled { fill: #d04040; } .k-pruned { fill: #9b59b6; } .k-draft { fill: #7fc97f; }
.hop { stroke: #555; stroke-width: 0.8; fill: none; marker-end: url(#arrow); opacity: 0.55; }
.commit { fill: #1a7a1a; }
#cursor { stroke: #000; stroke-width: 1.5; }
.lane-label { font: 11px ui-monospace, monospace; }
.legend span { display: inline-block; width: 12px; height: 12px; vertical-align: middle; margin: 0 4px 0 12px; }
</style>
</head>
<body>
<h1 id="title">%TITLE%</h1>
<div id="controls">
  <button id="prev" title="previous step (←)">&#9664;</button>
  <input type="range" id="slider" min="0" max="0" value="0" aria-label="step">
  <button id="next" title="next step (→)">&#9654;</button>
  <span>step <b id="step-index">0</b> of <span id="step-count">0</span> &middot; t = <span id="step-time"></span> &middot; <span id="step-who"></span></span>
</div>
<div id="step-text"></div>
<svg id="lanes" xmlns="http://www.w3.org/2000/svg"></svg>
<div class="legend" id="legend">
  <span style="background:#9aa7b8"></span>prefill <span style="background:#4a7bd0"></span>plain
  <span style="background:#f0a030"></span>speculative <span style="background:#d04040"></span>cancelled
  <span style="background:#9b59b6"></span>pruned rows <span style="background:#7fc97f"></span>drafting
  <span style="background:#1a7a1a"></span>commit &middot; arrows: hops &middot; keys: &larr; &rarr; Home End
</div>
<div class="grid">
  <section><h2>Committed text</h2><div id="committed"></div></section>
  <section><h2>Runs in flight</h2><table id="inflight"></table></section>
  <section><h2>Cancellation map</h2><div id="cancels"></div></section>
  <section><h2>Token tree (the head's speculation)</h2><div id="tree"></div></section>
</div>
<section style="max-height:none"><h2>KV cells &times; sequences, per stage (after the messages each stage has handled)</h2><div id="kv"></div></section>
<script id="data" type="application/json">%DATA%</script>
<script>
"use strict";
(function () {
  const D = JSON.parse(document.getElementById("data").textContent);
  const N = D.steps.length;
  const $ = (id) => document.getElementById(id);
  const esc = (s) => String(s).replace(/[&<>"]/g, (c) => ({"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}[c]));
  const txt = (t) => (Object.prototype.hasOwnProperty.call(D.texts, String(t)) ? D.texts[String(t)] : "<" + t + ">");
  const shown = (s) => JSON.stringify(s).slice(1, -1);
  const fmtTime = (t) => (D.span < 10 ? (t * 1e3).toFixed(3) + " ms" : t.toFixed(3) + " s");

  // --- indexes over the steps ----------------------------------------------------------------
  const runSent = {}, runAnswered = {}, cancelStep = {}, stageDone = {};
  D.steps.forEach((s, i) => {
    if (s.sent !== undefined) runSent[s.sent] = i;
    if (s.answer !== undefined) runAnswered[s.answer] = i;
    if (s.cancel !== undefined && cancelStep[s.cancel] === undefined) cancelStep[s.cancel] = i;
    if (s.run !== undefined) (stageDone[s.run] = stageDone[s.run] || []).push([i, s.stage]);
  });
  const committedSeqs = new Set(D.committed_seqs);  // each request's committed text

  // --- the lanes: stages over time ----------------------------------------------------------
  const svgNS = "http://www.w3.org/2000/svg";
  const W = 1000, L = 70, R = 10, laneH = 22, gap = 8;
  const lanes = D.n_stages + 1;
  const H = lanes * (laneH + gap) + 20;
  const span = D.span > 0 ? D.span : 1;
  const X = (t) => L + (W - L - R) * (t / span);
  const Y = (lane) => 6 + lane * (laneH + gap);  // lane 0: the head; lane k + 1: stage k
  const svg = $("lanes");
  svg.setAttribute("viewBox", "0 0 " + W + " " + H);
  function el(name, attrs, parent) {
    const e = document.createElementNS(svgNS, name);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    (parent || svg).appendChild(e);
    return e;
  }
  const defs = el("defs", {});
  const marker = el("marker", {id: "arrow", viewBox: "0 0 6 6", refX: "6", refY: "3", markerWidth: "5",
                               markerHeight: "5", orient: "auto"}, defs);
  el("path", {d: "M0,0 L6,3 L0,6 z", fill: "#555"}, marker);
  for (let k = 0; k < lanes; k++) {
    el("rect", {x: L, y: Y(k), width: W - L - R, height: laneH, fill: k % 2 ? "#fafafa" : "#f2f2f2"});
    const label = el("text", {x: 4, y: Y(k) + laneH * 0.7, "class": "lane-label"});
    label.textContent = k === 0 ? "head" : "stage " + (k - 1);
  }
  D.drafts.forEach(([a, b]) => {
    el("rect", {x: X(a), y: Y(0) + laneH * 0.55, width: Math.max(0.5, X(b) - X(a)), height: laneH * 0.4,
                "class": "k-draft"});
  });
  const slicesOf = {};
  D.slices.forEach((s) => {
    const r = el("rect", {x: X(s.t0), y: Y(s.stage + 1) + 2, width: Math.max(1, X(s.t1) - X(s.t0)),
                          height: laneH - 4, "class": "slice k-" + s.kind, "data-run": s.run});
    const title = el("title", {}, r);
    title.textContent = "run " + s.run + " on stage " + s.stage + ": " + s.kind + ", " + s.rows + " row(s), " +
                        s.placed + " placed";
    (slicesOf[s.run] = slicesOf[s.run] || []).push(s);
  });
  function hop(x1, y1, x2, y2) {
    el("path", {d: "M" + x1 + "," + y1 + " L" + x2 + "," + y2, "class": "hop"});
  }
  D.runs.forEach((run) => {
    const visits = (slicesOf[run.id] || []).slice().sort((a, b) => a.stage - b.stage);
    if (!visits.length) return;
    hop(X(run.sent), Y(0) + laneH, X(visits[0].t0), Y(1) + 2);
    for (let k = 1; k < visits.length; k++) {
      hop(X(visits[k - 1].t1), Y(visits[k - 1].stage + 1) + laneH - 2, X(visits[k].t0), Y(visits[k].stage + 1) + 2);
    }
    const last = visits[visits.length - 1];
    if (run.answered !== null && last.stage === D.n_stages - 1) {
      hop(X(last.t1), Y(last.stage + 1) + 2, X(run.answered), Y(0) + laneH);
    }
  });
  D.steps.forEach((s) => {
    if (s.commit) {
      el("path", {d: "M" + X(s.t) + "," + (Y(0) + 1) + " l-4,-0 l4,8 l4,-8 z", "class": "commit"});
    }
  });
  const cursor = el("line", {id: "cursor", x1: L, x2: L, y1: 0, y2: H});

  // --- the panels ---------------------------------------------------------------------------
  function committedAt(i) {
    const out = {};
    D.requests.forEach((r) => { out[r.id] = []; });
    for (let j = 0; j <= i; j++) {
      const c = D.steps[j].commit;
      if (c) (out[c[0]] = out[c[0]] || []).push(...c[1]);
    }
    return out;
  }
  function renderCommitted(committed) {
    $("committed").innerHTML = D.requests.map((r) => {
      const prompt = r.prompt.map(txt).join("");
      const gen = (committed[r.id] || []).map(txt).join("");
      return '<div class="req" data-request="' + esc(r.id) + '">' + (D.requests.length > 1 ? "<b>" + esc(r.id) + ":</b> " : "") +
             '<span class="prompt">' + esc(prompt) + '</span><span class="gen">' + esc(gen) + "</span></div>";
    }).join("");
  }
  function renderInflight(i) {
    const rows = [];
    D.runs.forEach((run) => {
      const sent = runSent[run.id], answered = runAnswered[run.id];
      if (sent === undefined || sent > i || (answered !== undefined && answered <= i)) return;
      const done = (stageDone[run.id] || []).filter(([j]) => j <= i).map(([, k]) => k);
      const where = done.length ? "done by stage " + Math.max(...done) : "on its way to stage 0";
      const cut = cancelStep[run.id] !== undefined && cancelStep[run.id] <= i ? " (cancelled)" : "";
      const parts = run.parts.map(([req, part, n]) => req + ":" + part + " (" + n + ")").join(" + ");
      rows.push("<tr data-run=\"" + run.id + "\"><td>" + run.id + "</td><td>" + esc(run.kinds.join(", ")) + cut +
                "</td><td>" + run.rows + "</td><td>" + esc(parts) + "</td><td>" + where + "</td></tr>");
    });
    $("inflight").innerHTML = "<tr><th>run</th><th>kind</th><th>rows</th><th>request:part (rows)</th><th>where</th></tr>" +
                              rows.join("");
    $("inflight").setAttribute("data-count", String(rows.length));
  }
  function cancelledAt(i) {
    const out = [];
    for (const key in cancelStep) if (cancelStep[key] <= i) out.push(Number(key));
    return out.sort((a, b) => a - b);
  }
  function renderCancels(cancelled) {
    if (!cancelled.length) {
      $("cancels").innerHTML = "<i>no slot marked yet</i>";
    } else {
      $("cancels").innerHTML = "<table><tr><th>slot (id mod " + D.cancel_capacity + ")</th><th>holds id</th></tr>" +
        cancelled.map((k) => "<tr class=\"slot\"><td>" + (k % D.cancel_capacity) + "</td><td>" + k + "</td></tr>").join("") +
        "</table><p>A stage asks: does slot id mod " + D.cancel_capacity + " hold exactly this id?</p>";
    }
    $("cancels").setAttribute("data-count", String(cancelled.length));
  }
  function renderKV(i) {
    const html = [];
    for (let k = 0; k < D.n_stages; k++) {
      const cells = D.versions[k][D.steps[i].versions[k]];
      const seqs = [...new Set(cells.flatMap((c) => c[3]))].sort((a, b) => a - b);
      let t = '<div class="kvstage" id="kv-stage-' + k + '" data-cells="' + cells.length + '"><b>stage ' + k +
              "</b> (" + cells.length + " cells)<table><tr><th>cell</th><th>pos</th><th>token</th>" +
              seqs.map((s) => "<th>seq " + s + "</th>").join("") + "</tr>";
      cells.forEach(([cell, pos, token, cs]) => {
        t += "<tr><td>" + cell + "</td><td>" + pos + "</td><td title=\"" + token + "\">" + esc(shown(txt(token))) + "</td>" +
             seqs.map((s) => cs.indexOf(s) >= 0 ? '<td class="' + (committedSeqs.has(s) ? "committedseq" : "seen") + '">&#9632;</td>' : "<td></td>").join("") +
             "</tr>";
      });
      html.push(t + "</table></div>");
    }
    $("kv").innerHTML = html.join("");
  }
  function renderTree(i, committed, cancelled) {
    const cut = new Set(cancelled);
    const live = new Set();
    const text = {};
    D.requests.forEach((r) => { text[r.id] = r.prompt.concat(committed[r.id] || []); });
    D.rows.forEach((r, j) => {
      if (r.kind === "prefill" || r.sent > i || (r.released !== null && r.released <= i)) return;
      const mine = text[r.request] || [];
      // committed history is not speculation: keep the newest committed token (the root) and beyond
      if (r.pos < mine.length - 1 && mine[r.pos] === r.token) return;
      live.add(j);
    });
    const children = {};
    const roots = {};
    live.forEach((j) => {
      const p = D.rows[j].parent;
      if (p !== null && live.has(p)) (children[p] = children[p] || []).push(j);
      else (roots[D.rows[j].request] = roots[D.rows[j].request] || []).push(j);
    });
    function node(j) {
      const r = D.rows[j];
      const mine = text[r.request] || [];
      let cls = cut.has(r.key) ? "node-cancelled" : (mine[r.pos] === r.token ? "node-match" : "");
      const kids = (children[j] || []).map(node).join("");
      return '<li class="node ' + cls + '" data-key="' + r.key + '">' + esc(shown(txt(r.token))) + " <small>(" + r.token +
             " @" + r.pos + ", " + esc(r.kind) + " " + r.key + ")</small>" + (kids ? '<ul class="tree">' + kids + "</ul>" : "") + "</li>";
    }
    const out = [];
    for (const req in roots) {
      out.push((D.requests.length > 1 ? "<b>" + esc(req) + "</b>" : "") + '<ul class="tree">' + roots[req].map(node).join("") + "</ul>");
    }
    $("tree").innerHTML = out.length ? out.join("") : "<i>no speculation in flight</i>";
    $("tree").setAttribute("data-count", String(live.size));
  }

  let current = 0;
  function go(i) {
    if (!N) return;
    current = Math.max(0, Math.min(N - 1, i));
    const s = D.steps[current];
    $("slider").value = String(current);
    $("step-index").textContent = String(current);
    $("step-time").textContent = fmtTime(s.t);
    $("step-who").textContent = s.who;
    $("step-text").textContent = s.text;
    const x = X(s.t);
    cursor.setAttribute("x1", x);
    cursor.setAttribute("x2", x);
    const committed = committedAt(current);
    const cancelled = cancelledAt(current);
    renderCommitted(committed);
    renderInflight(current);
    renderCancels(cancelled);
    renderKV(current);
    renderTree(current, committed, cancelled);
  }
  $("slider").max = String(Math.max(0, N - 1));
  $("step-count").textContent = String(N);
  $("slider").addEventListener("input", (e) => go(Number(e.target.value)));
  $("prev").addEventListener("click", () => go(current - 1));
  $("next").addEventListener("click", () => go(current + 1));
  document.addEventListener("keydown", (e) => {
    if (e.target && e.target.id === "slider") return;  // the slider moves itself
    if (e.key === "ArrowRight") go(current + 1);
    else if (e.key === "ArrowLeft") go(current - 1);
    else if (e.key === "Home") go(0);
    else if (e.key === "End") go(N - 1);
    else return;
    e.preventDefault();
  });
  window.minipipeViewer = {go: go, steps: N, current: () => current};
  go(0);
})();
</script>
</body>
</html>
"""
