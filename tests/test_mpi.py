"""The MPI runtime (`--runtime mpi`) and real link delays.

* Under `mpiexec -n 3` and `-n 5` on this machine, every strategy's tokens equal greedy decoding,
  also with delayed links and with cancellations landing mid-run (PipeInfer's cancelled runs,
  SpecPipe's pruned rows, on drafts right half the time), and for several requests at once.
* Cancellation marks travel as MPI messages and land where the link delays put them: before a
  run, between its stages, on single rows (tests/mpi_driver.py).
* A stage rank that is stopped or killed mid-run ends the run with one line naming it, within the
  stage timeout; Ctrl-C ends every rank; no rank and no shared-memory segment is left.
* The process runtime's --link-delay-ms delays every hop for real and changes no token.

Skipped, with the reason, where mpi4py (`pip install 'minipipe[mpi]'`) is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from minipipe.greedy import generate_greedy
from minipipe.model import load_stage
from minipipe.synthetic import make_random_checkpoint

from .test_runtime import SHAPE, assert_no_leaks

HAVE_MPI = importlib.util.find_spec("mpi4py") is not None
needs_mpi = pytest.mark.skipif(not HAVE_MPI, reason="mpi4py is not installed (pip install 'minipipe[mpi]')")
STRATEGIES = ["pipeline", "speculative", "tree", "pipeinfer", "specpipe"]
PROMPT = "3,1,4,1,5"
DRIVER = Path(__file__).with_name("mpi_driver.py")


def _mpiexec() -> str:
    from minipipe.runtime.mpi import find_mpiexec

    return find_mpiexec()


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A random 6-layer target with a long context (fault tests generate until stopped)."""
    return make_random_checkpoint(tmp_path_factory.mktemp("mpi") / "m", seed=5, **{**SHAPE, "max_positions": 100000})


def greedy(checkpoint, prompt: str = PROMPT, n: int = 24) -> list[int]:
    return generate_greedy(load_stage(checkpoint), [int(t) for t in prompt.split(",")], n).tokens


def _generate_args(checkpoint, strategy: str, *extra) -> list[str]:
    args = ["generate", "--prompt-ids", PROMPT, "--model", str(checkpoint), "--strategy", strategy, "--runtime", "mpi",
            "--max-new-tokens", "24", "--json", "--stage-timeout", "20", *extra]
    if strategy != "pipeline":
        args += ["--draft-model", "oracle:0.5"]  # right half the time: cancellations and pruning
    return args


def _run(cmd: list[str], timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def _tokens(proc: subprocess.CompletedProcess) -> list[int]:
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])["tokens"]


def _mpich_segments() -> set[str]:
    return {n for n in os.listdir("/dev/shm") if n.startswith("mpich_shm_")}


# ------------------------------------------------------------------------------------------------
# every strategy equals greedy, under mpiexec -n 3 and -n 5


@needs_mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("n_ranks,strategy", [(3, s) for s in STRATEGIES] + [
    (5, "pipeinfer"), (5, "specpipe"),
    *[pytest.param(5, s, marks=pytest.mark.slow) for s in ("pipeline", "speculative", "tree")]])
def test_every_strategy_equals_greedy_under_mpiexec(checkpoint, n_ranks, strategy):
    got = _tokens(_run([_mpiexec(), "-n", str(n_ranks), sys.executable, "-m", "minipipe",
                        *_generate_args(checkpoint, strategy)]))
    assert got == greedy(checkpoint)


@needs_mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy,stages,delay", [("pipeinfer", 4, "5"), ("specpipe", 2, "10"),
                                                   pytest.param("pipeline", 4, "1", marks=pytest.mark.slow),
                                                   pytest.param("speculative", 2, "5", marks=pytest.mark.slow),
                                                   pytest.param("tree", 4, "5", marks=pytest.mark.slow)])
def test_delayed_links_keep_every_token(checkpoint, strategy, stages, delay):
    """Started by hand: minipipe runs mpiexec itself. With delayed links the speculative
    strategies' cancellations land while runs are between stages."""
    got = _tokens(_run([sys.executable, "-m", "minipipe", *_generate_args(checkpoint, strategy),
                        "--stages", str(stages), "--link-delay-ms", delay]))
    assert got == greedy(checkpoint)


@needs_mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("strategy", ["pipeinfer", pytest.param("specpipe", marks=pytest.mark.slow)])
def test_several_requests_at_once(checkpoint, tmp_path, strategy):
    prompts = ["3,1,4", "2,7,1,8", "5"]
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps({"id": str(i), "prompt_ids": [int(t) for t in p.split(",")],
                                        "max_new_tokens": 12 + 4 * i}) + "\n" for i, p in enumerate(prompts)))
    proc = _run([sys.executable, "-m", "minipipe", "generate", "--requests", str(path), "--model", str(checkpoint),
                 "--strategy", strategy, "--runtime", "mpi", "--stages", "3", "--json", "--link-delay-ms", "2",
                 "--draft-model", "ngram"])
    assert proc.returncode == 0, proc.stderr
    finished = {o["id"]: o["tokens"] for o in map(json.loads, proc.stdout.splitlines()) if "id" in o}
    assert finished == {str(i): greedy(checkpoint, p, 12 + 4 * i) for i, p in enumerate(prompts)}


@needs_mpi
@pytest.mark.timeout(120)
def test_cancellations_land_where_the_link_delays_put_them(checkpoint):
    delay = 0.25
    proc = _run([_mpiexec(), "-n", "4", sys.executable, str(DRIVER), str(checkpoint), str(delay)])
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert "error" not in out, out
    assert proc.returncode == 0, proc.stderr
    n_layers = out["n_layers"]
    assert out["before"] == {"kind": "cancelled", "layers_skipped": n_layers}  # skipped by every stage
    assert out["mid"] == {"kind": "cancelled", "layers_skipped": n_layers - out["stage0_layers"]}  # after stage 0
    k1, k2, k3 = out["row_keys"]
    ref = out["reference_tokens"]
    assert out["rows"] == {"kind": "result", "tokens": [ref[0], ref[2]], "row_ids": [k1, k3]}  # row k2 dropped
    assert out["plain"]["tokens"] == ref
    assert out["plain_s"] >= (out["n_stages"] + 1) * delay  # every hop was delayed (4 hops)


# ------------------------------------------------------------------------------------------------
# faults: a stopped or killed rank, Ctrl-C


def _ranks(marker: str) -> dict[int, int]:
    """{MPI rank: pid} of the processes whose command line holds `marker` (this test's checkpoint)."""
    found = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if marker.encode() not in f.read():
                    continue
            with open(f"/proc/{pid}/environ", "rb") as f:
                env = dict(item.split(b"=", 1) for item in f.read().split(b"\0") if b"=" in item)
        except OSError:
            continue
        if b"PMI_RANK" in env:
            found[int(env[b"PMI_RANK"])] = int(pid)
    return found


@contextmanager
def _long_run(checkpoint, launcher: str, *extra):
    """`generate --runtime mpi` with 2 stages, generating until stopped; ended if the test fails."""
    args = ["generate", "--prompt-ids", PROMPT, "--model", str(checkpoint), "--strategy", "pipeinfer", "--runtime",
            "mpi", "--max-new-tokens", "100000", "--ignore-eos", "--draft-model", "ngram", *extra]
    cmd = [sys.executable, "-m", "minipipe", *args, "--stages", "2"] if launcher == "minipipe" else \
        [_mpiexec(), "-n", "3", sys.executable, "-m", "minipipe", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            stdin=subprocess.DEVNULL)
    try:
        assert proc.stdout.read(8), "tokens should be streaming"
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def _assert_all_gone(pids) -> None:
    assert_no_leaks(pids)


@needs_mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("launcher,stopped", [("minipipe", 2), ("mpiexec", 1)])
def test_a_stopped_rank_is_named_within_the_timeout(checkpoint, launcher, stopped):
    segments = _mpich_segments()
    with _long_run(checkpoint, launcher, "--stage-timeout", "2") as proc:
        ranks = _ranks(str(checkpoint))
        assert sorted(ranks) == [0, 1, 2]
        os.kill(ranks[stopped], signal.SIGSTOP)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=60)
        took = time.monotonic() - sent
    layers = {1: "0-2", 2: "3-5"}[stopped]
    assert proc.returncode == 1, err
    assert re.fullmatch(rf"minipipe: error: stage {stopped - 1} \(layers {layers}, rank {stopped}, pid "
                        rf"{ranks[stopped]} on \S+\) made no progress for \d+\.\d s while \w+ \(stopped, deadlocked "
                        r"or unreachable; --stage-timeout is 2 s\)\n", err), err
    assert took < 2 + 10
    _assert_all_gone(ranks.values())  # the stopped one too
    assert _mpich_segments() <= segments


@needs_mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("killed", [1, 2, 0])
def test_a_killed_rank_ends_the_run_in_one_line(checkpoint, killed):
    segments = _mpich_segments()
    with _long_run(checkpoint, "minipipe") as proc:
        ranks = _ranks(str(checkpoint))
        os.kill(ranks[killed], signal.SIGKILL)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 1, err
    who = {0: rf"the head \(rank 0, pid {ranks[0]} on \S+\)",
           1: rf"stage 0 \(layers 0-2, rank 1, pid {ranks[1]} on \S+\)",
           2: rf"stage 1 \(layers 3-5, rank 2, pid {ranks[2]} on \S+\)"}[killed]
    assert re.fullmatch(rf"minipipe: error: {who} died: killed by SIGKILL \(mpiexec ended every rank\)\n", err), err
    _assert_all_gone(ranks.values())
    assert _mpich_segments() <= segments


@needs_mpi
@pytest.mark.timeout(120)
def test_a_killed_rank_under_a_plain_mpiexec_ends_every_rank(checkpoint):
    """mpiexec ends the job itself (with MPI's own report): nothing is left running."""
    with _long_run(checkpoint, "mpiexec") as proc:
        ranks = _ranks(str(checkpoint))
        os.kill(ranks[1], signal.SIGKILL)
        proc.communicate(timeout=30)
    assert proc.returncode != 0
    _assert_all_gone(ranks.values())


@needs_mpi
@pytest.mark.timeout(120)
@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_ends_every_rank(checkpoint, sig, code):
    segments = _mpich_segments()
    with _long_run(checkpoint, "minipipe") as proc:
        ranks = _ranks(str(checkpoint))
        proc.send_signal(sig)
        sent = time.monotonic()
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - sent
    assert proc.returncode == code, err
    assert err.strip() == "minipipe: interrupted", err
    assert took < 5
    _assert_all_gone(ranks.values())
    assert _mpich_segments() <= segments


# ------------------------------------------------------------------------------------------------
# bad input: one line, no hang


@needs_mpi
@pytest.mark.timeout(60)
def test_too_few_ranks_for_the_stages_is_one_line(checkpoint):
    proc = _run([_mpiexec(), "-n", "3", sys.executable, "-m", "minipipe",
                 *_generate_args(checkpoint, "pipeline", "--stages", "3")], timeout=50)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines()[-1] == ("minipipe: error: 3 stages need 4 MPI ranks (the head and one per "
                                                    "stage), but this job has 3: run mpiexec -n 4, or leave --stages out")


@needs_mpi
@pytest.mark.timeout(60)
def test_a_bad_flag_ends_every_rank(checkpoint):
    proc = _run([sys.executable, "-m", "minipipe", *_generate_args(checkpoint, "pipeline", "--link-delay-ms", "-1")],
                timeout=50)
    assert proc.returncode == 1
    assert proc.stderr == "minipipe: error: --link-delay-ms must be a finite number of milliseconds >= 0, got -1.0\n"


def test_missing_mpi4py_is_one_line(checkpoint, monkeypatch, capsys):
    from minipipe.cli import main
    from minipipe.transport.mpi import import_mpi

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None)
    assert main(["generate", "--prompt-ids", "3", "--model", str(checkpoint), "--strategy", "pipeline",
                 "--runtime", "mpi"]) == 1
    assert capsys.readouterr().err == ("minipipe: error: --runtime mpi needs mpi4py: install minipipe[mpi] (pip install "
                                       "'minipipe[mpi]': mpi4py and MPICH, nothing to compile)\n")
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    with pytest.raises(Exception, match=r"^--runtime mpi needs mpi4py and an MPI library .*install minipipe\[mpi\]"):
        import_mpi()


# ------------------------------------------------------------------------------------------------
# the process runtime's real link delays


@pytest.mark.timeout(90)
@pytest.mark.parametrize("strategy", ["pipeline", "pipeinfer"])
def test_process_runtime_link_delays_keep_every_token(checkpoint, strategy):
    from minipipe.draft import OracleDraft
    from minipipe.engine import Engine
    from minipipe.request import Request
    from minipipe.runtime import open_pipeline
    from minipipe.strategies import PipeInferStrategy, PipelineStrategy, largest_run

    truth = greedy(checkpoint)
    prompt = [int(t) for t in PROMPT.split(",")]
    strat = PipelineStrategy() if strategy == "pipeline" else PipeInferStrategy(
        OracleDraft(truth + [0] * 30, 0.5, SHAPE["vocab_size"]), p_accept=0.0, n_draft=4, max_inflight=6)
    with open_pipeline(checkpoint, "process", 3, n_seqs=Engine.n_seqs(strat, 1), max_rows=largest_run(strat),
                       link_delay=0.005) as pipe:
        request = Request("0", prompt, 24, ())
        engine = Engine(pipe, strat, 1)
        engine.add(request)
        engine.run()
    assert request.result().tokens == truth
    assert_no_leaks()


@pytest.mark.timeout(60)
def test_process_runtime_delays_every_hop(checkpoint):
    from minipipe.batch import Batch
    from minipipe.runtime import open_pipeline
    from minipipe.transport.messages import Result, Run

    delay = 0.1
    with open_pipeline(checkpoint, "process", 3, link_delay=delay) as pipe:
        t0 = time.monotonic()
        pipe.submit(Run(pipe.new_run_id(), Batch.chain([3, 4], 0)))
        assert isinstance(pipe.receive(), Result)
        assert time.monotonic() - t0 >= 4 * delay  # head -> 0 -> 1 -> 2 -> head
    assert_no_leaks()
