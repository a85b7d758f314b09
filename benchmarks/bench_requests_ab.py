"""Several requests at once, this checkout against another one, interleaved level by level.

    git worktree add /tmp/old COMMIT        # the code before a change
    python benchmarks/bench_requests_ab.py --baseline /tmp/old --model smollm2-135m
    python benchmarks/bench_requests_ab.py --baseline /tmp/old --concurrency 1,8 --rounds 4

`bench_requests.py` measures one checkout; on a noisy machine two runs of it minutes apart differ
by more than most changes do. This script keeps one worker process per checkout alive (each
imports its own checkout, computes its greedy oracle, and opens its own process pipeline once),
then for every round and every concurrency c asks both workers, one right after the other (who
goes first alternates), to serve the same c requests (`bench_requests.serve`: different prompts,
`--tokens` each, end-of-sequence ignored). Figures are medians over rounds: tok/s aggregate, ×1
its ratio to one request of the same checkout in the same round, `after / before` the ratio of
the two checkouts' tok/s at the same level in the same round, and TBT the mean time between a
request's tokens. Every request's tokens are checked against its checkout's greedy decoding.
The idle worker's stages sleep on their rings while the other serves.

Progress goes to stderr; the table to stdout.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(checkout: str, model: str | None, draft: str, levels: list[int], n_tokens: int, strategy_name: str,
           n_stages: int) -> None:
    """Serve `c` requests for every line `c` read from stdin; one JSON summary per line."""
    sys.path.insert(0, checkout)
    from benchmarks.bench_requests import PROMPTS, make_strategy, serve
    from minipipe.config import load_config
    from minipipe.draft import NgramDraft
    from minipipe.engine import Engine, summarize
    from minipipe.greedy import generate_greedy
    from minipipe.model import load_stage
    from minipipe.paths import resolve_model
    from minipipe.runtime import open_pipeline
    from minipipe.strategies import largest_run
    from minipipe.tokenizer import Tokenizer

    target_dir = resolve_model(model)
    config = load_config(target_dir)
    tok = Tokenizer(target_dir, config.eos_ids)
    prompts = [tok.encode(p) for p in PROMPTS]
    prompts = (prompts * (max(levels) // len(prompts) + 1))[: max(levels)]
    target = load_stage(target_dir)
    truth = {tuple(p): generate_greedy(target, p, n_tokens).tokens for p in prompts}
    del target
    if draft != "ngram":
        raise SystemExit("bench_requests_ab: only --draft ngram is supported")
    strategy = make_strategy(strategy_name, NgramDraft(), n_stages)
    pipe = open_pipeline(target_dir, "process", n_stages, n_seqs=Engine.n_seqs(strategy, max(levels)),
                         max_rows=largest_run(strategy, max(levels)), cache_cells=2048)
    try:
        print(json.dumps({"ready": True}), flush=True)
        for line in sys.stdin:
            requests = serve(pipe, strategy, prompts[: int(line)], n_tokens, config.max_positions)
            summary = summarize(requests)
            summary["exact"] = all(r.result().tokens == truth[tuple(r.prompt)] for r in requests)
            print(json.dumps(summary), flush=True)
    finally:
        pipe.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", required=True, type=Path, help="the other checkout (e.g. a git worktree)")
    parser.add_argument("--model", default="smollm2-135m", help="target (default: smollm2-135m)")
    parser.add_argument("--draft", default="ngram", help="draft of the speculative strategies (ngram only)")
    parser.add_argument("--strategy", default="pipeline", help="one strategy (default: pipeline)")
    parser.add_argument("--stages", type=int, default=2)
    parser.add_argument("--concurrency", default="1,2,4,8,16", help="comma-separated request counts")
    parser.add_argument("--tokens", type=int, default=24, help="tokens per request (eos ignored)")
    parser.add_argument("--rounds", type=int, default=10, help="interleaved rounds; medians are reported")
    parser.add_argument("--json", metavar="FILE", help="also write every measurement as JSON")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    levels = [int(c) for c in args.concurrency.split(",")]
    if args.worker:
        worker(args.worker, args.model, args.draft, levels, args.tokens, args.strategy, args.stages)
        return

    checkouts = {"before": args.baseline.resolve(), "after": REPO}
    workers = {}
    for name, checkout in checkouts.items():
        print(f"starting the {name} worker ({checkout}) ...", file=sys.stderr)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(checkout), "--baseline", str(checkout),
               "--model", args.model, "--draft", args.draft, "--strategy", args.strategy, "--stages",
               str(args.stages), "--concurrency", args.concurrency, "--tokens", str(args.tokens)]
        workers[name] = subprocess.Popen(cmd, cwd=checkout, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        if not json.loads(workers[name].stdout.readline() or "{}").get("ready"):
            raise SystemExit(f"the {name} worker did not start (see its error above)")

    def ask(name: str, c: int) -> dict:
        workers[name].stdin.write(f"{c}\n")
        workers[name].stdin.flush()
        return json.loads(workers[name].stdout.readline())

    for name in workers:  # warm-up
        ask(name, min(2, max(levels)))
    runs = []
    for r in range(args.rounds):
        print(f"round {r + 1}/{args.rounds}", file=sys.stderr)
        for i, c in enumerate(levels):
            order = ["before", "after"] if (r + i) % 2 == 0 else ["after", "before"]
            for name in order:
                s = ask(name, c)
                runs.append(dict(round=r, requests=c, checkout=name, tokens_per_s=s["tokens_per_s"],
                                 tbt_mean_s=s["inter_token_latency_s"]["mean"], exact=s["exact"]))
    for w in workers.values():
        w.stdin.close()
        w.wait()

    at = {(x["round"], x["requests"], x["checkout"]): x for x in runs}
    rounds = range(args.rounds)

    def med(f):
        return statistics.median(f(r) for r in rounds)

    label = Path(args.model).name
    print(f"# {label}, process runtime, {args.stages} stages, {args.strategy}, {args.tokens} tokens per request, "
          f"{args.rounds} interleaved rounds; before: {checkouts['before']}, after: {checkouts['after']}")
    print("| requests | before tok/s (×1) | after tok/s (×1) | after / before (rounds min–max) "
          "| TBT mean ms before → after | exact |")
    print("|---|---|---|---|---|---|")
    for c in levels:
        cells = []
        for name in ("before", "after"):
            tps = med(lambda r: at[(r, c, name)]["tokens_per_s"])
            gain = med(lambda r: at[(r, c, name)]["tokens_per_s"] / at[(r, levels[0], name)]["tokens_per_s"])
            cells.append(f"{tps:.1f} ({gain:.2f})")
        ratios = sorted(at[(r, c, "after")]["tokens_per_s"] / at[(r, c, "before")]["tokens_per_s"] for r in rounds)
        tbt = [med(lambda r: at[(r, c, name)]["tbt_mean_s"]) * 1e3 for name in ("before", "after")]
        exact = all(at[(r, c, name)]["exact"] for r in rounds for name in ("before", "after"))
        print(f"| {c} | {cells[0]} | {cells[1]} | {statistics.median(ratios):.2f} ({ratios[0]:.2f}–{ratios[-1]:.2f}) "
              f"| {tbt[0]:.0f} → {tbt[1]:.0f} | {'yes' if exact else 'NO'} |")
    if args.json:
        Path(args.json).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
