"""`pipeinfer`: asynchronous continuous speculation with early inference cancellation and
pipelined KV-cache multibuffering (PipeInfer, Butler et al., SC'24).

The head never waits idle while the pipeline works:

* **Asynchronous speculation.** After every verification that commits tokens, the head launches
  one *non-speculative* single-token run for the newest committed token (it writes the
  request's committed sequence,
  is never cancelled, and guarantees one committed token per pipeline traversal), then keeps the
  pipeline filled with *speculative* runs while it waits for the oldest result.
* **Continuous speculation.** Each speculative run is a micro-batch of 1 to `n_draft` drafted
  tokens continuing the chain of the runs before it. Drafting stops when the draft's confidence
  falls below the cutoff `p_accept + iter·p_recovery − n_rejected·p_decay` (iter: runs launched
  in this burst; n_rejected: empty drafting attempts since the last accepted token); a branch
  splits when an alternative's probability exceeds `p_split` + the same adjustment, up to
  `branches` branches per run.
* **KV multibuffering.** Each speculative run writes only its own partition of sequence ids. Its
  partition first *views* the committed prefix (the committed sequence) and, beyond it, the previous run's
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

from dataclasses import dataclass, field

from ..batch import Batch
from ..draft import DraftSource
from ..drafter import Backoff
from ..events import Answered, Cancelled, Committed, Drafted, Launched, Verified
from ..metrics import SpeculationStats
from ..multibuffer import KVMultiBuffer, Partition
from ..tree import TokenTree
from .base import Decoder, Part, Strategy


@dataclass
class InFlight:
    """What a launched run assumed (the decoder's bookkeeping for one part)."""

    start: int  # position of the run's first row
    tree: TokenTree  # root = the token at start - 1 (not a row); rows = nodes 1..
    chain: list[int]  # tokens this run assumes at positions [base, start) beyond the committed text
    base: int  # committed length when launched: positions < base were committed then
    partition: Partition | None  # None: a non-speculative run (writes the committed sequence)

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


class PipeInferDecoder(Decoder):
    """One request under PipeInfer."""

    def __init__(self, strategy: "PipeInferStrategy", request, seqs, head):
        super().__init__(strategy, request, seqs, head)
        self.open_draft(strategy.draft.fork(request.prompt, request.sampling), calibrate=strategy.calibrate)
        self.buffers = KVMultiBuffer(n_partitions=strategy.max_inflight + 1, width=strategy.branches, base=self.seq)
        self.n_rejected = 0  # empty drafting attempts since the last accepted token
        self.burst = 0  # speculative runs launched since the last answer
        self.declined = False  # drafting came up empty: no more offers until the next answer
        self.backoff = Backoff()  # ... and, while it keeps coming up empty, for more answers

    def begin(self) -> None:
        self.launch_plain()
        self.draft_next()

    # ------------------------------------------------------------------------------------------
    # answers

    def on_answer(self, part: Part, answer) -> None:
        """Verify one answer: commit what it proves, adopt its accepted rows, free its partition."""
        run: InFlight = part.info
        self.burst, self.declined = 0, not self.backoff.ready()
        usable = not part.cancelled and not answer.cancelled  # a cancelled run's rows are never used
        committed_before = len(self.committed)
        status, node, accepted = run.walk(self.committed)
        if usable and status == "ok":
            while node != 0 and len(self.committed) == run.start + len(accepted) and not self.done:
                token = int(answer.tokens[node - 1])  # row of node = node - 1 (the root is no row)
                self.commit([token], part)
                node = run.tree.match(node, token)
                if node is None:
                    break
                accepted.append(node)
        if run.speculative:  # drafted: every launched token; accepted: those the committed text confirms
            self.emit(Verified, part=part.id, drafted=len(run.tree) - 1, depth=run.tree.depth,
                      accepted=len(accepted), outcome=status if usable else "cancelled")
            if usable and status == "ok" and accepted:  # the committed sequence adopts the accepted rows
                leaf = run.tree.leaf_below(accepted[-1])
                seq = run.partition[run.tree.leaves().index(leaf)]
                self.edit(self.buffers.commit(seq, run.start, run.start + len(accepted)), "commit")
            self.edit(self.buffers.release(run.partition), "release")
        if len(self.committed) > committed_before:
            self.n_rejected = 0
            self.cancel_invalid()
            if not self.done:
                self.launch_plain()
                self.draft_next()

    def cancel_invalid(self) -> None:
        """Early cancellation: stop speculative runs that can no longer be accepted."""
        for part in self.inflight:
            run: InFlight = part.info
            if not run.speculative or part.cancelled:
                continue
            status = run.walk(self.committed)[0]
            if status != "ok":
                part.cancelled = True
                self.cancel([part.id], "it assumed a token the target did not choose" if status == "diverged"
                            else "it can no longer add anything")

    def release_all(self) -> None:
        for partition in list(self.buffers.in_use):
            self.edit(self.buffers.release(partition), "release")

    # ------------------------------------------------------------------------------------------
    # launching

    def launch_run(self, run: InFlight) -> None:
        rows = run.tree.batch(run.start - 1, run.partition[0] if run.partition else self.seq, include_root=False)
        if run.partition is None:
            rows = Batch.chain(rows.tokens, run.start, (self.seq,))
        self.launch(rows, "speculative" if run.speculative else "plain", info=run)

    def launch_plain(self) -> None:
        """The non-speculative run: the newest committed token, into the committed sequence."""
        C = len(self.committed)
        tree = TokenTree(self.committed[-2] if C >= 2 else 0)
        tree.add(0, self.committed[-1], 1.0)
        self.launch_run(InFlight(C - 1, tree, [], C - 1, None))

    def chain_tail(self) -> InFlight | None:
        """The latest in-flight speculative run whose first branch still fits the committed text."""
        C = len(self.committed)
        for part in reversed(self.inflight):
            run: InFlight = part.info
            if not run.speculative or part.cancelled:
                continue
            tokens, end = run.branch_end()
            consistent = run.walk(self.committed)[0] == "ok" and all(
                self.committed[run.start + i] == t for i, t in enumerate(tokens) if run.start + i < C)
            if consistent and end >= C - 1:
                return run
        return None

    def next_run(self, now: bool = True) -> "RunPlan | None":
        """What the next speculative run would be, if one may go (`now`: also within the cap on
        runs in flight): where it starts, the chain of in-flight tokens it continues, and its
        drafting cutoff."""
        s: PipeInferStrategy = self.strategy
        if self.done or self.declined or now and len(self.inflight) >= s.max_inflight:
            return None
        adjust = self.burst * s.p_recovery - self.n_rejected * s.p_decay
        if s.p_accept + adjust >= 1.0:
            return None
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
            return None
        return RunPlan(tail, chain, start, min(s.n_draft, limit), s.p_accept + adjust, s.p_split + adjust)

    def offer(self) -> bool:
        """Continuous speculation: one more speculative run continuing the chain, if the cutoff allows."""
        plan = self.next_run()
        if plan is None:
            return False
        C = len(self.committed)
        tree = self.draft_tree(plan)
        self.backoff.drafted(len(tree) > 1)
        if len(tree) == 1:
            self.n_rejected += 1
            self.declined = True
            return False
        partition = self.buffers.acquire()
        if partition is None:
            return False
        self.edit(self.buffers.view(self.seq, partition, 0, C), "view")
        if plan.tail is not None and plan.start > C:
            self.edit(self.buffers.view(plan.tail.partition[self.tail_branch(plan.tail)], partition, C, plan.start),
                      "view")
        self.launch_run(InFlight(plan.start, tree, plan.chain, C, partition))
        self.burst += 1
        self.draft_next()
        return True

    def draft_next(self) -> None:
        """Draft the run after the newest one now, on the draft's lane, while the head waits for
        the pipeline: when the head offers it, its drafting is done (or under way). Only when the
        runs in flight are at their cap, so the head must wait for an answer anyway: otherwise it
        offers the run at once and drafts it then. (Drafting ahead also while an answer waits to
        be verified cost 7% on the virtual clock: that answer often overturns the plan, and the
        lane stays busy with a run nobody will launch; docs/drafts.md.)"""
        if len(self.inflight) < self.strategy.max_inflight:
            return
        plan = self.next_run(now=False)
        if plan is not None:
            self.draft.ahead(draft_run, *plan.drafting(self.committed), self.strategy.branches)

    @staticmethod
    def tail_branch(run: InFlight) -> int:
        """Index (in the partition) of the sequence that holds the run's first branch."""
        return run.tree.leaves().index(run.tree.leaf_below(0))

    def draft_tree(self, plan: "RunPlan") -> TokenTree:
        """PipeInfer's drafting of one run (`draft_run`), reported as an event."""
        mark = self.draft_mark()
        tree, stopped_at = draft_run(self.draft, *plan.drafting(self.committed), self.strategy.branches)
        self.emit(Drafted, tokens=tuple(n.token for n in tree.nodes[1:]), probs=tuple(n.prob for n in tree.nodes[1:]),
                  cutoff=plan.cutoff, stopped_at=stopped_at, **self.draft_since(mark))
        return tree


@dataclass
class RunPlan:
    """The next speculative run: the in-flight run it continues (`tail`, None: none), the tokens it
    assumes beyond the committed text (`chain`), its first position, its most drafted tokens, and
    the cutoffs (`p_accept` and `p_split` plus the adjustment)."""

    tail: InFlight | None
    chain: list[int]
    start: int
    n_draft: int
    cutoff: float
    split: float

    def drafting(self, committed: list[int]) -> tuple:
        """`draft_run`'s arguments (but the branch limit)."""
        root = committed[-1] if not self.chain else self.chain[-1]
        return committed + self.chain, root, self.n_draft, self.cutoff, self.split


def draft_run(draft: DraftSource, context: list[int], root_token: int, n_draft: int, cutoff: float, split: float,
              branches: int) -> tuple[TokenTree, float | None]:
    """PipeInfer's drafting: grow branches step by step under `root_token` (the last token of
    `context`), each stopping where the draft's confidence falls below `cutoff`; an alternative
    above `split` opens a new branch, up to `branches`; at most `n_draft` tokens. Returns the tree
    and the confidence that stopped a branch (if one did). A module-level function of plain
    arguments, so a draft server can run it ahead of need (`Drafter.ahead`)."""
    tree = TokenTree(root_token)
    active, n_branches, n_tokens, stopped_at = [0], 1, 0, None
    while active and n_tokens < n_draft:
        next_active = []
        for leaf in active:
            if n_tokens >= n_draft:
                break
            guesses = draft.top(context + tree.tokens_to(leaf), 1 + branches - n_branches)
            if not guesses or guesses[0][1] < cutoff:
                stopped_at = guesses[0][1] if guesses else stopped_at
                continue  # this branch stops
            next_active.append(tree.add(leaf, *guesses[0]))
            n_tokens += 1
            for token, prob in guesses[1:]:
                if n_branches < branches and prob > split and n_tokens < n_draft:
                    next_active.append(tree.add(leaf, token, prob))
                    n_branches += 1
                    n_tokens += 1
        active = next_active
    return tree, stopped_at


@dataclass
class PipeInferStats:
    """PipeInfer's counters, computed from its events."""

    runs_launched: int = 0
    speculative_runs: int = 0
    non_speculative_runs: int = 0
    runs_verified: int = 0  # answers consumed that were used (committed or confirmed tokens)
    runs_cancelled: int = 0  # speculative runs the head cancelled
    cancelled_too_late: int = 0  # of those, answered in full anyway (every stage had finished it)
    stage_layers_skipped: int = 0  # stage-layers not computed thanks to cancellation
    inflight_depth: list[tuple[float, int]] = field(default_factory=list)  # (head time, runs in flight)
    speculation: SpeculationStats = field(default_factory=SpeculationStats)
    _kinds: dict = field(default_factory=dict, repr=False)  # part -> kind
    _last_committer: int | None = field(default=None, repr=False)

    def observe(self, e) -> None:
        if isinstance(e, Launched) and e.kind != "prefill":
            self._kinds[e.part] = e.kind
            self.runs_launched += 1
            self.speculative_runs += e.kind == "speculative"
            self.non_speculative_runs += e.kind == "plain"
            self.inflight_depth.append((e.t, e.in_flight))
        elif isinstance(e, Answered):
            self.stage_layers_skipped += e.layers_skipped
            self.cancelled_too_late += e.too_late
        elif isinstance(e, Cancelled) and e.reason != "the request is over":
            self.runs_cancelled += len(e.ids)
        elif isinstance(e, Committed) and e.part in self._kinds and e.part != self._last_committer:
            self.runs_verified += 1
            self._last_committer = e.part
        self.speculation.observe(e)

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
    max_inflight: most runs in flight per request (the original self-regulates; a cap keeps a
                very fast or always-confident draft from running ahead without bound); also the
                most micro-batches in flight
    calibrate:  the cutoffs apply to the draft's calibrated confidence — this request's measured
                acceptance of guesses with that claim (`minipipe.drafter`) — so speculation
                stops by itself when drafts are not accepted, and returns when they are

    Defaults: the original's, but n_draft 4 (its README suggests 3-8; its scripts use 3 and 4)
    and p_accept 0.3 on calibrated confidence (the command line's `default_settings`: also
    max_inflight 2 x n_stages).
    """

    name = "pipeinfer"
    one_part_in_flight = False
    offer_while_answer_waits = False  # verify what came back before speculating further

    def __init__(self, draft: DraftSource, p_accept: float = 0.3, p_split: float = 0.1, p_recovery: float = 0.0,
                 p_decay: float = 0.0, n_draft: int = 4, branches: int = 1, max_inflight: int = 16,
                 calibrate: bool = True):
        self.draft, self.calibrate = draft, calibrate
        self.p_accept, self.p_split, self.p_recovery, self.p_decay = p_accept, p_split, p_recovery, p_decay
        self.n_draft, self.branches, self.max_inflight = n_draft, branches, max_inflight

    @property
    def seqs_per_request(self) -> int:
        return KVMultiBuffer(n_partitions=self.max_inflight + 1, width=self.branches).n_seqs

    def max_inflight_runs(self, n_stages: int) -> int:
        return self.max_inflight

    def max_part_rows(self) -> int:
        return self.n_draft  # drafted tokens (the root is computed by an earlier run)

    def speculative_cells(self) -> int:
        return self.max_inflight * self.n_draft

    def max_row_seqs(self) -> int:
        return self.branches

    def decoder(self, request, seqs, head) -> PipeInferDecoder:
        return PipeInferDecoder(self, request, seqs, head)

    def stats(self) -> PipeInferStats:
        return PipeInferStats()
