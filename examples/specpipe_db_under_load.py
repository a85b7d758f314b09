"""SpecPipe-DB under load: watch the trees narrow once the requests outnumber the stages.

    python examples/specpipe_db_under_load.py [--stages 8] [--tokens 32] [--requests 1,8,16]

For each number of requests, the same requests are served three ways on the virtual clock (fixed
costs, the same on every machine): continuous batching (`pipeline`), SpecPipe-DB with its load
bar (`SpecPipeDecoder.load_bar`, the default) and SpecPipe-DB without it (`row_cost = 0`). Each
line shows the time between tokens, the tree rows sent per committed token, and the bar a row had
to clear at the end. With no more requests than stages the bar is 0 and both SpecPipe-DB runs are
the same; beyond, the bar rises, each request sends fewer rows, and the step every request shares
gets shorter. At the end every request's tokens are checked against its greedy decoding alone.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_requests import PROMPTS  # noqa: E402
from minipipe.config import load_config  # noqa: E402
from minipipe.draft import DraftModel  # noqa: E402
from minipipe.engine import Engine  # noqa: E402
from minipipe.events import Committed, Launched  # noqa: E402
from minipipe.greedy import generate_greedy  # noqa: E402
from minipipe.model import load_stage  # noqa: E402
from minipipe.paths import DEFAULT_DRAFT, resolve_model  # noqa: E402
from minipipe.request import Request  # noqa: E402
from minipipe.runtime import LocalPipeline, load_stage_models, split_layers  # noqa: E402
from minipipe.runtime.cost import fixed  # noqa: E402
from minipipe.strategies import PipelineStrategy, SpecPipeStrategy, default_settings  # noqa: E402
from minipipe.tokenizer import Tokenizer  # noqa: E402


def serve(strategy, prompts, args, target_dir, config, cost):
    """Serve `prompts` at once; -> (requests, tree rows sent, tokens committed, the bars the decoders saw)."""
    pipe = LocalPipeline(load_stage_models(target_dir, split_layers(config.n_layers, args.stages)),
                         Engine.n_seqs(strategy, len(prompts)), cost=cost, cache_cells=2048)
    counts = {"rows": 0, "tokens": 0}

    def count(event) -> None:
        if isinstance(event, Launched) and event.kind == "tree layer":
            counts["rows"] += len(event.tokens)
        elif isinstance(event, Committed):
            counts["tokens"] += len(event.tokens)

    engine = Engine(pipe, strategy, max_running=len(prompts), max_positions=config.max_positions, listeners=[count])
    requests = [engine.add(Request(i, p, args.tokens)) for i, p in enumerate(prompts)]
    bars = []  # the bar each running SpecPipe request sees, turn by turn
    while engine.waiting or engine.running:
        engine.step()
        bars.extend(d.load_bar() for d in engine.running if hasattr(d, "load_bar"))
    engine.run()  # (what is still in flight)
    pipe.close()
    return requests, counts["rows"], counts["tokens"], bars


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--requests", default="1,8,16")
    args = parser.parse_args()
    target_dir = resolve_model(None)
    config = load_config(target_dir)
    tok = Tokenizer(target_dir, config.eos_ids)
    draft_model = load_stage(resolve_model(None, default=DEFAULT_DRAFT))
    cost = fixed(config, draft_model.config)
    target = load_stage(target_dir)
    prompts = [tok.encode(p) for p in PROMPTS]
    truth = {}
    exact = True
    print(f"tinybard on {args.stages} stages, {args.tokens} tokens per request, virtual clock\n")
    print(f"{'requests':>8}  {'run':<22} {'TBT ms':>7}  {'rows/token':>10}  {'bar (mean, max)':>16}")
    for n in [int(c) for c in args.requests.split(",")]:
        for label, row_cost in (("pipeline", None), ("SpecPipe-DB", 0.47), ("SpecPipe-DB, no bar", 0.0)):
            if row_cost is None:
                strategy = PipelineStrategy()
            else:
                draft = DraftModel(draft_model, target_vocab=config.vocab_size)
                strategy = SpecPipeStrategy(draft, **default_settings("specpipe", args.stages), row_cost=row_cost)
            requests, rows, tokens, bars = serve(strategy, prompts[:n], args, target_dir, config, cost)
            gaps = [b - a for r in requests for a, b in zip(r.result().metrics.token_times,
                                                             r.result().metrics.token_times[1:])]
            for r in requests:
                key = tuple(r.prompt)
                if key not in truth:
                    truth[key] = generate_greedy(target, r.prompt, args.tokens).tokens
                exact &= r.result().tokens == truth[key]
            bar = f"{statistics.mean(bars):.2f}, {max(bars):.2f}" if bars else ""
            per_token = f"{rows / tokens:.2f}" if row_cost is not None else ""
            print(f"{n:>8}  {label:<22} {statistics.mean(gaps) * 1e3:7.2f}  {per_token:>10}  {bar:>16}")
        print()
    print(f"every request's tokens equal its greedy decoding alone: {exact}")
    sys.exit(0 if exact else 1)


if __name__ == "__main__":
    main()
