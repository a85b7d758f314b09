"""Three requests arriving at different times, served by one pipeline: watch their rows share micro-batches.

    python examples/requests_step_through.py [--strategy pipeline|specpipe|...] [--stages 2] [--tokens 8]

The stages run in the local runtime on a virtual clock with the default (fixed) cost model, so
the story is the same on every machine. Request "a" arrives at once, "b" a little later, "c"
later still; each line is one decision: admissions, the micro-batches the engine forms (which
requests' parts share each run), answers and commits. At the end each request's tokens are
checked against its greedy decoding alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipipe.config import load_config  # noqa: E402
from minipipe.draft import DraftModel  # noqa: E402
from minipipe.engine import Engine  # noqa: E402
from minipipe.events import Admitted, Batched, Committed, Finished, Narrator  # noqa: E402
from minipipe.greedy import generate_greedy  # noqa: E402
from minipipe.model import load_stage  # noqa: E402
from minipipe.paths import DEFAULT_DRAFT, resolve_model  # noqa: E402
from minipipe.request import Request  # noqa: E402
from minipipe.runtime import CostModel, LocalPipeline, load_stage_models, split_layers  # noqa: E402
from minipipe.strategies import PipelineStrategy, SpecPipeStrategy, SpeculativeStrategy  # noqa: E402
from minipipe.tokenizer import Tokenizer  # noqa: E402

ARRIVALS = [("a", "ROMEO:\n", 0.0), ("b", "JULIET:\n", 0.002), ("c", "HAMLET:\n", 0.005)]  # virtual seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--strategy", choices=("pipeline", "speculative", "specpipe"), default="pipeline")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--tokens", type=int, default=8)
    parser.add_argument("--model", help="target (default: the shipped model)")
    args = parser.parse_args()
    target_dir = resolve_model(args.model)
    config = load_config(target_dir)
    tok = Tokenizer(target_dir, config.eos_ids)
    if args.strategy == "pipeline":
        strategy = PipelineStrategy()
    else:
        draft = DraftModel(load_stage(resolve_model(None, default=DEFAULT_DRAFT)), target_vocab=config.vocab_size)
        strategy = SpeculativeStrategy(draft, k=3) if args.strategy == "speculative" else SpecPipeStrategy(draft, 2)
    pipe = LocalPipeline(load_stage_models(target_dir, split_layers(config.n_layers, args.stages)),
                         Engine.n_seqs(strategy, 3), cost=CostModel())

    narrator = Narrator(text=lambda t: tok.decode([t]), show_request=True)
    shown = (Admitted, Batched, Committed, Finished)

    def listen(event) -> None:  # the engine's view: admissions, shared micro-batches, commits
        if isinstance(event, shown):
            line = narrator.sentence(event)
            who = "" if isinstance(event, Batched) else f"[{event.request}] "
            print(f"t={pipe.now() * 1e3:6.2f} ms  {who}{line}")

    engine = Engine(pipe, strategy, max_running=3, max_positions=config.max_positions, listeners=[listen])
    requests = [engine.add(Request(rid, tok.encode(text), args.tokens, tok.eos_ids, arrival_s=t))
                for rid, text, t in ARRIVALS]
    print(f"{strategy.name} on {args.stages} stages; requests arrive at "
          + ", ".join(f"{rid} {t * 1e3:.0f} ms" for rid, _, t in ARRIVALS) + "\n")
    engine.run()
    print()
    target = load_stage(target_dir)
    same = True
    for r in requests:
        expected = generate_greedy(target, r.prompt, args.tokens, tok.eos_ids).tokens
        same &= r.result().tokens == expected
        print(f"{r.id}: {tok.decode(r.result().tokens)!r}  (queued {r.queued_s * 1e3:.2f} ms, "
              f"first token after {r.result().metrics.token_times[0] * 1e3:.2f} ms)")
    print(f"same as greedy decoding, each alone: {same}")
    sys.exit(0 if same else 1)


if __name__ == "__main__":
    main()
