"""Drafts compared: how much of each draft's proposal the target accepts, single and merged,
and how long a tree of a thousand leaves takes to verify.

    python benchmarks/bench_drafts.py                                    # tinybard: its draft, self:K, ngram, merged
    python benchmarks/bench_drafts.py --model smollm2-135m --chat --drafts "self:15;ngram;self:15+ngram"
    python benchmarks/bench_drafts.py --big-tree                          # the 1000-leaf verification, timed

**Acceptance** is measured the way a greedy verification decides it, without running the target
for every tree: the target decodes each prompt greedily once (its tokens t; t[0] comes with the
prompt's prefill); then, from position j = 1, the strategy's own growth code drafts a tree after prompt + t[:j] (`TreeStrategy.grow`:
every source its own tree, merged into one), the verification accepts the longest path of the
tree that spells t[j:], and j moves past it and the bonus token. Greedy verification accepts
exactly that path, so the counts are those of a real run (tests/test_drafts.py checks it against
the `tree` strategy). Reported per verification: tokens committed (accepted + 1), nodes drafted
(the rows a verification adds), and the draft rows computed (its cost).

Shapes: `tree` (SpecInfer's <1,1,3,1,1,1,1,1> per source) and `chain` (4 tokens per source); no
cutoff, so every source always proposes its whole tree.

**A thousand leaves** (`--big-tree`): the tree strategy with the schedule <10,10,10> (1000
leaves, 1111 rows in one verification) on 2 stages of the process and local runtimes, wall
clock per verification; tokens checked against greedy decoding.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipipe.config import load_config  # noqa: E402
from minipipe.draft import build_draft  # noqa: E402
from minipipe.drafter import Drafter  # noqa: E402
from minipipe.greedy import generate_greedy  # noqa: E402
from minipipe.model import load_stage  # noqa: E402
from minipipe.paths import resolve_model  # noqa: E402
from minipipe.strategies import SpeculativeStrategy, TreeStrategy  # noqa: E402
from minipipe.tokenizer import Tokenizer  # noqa: E402
from minipipe.tree import TokenTree  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


class _NoLane:
    """The draft runs here and now: nothing to charge, nothing to wait for."""

    draft_ahead = False

    @staticmethod
    def draft_work(rows, forwards=None, wait=True):
        return 0.0

    @staticmethod
    def draft_wait(t):
        pass


def accepted_path(tree: TokenTree, truth: list[int]) -> int:
    """How many drafted tokens a greedy verification accepts: the longest path spelling `truth`."""
    node, n = 0, 0
    while n < len(truth):
        child = tree.match(node, truth[n])
        if child is None:
            break
        node, n = child, n + 1
    return n


def simulate(strategy, prompt: list[int], truth: list[int]) -> dict:
    """Verifications of `strategy`'s trees along the target's greedy text (see the docstring)."""
    draft = Drafter(strategy.draft.fork(prompt), _NoLane())
    j, verifications, accepted, nodes = 1, 0, 0, 0  # (the first token comes with the prompt's prefill)
    while j < len(truth):
        context = list(prompt) + truth[:j]
        tree = TokenTree(context[-1])
        strategy.grow(tree, draft, context, len(truth) - j - 1)
        a = accepted_path(tree, truth[j:])
        verifications, accepted, nodes = verifications + 1, accepted + a, nodes + len(tree) - 1
        j += a + 1
        draft.settle(list(prompt) + truth[:j])
    draft.release()
    return {"verifications": verifications, "accepted": accepted, "nodes": nodes, "draft_rows": draft.rows}


def acceptance(model: str, drafts: list[str], shape: str, prompts: list[str], tokens: int, chat: bool) -> list[dict]:
    target_dir = resolve_model(model)
    config = load_config(target_dir)
    target = load_stage(target_dir)
    tokenizer = Tokenizer(target_dir, config.eos_ids)
    texts = []
    for text in prompts:
        if chat:
            from minipipe.chat import chat_prompt

            text = chat_prompt(tokenizer, text)
        prompt = tokenizer.encode(text)
        texts.append((prompt, generate_greedy(target, prompt, tokens, eos_ids=tokenizer.eos_ids).tokens))
    rows = []
    for spec in drafts:
        source = build_draft(spec, target_dir, config, [target])
        strategy = (TreeStrategy(source, calibrate=False) if shape == "tree"
                    else SpeculativeStrategy(source, k=4, min_confidence=0.0, calibrate=False))
        t0 = time.time()
        total = {"verifications": 0, "accepted": 0, "nodes": 0, "draft_rows": 0}
        for prompt, truth in texts:
            for key, value in simulate(strategy, prompt, truth).items():
                total[key] += value
        v = total["verifications"]
        rows.append({"draft": spec, "shape": shape, "tokens_per_verification": (total["accepted"] + v) / v,
                     "accepted_per_verification": total["accepted"] / v, "nodes_per_verification": total["nodes"] / v,
                     "draft_rows_per_verification": total["draft_rows"] / v, "verifications": v,
                     "seconds": round(time.time() - t0, 1)})
        print(f"  {spec} ({shape}): {rows[-1]['tokens_per_verification']:.2f} tokens per verification", file=sys.stderr)
    return rows


def big_tree() -> list[dict]:
    """The 1000-leaf tree: wall-clock seconds per verification, local and process runtimes."""
    from minipipe.draft import OracleDraft
    from minipipe.runtime import open_pipeline
    from minipipe.strategies import generate, largest_run

    target_dir = resolve_model(None)
    config = load_config(target_dir)
    prompt, n = [1, 1889, 28, 201], 12
    truth = generate_greedy(load_stage(target_dir), prompt, n).tokens
    rows = []
    for runtime in ("local", "process"):
        strategy = TreeStrategy(OracleDraft(truth + [0] * 30, 0.5, config.vocab_size, seed=0), schedule=(10, 10, 10),
                                calibrate=False)
        with open_pipeline(target_dir, runtime, 2, n_seqs=strategy.n_seqs, max_rows=largest_run(strategy),
                           row_seqs=strategy.max_row_seqs()) as pipe:
            t = time.perf_counter()
            got = generate(strategy, pipe, prompt, n, max_positions=config.max_positions)
            seconds = time.perf_counter() - t
        v = got.metrics.extra["speculation"].to_dict()["verifications"]
        rows.append({"runtime": runtime, "rows": strategy.max_part_rows(), "leaves": strategy.max_leaves,
                     "verifications": v, "seconds_per_verification": seconds / v, "exact": got.tokens == truth})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tinybard")
    parser.add_argument("--drafts", help="';'-separated draft spellings (as --draft-model; '+' merges). Default: "
                                         "tinybard-draft, self:4, ngram and their merges (tinybard); self:15, ngram "
                                         "and self:15+ngram (others)")
    parser.add_argument("--shape", choices=("tree", "chain", "both"), default="both")
    parser.add_argument("--prompts", type=Path, help="JSON list of prompts (default: tinybard's held-out prompts, "
                                                     "or tools/chat_prompts.json with --chat)")
    parser.add_argument("-n", type=int, default=16, help="prompts used")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--chat", action="store_true", help="wrap prompts in the model's chat template")
    parser.add_argument("--big-tree", action="store_true", help="time the 1000-leaf verification instead")
    parser.add_argument("--json", metavar="FILE")
    args = parser.parse_args()
    if args.big_tree:
        rows = big_tree()
        for r in rows:
            print(f"{r['runtime']:>8}: a tree of {r['leaves']} leaves ({r['rows']} rows) verified in "
                  f"{r['seconds_per_verification']:.2f} s ({r['verifications']} verifications; "
                  f"{'exact' if r['exact'] else 'NOT EXACT'})")
    else:
        drafts = (args.drafts.split(";") if args.drafts else
                  ["tinybard-draft", "self:4", "ngram", "tinybard-draft+ngram", "tinybard-draft+self:4",
                   "tinybard-draft+self:4+ngram"] if args.model == "tinybard" else ["self:15", "ngram", "self:15+ngram"])
        path = args.prompts or (REPO / "tools" / "chat_prompts.json" if args.chat
                                else REPO / "models" / "tinybard" / "heldout_prompts.json")
        raw = json.loads(path.read_text())
        prompts = (raw["prompts"] if isinstance(raw, dict) else raw)[: args.n]
        shapes = ["tree", "chain"] if args.shape == "both" else [args.shape]
        rows = [r for shape in shapes for r in acceptance(args.model, drafts, shape, prompts, args.tokens, args.chat)]
        print(f"\n{args.model}, {len(prompts)} prompts{' (chat)' if args.chat else ''}, {args.tokens} greedy tokens each")
        print(f"{'draft':<30} {'shape':<6} {'tokens/verif':>12} {'accepted':>9} {'nodes':>7} {'draft rows':>11}")
        for r in rows:
            print(f"{r['draft']:<30} {r['shape']:<6} {r['tokens_per_verification']:>12.2f} "
                  f"{r['accepted_per_verification']:>9.2f} {r['nodes_per_verification']:>7.1f} "
                  f"{r['draft_rows_per_verification']:>11.1f}")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
