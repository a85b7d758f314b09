"""The draft in a process of its own: a draft server for the process runtime.

PipeInfer gives its draft ranks of their own and SpecPipe folds the draft into the pipeline; in
both the draft proposes while the head verifies and schedules. Here the draft model runs in one
server process, fed over a pipe by the head, so drafting ahead of need (`Drafter.ahead`: SpecPipe's
next layer, PipeInfer's next run) really happens while the head waits for the pipeline.

Messages, head -> server (the server answers the ones marked ->, in the order they came):

    ("fork", key, prompt, sampling)              a request starts: the server forks its draft
    ("top", key, contexts, k)                    -> (guesses per context, rows computed)
    ("ahead", key, job, args, calibration)       -> ({(context, k): guesses} for every question
                                                    `job` asked, rows computed)
    ("release", key)                             the request is over
    ("stop",)

A job is a module-level drafting function of plain arguments (`pipeinfer.draft_run`,
`drafter.top_many_job`): the server runs it on the request's fork with the head's calibration at
the time it was sent, so it asks the questions the head will ask; the head keeps the answers and
asks again only about what the job did not foresee. Answers never change which tokens are
committed, only which are drafted.

Only drafts that compute (a model, `self:K`, or a merge with one) are worth a process; n-gram
and oracle drafts stay in the head.
"""

from __future__ import annotations

import multiprocessing as mp
from collections import deque
from collections.abc import Sequence

from .draft import DraftSource, Guess, prefetch_by_pool
from .errors import MinipipeError


class _Recorder(DraftSource):
    """Server side: a fork whose answers are remembered raw and handed to the job calibrated."""

    def __init__(self, source: DraftSource, calibration):
        self.source, self.calibration = source, calibration
        self.answers: dict[tuple, list[Guess]] = {}

    def top(self, context: Sequence[int], k: int) -> list[Guess]:
        return self.top_many([context], k)[0]

    def top_many(self, contexts, k):
        keys = [(tuple(int(t) for t in c), k) for c in contexts]
        missing = [i for i, key in enumerate(keys) if key not in self.answers]
        if missing:
            for i, guesses in zip(missing, self.source.top_many([contexts[i] for i in missing], k)):
                self.answers[keys[i]] = guesses
        out = [self.answers[key] for key in keys]
        if self.calibration is None:
            return out
        return [[(t, self.calibration.value(p)) for t, p in guesses] for guesses in out]


def serve(conn, spec: str, target_dir: str) -> None:
    """The server process: build the draft, then answer messages until told to stop."""
    from . import blas
    from .config import load_config
    from .draft import build_draft

    blas.set_threads(1)
    try:
        draft = build_draft(spec, target_dir, load_config(target_dir))
    except MinipipeError as e:
        conn.send(("error", str(e)))
        return
    conn.send(("ready", draft.name))
    forks: dict = {}
    while True:
        try:
            batch = [conn.recv()]
            while conn.poll(0):  # everything the head has sent meanwhile, answered in order
                batch.append(conn.recv())
        except EOFError:  # the head is gone
            return
        rows_ahead = _prefetch_together(batch, forks)
        for msg in batch:
            kind = msg[0]
            if kind == "stop":
                return
            if kind == "fork":
                _, key, prompt, sampling = msg
                forks[key] = draft.fork(prompt, sampling)
            elif kind == "release":
                fork = forks.pop(msg[1], None)
                if fork is not None:
                    fork.release()
            else:
                fork = forks[msg[1]]
                rows = fork.tokens_computed
                if kind == "top":
                    _, _, contexts, k = msg
                    answer = fork.top_many(contexts, k)
                else:  # "ahead"
                    _, _, job, args, calibration = msg
                    recorder = _Recorder(fork, calibration)
                    job(recorder, *args)
                    answer = recorder.answers
                conn.send((answer, fork.tokens_computed - rows + rows_ahead))
                rows_ahead = 0  # (the batched forward's rows are reported once, with the first answer)


def _prefetch_together(batch: list, forks: dict) -> int:
    """The questions of every `top` and SpecPipe-style `ahead` job (`top_many_job`) in `batch`
    whose request already has a fork on a draft model's shared pool, computed in one forward
    (`DraftPool.prefetch`): several requests' drafting costs about one request's. The jobs then
    find their answers in memory. Returns the rows computed."""
    from .drafter import top_many_job

    queries = []
    for msg in batch:
        fork = forks.get(msg[1]) if msg[0] in ("top", "ahead") else None
        if getattr(fork, "pool", None) is None:
            continue
        if msg[0] == "top":
            contexts = msg[2]
        elif msg[2] is top_many_job:
            contexts = msg[3][0]
        else:
            continue
        queries.extend((fork, [int(t) for t in c]) for c in contexts)
    return sum(prefetch_by_pool(queries, min_queries=2).values())


class DraftServer:
    """The head's side of a draft server; `source` is the strategy's draft (forks per request).

    Use as a context manager: the process stops when the `with` block ends."""

    def __init__(self, spec: str, target_dir, name: str = "draft"):
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.process = ctx.Process(target=serve, args=(child, spec, str(target_dir)), name="minipipe-draft",
                                   daemon=True)
        self.process.start()
        child.close()
        if not self.conn.poll(120):
            self.close()
            raise MinipipeError("the draft server did not start within 120 s")
        status, detail = self.conn.recv()
        if status == "error":
            self.close()
            raise MinipipeError(detail)
        self.expected: deque = deque()  # (fork, kind) of every answer on its way, in order
        self.ahead_sent = 0  # drafting jobs sent to run ahead of need (all requests)
        self.next_key = 0
        self.source = RemoteDraft(self, None)
        self.source.name = detail

    def send(self, msg, fork: "RemoteDraft | None" = None, kind: str | None = None) -> None:
        self.conn.send(msg)
        if kind is not None:
            self.expected.append((fork, kind))

    def receive_one(self):
        """The oldest answer on its way, handed to the fork that asked for it."""
        try:
            answer, rows = self.conn.recv()
        except (EOFError, OSError):
            raise MinipipeError("the draft server died") from None
        fork, kind = self.expected.popleft()
        fork.rows += rows
        if kind == "ahead":
            fork.pending -= 1
            fork.known.update(answer)
            return None
        return answer

    def close(self) -> None:
        try:
            self.conn.send(("stop",))
        except (OSError, ValueError):
            pass
        self.process.join(5)
        if self.process.is_alive():
            self.process.kill()
            self.process.join()
        self.conn.close()

    def __enter__(self) -> "DraftServer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RemoteDraft(DraftSource):
    """One request's draft on a draft server (the strategy's `source` is the unforked template).

    `top_many`: answers computed ahead are used as they are; otherwise the answers still on their
    way are received first (they may hold it), and only then is the server asked, and waited for.
    """

    name = "remote"

    def __init__(self, server: DraftServer, key: int | None):
        self.server, self.key = server, key
        self.known: dict[tuple, list[Guess]] = {}  # (context, k) -> guesses, from ahead jobs
        self.pending = 0  # ahead jobs sent, not yet answered
        self.rows = 0
        self.ahead_hits = 0  # questions answered by an ahead job

    def fork(self, prompt: Sequence[int], sampling=None) -> "RemoteDraft":
        clone = RemoteDraft(self.server, self.server.next_key)
        clone.name = self.name
        self.server.next_key += 1
        clone.sampling = sampling if sampling is not None else self.sampling
        self.server.send(("fork", clone.key, list(prompt), sampling))
        return clone

    def top(self, context: Sequence[int], k: int) -> list[Guess]:
        return self.top_many([context], k)[0]

    def top_many(self, contexts, k):
        keys = [(tuple(int(t) for t in c), k) for c in contexts]
        while self.pending and any(key not in self.known for key in keys):
            self.server.receive_one()  # an ahead job's answers may hold them
        missing = [i for i, key in enumerate(keys) if key not in self.known]
        self.ahead_hits += len(keys) - len(missing)
        if missing:
            self.server.send(("top", self.key, [list(keys[i][0]) for i in missing], k), self, "top")
            answer = None
            while answer is None:
                answer = self.server.receive_one()
            for i, guesses in zip(missing, answer):
                self.known[keys[i]] = guesses
        out = [self.known[key] for key in keys]
        shortest = min(len(key[0]) for key in keys)
        self.known = {key: v for key, v in self.known.items() if len(key[0]) >= shortest and key not in keys}
        return out

    def submit_ahead(self, job, args: tuple, calibration) -> None:
        """Have the server run `job` now; its answers come back while the head does other work."""
        self.server.send(("ahead", self.key, job, tuple(args), calibration), self, "ahead")
        self.server.ahead_sent += 1
        self.pending += 1

    def release(self) -> None:
        self.known = {}
        if self.key is not None:
            self.server.send(("release", self.key))

    @property
    def tokens_computed(self) -> int:
        return self.rows
