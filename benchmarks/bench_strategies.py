"""The papers' comparisons: pipeline, speculative, tree, pipeinfer and specpipe, side by side.

    python benchmarks/bench_strategies.py                 # both parts, default pair
    python benchmarks/bench_strategies.py --part clock --stages 4,8 --p 0.2,0.6,0.95
    python benchmarks/bench_strategies.py --quick         # a smaller grid, about a minute

Part **process** (real processes, real time): every strategy on 2 stages of the process runtime
with the shipped draft, on the default pair and on SmolLM2 (if pulled; with the n-gram draft,
since no SmolLM2 draft ships): decode tokens/s, time to first token, inter-token latency (mean,
p50, p95), and the ratio to `pipeline`.

Part **clock** (local runtime, virtual clock): costs calibrated on this machine from the real
models (`runtime.cost.calibrate`: per-layer time per row, LM head, draft time per token, and the
measured one-way ring latency), 4 and 8 stages, an oracle draft whose guesses are right with
probability p (0.2 .. 0.95), and the same with an added per-hop latency that mimics a slow
interconnect. Tokens/s on the virtual clock, ratios to `pipeline` and to `speculative`, and for
SpecPipe the hit rate h next to the sanity model S = N / (1 + (1 - h)(N - 1)) (docs/papers.md).

Every run's tokens are checked against greedy decoding ("exact" column).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from minipipe.config import load_config  # noqa: E402
from minipipe.draft import DraftModel, NgramDraft, OracleDraft  # noqa: E402
from minipipe.errors import MinipipeError  # noqa: E402
from minipipe.greedy import generate_greedy  # noqa: E402
from minipipe.model import load_stage  # noqa: E402
from minipipe.paths import DEFAULT_DRAFT, resolve_model  # noqa: E402
from minipipe.runtime import LocalPipeline, load_stage_models, open_pipeline, split_layers  # noqa: E402
from minipipe.runtime.cost import calibrate  # noqa: E402
from minipipe.strategies import (PipeInferStrategy, PipelineStrategy, SpecPipeStrategy, SpeculativeStrategy,  # noqa: E402
                                 TreeStrategy, generate)
from minipipe.tokenizer import Tokenizer  # noqa: E402

STRATEGY_NAMES = ("pipeline", "speculative", "tree", "pipeinfer", "specpipe")


def make_strategy(name: str, draft, n_stages: int):
    """The settings compared (one line each, so the table can say what it measured)."""
    if name == "pipeline":
        return PipelineStrategy()
    if name == "speculative":
        return SpeculativeStrategy(draft, k=4)
    if name == "tree":
        return TreeStrategy(draft)  # SpecInfer's <1,1,3,1,1,1,1,1>
    if name == "pipeinfer":
        return PipeInferStrategy(draft, p_accept=0.3, n_draft=4, max_inflight=2 * n_stages + 2)
    return SpecPipeStrategy(draft, width=2)


def summarize(result, greedy_tokens) -> dict:
    m = result.metrics.to_dict()
    itl = m["inter_token_latency_s"]
    spec = m.get("speculation") or {}
    return {"tokens_per_s": m["decode_tokens_per_s"], "ttft_ms": (m["time_to_first_token_s"] or 0) * 1e3,
            "itl_mean_ms": (itl["mean"] or 0) * 1e3, "itl_p50_ms": (itl["p50"] or 0) * 1e3,
            "itl_p95_ms": (itl["p95"] or 0) * 1e3, "exact": result.tokens == greedy_tokens,
            "acceptance": spec.get("acceptance_rate"), "hit_rate": spec.get("hit_rate")}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------------------------


def part_process(pairs, n_tokens: int, repeats: int) -> list[dict]:
    rows = []
    for label, target_dir, make_draft, prompt in pairs:
        config = load_config(target_dir)
        tok = Tokenizer(target_dir, config.eos_ids)
        ids = tok.encode(prompt)
        greedy = generate_greedy(load_stage(target_dir), ids, n_tokens)  # eos ignored: equal lengths
        rows.append({"model": label, "strategy": "greedy (1 process)", **summarize(greedy, greedy.tokens)})
        for name in STRATEGY_NAMES:
            best = None
            for _ in range(repeats):
                strategy = make_strategy(name, make_draft(), 2)
                with open_pipeline(target_dir, "process", 2, n_seqs=strategy.n_seqs) as pipe:
                    result = generate(strategy, pipe, ids, n_tokens, (), config.max_positions)
                row = summarize(result, greedy.tokens)
                if best is None or (row["tokens_per_s"] or 0) > (best["tokens_per_s"] or 0):
                    best = row
            rows.append({"model": label, "strategy": name, **best})
            log(f"  process {label} {name}: {best['tokens_per_s']} tok/s")
    return rows


def part_clock(target_dir, draft_dir, n_tokens: int, stage_counts, ps, slow_hop: float) -> tuple[list[dict], str]:
    config = load_config(target_dir)
    tok = Tokenizer(target_dir, config.eos_ids)
    ids = tok.encode("Once upon a time")
    target = load_stage(target_dir)
    draft = load_stage(draft_dir)
    from bench_ring import ring_latency  # noqa: E402  (same folder)

    import numpy as np
    hop = ring_latency(np.zeros(16 + config.dim, np.float32), 600)
    base_cost = calibrate(target, draft, hop_latency=hop)
    truth = generate_greedy(target, ids, n_tokens).tokens
    rows = []
    for n_stages in stage_counts:
        models = load_stage_models(target_dir, split_layers(config.n_layers, n_stages))
        for link, cost in (("measured hop", base_cost), (f"+{slow_hop * 1e3:.1f} ms/hop", base_cost.with_hop_latency(slow_hop))):
            for p in ps:
                for name in STRATEGY_NAMES:
                    strategy = make_strategy(name, OracleDraft(truth + [0] * 64, p, config.vocab_size, seed=1), n_stages)
                    pipe = LocalPipeline(models, n_seqs=strategy.n_seqs, cost=cost)
                    result = generate(strategy, pipe, ids, n_tokens, (), config.max_positions)
                    rows.append({"stages": n_stages, "link": link, "p": p, "strategy": name,
                                 **summarize(result, truth)})
                log(f"  clock {n_stages} stages {link} p={p} done")
    return rows, base_cost.describe()


# ----------------------------------------------------------------------------------------------


def print_process(rows) -> None:
    print("\nProcess runtime, 2 stages (real time; best of the repeats)")
    print(f"{'model':<16} {'strategy':<20} {'tok/s':>8} {'vs pipeline':>11} {'TTFT ms':>8} {'ITL mean':>9} "
          f"{'p50':>7} {'p95':>7} {'accept':>7} {'exact':>6}")
    for model in dict.fromkeys(r["model"] for r in rows):
        base = next(r["tokens_per_s"] for r in rows if r["model"] == model and r["strategy"] == "pipeline")
        for r in (r for r in rows if r["model"] == model):
            acc = r["acceptance"] if r["acceptance"] is not None else r["hit_rate"]
            print(f"{model:<16} {r['strategy']:<20} {r['tokens_per_s'] or 0:>8.1f} {(r['tokens_per_s'] or 0) / base:>11.2f} "
                  f"{r['ttft_ms']:>8.1f} {r['itl_mean_ms']:>9.2f} {r['itl_p50_ms']:>7.2f} {r['itl_p95_ms']:>7.2f} "
                  f"{'' if acc is None else f'{acc:.2f}':>7} {'yes' if r['exact'] else 'NO':>6}")


def print_clock(rows, cost_text: str) -> None:
    print(f"\nLocal runtime, virtual clock (costs calibrated here: {cost_text}); oracle draft right with probability p")
    for (n_stages, link) in dict.fromkeys((r["stages"], r["link"]) for r in rows):
        print(f"\n{n_stages} stages, {link}: tokens/s (ratio to pipeline | to speculative)")
        ps = list(dict.fromkeys(r["p"] for r in rows))
        print(f"{'strategy':<12} " + " ".join(f"{'p=' + str(p):>22}" for p in ps))
        for name in STRATEGY_NAMES:
            cells = []
            for p in ps:
                sel = {r["strategy"]: r for r in rows if r["stages"] == n_stages and r["link"] == link and r["p"] == p}
                r, base, spec = sel[name], sel["pipeline"]["tokens_per_s"], sel["speculative"]["tokens_per_s"]
                flag = "" if r["exact"] else "!"
                cells.append(f"{r['tokens_per_s']:>8.0f} ({r['tokens_per_s'] / base:4.2f}|{r['tokens_per_s'] / spec:4.2f}){flag}")
            print(f"{name:<12} " + " ".join(f"{c:>22}" for c in cells))
        sp = [r for r in rows if r["stages"] == n_stages and r["link"] == link and r["strategy"] == "specpipe"]
        model = []
        for r in sp:
            h = r["hit_rate"] or 0.0
            predicted = n_stages / (1 + (1 - h) * (n_stages - 1))
            base = next(x["tokens_per_s"] for x in rows if x["stages"] == n_stages and x["link"] == link
                        and x["p"] == r["p"] and x["strategy"] == "pipeline")
            model.append(f"p={r['p']}: h={h:.2f}, S(h,N)={predicted:.2f}, measured {r['tokens_per_s'] / base:.2f}")
        print("specpipe vs the sanity model: " + "; ".join(model))
    print("\nITL (ms, mean) on the virtual clock, highest p:")
    for (n_stages, link) in dict.fromkeys((r["stages"], r["link"]) for r in rows):
        top = max(r["p"] for r in rows)
        sel = [r for r in rows if r["stages"] == n_stages and r["link"] == link and r["p"] == top]
        print(f"  {n_stages} stages, {link}: " + ", ".join(f"{r['strategy']} {r['itl_mean_ms']:.2f}" for r in sel))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", help="target (default: the shipped model)")
    parser.add_argument("--draft", help="draft (default: the shipped draft)")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--part", choices=("process", "clock", "all"), default="all")
    parser.add_argument("--stages", default="4,8", help="stage counts for the clock part (default 4,8)")
    parser.add_argument("--p", default="0.2,0.4,0.6,0.8,0.95", help="oracle acceptance values (clock part)")
    parser.add_argument("--slow-hop-ms", type=float, default=1.0, help="added per-hop latency of the slow link")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="smaller grid: 24 tokens, p 0.4,0.9, one repeat")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.p, args.repeats = 24, "0.4,0.9", 1
    try:
        target_dir, draft_dir = resolve_model(args.model), resolve_model(args.draft, default=DEFAULT_DRAFT)
    except MinipipeError as e:
        sys.exit(f"bench_strategies: {e}")
    out = {}
    if args.part in ("process", "all"):
        pairs = [(target_dir.name, target_dir, lambda: DraftModel(load_stage(draft_dir)), "Once upon a time")]
        try:
            smollm = resolve_model("smollm2-135m")
            pairs.append(("smollm2-135m", smollm, NgramDraft, "The capital of France is Paris. The capital of"))
        except MinipipeError:
            log("SmolLM2 not pulled: skipping it (minipipe pull smollm2-135m)")
        t = time.time()
        out["process"] = part_process(pairs, args.tokens, args.repeats)
        log(f"process part: {time.time() - t:.0f} s")
    if args.part in ("clock", "all"):
        t = time.time()
        stage_counts = [int(s) for s in args.stages.split(",")]
        ps = [float(p) for p in args.p.split(",")]
        out["clock"], out["cost_model"] = part_clock(target_dir, draft_dir, args.tokens, stage_counts, ps,
                                                     args.slow_hop_ms / 1e3)
        log(f"clock part: {time.time() - t:.0f} s")
    if args.json:
        print(json.dumps(out, indent=2))
        return
    if "process" in out:
        print_process(out["process"])
    if "clock" in out:
        print_clock(out["clock"], out["cost_model"])


if __name__ == "__main__":
    main()
