"""The MPI runtime: the head on rank 0, stage i on rank i + 1, possibly on other machines.

    rank 0 (head) ─DATA─▶ rank 1 (stage 0) ─DATA─▶ rank 2 (stage 1) ─ … ─▶ rank S (stage S-1) ─DATA─▶ rank 0
        │ CANCEL to every stage rank                 every stage rank sends STATUS to rank 0
        └ CONTROL at start-up: hello, clock sync, the stage's assignment

The stages run the same service loop as in the process runtime (`service.py`) on an
`MPIStageChannel` (`transport/mpi.py`, which also lists the tags); the head is `MPIPipeline`.

**Three roles of one command.** `minipipe generate ... --runtime mpi` is

| started                          | role                                                                   |
|----------------------------------|------------------------------------------------------------------------|
| by `mpiexec`, rank 0             | the head: tokenizer, drafts, engine; `MPIPipeline` talks to the ranks  |
| by `mpiexec`, rank r > 0         | stage r - 1: waits for its assignment, loads only its own layers,      |
|                                  | serves until Shutdown (`stage_rank_main`)                              |
| by hand, not under MPI           | the supervisor: starts `mpiexec -n S+1` on the same command (`supervise`) |

**Start-up (CONTROL messages).**

| step | from -> to        | message                                   | why                                         |
|------|-------------------|-------------------------------------------|---------------------------------------------|
| 1    | stage rank -> head| ("hello", host, pid)                      | names in error messages; pid checks on the head's host |
| 2    | head -> stage rank| ("sync",) ×`SYNC_ROUNDS`, answered by     | the rank's clock offset (least round trip), |
|      | stage rank -> head| ("clock", monotonic ns)                   | so link delays use one clock across hosts   |
| 3    | head -> stage rank| ("assign", `MPIStageSpec`)                | layers, cache, delays, timeouts, offset     |
| 4    | stage -> … -> head| `Ready` on DATA, like the process runtime | every stage has loaded                      |
| —    | head -> stage rank| ("exit",) instead of 3                    | the head ends without opening a pipeline    |

**Cancellation across hosts.** `cancel(id)` sends int64 [due, id] to every stage rank on CANCEL;
a stage drains those messages into its private `CancelSlots` before every step (before a run,
between layers) and so stops a run, or drops the rows whose ids are marked (the engine's
per-row keys, SpecPipe's pruning), exactly as with the shared map; stubs travel on as before.
Why a mark can never hit the wrong run: run ids and row keys come from one counter
(`Pipeline.new_run_id`), so they are unique and only grow; a mark names one id and no other
run or row will ever carry it; and a slot reused by a later id stores that id, so the old mark
is simply forgotten. MPI does not order CANCEL against DATA, and nothing needs it to: a mark
that arrives before its run makes the stage skip it; one that arrives during it stops it between
layers; one that arrives after it changes nothing (that id never comes again), and the head
treats every answer the same whether or not a cancellation caught it. Cancels travel over the
same links as data, so with `--link-delay-ms` they too arrive `delay` after they were sent.

**Faults** end with one line naming the stage, its layers, rank, pid and host:

| fault                                 | how the head finds out                                        |
|---------------------------------------|---------------------------------------------------------------|
| a stage raises (load error, bug, ...) | its ("failed", text) STATUS message                           |
| a stage rank dies                     | on the head's host: its pid is gone (checked every `POLL_S`); |
|                                       | elsewhere: no STATUS for `--stage-timeout`                    |
| a stage rank stalls (SIGSTOP, ...)    | no STATUS for `--stage-timeout` (ranks beat at least every    |
|                                       | half heartbeat, idle or not)                                  |
| Ctrl-C, SIGTERM                       | the head's own signal (mpiexec forwards both to every rank;   |
|                                       | stage ranks ignore them: the head decides)                    |

A run that ends normally shuts the stages down (Shutdown travels through every stage and back)
and every rank finalizes MPI. Any other end calls MPI_Abort from the head once its line is out,
which makes the MPI launcher kill every rank on every host, a stopped one included; its own
"Abort(...)" line is not shown. A stage rank that is killed outright makes mpiexec end the
whole job itself (its default clean-up), the head included, with MPI's own report; when minipipe
started mpiexec (the supervisor), it watches the ranks on its host, notes which one began to exit first
(`_RankWatcher`) and says so in the one line instead.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..config import load_config
from ..errors import InputError, MinipipeError
from ..trace import Tracer
from ..transport.channel import STAMP, LinkDelay
from ..transport.messages import Cancelled, Ready, Result, Run, Shutdown, TraceEvents, decode, encode
from ..transport.mpi import (CANCEL, CONTROL, DATA, HEAD, INSTALL_HINT, SEND_WINDOW, STATUS, Backoff, MPIStageChannel,
                             Outbox, env_rank, import_mpi, pid_alive, receive_frames, receive_objects, send_frame)
from ..transport.status import STATE_NAMES
from .base import Pipeline, StageCrashed, split_layers
from .process import POLL_S, SHUTDOWN_S, STAGE_TIMEOUT_S

SYNC_ROUNDS = 5
SUPERVISOR_ENV = "MINIPIPE_MPI_SUPERVISOR"  # "pid:host:status file" of the supervising minipipe
ABORT_GRACE_S = 0.3  # unsupervised: time for mpiexec to pass the head's last line on before MPI_Abort
INTERRUPT_GRACE_S = 5.0  # the supervisor waits this long for an interrupted job, then kills it


@dataclass
class MPIStageSpec:
    """A stage rank's assignment (pickled to it at start-up)."""

    index: int
    n_stages: int
    model_dir: str
    lo: int
    hi: int
    n_seqs: int
    cache_cells: int
    trace: bool
    heartbeat_s: float
    link_delay_s: float
    offset_ns: int  # this rank's monotonic clock minus the head's
    head_host: str
    head_pid: int


class _World:
    """What this process knows of its MPI job (one per process)."""

    def __init__(self):
        self.MPI = None
        self.comm = None
        self.pipeline_opened = False  # stage ranks were assigned
        self.clean = False  # ... and shut down normally (every rank may finalize)
        self.supervisor: tuple[int, str, str] | None = None  # (pid, host, status file)

    def start(self):
        if self.MPI is None:
            self.MPI = import_mpi()
            self.comm = self.MPI.COMM_WORLD
        return self.MPI, self.comm


WORLD = _World()


# ----------------------------------------------------------------------------------------------
# roles


def under_mpi() -> bool:
    return env_rank() is not None


def is_stage_rank() -> bool:
    rank = env_rank()
    return rank is not None and rank > 0


def world_size() -> int:
    MPI, comm = WORLD.start()
    return comm.Get_size()


def stage_rank_main() -> int:
    """A stage rank: wait for the head's assignment, serve it, return 0 after Shutdown."""
    for sig in (signal.SIGINT, signal.SIGTERM):  # mpiexec forwards both; the head decides
        signal.signal(sig, signal.SIG_IGN)
    try:
        MPI, comm = WORLD.start()
    except MinipipeError as e:
        print(f"minipipe: error: {e}", file=sys.stderr)
        return 1
    from .. import blas

    blas.set_threads(1)
    hello = comm.isend(("hello", socket.gethostname(), os.getpid()), HEAD, CONTROL)
    backoff = Backoff()
    while True:
        messages = receive_objects(comm, MPI, HEAD, CONTROL)
        if not messages:
            backoff.sleep(5e-3)
            continue
        for _, message in messages:
            if message[0] == "sync":
                comm.send(("clock", time.monotonic_ns()), HEAD, CONTROL)
            elif message[0] == "exit":
                hello.Wait()
                return 0
            elif message[0] == "assign":
                hello.Wait()
                _forget_mpich_segments()
                return _serve_assignment(comm, MPI, message[1])


def _serve_assignment(comm, MPI, spec: MPIStageSpec) -> int:
    from .service import CLOSED, SHUTDOWN, serve

    link = LinkDelay(spec.link_delay_s, spec.offset_ns)
    channel = MPIStageChannel(comm, MPI, spec.index, spec.n_stages, spec.heartbeat_s, link, spec.head_host,
                              spec.head_pid)

    def load(cancels):
        from ..model import load_stage
        from .stage import Stage

        return Stage(spec.index, load_stage(spec.model_dir, spec.lo, spec.hi), cancels, spec.n_seqs, spec.cache_cells)

    status = serve(channel, load, spec.index, spec.lo, spec.hi, spec.trace)
    if status == SHUTDOWN:
        return 0  # MPI is finalized at exit, with every other rank
    if status == CLOSED:
        os._exit(0)  # the head is gone: nobody to finalize with
    # failed: the head has our words; it ends the job (MPI_Abort). Exiting first would let
    # mpiexec end the job before the head could say anything.
    while not channel._head_gone():
        time.sleep(0.2)
    os._exit(status)


# ----------------------------------------------------------------------------------------------
# the head


class MPIPipeline(Pipeline):
    """The stages on MPI ranks 1..S (this process is rank 0). Use as a context manager.

    n_stages / split as for the process runtime; the job must have n_stages + 1 ranks (None:
    every other rank is a stage). link_delay: seconds every hop takes to deliver a message (and
    a cancellation mark). stage_timeout: seconds a stage rank may go without a status message
    before the run stops naming it (None or 0: never)."""

    def __init__(self, model_dir, n_stages: int | None = None, split: list[int] | None = None, n_seqs: int = 1,
                 tracer: Tracer | None = None, start_timeout: float = 120.0,
                 stage_timeout: float | None = STAGE_TIMEOUT_S, cache_cells: int = 256, link_delay: float = 0.0):
        MPI, comm = WORLD.start()
        self.MPI, self.comm = MPI, comm
        size = comm.Get_size()
        if comm.Get_rank() != HEAD:
            raise InputError("MPIPipeline runs on rank 0 (the head)")
        n_ranks = size - 1
        wanted = n_stages if n_stages is not None else len(split) if split else n_ranks
        if wanted != n_ranks or n_ranks < 1:
            raise InputError(f"{wanted} stages need {wanted + 1} MPI ranks (the head and one per stage), but this "
                             f"job has {size}: run mpiexec -n {wanted + 1}, or leave --stages out")
        self.config = config = load_config(model_dir)
        self.splits = split_layers(config.n_layers, n_ranks, split)
        self.tracer = tracer if tracer is not None else Tracer(enabled=False)
        self.stage_timeout = stage_timeout or None
        self.link = LinkDelay(link_delay)
        self.answers: deque = deque()
        self.held: deque = deque()  # (due ns, frame) received from the last stage, not yet delivered
        self.outbox, self.small = Outbox(), Outbox()
        self.backoff = Backoff()
        self.closed = self.faulted = False
        self.ready = 0
        self.shutdown_seen = False
        self.hosts: dict[int, str] = {}
        self.pids: dict[int, int] = {}
        self.last_seen: dict[int, float] = {}
        self.states: dict[int, int] = {}
        self.errors: dict[int, str] = {}
        self.last_check = 0.0
        self.host = socket.gethostname()
        heartbeat_s = min(0.5, self.stage_timeout / 4) if self.stage_timeout else 1.0
        deadline = time.monotonic() + start_timeout
        try:
            self._hellos(deadline)
            _forget_mpich_segments()
            WORLD.pipeline_opened = True
            _tell_supervisor([f"rank {i + 1} {self.pids[i + 1]} {self.hosts[i + 1]} {self._describe(i)}"
                              for i in range(self.n_stages)])
            for i, (lo, hi) in enumerate(self.splits):
                rank = i + 1
                spec = MPIStageSpec(i, n_ranks, str(Path(model_dir).resolve()), lo, hi, n_seqs, cache_cells,
                                    self.tracer.enabled, heartbeat_s, link_delay, self._clock_offset(rank),
                                    self.host, os.getpid())
                comm.send(("assign", spec), rank, CONTROL)
                self.last_seen[rank] = time.monotonic()
            while self.ready < self.n_stages:
                self._pull()
                self._check_stages()
                if time.monotonic() > deadline:
                    self.faulted = True
                    slow = next((i for i in range(self.n_stages) if self.states.get(i + 1, 0) == 0), 0)
                    raise StageCrashed(f"{self._describe(slow)} did not start within {start_timeout:.0f} s")
                self.backoff.sleep()
        except BaseException:
            self.close(polite=False)
            raise

    def _hellos(self, deadline: float) -> None:
        while len(self.hosts) < self.n_stages:
            for rank, message in receive_objects(self.comm, self.MPI, self.MPI.ANY_SOURCE, CONTROL):
                if message[0] == "hello":
                    self.hosts[rank], self.pids[rank] = message[1], message[2]
            if time.monotonic() > deadline:
                missing = sorted(set(range(1, self.n_stages + 1)) - set(self.hosts))
                raise StageCrashed(f"MPI rank {missing[0]} (stage {missing[0] - 1}) did not report within the start "
                                   "timeout")
            time.sleep(1e-3)

    def _clock_offset(self, rank: int) -> int:
        """The rank's monotonic clock minus ours, from the ping-pong with the least round trip."""
        best = None
        for _ in range(SYNC_ROUNDS):
            t0 = time.monotonic_ns()
            self.comm.send(("sync",), rank, CONTROL)
            _, theirs = self.comm.recv(source=rank, tag=CONTROL)
            t1 = time.monotonic_ns()
            if best is None or t1 - t0 < best[0]:
                best = (t1 - t0, theirs - (t0 + t1) // 2)
        return best[1] if rank and self.hosts.get(rank) != self.host else 0  # one machine: one clock

    # the Pipeline interface -----------------------------------------------------------------

    def submit(self, msg) -> None:
        if isinstance(msg, Run):
            self.tracer.instant("head", f"submit {msg.run_id}", time.monotonic(), "submit", msg.run_id)
        send_frame(self.comm, self.MPI, self.outbox, encode(msg), 1, self.link)
        self.backoff.reset()
        while True:  # a bounded number of sends in flight; answers keep moving meanwhile
            self._pull()
            if len(self.outbox) <= SEND_WINDOW:
                return
            self._check_stages()
            self.backoff.sleep()

    def cancel(self, run_id: int) -> None:
        marks = np.array([self.link.now_ns() + self.link.delay_ns if self.link else 0, run_id], dtype=np.int64)
        for rank in range(1, self.n_stages + 1):
            self.small.add(self.comm.Isend([marks, self.MPI.INT64_T], rank, CANCEL), marks)
        self.small.progress()
        self.tracer.instant("head", f"cancel {run_id}", time.monotonic(), "cancel", run_id)

    def poll(self) -> bool:
        self._pull()
        return bool(self.answers)

    def wait(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        self.backoff.reset()
        while not self.poll():
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._check_stages()
            self.backoff.sleep(left)
        return True

    def receive(self):
        self.backoff.reset()
        while not self.poll():
            self._check_stages()
            self.backoff.sleep(self.link.wait_s(self.held[0][0]) if self.held else 1.0)
        return self.answers.popleft()

    def now(self) -> float:
        return time.monotonic()

    # ------------------------------------------------------------------------------------------

    def _pull(self) -> None:
        """Receive what the last stage sent; deliver what is due."""
        if receive_frames(self.comm, self.MPI, self.n_stages, self.held):
            self.backoff.reset()
        self.outbox.progress()
        self.small.progress()
        now = self.link.now_ns()
        while self.held and self.held[0][0] <= now:
            msg = decode(memoryview(self.held.popleft()[1])[STAMP.size:])  # views of a frame we own
            if isinstance(msg, (Result, Cancelled)):
                self.answers.append(msg)
            elif isinstance(msg, Ready):
                self.ready += 1
            elif isinstance(msg, TraceEvents):
                self.tracer.extend(msg.events)
            elif isinstance(msg, Shutdown):
                self.shutdown_seen = True

    def _describe(self, i: int) -> str:
        lo, hi = self.splits[i]
        rank = i + 1
        where = f", pid {self.pids[rank]} on {self.hosts[rank]}" if rank in self.pids else ""
        return f"stage {i} (layers {lo}-{hi - 1}, rank {rank}{where})"

    def _check_stages(self) -> None:
        """Raise StageCrashed for the first stage rank that failed, died or went silent."""
        now = time.monotonic()
        for rank, message in receive_objects(self.comm, self.MPI, self.MPI.ANY_SOURCE, STATUS):
            self.last_seen[rank] = now
            if message[0] == "failed":
                self.errors.setdefault(rank, message[1])
            else:
                self.states[rank] = message[1]
        if self.errors:
            rank = min(self.errors)
            self.faulted = True
            raise StageCrashed(f"{self._describe(rank - 1)} failed: {self.errors[rank]}")
        if now - self.last_check < POLL_S:
            return
        self.last_check = now
        for rank in range(1, self.n_stages + 1):
            if self.hosts.get(rank) == self.host and rank in self.pids and not pid_alive(self.pids[rank]):
                self.faulted = True
                raise StageCrashed(f"{self._describe(rank - 1)} died")
        if self.stage_timeout:
            for rank in range(1, self.n_stages + 1):
                silent = now - self.last_seen.get(rank, now)
                if silent > self.stage_timeout:
                    self.faulted = True
                    state = STATE_NAMES[self.states[rank]] if rank in self.states else "starting"
                    raise StageCrashed(f"{self._describe(rank - 1)} made no progress for {silent:.1f} s while "
                                       f"{state} (stopped, deadlocked or unreachable; --stage-timeout is "
                                       f"{self.stage_timeout:g} s)")

    # ------------------------------------------------------------------------------------------

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(polite=exc_type is None)

    def close(self, polite: bool = True) -> None:
        """A polite close sends Shutdown through every stage and waits (SHUTDOWN_S) for it to
        come back; then every rank may finalize MPI. Any other end leaves the ranks to
        `finish_head`, which aborts the job."""
        if self.closed:
            return
        self.closed = True
        if not (polite and not self.faulted and WORLD.pipeline_opened):
            return
        try:
            send_frame(self.comm, self.MPI, self.outbox, encode(Shutdown()), 1, self.link)
            deadline = time.monotonic() + SHUTDOWN_S + 2 * self.n_stages * self.link.delay_ns / 1e9
            while not self.shutdown_seen and time.monotonic() < deadline:
                self._pull()
                self._check_stages()
                self.backoff.sleep()
            while (len(self.outbox) or len(self.small)) and time.monotonic() < deadline:
                self._pull()
                self.backoff.sleep()
        except MinipipeError:
            return
        WORLD.clean = self.shutdown_seen and not len(self.outbox) and not len(self.small)


# ----------------------------------------------------------------------------------------------
# how the head's process ends


def head_starts() -> None:
    """Rank 0: join the MPI job at once (so `finish_head` can always release or end the stage
    ranks). Under a supervisor on this host, also write to the supervisor's own stdout and
    stderr (not through mpiexec, so the terminal, streaming and one-line errors are as without
    MPI), and tell it our pid."""
    WORLD.start()
    value = os.environ.get(SUPERVISOR_ENV)
    if not value:
        return
    pid, host, status_file = value.split(":", 2)
    if host != socket.gethostname():
        return
    try:
        for fd in (1, 2):
            target = os.open(f"/proc/{pid}/fd/{fd}", os.O_WRONLY | os.O_APPEND)
            (sys.stdout if fd == 1 else sys.stderr).flush()
            os.dup2(target, fd)
            os.close(target)
    except OSError:
        return
    WORLD.supervisor = (int(pid), host, status_file)
    _tell_supervisor([f"pid {os.getpid()}"])


def _tell_supervisor(lines: list[str]) -> None:
    """Append lines to the supervisor's status file: our pid, the roster of stage ranks (so it
    can name a rank whose death made mpiexec end the job), our exit status."""
    if WORLD.supervisor is not None:
        try:
            with open(WORLD.supervisor[2], "a") as f:
                f.write("".join(line + "\n" for line in lines))
        except OSError:
            pass


def _forget_mpich_segments() -> None:
    """Unlink the shared-memory segments MPICH mapped into this process at MPI_Init (every rank
    on this host has mapped them by now; the mappings stay valid). MPICH unlinks them when it
    finalizes, which an aborted or killed job never does: without this each such job would
    leave a few MiB in /dev/shm. Each rank does it, for its own host."""
    try:
        with open("/proc/self/maps") as f:
            names = {line.rsplit("/dev/shm/", 1)[1].strip() for line in f if "/dev/shm/mpich_shm_" in line}
    except OSError:
        return
    for name in names:
        if "/" not in name and not name.endswith("(deleted)"):
            try:
                os.unlink(f"/dev/shm/{name}")
            except OSError:
                pass


def finish_head(code: int) -> int:
    """End the head's process with `code`. A pipeline that shut down cleanly: return (every rank
    finalizes MPI). None opened: release the stage ranks, return. Otherwise: MPI_Abort, which
    ends every rank on every host, after our last line is out."""
    _tell_supervisor([f"exit {code}"])
    if WORLD.MPI is None:
        return code
    if WORLD.pipeline_opened and not WORLD.clean:
        _abort(code)
    if not WORLD.pipeline_opened:
        comm = WORLD.comm
        requests = [comm.isend(("exit",), rank, CONTROL) for rank in range(1, comm.Get_size())]
        deadline = time.monotonic() + 2.0
        while not all(r.Test() for r in requests):
            if time.monotonic() > deadline:
                _abort(code)
            time.sleep(1e-3)
    return code


def _abort(code: int) -> None:
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):
            pass
    if WORLD.supervisor is None:
        time.sleep(ABORT_GRACE_S)  # mpiexec forwards our output: let it pass the last line on
    null = os.open(os.devnull, os.O_WRONLY)
    os.dup2(null, 1)
    os.dup2(null, 2)  # MPI_Abort's own "Abort(1) on node 0 ..." line
    WORLD.comm.Abort(code)
    os._exit(code)


# ----------------------------------------------------------------------------------------------
# the supervisor: `minipipe generate --runtime mpi` started by hand


def find_mpiexec() -> str:
    """The mpiexec beside this Python (the MPICH wheel installs it into the environment), else
    the one on PATH."""
    import shutil

    beside = Path(sys.executable).parent / "mpiexec"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    found = shutil.which("mpiexec")
    if found is None:
        raise InputError(f"--runtime mpi needs mpiexec: {INSTALL_HINT}")
    return found


def _hostfile(hostfile: str | None, hosts: str | None) -> str | None:
    """A hostfile with this machine first, one rank (the head), then the user's hosts (None
    when neither --hostfile nor --hosts is given: every rank runs here)."""
    if hostfile is None and hosts is None:
        return None
    if hostfile is not None and hosts is not None:
        raise InputError("give --hostfile or --hosts, not both")
    if hostfile is not None:
        try:
            lines = [line.strip() for line in Path(hostfile).read_text().splitlines()]
        except OSError as e:
            raise InputError(f"--hostfile {hostfile}: {e.strerror or e}") from None
        entries = [line for line in lines if line and not line.startswith("#")]
    else:
        entries = [h.strip() for h in hosts.split(",") if h.strip()]
    if not entries:
        raise InputError("--hostfile/--hosts names no host")
    fd, path = tempfile.mkstemp(prefix="minipipe-hosts-", text=True)
    with os.fdopen(fd, "w") as f:
        f.write("\n".join([f"{socket.gethostname()}:1", *entries]) + "\n")
    return path


HYDRA_NOISE = ("[mpiexec@", "[proxy:", "====", "=   ", "YOUR APPLICATION TERMINATED", "This typically refers",
               "Please see the FAQ", "Abort(")


def supervise(argv: list[str], n_stages: int, hostfile: str | None = None, hosts: str | None = None) -> int:
    """Run this very command under `mpiexec -n n_stages+1` and return the head's exit status.

    The head (rank 0, on this machine) writes straight to our stdout and stderr; mpiexec's own
    output is kept, and shown (one line) only if the job failed without the head saying why."""
    import importlib.util

    if importlib.util.find_spec("mpi4py") is None:
        raise InputError(f"--runtime mpi needs mpi4py: {INSTALL_HINT}")
    mpiexec = find_mpiexec()
    host_path = _hostfile(hostfile, hosts)
    fd, status_file = tempfile.mkstemp(prefix="minipipe-mpi-", text=True)
    os.close(fd)
    cmd = [mpiexec, "-n", str(n_stages + 1)]
    if host_path is not None:
        cmd += ["-f", host_path]
    cmd += [sys.executable, "-m", "minipipe", *argv]
    env = dict(os.environ, **{SUPERVISOR_ENV: f"{os.getpid()}:{socket.gethostname()}:{status_file}"})
    output: deque[str] = deque(maxlen=200)
    interrupted: list[int] = []
    previous = {}
    try:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env=env, start_new_session=True, text=True, errors="replace",
                                preexec_fn=_end_with_parent)
    except OSError as e:
        raise InputError(f"could not start {mpiexec}: {e.strerror or e}") from None
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()

    def forward(signum, frame):  # Ctrl-C reaches us only (mpiexec has its own session): pass it on once
        if not interrupted:
            interrupted.append(signum)
            interrupted.append(time.monotonic())
            try:
                proc.send_signal(signum)
            except OSError:
                pass

    for sig in (signal.SIGINT, signal.SIGTERM):
        previous[sig] = signal.signal(sig, forward)
    watcher = _RankWatcher(status_file)
    try:
        while proc.poll() is None:
            time.sleep(0.05)
            if interrupted and time.monotonic() - interrupted[1] > INTERRUPT_GRACE_S:
                _kill_group(proc)
            head = _head_pid(status_file)
            if head is not None and _status_code(status_file) is None and not pid_alive(head):
                time.sleep(0.5)  # the head is gone without a word: end the job
                if proc.poll() is None and _status_code(status_file) is None:
                    output.append("minipipe: error: the head (rank 0) died")
                    _kill_group(proc)
        reader.join(timeout=2.0)
        code = _status_code(status_file)
        if code is not None:
            return code
        if interrupted:
            _say("minipipe: interrupted")
            return 130 if interrupted[0] == signal.SIGINT else 143
        lines = [line.rstrip() for line in output if line.strip()]
        said = [line for line in lines if line.startswith("minipipe: error:")]
        if said:
            _say(said[-1])
            return 1
        died = _who_died(lines, status_file, watcher.result())
        if died is not None:
            _say(f"minipipe: error: {died} (mpiexec ended every rank)")
            return 1
        useful = [line for line in lines if not line.startswith(HYDRA_NOISE) and "Traceback" not in line]
        reason = useful[-1] if useful else f"exit status {proc.returncode}"
        _say(f"minipipe: error: the MPI job failed before its head could report ({reason})")
        return 1
    finally:
        watcher.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if proc.poll() is None:
            _kill_group(proc)
        _catch_up()
        for path in (status_file, host_path):
            if path is not None:
                try:
                    os.unlink(path)
                except OSError:
                    pass


def _end_with_parent() -> None:
    """In mpiexec, before exec: SIGTERM when the supervisor dies (even by SIGKILL), which mpiexec
    passes to every rank, so the head ends the job (Linux; elsewhere nothing)."""
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def _catch_up() -> None:
    """The head appended to our stdout and stderr through descriptions of its own: when they are
    regular files, move our offsets (shared with the shell that opened them) past its bytes."""
    for fd in (1, 2):
        try:
            os.lseek(fd, 0, os.SEEK_END)
        except OSError:  # a pipe or a terminal: nothing to do
            pass


def _say(line: str) -> None:
    _catch_up()
    print(line, file=sys.stderr, flush=True)


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except OSError:
        pass
    try:
        proc.wait(timeout=5)
    except subprocess.TimeoutExpired:
        pass


class _RankWatcher:
    """Watches the ranks on this host (pids from the head's roster in the status file) and
    notes which one began to die first: when a rank dies, mpiexec kills all the others within
    milliseconds, and its own report does not reliably name the first (it often names rank 0).
    A thread reads each rank's /proc/PID/stat every millisecond (`_exiting`)."""

    def __init__(self, status_file: str):
        self.status_file = status_file
        self.first_dead: list[str] | None = None  # the rank(s) that began to exit first
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        """Wait for the head's roster (checked every 2 ms, from the start: a rank may die moments
        after it is written), then watch the ranks in it."""
        while not self.closed.is_set():
            ranks = _roster(self.status_file)
            if ranks:
                return self._watch(ranks)
            time.sleep(2e-3)

    def close(self) -> None:
        """Stop waiting for a roster (the job is over)."""
        self.closed.set()

    def result(self, wait_s: float = 0.5) -> list[str] | None:
        """The rank(s) that began to exit first, waiting up to `wait_s` for the watcher to say."""
        self.thread.join(wait_s)
        return self.first_dead

    def _watch(self, ranks: dict[int, str]) -> None:
        """Wait for the first rank to start dying, checking every millisecond. A process's exit
        begins long before it ends: once killed it closes its files (its MPI connections: the
        launcher learns of the death there and kills the other ranks at once) and only then
        frees its memory, which takes longer for a big process, so the rank whose *end* comes
        first can be one the launcher killed. So the watcher looks for the start: the kernel's
        PF_EXITING flag in /proc/PID/stat (or the process gone). Several seen at once: all named."""
        while not self.closed.is_set():
            dying = [what for pid, what in ranks.items() if _exiting(pid)]
            if dying:
                self.first_dead = dying
                return
            time.sleep(1e-3)


PF_EXITING = 0x4  # linux/sched.h: the task is getting shut down


def _exiting(pid: int) -> bool:
    """Process `pid` has begun to exit (PF_EXITING), is a zombie, or is gone (Linux /proc; where
    there is no /proc: not alive)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except FileNotFoundError:
        return True
    except OSError:
        return not pid_alive(pid)
    fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session tty tpgid flags
    return fields[0] in (b"Z", b"X") or bool(int(fields[6]) & PF_EXITING)


def _roster(status_file: str) -> dict[int, str]:
    """{pid: description} of the head and the stage ranks on this host, once the head wrote them."""
    lines = _status_lines(status_file)
    host = socket.gethostname()
    ranks = {}
    for line in lines:
        if line.startswith("rank "):  # "rank R PID HOST description"
            _, _, pid, rank_host, description = line.split(" ", 4)
            if rank_host == host:
                ranks[int(pid)] = description
    head = _head_pid(status_file)
    if not ranks or head is None:
        return {}
    ranks[head] = f"the head (rank 0, pid {head} on {host})"
    return ranks


def _who_died(lines: list[str], status_file: str, first_dead: list[str] | None) -> str | None:
    """The rank whose death made mpiexec end the job ("stage 1 (...) died: killed by SIGKILL"):
    the one rank on this host that began to exit first, how it ended from mpiexec's report ("EXIT CODE:
    9"). None if mpiexec reported no rank's death."""
    import re

    code = re.search(r"EXIT CODE: (\d+)", "\n".join(lines))
    if code is None:
        return None
    n = int(code.group(1))
    try:
        how = f"died: killed by {signal.Signals(n).name}" if 0 < n < 64 else f"died: exited with status {n}"
    except ValueError:
        how = f"died: exit code {n}"
    if first_dead is not None and len(first_dead) == 1:
        return f"{first_dead[0]} {how}"
    return f"an MPI rank {how}"


def _status_lines(status_file: str) -> list[str]:
    try:
        return Path(status_file).read_text().splitlines()
    except OSError:
        return []


def _head_pid(status_file: str) -> int | None:
    pids = [int(line.split()[1]) for line in _status_lines(status_file) if line.startswith("pid ")]
    return pids[-1] if pids else None


def _status_code(status_file: str) -> int | None:
    codes = [int(line.split()[1]) for line in _status_lines(status_file) if line.startswith("exit ")]
    return codes[-1] if codes else None
