"""The runtimes and the `pipeline` strategy: exactly the greedy tokens, in every runtime, stage
count, split and interleaving; and clean failure when a stage dies, a message is corrupt or the
user presses Ctrl-C."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from functools import lru_cache

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from minipipe.batch import Batch
from minipipe.errors import InputError
from minipipe.greedy import generate_greedy
from minipipe.runtime import Chooser, LocalPipeline, StageCrashed, open_pipeline, split_layers
from minipipe.runtime.stage import Stage, drain
from minipipe.strategies import PipelineStrategy, generate
from minipipe.synthetic import make_random_checkpoint, random_model
from minipipe.trace import Tracer
from minipipe.transport.cancel import LocalCancelSet
from minipipe.transport.messages import Cancelled, Result, Run


SHAPE = dict(dim=32, ffn_dim=48, n_layers=6, n_heads=4, n_kv_heads=2, vocab_size=61, max_positions=64)


@lru_cache(maxsize=None)
def models(splits: tuple[tuple[int, int], ...], seed: int = 5):
    return [random_model(seed=seed, lo=lo, hi=hi, **SHAPE) for lo, hi in splits]


@lru_cache(maxsize=None)
def greedy_tokens(seed: int, prompt: tuple[int, ...], n: int) -> list[int]:
    return generate_greedy(random_model(seed=seed, **SHAPE), list(prompt), n).tokens


class DrawChooser(Chooser):
    """Interleavings chosen by hypothesis."""

    def __init__(self, data):
        self.data = data

    def pick(self, runnable):
        return self.data.draw(st.sampled_from(runnable), label="stage")

    def budget(self):
        return self.data.draw(st.integers(0, 4), label="steps")


def test_split_layers():
    assert split_layers(8, 3) == [(0, 3), (3, 6), (6, 8)]
    assert split_layers(5, split=[2, 3]) == [(0, 2), (2, 5)]
    for bad in (dict(n_stages=0), dict(n_stages=9), dict(split=[4, 5]), dict(split=[8, 0]), dict(n_stages=2, split=[8])):
        with pytest.raises(InputError):
            split_layers(8, **bad)


@given(data=st.data())
def test_pipeline_equals_greedy_local_any_interleaving(data):
    sizes = data.draw(st.lists(st.integers(1, 3), min_size=1, max_size=6).filter(lambda s: sum(s) == 6)
                      | st.sampled_from([[6], [1] * 6, [2, 4], [5, 1]]), label="split")
    splits = tuple(split_layers(6, split=sizes))
    prompt = tuple(data.draw(st.lists(st.integers(0, 60), min_size=1, max_size=8), label="prompt"))
    n = data.draw(st.integers(1, 12), label="tokens")
    chooser = DrawChooser(data) if data.draw(st.booleans(), label="chooser") else None
    pipe = LocalPipeline(models(splits), chooser=chooser)
    got = generate(PipelineStrategy(), pipe, prompt, n, max_positions=SHAPE["max_positions"])
    assert got.tokens == greedy_tokens(5, prompt, n)


def test_pipeline_equals_greedy_on_a_real_model(pair):
    from minipipe.model import load_stage

    prompt = list(pair.prompt)
    expected = generate_greedy(load_stage(pair.target), prompt, 30, pair.eos).tokens
    for runtime, n_stages in (("local", 5), ("process", 2), ("process", 3)):
        with open_pipeline(pair.target, runtime, n_stages) as pipe:
            got = generate(PipelineStrategy(), pipe, prompt, 30, pair.eos, pair.max_positions)
        assert got.tokens == expected, (runtime, n_stages)


@pytest.mark.parametrize("split", [None, [1, 2, 3], [4, 1, 1]])
def test_process_runtime_equals_greedy(tmp_path, split):
    d = make_random_checkpoint(tmp_path / "m", seed=5, **SHAPE)
    prompt = [3, 1, 4, 1, 5]
    with open_pipeline(d, "process", None if split else 6, split) as pipe:
        got = generate(PipelineStrategy(), pipe, prompt, 10, max_positions=64)
    assert got.tokens == greedy_tokens(5, tuple(prompt), 10)
    assert_no_leaks()


@pytest.mark.timeout(240)
def test_stage_processes_decode_on_several_threads_with_one_threads_bits(tmp_path):
    """`--threads N` on the process runtime: each stage runs its decode GEMVs on N threads (its
    GEMV team's workers are there: at least N - 1 more threads than a one-thread stage) and the tokens
    are greedy decoding's on one thread, with GEMVs big enough to be split (weights of 1 MB and
    more) and some that are not."""
    shape = dict(dim=512, ffn_dim=1024, n_layers=2, n_heads=8, n_kv_heads=2, vocab_size=1024, max_positions=64)
    d = make_random_checkpoint(tmp_path / "m", seed=7, **shape)
    prompt = [3, 1, 4, 1, 5, 9, 2, 6]
    expected = generate_greedy(random_model(seed=7, **shape), prompt, 12).tokens

    def threads_of(pid: int) -> int:
        return len(os.listdir(f"/proc/{pid}/task"))

    tasks = {}
    for n in (1, 3):
        with open_pipeline(d, "process", 2, gemv_threads=n) as pipe:
            got = generate(PipelineStrategy(), pipe, prompt, 12, max_positions=64)
            tasks[n] = [threads_of(proc.pid) for proc in pipe.procs]
        assert got.tokens == expected, n
    assert all(b >= a + 2 for a, b in zip(tasks[1], tasks[3])), tasks  # (and OpenBLAS's own, when it splits)
    assert_no_leaks()


def test_stage_cancellation_before_and_between_layers():
    model = random_model(seed=1, lo=0, hi=4, **{**SHAPE, "n_layers": 4})
    cancels = LocalCancelSet()
    stage = Stage(0, model, cancels)
    run = Run(1, Batch.chain([3, 4], 0))
    steps = stage.process(run)
    next(steps)  # one layer computed
    cancels.cancel(1)
    out = drain(steps)
    assert isinstance(out[0], Cancelled) and out[0].layers_skipped == 3
    cancels.cancel(2)
    out = drain(stage.process(Run(2, Batch.chain([5], 2))))
    assert isinstance(out[0], Cancelled) and out[0].layers_skipped == 4
    assert stage.stats.layers_computed == 1 and stage.stats.layers_skipped == 7
    out = drain(stage.process(Run(3, Batch.chain([5], 2))))  # uncancelled runs still work
    assert isinstance(out[0], Result)


def test_trace_and_timeline(tmp_path):
    tracer = Tracer()
    pipe = LocalPipeline(models(((0, 3), (3, 6))), tracer=tracer)
    generate(PipelineStrategy(), pipe, [1, 2, 3], 4, max_positions=64)
    text = tracer.timeline(width=60)
    assert "stage 0 |" in text and "stage 1 |" in text
    path = tmp_path / "t.json"
    tracer.write_chrome(path)
    import json

    events = json.loads(path.read_text())["traceEvents"]
    assert {e["args"]["name"] for e in events if e["name"] == "thread_name"} >= {"stage 0", "stage 1"}
    assert any(e.get("ph") == "X" and e["cat"] == "run" for e in events)


# ------------------------------------------------------------------------------------------------
# failure handling of the process runtime


def our_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith(f"minipipe_{os.getpid()}_")}


def assert_no_leaks(pids=()):
    assert not our_segments(), our_segments()
    for pid in pids:
        deadline = time.time() + 5
        while time.time() < deadline and _alive(pid):
            time.sleep(0.05)
        assert not _alive(pid), f"process {pid} outlived the pipeline"


def _alive(pid: int) -> bool:
    from minipipe.transport.shm import pid_alive

    return pid_alive(pid)


def test_killed_stage_is_reported_quickly(tmp_path):
    d = make_random_checkpoint(tmp_path / "m", seed=5, **SHAPE)
    with pytest.raises(StageCrashed, match=r"stage 1 \(layers 2-3, pid \d+\) died: killed by SIGKILL"):
        with open_pipeline(d, "process", 3) as pipe:
            pids = [p.pid for p in pipe.procs]
            killed_at = []

            def kill_after_three(token):
                if len(killed_at) == 0 and token is not None:
                    seen.append(token)
                    if len(seen) == 3:
                        os.kill(pids[1], signal.SIGKILL)
                        killed_at.append(time.monotonic())

            seen: list[int] = []
            try:
                generate(PipelineStrategy(), pipe, [3, 1, 4], 50, max_positions=64, on_token=kill_after_three)
            finally:
                assert killed_at and time.monotonic() - killed_at[0] < 10
    assert_no_leaks(pids)


def test_corrupt_message_is_reported(tmp_path):
    d = make_random_checkpoint(tmp_path / "m", seed=5, **SHAPE)
    with pytest.raises(StageCrashed, match="stage 0 .* failed: corrupt message"):
        with open_pipeline(d, "process", 2) as pipe:
            pids = [p.pid for p in pipe.procs]
            pipe.rings[0].write([b"this is not a message" * 4])
            pipe.receive()
    assert_no_leaks(pids)


def test_bad_checkpoint_in_a_stage_is_reported(tmp_path):
    d = make_random_checkpoint(tmp_path / "m", seed=5, **SHAPE)
    f = d / "model.safetensors"
    raw = f.read_bytes()
    f.write_bytes(raw[: len(raw) - 1000])  # the last tensors are cut off (every stage checks the whole header)
    with pytest.raises(StageCrashed, match=r"stage [01] .* failed: .*truncated"):
        with open_pipeline(d, "process", 2):
            pass
    assert_no_leaks()


def _cli(*args):
    return [sys.executable, "-m", "minipipe", *args]


def test_ctrl_c_stops_everything(tmp_path):
    d = make_random_checkpoint(tmp_path / "m", seed=5, **{**SHAPE, "max_positions": 100000})
    proc = subprocess.Popen(_cli("generate", "--prompt-ids", "3,4", "--model", str(d), "--strategy", "pipeline",
                                 "--stages", "3", "--max-new-tokens", "100000", "--json"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    children = _children(proc.pid)
    segments = _segments_of(proc.pid)
    assert len(children) >= 3 and segments, "the pipeline should be running"
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == 130, err
    assert "interrupted" in err and "Traceback" not in err
    assert_no_leaks(children)  # stages, and multiprocessing's resource tracker
    assert not _segments_of(proc.pid)


def _children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def _segments_of(pid: int) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(f"minipipe_{pid}_")]


@settings(max_examples=3, deadline=None)
@given(seed=st.integers(0, 3))
def test_local_runtime_is_deterministic(seed):
    """Clock mode: same inputs, same virtual timeline, event for event."""
    def timeline():
        tracer = Tracer()
        pipe = LocalPipeline(models(((0, 2), (2, 6))), tracer=tracer)
        generate(PipelineStrategy(), pipe, [seed + 1, 2], 5, max_positions=64)
        return [(e.track, e.name, e.start, e.end) for e in tracer.events]
    assert timeline() == timeline()


def test_stage_rows_shapes():
    """A run's answer carries one token per wanted row, in row order."""
    pipe = LocalPipeline(models(((0, 6),)))
    batch = Batch(tokens=np.array([3, 4, 5]), positions=np.array([0, 1, 2]), seq_ids=((0,),) * 3,
                  want_logits=np.array([True, False, True]))
    pipe.submit(Run(pipe.new_run_id(), batch, return_logits=True))
    res = pipe.receive()
    assert res.tokens.shape == (2,) and res.logits.shape == (2, SHAPE["vocab_size"])
    assert list(res.tokens) == list(np.argmax(res.logits, axis=1))
