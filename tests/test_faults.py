"""Faults of the process runtime end cleanly: one line naming the stage, a non-zero exit, every
process ended, every /dev/shm segment released, and promptly.

Stages are stopped (SIGSTOP) to play a stalled or unresponsive stage, the whole run is SIGKILLed
to leave segments behind, Ctrl-C lands while the stages are starting, and a stage fails to load
while its neighbour has not started.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from multiprocessing.context import SpawnProcess

import pytest

from minipipe.config import ModelConfig
from minipipe.runtime import StageCrashed, open_pipeline
from minipipe.runtime.process import ProcessPipeline
from minipipe.synthetic import hf_config, make_random_checkpoint, random_tensors, write_checkpoint
from minipipe.transport.ring import Ring
from minipipe.transport.status import COMPUTING, FAILED, WAITING, WRITING, StatusBoard

from .test_runtime import SHAPE, _segments_of, assert_no_leaks

pytestmark = pytest.mark.timeout(90)


def _cli(*args):
    return [sys.executable, "-m", "minipipe", *args]


def _stages_of(pid: int) -> list[int]:
    """The stage processes of a minipipe run (not multiprocessing's resource tracker)."""
    out = subprocess.run(["ps", "-ww", "-o", "pid=,args=", "--ppid", str(pid)], capture_output=True, text=True).stdout
    return [int(line.split()[0]) for line in out.splitlines()
            if "spawn_main" in line and "resource_tracker" not in line]


def _wait_for(predicate, timeout: float = 20.0, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_random_checkpoint(tmp_path_factory.mktemp("faults") / "m", seed=5,
                                  **{**SHAPE, "max_positions": 100000})


@contextmanager
def _generating(*args, **popen):
    """`minipipe generate ARGS` running (3 stages, a long generation); ended if the test fails."""
    proc = subprocess.Popen(_cli("generate", *args, "--stages", "3", "--max-new-tokens", "100000"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **popen)
    try:
        yield proc
    finally:
        if proc.poll() is None:  # SIGTERM: the head still cleans up
            proc.terminate()
            try:
                proc.communicate(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.communicate()


def _random_run(model, *extra, **popen):
    return _generating("--prompt-ids", "3,4", "--model", str(model), "--strategy", "pipeline", *extra, **popen)


# ------------------------------------------------------------------------------------------------
# a stage that stops making progress


@pytest.mark.parametrize("stopped", [1, 2])
def test_stalled_stage_is_named_and_everything_ends(checkpoint, stopped):
    with _random_run(checkpoint, "--stage-timeout", "1") as proc:
        proc.stdout.read(8)  # tokens are streaming: the stages are running
        stages = _stages_of(proc.pid)
        assert len(stages) == 3
        os.kill(stages[stopped], signal.SIGSTOP)
        out, err = proc.communicate(timeout=30)
    layers = {1: "2-3", 2: "4-5"}[stopped]
    assert proc.returncode == 1, err
    assert re.fullmatch(rf"minipipe: error: stage {stopped} \(layers {layers}, pid {stages[stopped]}\) made no "
                        r"progress for \d+\.\d s with work waiting \(stopped or deadlocked; --stage-timeout is 1 s\)\n",
                        err), err
    assert_no_leaks(stages)  # the stopped stage too: SIGKILL ends it
    assert not _segments_of(proc.pid)


def test_board_names_only_a_stage_with_work_and_no_sign_of_life():
    """The stall rule on a hand-written board: busy but beating is not stalled; a stage that
    waits with nothing to do is not stalled however long it waits."""
    board = StatusBoard.create(4)
    try:
        t0 = 1000.0
        for i, state in enumerate((COMPUTING, WRITING, WAITING, WAITING)):
            board.set_state(i, state)
        board._f[:, 2] = t0  # every heartbeat at t0 (word 2 of a slot)
        pending = [False, False, False, True]  # only stage 3 has unread input
        assert board.stalled(pending, timeout=5.0, now=t0 + 4.0) is None
        assert board.stalled(pending, timeout=5.0, now=t0 + 6.0) == (0, 6.0)  # computing, silent
        board.beat(0)  # a layer computed: alive again
        board._f[0, 2] = t0 + 5.5
        assert board.stalled(pending, timeout=5.0, now=t0 + 6.0) == (1, 6.0)  # writing, silent
        board._f[1, 2] = t0 + 5.5
        assert board.stalled(pending, timeout=5.0, now=t0 + 6.0) == (3, 6.0)  # input waits: stage 3
        assert board.stalled([False] * 4, timeout=5.0, now=t0 + 6.0) is None  # stage 2 and 3 idle
        assert board.read(0).progress == 1
        board.fail(2, "could not load layers 4-5: é" * 100)  # truncated to the slot, whole characters
        status = board.read(2)
        assert status.state == FAILED and status.error.startswith("could not load layers 4-5: é")
        assert len(status.error.encode()) <= 448
        assert board.first_error() == (2, status.error)
    finally:
        board.release()


# ------------------------------------------------------------------------------------------------
# segments left by a run killed whole


def _semaphores() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("sem.mp-")}


def _unlink_orphan_semaphores(names) -> None:
    """Remove the rings' semaphores a killed run left behind (multiprocessing names them
    `sem.mp-*`, without a pid): only those that no live process has mapped."""
    mapped = set()
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/maps") as f:
                mapped.update(line.rsplit("/", 1)[-1].strip() for line in f if "/dev/shm/sem.mp-" in line)
        except OSError:
            pass
    for name in set(names) - mapped:
        try:
            os.unlink(f"/dev/shm/{name}")
        except OSError:
            pass


def test_segments_of_a_killed_run_are_removed_by_the_next(checkpoint):
    semaphores = _semaphores()
    with _random_run(checkpoint, start_new_session=True) as proc:  # its own process group, like a shell job
        proc.stdout.read(8)
        left = _segments_of(proc.pid)
        assert len(left) == 6  # 4 rings, the cancellation map, the status board
        os.killpg(proc.pid, signal.SIGKILL)  # the head, its stages and the resource tracker
        proc.communicate(timeout=10)
    _unlink_orphan_semaphores(_semaphores() - semaphores)
    assert _segments_of(proc.pid) == left  # nobody was left to unlink them
    with open(f"/dev/shm/minipipe_{os.getpid()}_00000000_live", "wb"):  # a live process's segment
        pass
    try:
        with open_pipeline(checkpoint, "process", 2) as pipe:
            assert set(left) <= set(pipe.stale_segments)
        assert not _segments_of(proc.pid)
        assert os.path.exists(f"/dev/shm/minipipe_{os.getpid()}_00000000_live")  # never touched
    finally:
        os.unlink(f"/dev/shm/minipipe_{os.getpid()}_00000000_live")
    assert_no_leaks()


# ------------------------------------------------------------------------------------------------
# Ctrl-C and SIGTERM


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15])
def test_ctrl_c_while_the_stages_start(checkpoint, delay):
    """Ctrl-C reaches the whole foreground process group: stages still importing must not print
    tracebacks, and the head must leave no segment (no resource-tracker warnings)."""
    with _random_run(checkpoint, start_new_session=True) as proc:
        _wait_for(lambda: len(_stages_of(proc.pid)) >= 2, what="stages")
        time.sleep(delay)  # the stages are importing; the head creates, starts, waits
        stages = _stages_of(proc.pid)
        os.killpg(proc.pid, signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert err.strip() == "minipipe: interrupted", err
    assert_no_leaks(stages)
    assert not _segments_of(proc.pid)


def _ignores_sigint(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as f:
        mask = next(int(line.split()[1], 16) for line in f if line.startswith("SigIgn:"))
    return bool(mask & (1 << (signal.SIGINT - 1)))


def test_stages_ignore_sigint_from_birth(checkpoint, monkeypatch):
    """Looked at the moment each stage process exists, before it runs any of our code."""
    start = SpawnProcess.start
    ignored = []

    def start_and_look(self):
        start(self)
        ignored.append(_ignores_sigint(self.pid))

    monkeypatch.setattr(SpawnProcess, "start", start_and_look)
    with open_pipeline(checkpoint, "process", 2):
        pass
    assert ignored == [True, True]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the head's own is back
    assert_no_leaks()


def test_interrupted_ring_creation_leaks_nothing(checkpoint, monkeypatch):
    """Ctrl-C between two ring creations: the rings made so far are released."""
    created = []
    original = Ring.create

    def create(*args, **kwargs):
        if len(created) == 2:
            raise KeyboardInterrupt
        created.append(original(*args, **kwargs))
        return created[-1]

    monkeypatch.setattr(Ring, "create", staticmethod(create))
    with pytest.raises(KeyboardInterrupt):
        ProcessPipeline(checkpoint, 3)
    assert len(created) == 2
    assert_no_leaks()


@pytest.mark.parametrize("strategy,sig", [("pipeinfer", signal.SIGINT), ("pipeinfer", signal.SIGTERM),
                                          pytest.param("pipeline", signal.SIGINT, marks=pytest.mark.slow),
                                          pytest.param("speculative", signal.SIGTERM, marks=pytest.mark.slow),
                                          pytest.param("tree", signal.SIGINT, marks=pytest.mark.slow),
                                          pytest.param("specpipe", signal.SIGTERM, marks=pytest.mark.slow)])
def test_signal_stops_every_strategy_within_2_s(strategy, sig):
    """The shipped pair, a long generation; a stage that cannot answer (stopped) must not hold
    the head: interrupted runs are not shut down politely."""
    with _generating("ROMEO:", "--strategy", strategy) as proc:
        proc.stdout.read(8)
        stages = _stages_of(proc.pid)
        os.kill(stages[1], signal.SIGSTOP)  # busy or stuck: either way it will not echo a Shutdown
        sent = time.monotonic()
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    assert proc.returncode == (130 if sig == signal.SIGINT else 143), err
    assert "Traceback" not in err
    assert took < 2.0, f"{strategy} took {took:.1f} s to stop"
    assert_no_leaks(stages)
    assert not _segments_of(proc.pid)


# ------------------------------------------------------------------------------------------------
# a stage's own error wins


def test_load_error_of_a_stage_wins_over_its_exit_status(tmp_path, monkeypatch):
    """Stage 0 cannot load its layers while stage 1 never finishes starting (stopped), so
    nothing can carry stage 0's message down the rings: the head still reports its words."""
    raw = hf_config(**SHAPE)
    tensors = random_tensors(ModelConfig.from_hf(raw), 5)
    tensors["model.layers.0.mlp.up_proj.weight"] = tensors["model.layers.0.mlp.up_proj.weight"][:, :-1]
    d = write_checkpoint(tmp_path / "m", raw, tensors)
    start = SpawnProcess.start
    started = []

    def start_and_stop_stage_1(self):
        start(self)
        started.append(self.pid)
        if self.name == "minipipe-stage1":
            os.kill(self.pid, signal.SIGSTOP)

    monkeypatch.setattr(SpawnProcess, "start", start_and_stop_stage_1)
    with pytest.raises(StageCrashed, match=r"^stage 0 \(layers 0-1, pid \d+\) failed: .*up_proj.* shape"):
        with open_pipeline(d, "process", 3):
            pass
    assert_no_leaks(started)



@pytest.mark.parametrize("value", ["0.5", "-1", "nan", "inf"])
def test_bad_stage_timeout_is_refused_in_one_line(capsys, checkpoint, value):
    from minipipe.cli import main

    code = main(["generate", "--prompt-ids", "3,4", "--model", str(checkpoint), "--strategy", "pipeline", "--quiet",
                 f"--stage-timeout={value}"])
    out, err = capsys.readouterr()
    assert code == 1 and out == ""
    assert err == f"minipipe: error: --stage-timeout must be a number of seconds >= 1 (or 0: never), got {float(value)}\n"
    assert_no_leaks()
