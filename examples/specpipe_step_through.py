"""Watch SpecPipe fill the pipeline: a diagonal wavefront of tree layers, hits, pruning and misses.

    python examples/specpipe_step_through.py [--model NAME|DIR] [--draft NAME|DIR] [--stages 4] [--width 2]

The stages run in the local runtime on its virtual clock with fixed costs (the same output on
every machine). Every decision of the head is printed with the virtual time: the layer of tree
nodes it sends into stage 0 at each step, each hit (the target's token is a child of the tip:
one token per step) with the nodes it prunes off the other branches, named (node id, token,
position), and each miss (the pipeline refills from a new root). The timeline at the end shows
every stage busy with a different layer — the diagonal wavefront — with `!` where a stage
dropped a micro-batch whose rows were all pruned; the tokens are checked against greedy
decoding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipipe.config import load_config  # noqa: E402
from minipipe.draft import DraftModel  # noqa: E402
from minipipe.events import Cancelled, Narrator  # noqa: E402
from minipipe.greedy import generate_greedy  # noqa: E402
from minipipe.model import load_stage  # noqa: E402
from minipipe.paths import DEFAULT_DRAFT, resolve_model  # noqa: E402
from minipipe.runtime import LocalPipeline, load_stage_models, split_layers  # noqa: E402
from minipipe.runtime.cost import fixed  # noqa: E402
from minipipe.strategies import SpecPipeStrategy, generate  # noqa: E402
from minipipe.tokenizer import Tokenizer  # noqa: E402
from minipipe.trace import TracedPipeline, Tracer  # noqa: E402
from minipipe.transport.messages import Run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="target (default: the shipped model)")
    parser.add_argument("--draft", help="draft (default: the shipped draft)")
    parser.add_argument("--stages", type=int, default=4)
    parser.add_argument("--width", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=12)
    parser.add_argument("--prompt", default="JULIET:\nO Romeo, Romeo! wherefore art thou Romeo?\n\nROMEO:\n")
    args = parser.parse_args()
    target_dir, draft_dir = resolve_model(args.model), resolve_model(args.draft, default=DEFAULT_DRAFT)
    config = load_config(target_dir)
    tok = Tokenizer(target_dir, config.eos_ids)
    prompt = tok.encode(args.prompt)
    target, draft = load_stage(target_dir), load_stage(draft_dir)
    cost = fixed(config, draft.config)
    print(f"virtual clock, fixed costs: {cost.describe()}\n")
    tracer = Tracer()

    def narrate(sentence: str) -> None:
        print(f"t={pipe.now() * 1e3:7.2f} ms  {sentence}")

    strategy = SpecPipeStrategy(DraftModel(draft), width=args.width)
    pipe = LocalPipeline(load_stage_models(target_dir, split_layers(config.n_layers, args.stages)),
                         n_seqs=strategy.n_seqs, cost=cost, tracer=tracer)
    print(f"prompt {args.prompt!r}: {len(prompt)} tokens; SpecPipe on {args.stages} stages, "
          f"{args.width} node(s) per layer\n")
    narrator = Narrator(narrate, text=lambda t: tok.decode([t]))
    traced = TracedPipeline(pipe, tracer)  # keeps every message sent: each row's node id, token, position

    def node(key: int) -> str:
        for _, what, msg, _ in traced.log:
            if what == "submit" and isinstance(msg, Run) and msg.batch.row_ids is not None:
                for k, t, p in zip(msg.batch.row_ids, msg.batch.tokens, msg.batch.positions):
                    if int(k) == key:
                        return f"#{key} {tok.decode([int(t)])!r}@{int(p)}"
        return f"#{key}"

    def tell(e) -> None:
        if isinstance(e, Cancelled) and e.reason == "pruned":
            narrate("prune " + ", ".join(node(k) for k in e.ids))
        else:
            narrator(e)

    result = generate(strategy, traced, prompt, args.tokens, tok.eos_ids, config.max_positions, listeners=[tell])
    print("\n" + tracer.timeline(width=110))
    print(f"\n{result.metrics.extra['speculation'].summary()}")
    expected = generate_greedy(target, prompt, args.tokens, tok.eos_ids).tokens
    print(f"generated {tok.decode(result.tokens)!r}")
    print(f"same as greedy decoding: {result.tokens == expected}")
    sys.exit(0 if result.tokens == expected else 1)


if __name__ == "__main__":
    main()
