"""Narrate PipeInfer on 3 stages: each launch decision (the draft's probability against the
cutoff), which runs are in flight, which get cancelled and why, which KV edits commit.

    python examples/pipeinfer_step_through.py [--model NAME|DIR] [--draft NAME|DIR] [--tokens 12]

The stages run in the local runtime on its virtual clock with fixed costs (`runtime.cost.fixed`),
so the story is the same on every machine. Every decision of the head is printed with the
virtual time, tokens with their text. At each launch decision the draft proposes tokens while
its probability stays at or above the cutoff `p_accept` (here 0.05); the first guess below it
ends the run's drafting. At the end a timeline shows each stage's work (one glyph per run id,
`!` where a cancelled run stopped, `~` a KV edit, `+` a commit; the legend is printed) and the
tokens are checked against greedy decoding.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipipe.config import load_config  # noqa: E402
from minipipe.draft import DraftModel  # noqa: E402
from minipipe.events import Drafted, Narrator  # noqa: E402
from minipipe.greedy import generate_greedy  # noqa: E402
from minipipe.model import load_stage  # noqa: E402
from minipipe.paths import DEFAULT_DRAFT, resolve_model  # noqa: E402
from minipipe.runtime import LocalPipeline, load_stage_models, split_layers  # noqa: E402
from minipipe.runtime.cost import fixed  # noqa: E402
from minipipe.strategies import PipeInferStrategy, generate  # noqa: E402
from minipipe.tokenizer import Tokenizer  # noqa: E402
from minipipe.trace import Tracer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="target (default: the shipped model)")
    parser.add_argument("--draft", help="draft (default: the shipped draft)")
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

    strategy = PipeInferStrategy(DraftModel(draft), p_accept=0.05, n_draft=3, branches=2, max_inflight=6)
    pipe = LocalPipeline(load_stage_models(target_dir, split_layers(config.n_layers, 3)), n_seqs=strategy.n_seqs,
                         cost=cost, tracer=tracer)
    print(f"prompt {args.prompt!r}: {len(prompt)} tokens; PipeInfer with p_accept 0.05, up to 3 drafted tokens "
          "and 2 branches per run, 6 runs in flight\n")
    narrator = Narrator(narrate, text=lambda t: tok.decode([t]))

    def tell(e) -> None:
        if isinstance(e, Drafted):  # a launch decision: each guess against the cutoff
            steps = [f"{t} {tok.decode([t])!r} p={p:.3f} >= {e.cutoff:.2f}" for t, p in zip(e.tokens, e.probs)]
            if e.stopped_at is not None:
                steps.append(f"next guess p={e.stopped_at:.3f} < {e.cutoff:.2f}: stop")
            narrate("launch decision: " + ("; ".join(steps) if steps else "no guess") +
                    ("" if e.tokens else " -> no speculative run"))
        else:
            narrator(e)

    result = generate(strategy, pipe, prompt, args.tokens, tok.eos_ids, config.max_positions, listeners=[tell])
    print("\n" + tracer.timeline(width=110))
    print(f"\n{result.metrics.extra['speculation'].summary()}")
    expected = generate_greedy(target, prompt, args.tokens, tok.eos_ids).tokens
    print(f"generated {tok.decode(result.tokens)!r}")
    print(f"same as greedy decoding: {result.tokens == expected}")
    sys.exit(0 if result.tokens == expected else 1)


if __name__ == "__main__":
    main()
