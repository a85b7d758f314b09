"""The papers' comparisons: pipeline, speculative, tree, pipeinfer and specpipe, side by side,
every run with the command line's defaults (`strategies.default_settings`, adapted to the stage
count) — no hand-picked flags.

    python benchmarks/bench_strategies.py --part clock                  # virtual clock, fixed costs
    python benchmarks/bench_strategies.py --part clock --cost calibrated  # ... costs measured here
    python benchmarks/bench_strategies.py --part process                # real processes, every core
    python benchmarks/bench_strategies.py --quick                       # a smaller grid of both

Part **clock** (local runtime, virtual clock): the shipped tinybard target, 4 and 8 stages, an
oracle draft whose first guess is right with probability p (0.2 .. 0.95), on the nominal link of
the cost model (fixed costs, as `minipipe generate --runtime local` charges by default; with
`--cost calibrated`, costs and the ring latency measured here once, for every cell) and on a
slow link (+1 ms per hop). The strategies are built as the command line builds them
(`default_settings`). Each cell is the mean over `--seeds` oracle seeds of decode tokens/s;
ratios to `pipeline` and to `speculative`. PipeInfer and SpecPipe run twice: with the draft on a
lane of its own (the default: decoders draft ahead while the head waits) and with the draft in
the head (`--draft-lane head`), side by side. For SpecPipe the measured hit rate h is printed
next to the sanity model S = N / (1 + (1 - h)(N - 1)) (docs/papers.md).

Part **process** (real processes, wall-clock time): stage counts from 1 up to the cores this
machine has, every strategy at each, each stage's decode GEMVs on cores // stages threads
(`--threads`: the same cores as greedy on every core); greedy on one thread and on every core, each
round interleaving every run so that load drifts hit them alike; medians over `--rounds`. Pairs:
tinybard with its draft, and SmolLM2-135M (if pulled) with prompt lookup on ordinary text and on
text that repeats. Tokens/s and the ratio to greedy with every core.

The process part runs `minipipe generate --json` in this process; every run's tokens are checked
against greedy decoding ("exact").
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipipe.cli import main as minipipe  # noqa: E402
from minipipe.errors import MinipipeError  # noqa: E402
from minipipe.paths import resolve_model  # noqa: E402

STRATEGY_NAMES = ("pipeline", "speculative", "tree", "pipeinfer", "specpipe")
LANE_STRATEGIES = ("pipeinfer", "specpipe")  # they draft ahead: measured with the draft on its lane and in the head
ORDINARY = "Once upon a time, in a small village by the sea,"
REPETITIVE = "The capital of France is Paris. The capital of"


def generate(argv: list[str]) -> dict:
    """One `minipipe generate ... --json --quiet` in this process; its JSON."""
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = minipipe(["generate", *argv, "--json", "--quiet", "--ignore-eos"])
    if code != 0:
        raise SystemExit(f"minipipe generate {' '.join(argv)} failed")
    return json.loads(out.getvalue().splitlines()[-1])


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# ----------------------------------------------------------------------------------------------
# the virtual clock


def clock_strategy(name: str, draft, n_stages: int):
    """`name` with the command line's defaults for `n_stages` stages (`default_settings`: what
    `minipipe generate` builds without flags)."""
    from minipipe.strategies import STRATEGIES, default_settings

    cls = STRATEGIES[name]
    return cls() if name == "pipeline" else cls(draft, **default_settings(name, n_stages))


def part_clock(tokens: int, stage_counts: list[int], ps: list[float], slow_ms: float, cost_kind: str,
               seeds: int) -> tuple[list[dict], str]:
    """Every cell on the virtual clock with one cost model: fixed (what `minipipe generate
    --runtime local` charges by default, the same everywhere) or calibrated here once (the
    command line would calibrate anew for every run)."""
    from minipipe.config import load_config
    from minipipe.draft import OracleDraft
    from minipipe.greedy import generate_greedy
    from minipipe.model import load_stage
    from minipipe.runtime import LocalPipeline, load_stage_models, split_layers
    from minipipe.runtime.cost import calibrate, fixed
    from minipipe.strategies import generate as run
    from minipipe.tokenizer import Tokenizer

    target_dir = resolve_model(None)
    config = load_config(target_dir)
    prompt = Tokenizer(target_dir, config.eos_ids).encode("ROMEO:")
    target = load_stage(target_dir)
    truth = generate_greedy(target, prompt, tokens).tokens
    if cost_kind == "fixed":
        cost = fixed(config)
    else:
        import numpy as np
        from bench_ring import ring_latency  # (same folder)

        from dataclasses import replace

        cost = calibrate(target, None, hop_latency=ring_latency(np.zeros(16 + config.dim, np.float32), 600))
        L = config.n_layers  # the oracle draft, priced as `fixed` prices it: a model a tenth of the target's cost
        cost = replace(cost, draft_fixed=0.1 * (cost.layer_fixed * L + cost.head_fixed),
                       draft_per_token=0.1 * (cost.layer_per_row * L + cost.head_per_row))
    rows = []
    for n in stage_counts:
        models = load_stage_models(target_dir, split_layers(config.n_layers, n))
        for link in (0.0, slow_ms):
            link_cost = cost.with_hop_latency(link / 1e3)

            def measure(name, p, seed, lane):
                strategy = clock_strategy(name, OracleDraft(truth + [0] * 64, p, config.vocab_size, seed=seed), n)
                pipe = LocalPipeline(models, n_seqs=strategy.n_seqs, cost=link_cost, draft_lane=lane)
                r = run(strategy, pipe, prompt, tokens, (), config.max_positions)
                assert r.tokens == truth, (name, n, p, lane)  # greedy's tokens, every run
                return r.metrics.to_dict()

            pipeline = measure("pipeline", 0.0, 0, True)
            for p in ps:
                for name in STRATEGY_NAMES:
                    for lane in ("own", "head") if name in LANE_STRATEGIES else ("own",):
                        ms = [pipeline] if name == "pipeline" else [measure(name, p, seed, lane == "own")
                                                                    for seed in range(seeds)]
                        spec = [m.get("speculation") or {} for m in ms]
                        rows.append({"stages": n, "slow_link_ms": link, "p": p, "strategy": name, "draft_lane": lane,
                                     "tokens_per_s": statistics.mean(m["decode_tokens_per_s"] for m in ms),
                                     "per_seed": [m["decode_tokens_per_s"] for m in ms],
                                     "hit_rate": statistics.mean(x["hit_rate"] for x in spec)
                                     if spec[0].get("hit_rate") is not None else None,
                                     "itl_mean_ms": 1e3 * statistics.mean(m["inter_token_latency_s"]["mean"]
                                                                          for m in ms)})
            log(f"  clock {n} stages, +{link} ms/hop done")
    return rows, cost.describe()


def print_clock(rows: list[dict], cost: str, described: str) -> None:
    print(f"\nVirtual clock ({cost} costs: {described}), tinybard, oracle draft right with probability p: "
          "decode tok/s (ratio to pipeline | to speculative); 'head': the draft in the head (--draft-lane head)")
    for n, link in dict.fromkeys((r["stages"], r["slow_link_ms"]) for r in rows):
        sel = [r for r in rows if r["stages"] == n and r["slow_link_ms"] == link]
        ps = list(dict.fromkeys(r["p"] for r in sel))
        print(f"\n{n} stages, {'+' + str(link) + ' ms per hop' if link else 'the cost model link'}")
        print(f"{'strategy':<17}" + "".join(f"{'p=' + str(p):>22}" for p in ps))
        for name, lane in dict.fromkeys((r["strategy"], r["draft_lane"]) for r in sel):
            cells = []
            for p in ps:
                at = {(r["strategy"], r["draft_lane"]): r for r in sel if r["p"] == p}
                t = at[(name, lane)]["tokens_per_s"]
                base, spec = at[("pipeline", "own")]["tokens_per_s"], at[("speculative", "own")]["tokens_per_s"]
                cells.append(f"{t:8.0f} ({t / base:4.2f}|{t / spec:4.2f})")
            label = name + (" (head)" if lane == "head" else "")
            print(f"{label:<17}" + "".join(f"{c:>22}" for c in cells))
        model = []
        for r in (r for r in sel if r["strategy"] == "specpipe" and r["draft_lane"] == "own"):
            h = r["hit_rate"] or 0.0
            base = next(x["tokens_per_s"] for x in sel if x["p"] == r["p"] and x["strategy"] == "pipeline")
            model.append(f"p={r['p']}: h={h:.2f} S={n / (1 + (1 - h) * (n - 1)):.2f} measured "
                         f"{r['tokens_per_s'] / base:.2f} (seeds {', '.join(f'{v / base:.2f}' for v in r['per_seed'])})")
        print("specpipe against S(h, N): " + "; ".join(model))


# ----------------------------------------------------------------------------------------------
# real processes


def part_process(tokens: int, rounds: int, max_stages: int, pairs: list[tuple]) -> list[dict]:
    """Every pair, greedy on 1 thread and on every core, every strategy at 1..max_stages stages;
    rounds interleave all runs."""
    n_cores = cores()
    samples: dict[tuple, list[dict]] = {}
    for round_ in range(rounds):
        for label, model, draft, prompt in pairs:
            truth = None
            plan = [("greedy", 1, ["--threads", "1"]), (f"greedy x{n_cores}", 1, ["--threads", str(n_cores)])]
            plan += [(name, s, ["--stages", str(s), "--threads", str(max(1, n_cores // s))]
                      + ([] if name == "pipeline" else ["--draft-model", draft]))
                     for s in range(1, max_stages + 1) for name in STRATEGY_NAMES]
            for name, stages, extra in plan:
                strategy = "greedy" if name.startswith("greedy") else name
                r = generate([prompt, "--model", model, "--strategy", strategy, "--max-new-tokens", str(tokens),
                              *extra])
                truth = truth or r["tokens"]
                m = r["metrics"]
                spec = m.get("speculation") or {}
                samples.setdefault((label, name, stages), []).append(
                    {"tokens_per_s": m["decode_tokens_per_s"], "exact": r["tokens"] == truth,
                     "acceptance": spec.get("acceptance_rate", spec.get("hit_rate"))})
            log(f"  process round {round_ + 1}: {label} done")
    rows = []
    for (label, name, stages), runs in samples.items():
        rows.append({"pair": label, "strategy": name, "stages": stages,
                     "tokens_per_s": statistics.median(x["tokens_per_s"] for x in runs),
                     "per_round": [x["tokens_per_s"] for x in runs], "exact": all(x["exact"] for x in runs),
                     "acceptance": runs[-1]["acceptance"]})
    return rows


def print_process(rows: list[dict]) -> None:
    n_cores = cores()
    print(f"\nReal processes on this machine ({n_cores} cores): decode tok/s, median of the rounds "
          f"(ratio to greedy on every core, x{n_cores} threads | to greedy on one thread)")
    for label in dict.fromkeys(r["pair"] for r in rows):
        sel = [r for r in rows if r["pair"] == label]
        every = next(r["tokens_per_s"] for r in sel if r["strategy"].startswith("greedy x"))
        one = next(r["tokens_per_s"] for r in sel if r["strategy"] == "greedy")
        print(f"\n{label}")
        for r in sel:
            where = "" if r["strategy"].startswith("greedy") else f" {r['stages']} stage{'s' * (r['stages'] > 1)}"
            acc = "" if r["acceptance"] is None else f"  accepted {r['acceptance']:.2f}"
            print(f"  {r['strategy'] + where:<26} {r['tokens_per_s']:8.1f} ({r['tokens_per_s'] / every:4.2f} | "
                  f"{r['tokens_per_s'] / one:4.2f}){acc}{'' if r['exact'] else '  NOT EXACT'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("process", "clock", "all"), default="all")
    parser.add_argument("--tokens", type=int, default=128, help="tokens per run (clock part; process: --process-tokens)")
    parser.add_argument("--stages", default="4,8", help="stage counts for the clock part (default 4,8)")
    parser.add_argument("--p", default="0.2,0.4,0.6,0.8,0.95", help="oracle acceptance values (clock part)")
    parser.add_argument("--slow-hop-ms", type=float, default=1.0, help="added per-hop latency of the slow link")
    parser.add_argument("--cost", choices=("fixed", "calibrated"), default="fixed", help="clock part's costs")
    parser.add_argument("--seeds", type=int, default=3, help="oracle seeds per cell (clock part; mean)")
    parser.add_argument("--process-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2, help="interleaved rounds (process part; median)")
    parser.add_argument("--max-stages", type=int, help="process part: stage counts 1..this (default: the cores)")
    parser.add_argument("--quick", action="store_true", help="smaller grid: 48 tokens, p 0.6,0.95, 8 stages, 1 seed, 1 round")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.p, args.stages, args.seeds, args.rounds, args.process_tokens = 48, "0.6,0.95", "8", 1, 1, 32
    out = {}
    if args.part in ("clock", "all"):
        t = time.time()
        out["clock"], out["cost_model"] = part_clock(args.tokens, [int(s) for s in args.stages.split(",")],
                                                     [float(p) for p in args.p.split(",")], args.slow_hop_ms,
                                                     args.cost, args.seeds)
        log(f"clock part: {time.time() - t:.0f} s")
        print_clock(out["clock"], args.cost, out["cost_model"])
    if args.part in ("process", "all"):
        t = time.time()
        pairs = [("tinybard + tinybard-draft", "tinybard", "tinybard-draft", "ROMEO:")]
        try:
            resolve_model("smollm2-135m")
            pairs += [("SmolLM2-135M + ngram, ordinary text", "smollm2-135m", "ngram", ORDINARY),
                      ("SmolLM2-135M + ngram, text that repeats", "smollm2-135m", "ngram", REPETITIVE)]
        except MinipipeError:
            log("SmolLM2 not pulled: skipping it (minipipe pull smollm2-135m)")
        out["process"] = part_process(args.process_tokens, args.rounds, args.max_stages or cores(), pairs)
        log(f"process part: {time.time() - t:.0f} s")
        print_process(out["process"])
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
