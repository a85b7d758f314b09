"""One SpecInfer token tree: drafted, flattened into a batch, masked, verified.

    python examples/token_tree.py [--model NAME|DIR] [--draft NAME|DIR] [--schedule 1,2,2]

Prints the tree the draft grows after a prompt, the verification batch it flattens to (one row
per node: token, position, sequence ids), the attention mask those sequence ids imply (a node
sees the committed prefix, its ancestors and itself), the target's greedy token at every node,
and the path the verifier accepts — then checks the committed tokens against greedy decoding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipipe.draft import DraftModel  # noqa: E402
from minipipe.greedy import generate_greedy, prefill  # noqa: E402
from minipipe.kernels import argmax_rows  # noqa: E402
from minipipe.model import load_stage  # noqa: E402
from minipipe.paths import DEFAULT_DRAFT, resolve_model  # noqa: E402
from minipipe.tokenizer import Tokenizer  # noqa: E402
from minipipe.tree import TokenTree  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="target (default: the shipped model)")
    parser.add_argument("--draft", help="draft (default: the shipped draft)")
    parser.add_argument("--schedule", default="1,2,2", help="children per leaf at each depth (default 1,2,2)")
    parser.add_argument("--prompt", default="JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n\nROMEO:\n")
    args = parser.parse_args()
    target_dir, draft_dir = resolve_model(args.model), resolve_model(args.draft, default=DEFAULT_DRAFT)
    target, tok = load_stage(target_dir), Tokenizer(target_dir)
    draft = DraftModel(load_stage(draft_dir))

    def show(t: int) -> str:
        return repr(tok.decode([t]))

    prompt = tok.encode(args.prompt)
    cache = target.new_cache(n_seqs=1 + 16)
    first = int(argmax_rows(prefill(target, cache, prompt)[None])[0])  # the committed bonus token: the root
    root_pos = len(prompt)
    print(f"prompt {args.prompt!r}: {len(prompt)} tokens in the KV cache (positions 0..{root_pos - 1})")
    print(f"root: the last committed token {first} {show(first)}, position {root_pos}, not cached yet\n")

    schedule = [int(w) for w in args.schedule.split(",")]
    tree = TokenTree(first).expand_schedule(draft, prompt + [first], schedule)
    print(f"the tree (schedule {schedule}: children per leaf at each depth; draft probabilities in brackets)")
    stack = [0]
    while stack:  # depth first, so every node is printed under its parent
        i = stack.pop()
        node = tree.nodes[i]
        label = "root" if i == 0 else f"p={node.prob:.2f}"
        print(f"  {'    ' * node.depth}[{i}] {node.token} {show(node.token)} ({label})")
        stack.extend(reversed(node.children))

    batch = tree.batch(root_pos, first_seq=1)
    print("\nthe verification batch (one row per node; each leaf's branch is one sequence id)")
    print("  row  token  position  sequences")
    for i in range(len(tree)):
        print(f"  {i:>3}  {int(batch.tokens[i]):>5}  {int(batch.positions[i]):>8}  {batch.seq_ids[i]}")

    mask = tree.attention_mask()
    print("\nattention among the rows (row i sees row j: '#'), besides the whole prompt")
    print("       " + "".join(f"{j:>3}" for j in range(len(tree))))
    for i in range(len(tree)):
        print(f"  {i:>3}  " + "".join("  #" if mask[i, j] else "  ." for j in range(len(tree))))

    for b in range(len(tree.leaves())):  # every branch sees the committed prompt
        cache.seq_cp(0, 1 + b)
    target_tokens = argmax_rows(target.forward(cache, batch))
    print("\nthe target's greedy token at every node")
    for i in range(len(tree)):
        print(f"  after node {i}: {int(target_tokens[i])} {show(int(target_tokens[i]))}")
    accepted, committed = tree.verify(target_tokens)
    path = " -> ".join(["root"] + [f"[{i}]" for i in accepted])
    print(f"\nverifier: walks {path}; accepts {len(accepted)} drafted token(s) and adds the bonus token")
    print(f"commits {committed} = {tok.decode(committed)!r}")
    expected = generate_greedy(target, prompt, 1 + len(committed)).tokens[1:]
    print(f"same as greedy decoding: {committed == expected}")
    sys.exit(0 if committed == expected else 1)


if __name__ == "__main__":
    main()
