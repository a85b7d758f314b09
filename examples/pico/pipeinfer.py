"""PipeInfer, pico version: asynchronous continuous speculation, early inference cancellation and
KV multibuffering, on a pipeline simulated tick by tick in one process.

Paper: Butler, Yu, Mazaheri, Jannesari, "PipeInfer: Accelerating LLM Inference using Asynchronous
Pipelined Speculation" (SC'24, arXiv 2407.11798): the four mechanisms of its design.

  asynchronous speculation  after every answer that commits tokens, the head launches one plain
                            (non-speculative) run for the newest committed token; it writes the
                            committed sequence 0, is never cancelled, and so guarantees at least
                            one token per trip through the pipeline whatever the guesses
  continuous speculation    while answers are out, the head keeps the pipeline full of
                            speculative runs: short drafted chains, each continuing the chain of
                            the newest run still in the game, drafted while the draft's
                            confidence stays at or above a cutoff (p_accept)
  KV multibuffering         each speculative run writes its own sequence id; KV edits travel
                            down the pipeline in order with the runs, so each stage applies them
                            between the same runs: view (the run's sequence sees sequence 0 and
                            its predecessor's guesses), commit (sequence 0 adopts accepted rows),
                            release (the sequence forgets all its cells)
  early cancellation        when tokens are committed, runs that assumed a token the target did
                            not choose are cancelled: their ids join a set that every stage checks
                            before computing; a cancelled run travels on as an empty stub

Verification: answers come back in launch order. Each run assumes a context (the tokens at
every position up to its last row). Its row at position q predicts position q + 1; when q + 1
is the next position to commit and the assumed context up to q is the committed text, the
target's choice there is committed. Only target argmaxes over the committed text are committed,
so the output is greedy decoding's.

Simplified compared with minipipe/strategies/pipeinfer.py (PipeInferStrategy) on
minipipe/runtime/: chains only (no branch splitting, p_split), a fixed cutoff (no p_recovery or
p_decay), speculation only while fewer than S runs are in flight (one per stage), one whole stage
step per tick (the real stages also check for cancellation between layers), the prompt prefilled
outside the simulation, no end-of-text rule.

    python examples/pico/pipeinfer.py    # the text, a timeline of the ticks, counters, the check
"""

from __future__ import annotations

import itertools
import sys
from collections import Counter, deque
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from minipipe import kernels  # noqa: E402
from minipipe.batch import Batch  # noqa: E402
from minipipe.greedy import generate_greedy  # noqa: E402
from minipipe.kvcache import KVCache  # noqa: E402
from minipipe.model import StageModel, load_stage  # noqa: E402
from minipipe.paths import DEFAULT_DRAFT, resolve_model  # noqa: E402
from minipipe.tokenizer import Tokenizer  # noqa: E402

N_DRAFT = 3  # most guesses per speculative run
P_ACCEPT = 0.05  # the draft-confidence cutoff (low: the tiny draft is rarely sure of itself)
N_STAGES, N_TOKENS = 4, 24  # the demo's knobs


class Draft:
    """The draft model's guesses. Its KV cache holds the last context it was asked about (sequence
    0); for a new context it keeps the common prefix, forgets the rest (seq_rm), runs the new tokens."""

    def __init__(self, model: StageModel):
        self.model, self.cache, self.seen = model, model.new_cache(), []

    def top(self, context: list[int], k: int) -> list[tuple[int, float]]:
        """The k most probable next tokens after `context`, with the draft's probabilities."""
        keep = 0  # positions to keep: the common prefix, but at least the last token is rerun
        while keep < min(len(self.seen), len(context) - 1) and self.seen[keep] == context[keep]:
            keep += 1
        self.cache.seq_rm(0, keep)  # forget positions >= keep
        logits = self.model.forward(self.cache, Batch.chain(context[keep:], keep, want_logits="last"))  # [1, V]
        self.seen = list(context)
        probs = kernels.softmax(logits[0])  # [V]
        best = np.argsort(-probs, kind="stable")[:k]
        return [(int(t), float(probs[t])) for t in best]


def agreement(a: list[int], b: list[int]) -> int:
    """Length of the common prefix of two token lists."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


@dataclass(eq=False)
class Run:
    """A micro-batch in flight: consecutive tokens at positions start.., written into sequence `seq`."""

    id: int
    start: int  # position of the first row
    tokens: list[int]
    seq: int  # 0: a plain run (writes the committed text); otherwise the speculative run's own sequence
    assumes: list[int]  # the token at every position up to its last row, its own rows included
    hidden: np.ndarray | None = None  # [T, D] between stages, logits [T, V] after the last one
    skipped: bool = False  # cancelled on its way: some stage did not compute it (it comes back as a stub)


def tick(stages: list[StageModel], caches: list[KVCache], inbox: list[deque], cancelled: set[int],
         counts: Counter, timeline: list[str] | None) -> Run | None:
    """One tick of the simulated pipeline; returns the run that leaves the last stage, if any.

    A stage's inbox holds runs and KV edits in the order the head sent them. The stage applies the
    edits up to the next run, then steps that run (unless it is cancelled) and passes it on."""
    leaving = None
    for s in reversed(range(len(stages))):  # the last stage first: a run moves one stage per tick
        downstream = inbox[s + 1] if s + 1 < len(stages) else None
        while inbox[s] and isinstance(inbox[s][0], tuple):  # a KV edit, e.g. ("seq_cp", src, dst, p0, p1)
            edit = inbox[s].popleft()
            getattr(caches[s], edit[0])(*edit[1:])
            if downstream is not None:
                downstream.append(edit)
        run = inbox[s].popleft() if inbox[s] else None
        if run is not None:
            if run.id in cancelled:  # early cancellation: no work, a stub goes on
                run.skipped, run.hidden = True, None
                counts["stage steps skipped"] += 1
            else:
                batch = Batch.chain(run.tokens, run.start, seq_ids=(run.seq,))  # every row wants logits
                run.hidden = stages[s].forward(caches[s], batch, run.hidden)  # [T, D], or [T, V] at the last stage
            if downstream is not None:
                downstream.append(run)
            else:
                leaving = run
        if timeline is not None:
            timeline[s] += "." if run is None else "x" if run.skipped else "P" if run.seq == 0 else str(run.id % 10)
    return leaving


def generate(stages: list[StageModel], draft_model: StageModel, prompt: list[int], n_new: int,
             n_draft: int = N_DRAFT, p_accept: float = P_ACCEPT,
             timeline: list[str] | None = None, counts: Counter | None = None) -> list[int]:
    """`n_new` tokens of greedy decoding, PipeInfer style. `timeline` (one string per stage) gets
    one character per tick; `counts` counts runs, cancellations and accepted guesses."""
    S, counts = len(stages), Counter() if counts is None else counts
    caches = [stage.new_cache(n_seqs=1 + S, capacity=len(prompt) + n_new + S * n_draft) for stage in stages]
    draft = Draft(draft_model)
    for start, end in kernels.prefill_chunks(len(prompt)):  # the prompt into sequence 0, stage by stage
        hidden, batch = None, Batch.chain(prompt[start:end], start, want_logits="last", prefill=True)
        for stage, cache in zip(stages, caches):
            hidden = stage.forward(cache, batch, hidden)  # [T, D], then logits [1, V]
    committed = prompt + [int(kernels.argmax_rows(hidden)[-1])]  # positions 0..C-1; the newest is not cached
    end = len(prompt) + n_new  # the committed text's final length
    inbox: list[deque] = [deque() for _ in range(S)]
    inflight: deque[Run] = deque()  # launched, not answered yet; oldest first
    cancelled: set[int] = set()  # ids of cancelled runs, checked by every stage before it computes
    free_seqs = deque(range(1, S + 1))  # the multibuffer: one sequence id per speculative run in flight
    run_ids = itertools.count()

    def live(run: Run) -> bool:  # the run assumes the committed text, so its last rows can still be used
        return agreement(run.assumes, committed) == len(committed)

    def launch(tokens: list[int], seq: int, assumes: list[int], edits: tuple = ()) -> None:
        run = Run(next(run_ids), len(assumes) - len(tokens), tokens, seq, assumes)
        inbox[0].extend([*edits, run])  # the edits travel just ahead of the run
        inflight.append(run)
        counts["plain runs" if seq == 0 else "speculative runs"] += 1

    launch([committed[-1]], 0, list(committed))  # asynchronous speculation: the plain run comes first
    while len(committed) < end:
        # Continuous speculation: fill the pipeline, each chain continuing the newest live speculative run.
        while len(inflight) < S and free_seqs:
            tail = next((r for r in reversed(inflight) if r.seq and live(r)), None)
            context = tail.assumes if tail else committed
            guesses: list[int] = []
            while len(guesses) < min(n_draft, end - 1 - len(context)):  # a row at q predicts q + 1 < end
                token, confidence = draft.top(context + guesses, 1)[0]
                if confidence < p_accept:
                    break
                guesses.append(token)
            if not guesses:
                break  # the draft is unsure: leave the pipeline to the plain run
            seq, C = free_seqs.popleft(), len(committed)
            view = [("seq_cp", 0, seq, 0, C)]  # KV multibuffering, view: the committed prefix ...
            if len(context) > C:  # ... and the guesses of the chain it continues
                view.append(("seq_cp", tail.seq, seq, C, len(context)))
            launch(guesses, seq, context + guesses, tuple(view))

        run = tick(stages, caches, inbox, cancelled, counts, timeline)
        counts["ticks"] += 1
        if run is None:
            continue
        # Verification of the oldest run: while it has a row at the newest committed position and
        # assumes the committed text up to there, that row's argmax is the next token.
        oldest = inflight.popleft()
        assert run is oldest, "answers come back in launch order"
        n_before = len(committed)
        while len(committed) < end and not run.skipped and run.start < len(committed) and live(run):
            choices = kernels.argmax_rows(run.hidden)  # [T, V] -> [T]
            committed.append(int(choices[len(committed) - 1 - run.start]))
        if run.seq:  # a speculative run: commit its confirmed rows, release its sequence
            confirmed = agreement(run.assumes, committed)  # rows before this position hold committed tokens
            if not run.skipped and confirmed > run.start:  # (a cancelled run's rows are missing somewhere)
                # commit: sequence 0 adopts them, in place of any cell a plain run wrote for the same token
                inbox[0].extend([("seq_rm", 0, run.start, confirmed), ("seq_cp", run.seq, 0, run.start, confirmed)])
                counts["accepted guesses"] += confirmed - run.start
            inbox[0].append(("seq_rm", run.seq))  # release: the sequence forgets all its cells
            free_seqs.append(run.seq)
        if len(committed) > n_before and len(committed) < end:
            for other in inflight:  # early cancellation of the runs that guessed wrong
                if other.seq and not live(other) and other.id not in cancelled:
                    cancelled.add(other.id)
                    counts["cancelled runs"] += 1
            launch([committed[-1]], 0, list(committed))  # the next plain run
    return committed[len(prompt):]


def main() -> None:
    """The shipped tinybard pair on 4 stages after "ROMEO:"; the result is checked against greedy."""
    target_dir, draft_dir = resolve_model(None), resolve_model(None, default=DEFAULT_DRAFT)
    tokenizer, whole = Tokenizer(target_dir), load_stage(target_dir)
    L, S = whole.config.n_layers, N_STAGES
    stages = [load_stage(target_dir, L * s // S, L * (s + 1) // S) for s in range(S)]  # layers [lo, hi) per stage
    prompt = tokenizer.encode("ROMEO:")
    timeline, counts = [""] * S, Counter()
    tokens = generate(stages, load_stage(draft_dir), prompt, N_TOKENS, timeline=timeline, counts=counts)
    print(tokenizer.decode(prompt + tokens))
    print("\ntimeline (one column per tick; P: plain run, digit: speculative run id, x: skipped, .: idle)")
    for s, row in enumerate(timeline):
        print(f"stage {s} |{row}|")
    print(f"{counts['ticks']} ticks for the {N_TOKENS - 1} tokens after the first (plain pipelining: "
          f"{S * (N_TOKENS - 1)}); "
          f"{counts['plain runs']} plain and {counts['speculative runs']} speculative runs, "
          f"{counts['accepted guesses']} guesses accepted, {counts['cancelled runs']} runs cancelled "
          f"({counts['stage steps skipped']} stage steps skipped)")
    same = tokens == generate_greedy(whole, prompt, N_TOKENS).tokens
    print(f"same as greedy: {same}")
    raise SystemExit(0 if same else 1)


if __name__ == "__main__":
    main()
