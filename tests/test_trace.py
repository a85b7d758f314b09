"""Traces and timelines: markers that cannot be mistaken for runs, hop arrows, named KV edits,
slices that stay nested after rounding, drafting on the head's track.

Oracles: hand-built events whose right rendering is known; and real runs, whose trace must be
consistent with what the head sent (every run's hops in order, every KV edit's label).
"""

from __future__ import annotations

import json

import pytest

from minipipe.config import load_config
from minipipe.draft import DraftModel
from minipipe.engine import Engine
from minipipe.model import load_stage
from minipipe.request import Request
from minipipe.runtime import LocalPipeline, load_stage_models, split_layers
from minipipe.runtime.cost import CostModel, fixed
from minipipe.strategies import PipeInferStrategy, SpeculativeStrategy
from minipipe.trace import MARKERS, RUN_GLYPHS, TracedDraft, TracedPipeline, Tracer

from .conftest import SHIPPED_MODELS

TARGET, DRAFT = SHIPPED_MODELS / "tinybard", SHIPPED_MODELS / "tinybard-draft"


def test_markers_never_collide_with_run_glyphs():
    assert not set(MARKERS.values()) & set(RUN_GLYPHS + ".")
    tracer = Tracer()
    for run, (a, b) in {33: (0, 4), 46: (4, 8), 38: (8, 12)}.items():  # glyphs 'x', 'K', 'C'
        tracer.record("stage 0", f"run {run}", a * 1e-3, b * 1e-3, "run", run)
    tracer.instant("stage 0", "skip cancelled 50", 13e-3, "cancel", 50)
    tracer.instant("stage 0", "seq_rm(1, 0, ∞)", 15e-3, "kv")
    tracer.instant("head", "commit [5]", 16e-3, "commit")
    tracer.record("stage 0", "run 7", 17e-3, 20e-3, "run", 7)
    text = tracer.timeline(width=20)
    row = next(line for line in text.splitlines() if line.startswith("stage 0 |"))
    cells = row.split("|")[1]
    assert len(cells) == 20
    assert cells[:12] == "xxxxKKKKCCCC" and cells[13] == "!" and cells[15] == "~" and cells[17:] == "777"
    head = next(line for line in text.splitlines() if line.startswith("   head |")).split("|")[1]
    assert head[16] == "+" and set(head) == {".", "+"}
    assert "!  a run cancelled" in text and "~  a KV edit" in text  # the legend
    assert "legend" not in tracer.timeline(width=20, legend=False) and "0-9a-zA-Z" not in tracer.timeline(
        width=20, legend=False)


def test_rounding_keeps_slices_nested():
    tracer = Tracer()
    tracer.record("stage 0", "run 1", 0.4e-9, 10.4e-9, "run", 1)  # rounded apart, the child would stick out
    tracer.record("stage 0", "layer 0", 0.6e-9, 10.4e-9, "layer", 1)
    events = [e for e in tracer.chrome()["traceEvents"] if e.get("ph") == "X"]
    (parent,), (child,) = [e for e in events if e["cat"] == "run"], [e for e in events if e["cat"] == "layer"]
    end = lambda e: round((e["ts"] + e["dur"]) * 1000)  # noqa: E731 - in whole nanoseconds
    assert round(parent["ts"] * 1000) <= round(child["ts"] * 1000) and end(child) <= end(parent)


def traced_run(strategy, n_stages: int, tokens: int = 12):
    config = load_config(TARGET)
    tracer = Tracer()
    local = LocalPipeline(load_stage_models(TARGET, split_layers(config.n_layers, n_stages)), n_seqs=strategy.n_seqs,
                          cost=fixed(config, load_config(DRAFT)), tracer=tracer)
    pipe = TracedPipeline(local, tracer)
    engine = Engine(pipe, strategy, max_running=1, listeners=[pipe.observe])
    engine.add(Request("0", [1, 1889, 28, 201], tokens, (2,)))
    engine.run()
    local.drain()
    return tracer, pipe


def slices_by_tid(events):
    out = {}
    for e in events:
        if e.get("ph") == "X":
            out.setdefault(e["tid"], []).append((round(e["ts"] * 1000), round((e["ts"] + e["dur"]) * 1000)))
    return out


def test_chrome_trace_of_a_real_run(tmp_path):
    strategy = PipeInferStrategy(DraftModel(load_stage(DRAFT)), p_accept=0.05, n_draft=3, max_inflight=6)
    tracer, pipe = traced_run(strategy, 3)
    path = tmp_path / "t.json"
    tracer.write_chrome(path)
    events = json.loads(path.read_text())["traceEvents"]
    tids = {e["args"]["name"]: e["tid"] for e in events if e["name"] == "thread_name"}
    slices = slices_by_tid(events)

    # slices on one track are nested or disjoint
    for tid, spans in slices.items():
        for a0, a1 in spans:
            for b0, b1 in spans:
                assert a1 <= b0 or b1 <= a0 or (a0 <= b0 and b1 <= a1) or (b0 <= a0 and a1 <= b1), (tid, a0, a1, b0, b1)

    # every hop is an arrow, leaving from inside a slice and landing inside one, in stage order
    starts = {e["id"]: e for e in events if e.get("ph") == "s"}
    ends = {e["id"]: e for e in events if e.get("ph") == "f"}
    assert starts and starts.keys() == ends.keys()
    for fid, s in starts.items():
        f = ends[fid]
        assert f["bp"] == "e" and s["name"] == f["name"]
        for e in (s, f):
            t = round(e["ts"] * 1000)
            assert any(a <= t <= b for a, b in slices[e["tid"]]), e
    runs = [msg.run_id for _, what, msg, _ in pipe.log if what == "submit" and hasattr(msg, "batch")]
    answered = {msg.run_id for _, what, msg, _ in pipe.log if what == "answer"}
    order = [tids["head"], tids["stage 0"], tids["stage 1"], tids["stage 2"], tids["head"]]
    for run in runs:
        hops = sorted((s for s in starts.values() if s["name"] == f"run {run}"), key=lambda s: s["ts"])
        path_taken = [hops[0]["tid"]] + [ends[s["id"]]["tid"] for s in hops]
        assert path_taken == order[: len(path_taken)], (run, path_taken)
        if run in answered:
            assert path_taken == order, (run, path_taken)

    # every stage KV edit is named after what it does, in the head's order
    labels = [label for _, what, _, label in pipe.log if what == "submit" and label is not None]
    assert set(labels) >= {"view", "commit", "release", "free"}
    for stage in range(3):
        named = [e["name"].split(":")[0] for e in events if e.get("cat") == "kv" and e["tid"] == tids[f"stage {stage}"]]
        assert named == labels, stage


@pytest.mark.timeout(120)
def test_drafting_is_on_the_heads_track_in_the_process_runtime():
    from minipipe.runtime import open_pipeline

    tracer = Tracer()
    strategy = SpeculativeStrategy(TracedDraft(DraftModel(load_stage(DRAFT)), tracer), k=3)
    with open_pipeline(TARGET, "process", 2, n_seqs=strategy.n_seqs, tracer=tracer) as p:
        pipe = TracedPipeline(p, tracer)
        engine = Engine(pipe, strategy, max_running=1, listeners=[pipe.observe])
        engine.add(Request("0", [1, 1889, 28, 201], 8, (2,)))
        engine.run()
    drafts = [e for e in tracer.events if e.track == "head" and e.kind == "draft"]
    assert drafts and all(e.end > e.start for e in drafts)
    answers = [t for t, what, _, _ in pipe.log if what == "answer"]
    # drafting happens between answers: each burst starts after the answer that prompted it
    assert all(any(a <= d.start for a in answers) for d in drafts[1:])
    runs = [e for e in tracer.events if e.track.startswith("stage") and e.kind == "run"]
    assert runs and min(e.start for e in runs) >= min(e.start for e in tracer.events if e.track == "head")


def test_cost_model_is_fixed_by_the_shapes():
    a = fixed(load_config(TARGET), load_config(DRAFT))
    assert a == fixed(load_config(TARGET), load_config(DRAFT))
    assert a.layer_per_row > 0 and a.draft_per_token < a.head_fixed + 8 * (a.layer_fixed + a.layer_per_row)
    bigger = load_config(TARGET)
    from dataclasses import replace

    wide = fixed(replace(bigger, dim=2 * bigger.dim, ffn_dim=2 * bigger.ffn_dim, head_dim=2 * bigger.head_dim))
    assert wide.layer_per_row > 3 * a.layer_per_row  # four times the weights per layer
    assert isinstance(a, CostModel)


@pytest.mark.parametrize("args, message", [
    (["--strategy", "pipeline", "--cost", "fixed"], "--cost needs --runtime local"),
    (["--strategy", "pipeline", "--runtime", "local", "--timeline", "--timeline-width", "5"],
     "--timeline-width must be at least 20, got 5"),
    (["--html", "x.html"], "--stages, --split, --trace, --timeline and --html need a pipelined --strategy"),
    (["--strategy", "pipeline", "--html", "/nonexistent/dir/x.html"], "--html /nonexistent/dir/x.html: cannot write there"),
])
def test_watching_flags_refuse_bad_input_in_one_line(capsys, args, message):
    from minipipe.cli import main

    code = main(["generate", "ROMEO:", "--max-new-tokens", "2", "--quiet", *args])
    err = capsys.readouterr().err
    assert code == 1 and err.startswith(f"minipipe: error: {message}") and err.count("\n") == 1, err


def test_timeline_width_is_honoured(capsys):
    from minipipe.cli import main

    code = main(["generate", "ROMEO:", "--max-new-tokens", "3", "--strategy", "pipeline", "--stages", "2",
                 "--runtime", "local", "--quiet", "--timeline", "--timeline-width", "33"])
    err = capsys.readouterr().err
    rows = [line for line in err.splitlines() if line.startswith(("stage", "   head"))]
    assert code == 0 and len(rows) == 3 and all(len(r.split("|")[1]) == 33 for r in rows), err
