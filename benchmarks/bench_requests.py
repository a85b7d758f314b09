"""Several requests at once: throughput and latency against concurrency, every strategy side by side.

    python benchmarks/bench_requests.py                              # shipped pair, process runtime, 2 stages
    python benchmarks/bench_requests.py --model smollm2-135m --draft ngram --concurrency 1,8
    python benchmarks/bench_requests.py --runtime local --stages 8   # the virtual clock, 8 stages
    python benchmarks/bench_requests.py --quick                      # 1, 4 requests; about a minute
    python benchmarks/bench_requests.py --runtime local --stages 8 --row-cost 0.1   # rows nearly free

For each concurrency c, c requests (different prompts, the same token budget) arrive at once and
are served by one engine; each strategy serves the same requests, strategies interleaved round by
round (this machine is noisy: compare ratios within a run, not absolute figures across runs).
Columns per strategy and c:

* **tok/s** — aggregate generated tokens / (last finish − first arrival), and `×1` its ratio to
  the same strategy with one request (the gain of continuous batching);
* **TTFT** — time to first token, median over requests (queueing and prefill included);
* **TBT** — time between tokens: the mean gap between consecutive tokens of a request, over all
  requests (a speculative step that yields several tokens counts as one gap and zero gaps, so the
  mean is the decode time per token; the median would be 0 for good drafts).

Every request's tokens are checked against its greedy decoding alone ("exact"). On the process
runtime times are wall-clock; on the local runtime they are virtual (`--cost fixed`, the
default: the command line's fixed cost model, the same on every machine; `--cost calibrated`:
measured here once, then fixed for every run). Every strategy has the command line's default
settings for the stage count (`minipipe.strategies.default_settings`), and on the process runtime
`pipeinfer` and `specpipe` draft on a draft server where `minipipe generate` would use one (a
model draft and a core to spare; `--draft-server always|never` to choose). `pipeline` is continuous batching in the vLLM style (the running
requests split into one micro-batch per stage); `specpipe` with several requests is SpecPipe-DB.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import cpu_name, progress  # noqa: E402
from minipipe.config import load_config  # noqa: E402
from minipipe.draft import DraftModel, NgramDraft, OracleDraft  # noqa: E402
from minipipe.engine import Engine, summarize  # noqa: E402
from minipipe.greedy import generate_greedy  # noqa: E402
from minipipe.model import load_stage  # noqa: E402
from minipipe.paths import DEFAULT_DRAFT, resolve_model  # noqa: E402
from minipipe.request import Request  # noqa: E402
from minipipe.runtime import LocalPipeline, load_stage_models, open_pipeline, split_layers  # noqa: E402
from minipipe.runtime.cost import calibrate, fixed  # noqa: E402
from minipipe.strategies import (PipeInferStrategy, PipelineStrategy, SpecPipeStrategy,  # noqa: E402
                                 SpeculativeStrategy, default_settings, largest_run)
from minipipe.tokenizer import Tokenizer  # noqa: E402

PROMPTS = ["ROMEO:\n", "JULIET:\n", "HAMLET:\n", "KING RICHARD III:\n", "First Citizen:\n", "MENENIUS:\n",
           "LADY MACBETH:\n", "PETRUCHIO:\n", "PORTIA:\n", "BRUTUS:\n", "OTHELLO:\n", "PROSPERO:\n",
           "Tell me about the weather.", "What is the capital of France?", "Write a short poem.", "Hello!"]
STRATEGIES = ("pipeline", "speculative", "pipeinfer", "specpipe")


def make_strategy(name: str, draft, n_stages: int):
    """`name` with the command line's defaults for `n_stages` stages (`default_settings`)."""
    cls = {"pipeline": PipelineStrategy, "speculative": SpeculativeStrategy, "pipeinfer": PipeInferStrategy,
           "specpipe": SpecPipeStrategy}[name]
    return cls() if name == "pipeline" else cls(draft, **default_settings(name, n_stages))


def serve(pipe, strategy, prompts: list[list[int]], n_tokens: int, max_positions: int) -> list[Request]:
    engine = Engine(pipe, strategy, max_running=len(prompts), max_positions=max_positions)
    requests = [engine.add(Request(i, p, n_tokens)) for i, p in enumerate(prompts)]
    engine.run()
    return requests


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="target (default: the shipped tinybard)")
    parser.add_argument("--draft", help="draft: a model, 'ngram', or 'oracle:P' (default: the shipped draft)")
    parser.add_argument("--runtime", choices=("process", "local"), default="process")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--cost", choices=("fixed", "calibrated"), default="fixed",
                        help="the local runtime's costs: fixed (the command line's default) or calibrated here once")
    parser.add_argument("--draft-server", choices=("auto", "always", "never"), default="auto",
                        help="process runtime: pipeinfer and specpipe draft on a draft server (auto: as the command "
                             "line decides, when a core is spare for it)")
    parser.add_argument("--row-cost", type=float, default=1.0, metavar="F",
                        help="local runtime: multiply every per-row cost (layers, LM head, draft) by F; e.g. 0.1 "
                             "asks what the strategies do where an extra row is nearly free, as on a GPU")
    parser.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated request counts")
    parser.add_argument("--strategies", default=",".join(STRATEGIES))
    parser.add_argument("--tokens", type=int, default=32, help="tokens per request (eos ignored)")
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds; the median is reported")
    parser.add_argument("--quick", action="store_true", help="concurrency 1,4, one round, 16 tokens")
    parser.add_argument("--json", metavar="FILE", help="also write the figures as JSON")
    args = parser.parse_args()
    if args.quick:
        args.concurrency, args.rounds, args.tokens = "1,4", 1, 16
    levels = [int(c) for c in args.concurrency.split(",")]
    names = args.strategies.split(",")
    target_dir = resolve_model(args.model)
    config = load_config(target_dir)
    tok = Tokenizer(target_dir, config.eos_ids)
    prompts = [tok.encode(p) for p in PROMPTS]
    prompts = (prompts * (max(levels) // len(prompts) + 1))[: max(levels)]
    target = load_stage(target_dir)
    truth = {tuple(p): generate_greedy(target, p, args.tokens).tokens for p in progress(prompts, "greedy oracle")}

    if args.draft in ("ngram",):
        draft = NgramDraft()
    elif args.draft and args.draft.startswith("oracle:"):
        draft = OracleDraft(lambda p: truth[tuple(p)], float(args.draft.split(":")[1]), config.vocab_size)
    else:
        draft_model = load_stage(resolve_model(args.draft, default=DEFAULT_DRAFT))
        draft = DraftModel(draft_model, target_vocab=config.vocab_size)
    cost = None
    if args.runtime == "local" and args.cost == "calibrated":
        cost = calibrate(target, getattr(draft, "model", None), repeats=3)
        print(f"virtual clock (calibrated once, then fixed): {cost.describe()}", file=sys.stderr)
    elif args.runtime == "local":
        draft_model = getattr(draft, "model", None)
        cost = fixed(config, None if draft_model is None else draft_model.config)
        print(f"virtual clock (fixed costs, as `minipipe generate --runtime local`): {cost.describe()}", file=sys.stderr)
    if cost is not None and args.row_cost != 1.0:
        from dataclasses import replace

        cost = replace(cost, layer_per_row=cost.layer_per_row * args.row_cost,
                       head_per_row=cost.head_per_row * args.row_cost, draft_per_token=cost.draft_per_token * args.row_cost)
        print(f"per-row costs x {args.row_cost}: {cost.describe()}", file=sys.stderr)

    # as `minipipe generate` does on the process runtime: pipeinfer and specpipe draft ahead on a
    # draft server (a process of its own) when the draft is a model and a core is spare for it
    # (`--draft-server always|never` overrides); the others draft in the head
    import os

    spare = (os.cpu_count() or 1) >= args.stages + 2
    server = None
    if (args.runtime == "process" and isinstance(draft, DraftModel) and any(n in ("pipeinfer", "specpipe") for n in names)
            and (args.draft_server == "always" or (args.draft_server == "auto" and spare))):
        from minipipe.draft_server import DraftServer

        server = DraftServer(str(resolve_model(args.draft, default=DEFAULT_DRAFT)), target_dir)

    figures: dict = {}  # (strategy, c) -> list of summaries
    for _ in progress(range(args.rounds), "rounds"):
        for name in names:
            on_server = server is not None and name in ("pipeinfer", "specpipe")
            strategy = make_strategy(name, server.source if on_server else draft, args.stages)
            n_seqs = Engine.n_seqs(strategy, max(levels))
            if args.runtime == "local":
                models = load_stage_models(target_dir, split_layers(config.n_layers, args.stages))
                pipes = [LocalPipeline(models, n_seqs, cost=cost, cache_cells=2048) for _ in levels]
            else:
                pipe = open_pipeline(target_dir, "process", args.stages, n_seqs=n_seqs,
                                     max_rows=largest_run(strategy, max(levels)), cache_cells=2048)
                pipes = [pipe] * len(levels)
            try:
                for c, pipe in zip(levels, pipes):
                    requests = serve(pipe, strategy, prompts[:c], args.tokens, config.max_positions)
                    summary = summarize(requests)
                    summary["exact"] = all(r.result().tokens == truth[tuple(r.prompt)] for r in requests)
                    figures.setdefault((name, c), []).append(summary)
            finally:
                pipes[0].close()
    if server is not None:
        server.close()

    def median(name: str, c: int, key: str, sub: str | None = None):
        values = [s[key][sub] if sub else s[key] for s in figures[(name, c)]]
        values = [v for v in values if v is not None]
        return statistics.median(values) if values else None

    label = Path(target_dir).name
    print(f"# {label}, {args.runtime} runtime, {args.stages} stages, {args.tokens} tokens per request, "
          f"{args.rounds} interleaved round(s); {cpu_name()}")
    unit = "virtual " if args.runtime == "local" else ""
    print(f"| strategy | requests | {unit}tok/s | ×1 | TTFT p50 ms | TBT mean ms | exact |")
    print("|---|---|---|---|---|---|---|")
    out = []
    for name in names:
        one = median(name, levels[0], "tokens_per_s")
        for c in levels:
            tps = median(name, c, "tokens_per_s")
            ttft, tbt = median(name, c, "time_to_first_token_s", "p50"), median(name, c, "inter_token_latency_s", "mean")
            exact = all(s["exact"] for s in figures[(name, c)])
            out.append(dict(strategy=name, requests=c, tokens_per_s=tps, gain=tps / one if one else None,
                            ttft_p50_s=ttft, tbt_mean_s=tbt, exact=exact))
            print(f"| {name} | {c} | {tps:.1f} | {tps / one:.2f} | {ttft * 1e3:.1f} | "
                  f"{(tbt or 0) * 1e3:.2f} | {'yes' if exact else 'NO'} |")
    if "pipeline" in names and "specpipe" in names:
        print("\nSpecPipe-DB against continuous-batching pipeline (same run):")
        print("| requests | throughput ratio | TBT ratio (pipeline / specpipe) |")
        print("|---|---|---|")
        for c in levels:
            a, b = median("specpipe", c, "tokens_per_s"), median("pipeline", c, "tokens_per_s")
            ta = median("specpipe", c, "inter_token_latency_s", "mean")
            tb = median("pipeline", c, "inter_token_latency_s", "mean")
            print(f"| {c} | {a / b:.2f} | {tb / ta:.2f} |" if ta else f"| {c} | {a / b:.2f} | n/a |")
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
