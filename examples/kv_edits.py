"""Every KV edit PipeInfer sends, as stage 0 applies it: view, commit or release, with the cache's
cells × sequences before and after.

    python examples/kv_edits.py [--tokens 3] [--stages 2]

A stage's KV cache is a pool of **cells** (the K/V of one token at one position); each cell is
seen by a set of **sequences** (`minipipe/kvcache.py`). A request's committed text is one
sequence (here 0); each speculative run borrows a *partition* of other sequence ids
(`minipipe/multibuffer.py`). The head never copies K/V: it sends three kinds of edits, on the
same rings as the runs, and every stage applies them in order:

* **view**    — a partition sees the committed prefix (and the previous run's branch):
                `seq_rm(s, p0, p1)` then `seq_cp(src->s, p0, p1)`
* **commit**  — sequence 0 adopts the rows the target accepted: `seq_rm(0, ...)`, `seq_cp(s->0, ...)`
* **release** — a partition forgets everything (`seq_rm(s, 0, ∞)`); cells no one sees are free
* **free**    — the request is over: its committed sequence goes too

The run is PipeInfer on the local runtime with fixed costs (the same output everywhere). In a
grid, `#` marks a sequence that sees a cell; runs are shown as stage 0 computes them (each row
takes a free cell, lowest index first).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipipe.config import load_config  # noqa: E402
from minipipe.draft import DraftModel  # noqa: E402
from minipipe.events import KVEdited, kv_label  # noqa: E402
from minipipe.greedy import generate_greedy  # noqa: E402
from minipipe.model import load_stage  # noqa: E402
from minipipe.paths import DEFAULT_DRAFT, resolve_model  # noqa: E402
from minipipe.runtime import LocalPipeline, load_stage_models, split_layers  # noqa: E402
from minipipe.runtime.cost import fixed  # noqa: E402
from minipipe.strategies import PipeInferStrategy, generate  # noqa: E402
from minipipe.tokenizer import Tokenizer  # noqa: E402
from minipipe.transport.messages import KVCopy, KVEdits, KVRemove, Run  # noqa: E402


def grid(cells, seqs, text) -> list[str]:
    """cells × sequences: one line per cell (index, position, token), one column per sequence."""
    lines = ["    cell pos  token        " + " ".join(f"{s:>2}" for s in seqs) + "   <- sequence"]
    for cell, pos, seen in cells:
        lines.append(f"    {cell:>4} {pos:>3}  {text.get((cell, pos), '?'):<12} "
                     + " ".join(" #" if s in seen else " ." for s in seqs))
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="target (default: the shipped model)")
    parser.add_argument("--draft", help="draft (default: the shipped draft)")
    parser.add_argument("--tokens", type=int, default=3)
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--prompt", default="ROMEO:")
    args = parser.parse_args()
    target_dir, draft_dir = resolve_model(args.model), resolve_model(args.draft, default=DEFAULT_DRAFT)
    config = load_config(target_dir)
    tok = Tokenizer(target_dir, config.eos_ids)
    prompt = tok.encode(args.prompt)
    target, draft = load_stage(target_dir), load_stage(draft_dir)

    strategy = PipeInferStrategy(DraftModel(draft), p_accept=0.05, n_draft=2, max_inflight=2)
    pipe = LocalPipeline(load_stage_models(target_dir, split_layers(config.n_layers, args.stages)),
                         n_seqs=strategy.n_seqs, cost=fixed(config, draft.config))
    labels: dict[int, tuple[object, str]] = {}  # id(edit) -> (edit, view/commit/release/free)
    text: dict[tuple[int, int], str] = {}  # (cell, position) -> the token's id and text, as stage 0 placed it
    before = []

    def on_event(e) -> None:
        if isinstance(e, KVEdited):
            for edit in e.edits:
                labels[id(edit)] = (edit, e.label)

    def watch(stage: int, msg, outputs, t: float) -> None:
        """Stage 0 has handled `msg`: show what it did to its cache."""
        nonlocal before
        if stage != 0:
            return
        cache = pipe.stages[0].cache
        after = cache.cells()
        if isinstance(msg, Run):
            b = msg.batch
            rows = ", ".join(f"{int(t)} {tok.decode([int(t)])!r}@{int(p)}" for t, p in zip(b.tokens, b.positions))
            kind = "prompt" if b.prefill else "speculative" if msg.speculative else "plain"
            print(f"t={t * 1e3:6.2f} ms  stage 0 computes run {msg.run_id} ({kind}): {rows}")
            new = [c for c in after if c not in before]
            for (cell, pos, seen), token in zip(new, b.tokens):
                text[(cell, pos)] = f"{int(token)} {tok.decode([int(token)])!r}"
            print(f"    rows take cells {[c[0] for c in new]}, seen by {sorted({s for c in new for s in c[2]})}")
        elif isinstance(msg, (KVRemove, KVCopy, KVEdits)):
            edits = msg.edits if isinstance(msg, KVEdits) else [msg]
            label = labels.get(id(edits[0]), (None, "edit"))[1]
            print(f"t={t * 1e3:6.2f} ms  stage 0 applies KV {label}: " + "; ".join(kv_label(e) for e in edits))
            seqs = sorted({s for c in before + after for s in c[2]})
            left = grid(before, seqs, text)
            right = grid(after, seqs, text)
            width = max(len(line) for line in left)
            print(f"    {'before':<{width - 4}}    after")
            for i in range(max(len(left), len(right))):
                a = left[i] if i < len(left) else ""
                b = right[i] if i < len(right) else ""
                print(f"{a:<{width}}  |{b}")
        before = after

    pipe.watchers.append(watch)
    print(f"prompt {args.prompt!r} = {prompt}; PipeInfer on {args.stages} stages, up to 2 drafted tokens per run, "
          "cutoff p_accept 0.05\n")
    result = generate(strategy, pipe, prompt, args.tokens, tok.eos_ids, config.max_positions, listeners=[on_event])
    pipe.drain()  # the last edits (freeing the request's cells) reach every stage
    left = pipe.stages[0].cache.cells()
    print(f"\nstage 0 holds {len(left)} cells at the end (every edit applied)")
    expected = generate_greedy(target, prompt, args.tokens, tok.eos_ids).tokens
    print(f"generated {[(t, tok.decode([t])) for t in result.tokens]}")
    print(f"same as greedy decoding: {result.tokens == expected}")
    sys.exit(0 if result.tokens == expected and not left else 1)


if __name__ == "__main__":
    main()
