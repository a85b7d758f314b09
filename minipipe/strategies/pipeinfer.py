"""`pipeinfer`: asynchronous continuous speculation with early inference cancellation and
pipelined KV-cache multibuffering (PipeInfer, Butler et al., SC'24; ALGORITHMS.md §1).

The head never waits idle while the pipeline works:

* **Asynchronous speculation.** After every verification that commits tokens, the head launches
  one *non-speculative* single-token run for the newest committed token (it writes sequence 0,
  is never cancelled, and guarantees one committed token per pipeline traversal), then keeps the
  pipeline filled with *speculative* runs while it waits for the oldest result.
* **Continuous speculation.** Each speculative run is a micro-batch of 1 to `n_draft` drafted
  tokens continuing the chain of the runs before it. Drafting stops when the draft's confidence
  falls below the cutoff `p_accept + iter·p_recovery − n_rejected·p_decay` (iter: runs launched
  in this burst; n_rejected: empty drafting attempts since the last accepted token); a branch
  splits when an alternative's probability exceeds `p_split` + the same adjustment, up to
  `branches` branches per run.
* **KV multibuffering.** Each speculative run writes only its own partition of sequence ids. Its
  partition first *views* the committed prefix (sequence 0) and, beyond it, the previous run's
  first branch — KV edits queued behind those runs, so every stage applies them after computing
  the runs they refer to. Accepted rows are *committed* (adopted into sequence 0); every
  partition is *released* when its run's answer has been consumed.
* **Early cancellation.** A speculative run whose assumed context no longer matches the
  committed tokens is cancelled through the shared map; stages skip it (before or between
  layers) and forward a stub. Answers are consumed in launch order.

Verification of any run (speculative or not), when its answer is consumed: walk its tree from
the root along the committed tokens; a node at position q whose path matches the committed text
predicts position q + 1; when q + 1 is the next position to commit, the target's token there is
committed, and the walk continues if a child carries it. Only target argmaxes over contexts
equal to the committed text are ever committed, so the output is greedy decoding's.

Positions: a run's `start` is the position of its first drafted token; its root (not a row) is
the token just before, computed by the run before it in the chain (or the non-speculative run).
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from ..batch import Batch
from ..draft import DraftSource
from ..generation import TokenSink
from ..metrics import SpeculationStats
from ..multibuffer import KVMultiBuffer, Partition
from ..runtime.base import Pipeline
from ..transport.messages import Cancelled, Run
from ..tree import TokenTree
from .base import Strategy


@dataclass
class InFlight:
    """A run the head has launched and not yet consumed."""

    run_id: int
    start: int  # position of the run's first row
    tree: TokenTree  # root = the token at start - 1 (not a row); rows = nodes 1..
    chain: list[int]  # tokens this run assumes at positions [base, start) beyond the committed text
    base: int  # committed length when launched: positions < base were committed then
    partition: Partition | None  # None: a non-speculative run (writes sequence 0)
    cancelled: bool = False

    @property
    def speculative(self) -> bool:
        return self.partition is not None

    def walk(self, committed: list[int]) -> tuple[str, int, list[int]]:
        """Follow the committed text through this run: (status, node reached, nodes on the way).

        status "ok": the assumed chain and the tree path agree with every committed position they
        cover and the path reaches the newest position, so the run can still be used; "stale":
        everything agrees but the committed text has moved past the run's tree; "diverged": the
        run assumed a token the target did not choose.
        """
        C = len(committed)
        for i, token in enumerate(self.chain):
            if self.base + i < C and committed[self.base + i] != token:
                return "diverged", 0, []
        node, path, pos = 0, [], self.start
        while pos < C:
            child = self.tree.match(node, committed[pos])
            if child is None:
                return ("stale" if not self.tree.nodes[node].children else "diverged"), node, path
            node, pos = child, pos + 1
            path.append(node)
        return "ok", node, path

    def branch_end(self) -> tuple[list[int], int]:
        """Tokens of branch 0 and the position of its last node (the chain continues there)."""
        branch = self.tree.first_branch()
        return [self.tree.nodes[i].token for i in branch], self.start + len(branch) - 1


@dataclass
class PipeInferStats:
    runs_launched: int = 0
    speculative_runs: int = 0
    non_speculative_runs: int = 0
    runs_verified: int = 0  # answers consumed that were used (committed or confirmed tokens)
    runs_cancelled: int = 0  # speculative runs the head cancelled
    cancelled_too_late: int = 0  # of those, answered in full anyway (every stage had finished it)
    stage_layers_skipped: int = 0  # stage-layers not computed thanks to cancellation
    inflight_depth: list[tuple[float, int]] = field(default_factory=list)  # (head time, runs in flight)
    speculation: SpeculationStats = field(default_factory=SpeculationStats)

    def to_dict(self) -> dict:
        depths = [d for _, d in self.inflight_depth]
        return {
            "runs_launched": self.runs_launched,
            "speculative_runs": self.speculative_runs,
            "non_speculative_runs": self.non_speculative_runs,
            "runs_verified": self.runs_verified,
            "runs_cancelled": self.runs_cancelled,
            "cancelled_too_late": self.cancelled_too_late,
            "stage_layers_skipped": self.stage_layers_skipped,
            "mean_inflight_depth": round(sum(depths) / len(depths), 3) if depths else None,
            "max_inflight_depth": max(depths) if depths else None,
            **self.speculation.to_dict(),
        }

    def summary(self) -> str:
        d = self.to_dict()
        return (f"{self.speculation.summary()}; runs: {d['speculative_runs']} speculative + "
                f"{d['non_speculative_runs']} plain, "
                f"{d['runs_cancelled']} cancelled ({d['stage_layers_skipped']} stage-layers skipped), "
                f"mean in flight {d['mean_inflight_depth']}")


class PipeInferStrategy(Strategy):
    """PipeInfer. Knobs as in the original (its defaults; its README suggests n_draft 3-8):

    p_accept:   draft confidence cutoff; a branch stops drafting below it
    p_split:    an alternative above it opens a new branch (up to `branches`)
    p_recovery: raises the cutoff with each run launched in one burst (stops long-diverged
                speculation)
    p_decay:    lowers the cutoff after empty drafting attempts (fills idle time)
    n_draft:    most drafted tokens per speculative run
    branches:   most branches per run
    max_inflight: most runs in flight (the original self-regulates; a cap keeps a very fast or
                always-confident draft from running ahead without bound)
    """

    name = "pipeinfer"

    def __init__(self, draft: DraftSource, p_accept: float = 0.5, p_split: float = 0.1, p_recovery: float = 0.0,
                 p_decay: float = 0.0, n_draft: int = 16, branches: int = 1, max_inflight: int = 16,
                 narrate=None):
        self.draft = draft
        self.narrate = narrate  # called with one sentence per decision (examples, teaching)
        self.p_accept, self.p_split, self.p_recovery, self.p_decay = p_accept, p_split, p_recovery, p_decay
        self.n_draft, self.branches, self.max_inflight = n_draft, branches, max_inflight
        self.buffers = KVMultiBuffer(n_partitions=max_inflight + 1, width=branches)
        self.n_seqs = self.buffers.n_seqs
        self.stats = PipeInferStats()

    # ------------------------------------------------------------------------------------------

    def decode(self, pipe: Pipeline, prompt: list[int], first_token: int, sink: TokenSink) -> None:
        self.pipe, self.sink, self.committed = pipe, sink, list(prompt) + [first_token]
        self.inflight: deque[InFlight] = deque()
        self.n_rejected = 0
        self.draft.reset(prompt)
        self.launch_plain()
        self.speculate()
        while not sink.done:
            answer = pipe.receive()  # the oldest run's answer (waits only when speculation is exhausted)
            run = self.inflight.popleft()
            assert answer.run_id == run.run_id, f"answers out of order: {answer.run_id} != {run.run_id}"
            self.consume(run, answer)
            self.speculate()
        self.finish()

    def finish(self) -> None:
        """The generation is over: cancel every run still in flight, wait for their answers (none
        is used) and free their partitions, so the caches hold only the committed text."""
        for run in self.inflight:
            if run.speculative and not run.cancelled:
                run.cancelled = True
                self.pipe.cancel(run.run_id)
        while self.inflight:
            self.pipe.receive()
            run = self.inflight.popleft()
            if run.speculative:
                self.submit(self.buffers.release(run.partition))

    def consume(self, run: InFlight, answer) -> None:
        """Verify one answer: commit what it proves, adopt its accepted rows, free its partition."""
        if isinstance(answer, Cancelled):
            self.stats.stage_layers_skipped += answer.layers_skipped
        # a cancelled run may have stopped part-way at some stage: its rows are never used
        usable = not run.cancelled and not isinstance(answer, Cancelled)
        self.stats.cancelled_too_late += run.cancelled and not isinstance(answer, Cancelled)
        if isinstance(answer, Cancelled):
            self.say(f"run {run.run_id} comes back as a cancelled stub ({answer.layers_skipped} stage-layers skipped)")
        committed_before = len(self.committed)
        status, node, accepted = run.walk(self.committed)
        consistent = status == "ok"
        if usable and consistent:
            while node != 0 and len(self.committed) == run.start + len(accepted) and not self.sink.done:
                token = int(answer.tokens[node - 1])  # row of node = node - 1 (the root is no row)
                self.commit([token])
                node = run.tree.match(node, token)
                if node is None:
                    break
                accepted.append(node)
        if usable and status == "diverged":
            self.say(f"run {run.run_id} answers, but it assumed a token the target did not choose: ignored")
        elif usable and status == "stale":
            self.say(f"run {run.run_id} answers, but the committed text has already moved past it: ignored")
        elif usable and len(self.committed) > committed_before:
            self.say(f"run {run.run_id} answers: commits {self.committed[committed_before:]}"
                     + (f" ({len(accepted)} drafted token(s) confirmed)" if run.speculative and accepted else ""))
        elif usable:
            self.say(f"run {run.run_id} answers: nothing new (its positions are already committed)")
        if run.speculative:  # drafted: every launched token; accepted: those the committed text confirms
            self.stats.speculation.record(len(run.tree) - 1, run.tree.depth, len(accepted))
            edits = []
            if usable and consistent and accepted:  # sequence 0 adopts the accepted rows (greedy's own K/V)
                leaf = run.tree.leaf_below(accepted[-1])
                seq = run.partition[run.tree.leaves().index(leaf)]
                edits += self.buffers.commit(seq, run.start, run.start + len(accepted))
                self.say(f"KV: sequence 0 adopts sequence {seq}'s cells at positions "
                         f"{run.start}..{run.start + len(accepted) - 1}")
            self.submit(edits + self.buffers.release(run.partition))
        if len(self.committed) > committed_before:
            self.stats.runs_verified += 1
            self.n_rejected = 0
            self.cancel_invalid()
            if not self.sink.done:
                self.launch_plain()

    def say(self, sentence: str) -> None:
        if self.narrate is not None:
            self.narrate(sentence)

    def commit(self, tokens: list[int]) -> None:
        for t in tokens:
            self.committed.append(t)
            self.sink.add([t])
            self.pipe.mark(f"commit {t}", "commit")

    def cancel_invalid(self) -> None:
        """Early cancellation: stop speculative runs that can no longer be accepted."""
        for run in self.inflight:
            status = run.walk(self.committed)[0] if run.speculative and not run.cancelled else "ok"
            if status != "ok":
                run.cancelled = True
                self.say(f"cancel run {run.run_id}: " + ("it assumed a token the target did not choose"
                                                          if status == "diverged" else "it can no longer add anything"))
                self.pipe.cancel(run.run_id)
                self.stats.runs_cancelled += 1

    # ------------------------------------------------------------------------------------------
    # launching

    def submit(self, edits) -> None:
        self.pipe.submit_edits(edits)

    def launch(self, run: InFlight) -> None:
        self.inflight.append(run)
        rows = run.tree.batch(run.start - 1, run.partition[0] if run.partition else 0, include_root=False)
        if run.partition is None:
            rows = Batch.chain(rows.tokens, run.start)  # sequence 0
        self.pipe.submit(Run(run.run_id, rows, speculative=run.speculative))
        what = "speculative" if run.speculative else "plain"
        self.say(f"launch {what} run {run.run_id}: tokens {[int(t) for t in rows.tokens]} at positions "
                 f"{run.start}..{run.start + run.tree.depth - 1}"
                 + (f", sequences {run.partition}" if run.partition else ", sequence 0"))
        self.stats.runs_launched += 1
        self.stats.inflight_depth.append((self.pipe.now(), len(self.inflight)))

    def launch_plain(self) -> None:
        """The non-speculative run: the newest committed token, into sequence 0."""
        C = len(self.committed)
        tree = TokenTree(self.committed[-2] if C >= 2 else 0)
        tree.add(0, self.committed[-1], 1.0)
        self.launch(InFlight(self.pipe.new_run_id(), C - 1, tree, [], C - 1, None))
        self.stats.non_speculative_runs += 1

    def chain_tail(self) -> InFlight | None:
        """The latest in-flight speculative run whose first branch still fits the committed text."""
        C = len(self.committed)
        for run in reversed(self.inflight):
            if not run.speculative or run.cancelled:
                continue
            tokens, end = run.branch_end()
            consistent = run.walk(self.committed)[0] == "ok" and all(
                self.committed[run.start + i] == t for i, t in enumerate(tokens) if run.start + i < C)
            if consistent and end >= C - 1:
                return run
        return None

    def speculate(self) -> None:
        """Fill the pipeline with speculative runs until an answer waits or the cutoff says stop."""
        iteration = 0
        while not self.sink.done and len(self.inflight) < self.max_inflight and not self.pipe.poll():
            adjust = iteration * self.p_recovery - self.n_rejected * self.p_decay
            if self.p_accept + adjust >= 1.0:
                return
            C = len(self.committed)
            tail = self.chain_tail()
            if tail is None:
                chain, start = [], C
            else:
                tokens, end = tail.branch_end()
                chain = tail.chain[C - tail.base:] if C < tail.start else []
                chain = (chain + tokens[max(0, C - tail.start):]) if C <= end else []
                start = end + 1
            limit = self.sink.n_prompt + self.sink.max_new_tokens - 1  # positions worth verifying
            limit = min(limit, self.sink.max_positions) - start
            if limit <= 0:
                return
            tree = self.draft_tree(self.committed + chain, self.committed[-1] if not chain else chain[-1],
                                   min(self.n_draft, limit), adjust)
            if len(tree) == 1:
                self.n_rejected += 1
                return
            part = self.buffers.acquire()
            if part is None:
                return
            edits = self.buffers.view(0, part, 0, C)
            if tail is not None and start > C:
                edits += self.buffers.view(tail.partition[self.tail_branch(tail)], part, C, start)
            self.submit(edits)
            self.launch(InFlight(self.pipe.new_run_id(), start, tree, chain, C, part))
            self.stats.speculative_runs += 1
            iteration += 1

    @staticmethod
    def tail_branch(run: InFlight) -> int:
        """Index (in the partition) of the sequence that holds the run's first branch."""
        return run.tree.leaves().index(run.tree.leaf_below(0))

    def draft_tree(self, context: list[int], root_token: int, n_draft: int, adjust: float) -> TokenTree:
        """PipeInfer's drafting: grow branches step by step, split on confident alternatives."""
        tree = TokenTree(root_token)
        cutoff, split = self.p_accept + adjust, self.p_split + adjust
        active, n_branches, n_tokens = [0], 1, 0
        rows_before = self.draft.tokens_computed
        while active and n_tokens < n_draft:
            next_active = []
            for leaf in active:
                if n_tokens >= n_draft:
                    break
                guesses = self.draft.top(context + tree.tokens_to(leaf), 1 + self.branches - n_branches)
                if not guesses or guesses[0][1] < cutoff:
                    continue  # this branch stops
                next_active.append(tree.add(leaf, *guesses[0]))
                n_tokens += 1
                for token, prob in guesses[1:]:
                    if n_branches < self.branches and prob > split and n_tokens < n_draft:
                        next_active.append(tree.add(leaf, token, prob))
                        n_branches += 1
                        n_tokens += 1
            active = next_active
        self.pipe.draft_work(self.draft.tokens_computed - rows_before)
        return tree
