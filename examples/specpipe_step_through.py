"""Watch SpecPipe fill the pipeline: a diagonal wavefront of tree layers, hits, pruning and misses.

    python examples/specpipe_step_through.py [--model NAME|DIR] [--draft NAME|DIR] [--stages 4] [--width 2]

The stages run in the local runtime on its virtual clock (costs calibrated on this machine).
Every decision of the head is printed with the virtual time: the layer of tree nodes it sends
into stage 0 at each step, each hit (the target's token is a child of the tip: one token per
step) with the nodes it prunes off the other branches, and each miss (the pipeline refills from
a new root). The timeline at the end shows every stage busy with a different layer — the
diagonal wavefront — and the tokens are checked against greedy decoding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipipe.config import load_config  # noqa: E402
from minipipe.draft import DraftModel  # noqa: E402
from minipipe.events import Narrator  # noqa: E402
from minipipe.greedy import generate_greedy  # noqa: E402
from minipipe.model import load_stage  # noqa: E402
from minipipe.paths import DEFAULT_DRAFT, resolve_model  # noqa: E402
from minipipe.runtime import LocalPipeline, load_stage_models, split_layers  # noqa: E402
from minipipe.runtime.cost import calibrate  # noqa: E402
from minipipe.strategies import SpecPipeStrategy, generate  # noqa: E402
from minipipe.tokenizer import Tokenizer  # noqa: E402
from minipipe.trace import Tracer  # noqa: E402


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
    cost = calibrate(target, draft, repeats=2)
    print(f"virtual clock, calibrated here: {cost.describe()}\n")
    tracer = Tracer()

    def narrate(sentence: str) -> None:
        print(f"t={pipe.now() * 1e3:7.2f} ms  {sentence}")

    strategy = SpecPipeStrategy(DraftModel(draft), width=args.width)
    pipe = LocalPipeline(load_stage_models(target_dir, split_layers(config.n_layers, args.stages)),
                         n_seqs=strategy.n_seqs, cost=cost, tracer=tracer)
    print(f"prompt {args.prompt!r}: {len(prompt)} tokens; SpecPipe on {args.stages} stages, "
          f"{args.width} node(s) per layer\n")
    narrator = Narrator(narrate, text=lambda t: tok.decode([t]))
    result = generate(strategy, pipe, prompt, args.tokens, tok.eos_ids, config.max_positions, listeners=[narrator])
    print("\n" + tracer.timeline(width=110))
    print(f"\n{result.metrics.extra['speculation'].summary()}")
    expected = generate_greedy(target, prompt, args.tokens, tok.eos_ids).tokens
    print(f"generated {tok.decode(result.tokens)!r}")
    print(f"same as greedy decoding: {result.tokens == expected}")
    sys.exit(0 if result.tokens == expected else 1)


if __name__ == "__main__":
    main()
