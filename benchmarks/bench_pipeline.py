"""Plain pipeline parallelism on the process runtime: tokens/s with 1, 2, 3 stages next to greedy,
and what one hop between processes costs.

    python benchmarks/bench_pipeline.py [--model DIR|NAME] [--stages 1,2,3] [--tokens 64] [--json]
    python benchmarks/bench_pipeline.py --quick            # the same, smaller: under a minute

Models: `--model` (default: the shipped target, `minipipe.paths.resolve_model(None)`), and
SmolLM2-135M when it has been pulled (`minipipe pull smollm2-135m`; `--no-smollm` skips it).

Rows, per model, all measured in one run on this machine:

* **greedy** — `greedy.generate_greedy` in this process: the oracle, no pipeline, no hops.
* **pipeline N** — `--strategy pipeline` on the process runtime with N stage processes (one run
  in flight at a time: head -> stage 0 -> ... -> stage N-1 -> head, i.e. N + 1 ring hops per
  token). Every pipeline stays open for the whole benchmark; each run starts with the usual
  `KVRemove` and prefill.

Side by side: every round runs every row once (each row runs every prompt), in an order that
rotates from round to round, after one warm-up run per row; `--repeats` rounds. A row's figures
are its best and its median round. Every run makes exactly `--tokens` tokens (eos ignored), and
every pipeline run must emit greedy's tokens (asserted; the `exact` column).

Figures:

* **decode tok/s** — (tokens − 1) / (total time − time to first token), summed over the prompts
  (metrics.py's definition); **ms/token** is its inverse.
* **ttft** — time to first token (prefill included), mean over the prompts.
* **per-hop cost** — with N stages a token costs about compute + (N + 1) hops, so
  per-hop ≈ (t_pipeline_N − t_greedy) / (N + 1), t = ms/token. It lumps together everything the
  pipeline adds per token: ring transfer and wake-up, message encoding and decoding, each
  stage's per-run bookkeeping (cache placement, RoPE), and the scheduler's context switches on a
  machine with fewer cores than processes. The **fit** line gives the slope of t against the
  number of hops over the pipeline rows alone (no greedy), which leaves out what the head adds
  once per token.
* **ring one-way latency** — `bench_ring.ring_latency` (a ping-pong between two processes; median
  one-way time) with a record the size of this model's one-row hidden-state `Run` message,
  measured in the same run: the transport's share of a hop. Also with the sender busy for one
  greedy step before each record, so that the reader has slept as long as a stage sleeps while
  the other stages work (a sleeping process takes longer to wake).
* **where the time goes** — after the timed rounds, one more run per pipeline with tracing on
  (fresh pipelines, `Tracer`; the timed runs are untraced): per decode token, the time inside
  the stages' `Stage.process` (their layers plus each stage's per-run bookkeeping) summed over
  the stages, and the gaps between one process finishing and the next starting (encode, ring
  write, wake-up, decode; the last gap also holds the head's own loop), medians over the tokens.

Progress goes to stderr (tqdm); the table, or with --json one JSON object, to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from contextlib import ExitStack
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for _p in (str(REPO), str(HERE)):  # run as a script from anywhere; bench_ring for the ring latency
    if _p not in sys.path:
        sys.path.insert(0, _p)

import bench_ring  # noqa: E402
from common import cpu_name, progress  # noqa: E402
from minipipe import blas  # noqa: E402
from minipipe.batch import Batch  # noqa: E402
from minipipe.config import load_config  # noqa: E402
from minipipe.errors import CheckpointError, MinipipeError  # noqa: E402
from minipipe.greedy import generate_greedy  # noqa: E402
from minipipe.model import load_stage  # noqa: E402
from minipipe.paths import resolve_model  # noqa: E402
from minipipe.runtime import open_pipeline  # noqa: E402
from minipipe.strategies import PipelineStrategy, generate  # noqa: E402
from minipipe.tokenizer import Tokenizer  # noqa: E402
from minipipe.trace import Tracer  # noqa: E402
from minipipe.transport.messages import Run, encode  # noqa: E402

SMOLLM = "smollm2-135m"



def default_model() -> tuple[Path, str | None]:
    """The shipped target (and no note)."""
    return resolve_model(None), None


def smollm_dir() -> Path | None:
    try:
        return resolve_model(SMOLLM)
    except CheckpointError:
        return None


def describe(config) -> str:
    c = config
    return (f"{c.n_layers} layers, dim {c.dim}, ffn {c.ffn_dim}, {c.n_heads}/{c.n_kv_heads} heads, "
            f"vocab {c.vocab_size}")


# ------------------------------------------------------------------------------------------------
# measurements


def ring_one_way(dim: int, n_messages: int, idle_s: float) -> dict:
    """One-way ring latency for a record the size of a one-row hidden-state Run message: back to
    back (`bench_ring.ring_latency`), and with the sender computing for `idle_s` before each
    message, so the reader has slept that long, as a stage sleeps while the others work."""
    msg = Run(1, Batch.chain([0], 0), hidden=np.zeros((1, dim), np.float32))
    n_bytes = sum(memoryview(p).nbytes for p in encode(msg))
    record = np.zeros((n_bytes + 3) // 4, np.float32)
    n_idle = int(min(n_messages, max(20, 2.0 / idle_s)))  # about two seconds at most
    return {"record_bytes": int(record.nbytes), "messages": n_messages,
            "one_way_us": bench_ring.ring_latency(record, n_messages) * 1e6,
            "idle_s": idle_s, "idle_messages": n_idle,
            "one_way_after_idle_us": bench_ring.ring_latency(record, n_idle, idle_s=idle_s) * 1e6}


def summarise_run(gens: list) -> dict:
    """One run of a row = one generation per prompt; decode rate over all of them."""
    ds = [g.metrics.to_dict() for g in gens]
    decode_s = sum(d["total_s"] - d["time_to_first_token_s"] for d in ds)
    decode_tokens = sum(d["n_generated_tokens"] - 1 for d in ds)
    return {"s_per_token": decode_s / decode_tokens,
            "ttft_s": statistics.mean(d["time_to_first_token_s"] for d in ds)}


def hop_breakdown(model_dir: Path, prompt: list[int], n_tokens: int, n_stages: int, max_positions: int) -> dict:
    """One traced pipeline run: per decode token, stage work and the gaps between processes (µs)."""
    tracer = Tracer(enabled=True)
    with open_pipeline(model_dir, "process", n_stages, n_seqs=1, tracer=tracer) as pipe:
        generate(PipelineStrategy(), pipe, prompt, min(n_tokens, 8), (), max_positions)  # warm-up
        first_id = pipe.next_run_id
        generate(PipelineStrategy(), pipe, prompt, n_tokens, (), max_positions)
    runs: dict[int, dict[str, tuple[float, float]]] = {}
    for e in tracer.events:  # stage events arrive when the pipeline closes
        if e.run_id is not None and e.run_id >= first_id and e.kind in ("run", "submit"):
            runs.setdefault(e.run_id, {})[e.track] = (e.start, e.end)
    work, gaps = [], []
    for run_id in sorted(runs):
        this, after = runs[run_id], runs.get(run_id + 1, {})
        spans = [this.get(f"stage {i}") for i in range(n_stages)]
        if "head" not in this or "head" not in after or None in spans:
            continue
        if run_id == first_id or runs.get(run_id - 1) is None:  # the prefill chunks: not decode tokens
            continue
        ends = [this["head"][0]] + [end for _, end in spans]
        starts = [start for start, _ in spans] + [after["head"][0]]
        work.append(sum(end - start for start, end in spans))
        gaps.append([b - a for a, b in zip(ends, starts)])
    per_gap = [statistics.median(g[i] for g in gaps) for i in range(n_stages + 1)]
    return {"tokens": len(work), "stage_work_us": 1e6 * statistics.median(work),
            "gaps_us": [1e6 * g for g in per_gap], "gap_sum_us": 1e6 * sum(per_gap)}


def measure_model(model_dir: Path, prompt_texts: list[str], n_tokens: int, stages: list[int], repeats: int,
                  ring_messages: int) -> dict:
    config = load_config(model_dir)
    tokenizer = Tokenizer(model_dir, config.eos_ids)
    prompts = [tokenizer.encode(t) for t in prompt_texts]
    if max(len(p) for p in prompts) + n_tokens > config.max_positions:
        raise SystemExit(f"a prompt + --tokens {n_tokens} exceed {model_dir}'s context ({config.max_positions})")
    print(f"{model_dir}: loading, greedy warm-up, ring latency ...", file=sys.stderr)
    model = load_stage(model_dir)
    first = [generate_greedy(model, p, n_tokens) for p in prompts]  # the reference tokens; warms the greedy row
    truth = [g.tokens for g in first]
    step_s = summarise_run(first)["s_per_token"]
    ring = ring_one_way(config.dim, ring_messages, idle_s=step_s)

    rows = ["greedy"] + [f"pipeline {n}" for n in stages]
    runs: dict[str, list[dict]] = {r: [] for r in rows}
    exact: dict[str, bool] = {r: True for r in rows}
    with ExitStack() as stack:
        pipes = {}
        for n in progress(stages, "starting pipelines"):
            pipes[f"pipeline {n}"] = stack.enter_context(open_pipeline(model_dir, "process", n, n_seqs=1))

        def run_row(row: str, n: int) -> list:
            if row == "greedy":
                return [generate_greedy(model, p, n) for p in prompts]
            pipe = pipes[row]
            return [generate(PipelineStrategy(), pipe, p, n, (), config.max_positions) for p in prompts]

        for row in rows[1:]:
            run_row(row, min(n_tokens, 8))  # warm-up: first touch of the stages' weights and rings
        for r in progress(range(repeats), f"rounds ({len(rows)} rows each)", unit="round"):
            shift = r % len(rows)
            for row in rows[shift:] + rows[:shift]:  # rotate the order: no row always runs first
                gens = run_row(row, n_tokens)
                ok = [g.tokens for g in gens] == truth
                assert ok, f"{row} did not emit greedy's tokens on {model_dir}"
                exact[row] &= ok
                runs[row].append(summarise_run(gens))

    table = []
    for row in rows:
        per_token = [x["s_per_token"] for x in runs[row]]
        ttft = [x["ttft_s"] for x in runs[row]]
        n_stages = 0 if row == "greedy" else int(row.split()[1])
        table.append({
            "row": row, "n_stages": n_stages, "hops": 0 if row == "greedy" else n_stages + 1,
            "decode_tokens_per_s_best": 1 / min(per_token),
            "decode_tokens_per_s_median": 1 / statistics.median(per_token),
            "ms_per_token_best": 1e3 * min(per_token), "ms_per_token_median": 1e3 * statistics.median(per_token),
            "ttft_ms_best": 1e3 * min(ttft), "ttft_ms_median": 1e3 * statistics.median(ttft),
            "exact": exact[row], "runs": runs[row],
        })
    print(f"{model_dir}: traced runs ...", file=sys.stderr)
    for t in progress(table[1:], "traced runs"):
        t["breakdown"] = hop_breakdown(model_dir, prompts[0], n_tokens, t["n_stages"], config.max_positions)
    g = table[0]
    for t in table[1:]:
        for stat in ("best", "median"):
            t[f"per_hop_us_{stat}"] = 1e3 * (t[f"ms_per_token_{stat}"] - g[f"ms_per_token_{stat}"]) / t["hops"]
        t["speed_vs_greedy"] = t["decode_tokens_per_s_best"] / g["decode_tokens_per_s_best"]
    g["speed_vs_greedy"] = 1.0
    fit = None
    if len(table) >= 3:  # slope of ms/token against hops over the pipeline rows
        hops = [t["hops"] for t in table[1:]]
        slope_best = np.polyfit(hops, [t["ms_per_token_best"] for t in table[1:]], 1)[0]
        slope_median = np.polyfit(hops, [t["ms_per_token_median"] for t in table[1:]], 1)[0]
        fit = {"per_hop_us_best": 1e3 * slope_best, "per_hop_us_median": 1e3 * slope_median}
    return {"model": str(model_dir), "model_desc": describe(config), "weight_bytes": model.weights.n_bytes,
            "prompts": prompt_texts, "prompt_tokens": [len(p) for p in prompts], "n_tokens": n_tokens,
            "repeats": repeats, "ring": ring, "rows": table, "fit": fit}


# ------------------------------------------------------------------------------------------------
# output


def render_model(m: dict) -> str:
    ring_us = m["ring"]["one_way_us"]
    lines = [
        f"model   {m['model']}  ({m['model_desc']}, {m['weight_bytes'] / 1e6:.1f} MB float32)",
        f"run     {len(m['prompts'])} prompt(s) of {', '.join(map(str, m['prompt_tokens']))} tokens, "
        f"{m['n_tokens']} new tokens each (eos ignored); {m['repeats']} rounds, rows interleaved, "
        "order rotated each round; best / median round",
        f"ring    one-way latency {ring_us:.1f} µs back to back (bench_ring.ring_latency, "
        f"{m['ring']['record_bytes']} B record = a 1-row hidden-state Run, median of {m['ring']['messages']} "
        "ping-pongs); "
        f"{m['ring']['one_way_after_idle_us']:.1f} µs when the reader has slept {m['ring']['idle_s'] * 1e3:.2f} ms "
        f"(one greedy step) before each record ({m['ring']['idle_messages']} ping-pongs)",
        "",
    ]
    head = ("row", "hops", "decode tok/s", "ms/token", "vs greedy", "ttft ms", "per-hop µs", "hop / ring", "exact")
    out = [head]
    for t in m["rows"]:
        hop = t.get("per_hop_us_best")
        out.append((
            t["row"], str(t["hops"]),
            f"{t['decode_tokens_per_s_best']:,.1f} / {t['decode_tokens_per_s_median']:,.1f}",
            f"{t['ms_per_token_best']:.3f} / {t['ms_per_token_median']:.3f}",
            f"{t['speed_vs_greedy']:.2f}",
            f"{t['ttft_ms_best']:.1f} / {t['ttft_ms_median']:.1f}",
            "-" if hop is None else f"{hop:,.0f} / {t['per_hop_us_median']:,.0f}",
            "-" if hop is None else f"{hop / ring_us:.1f}x",
            "yes" if t["exact"] else "NO",
        ))
    widths = [max(len(r[i]) for r in out) for i in range(len(head))]
    table = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in out]
    table.insert(1, "  ".join("-" * w for w in widths))
    lines += table
    if m["fit"] is not None:
        f = m["fit"]
        lines.append(f"fit     slope of ms/token against hops over the pipeline rows: {f['per_hop_us_best']:,.0f} µs "
                     f"(best) / {f['per_hop_us_median']:,.0f} µs (median) per hop")
    lines += ["", "where the time goes (one traced run per pipeline, medians per decode token, µs; compare stage work "
                  f"with greedy's {1e3 * m['rows'][0]['ms_per_token_best']:,.0f} µs per token, best round):"]
    head = ("row", "stage work (sum)", "gaps (sum)", "per gap", "gap by gap: head>s0 > ... > head")
    out = [head]
    for t in m["rows"][1:]:
        b = t["breakdown"]
        out.append((t["row"], f"{b['stage_work_us']:,.0f}", f"{b['gap_sum_us']:,.0f}",
                    f"{b['gap_sum_us'] / t['hops']:,.0f}", " ".join(f"{g:,.0f}" for g in b["gaps_us"])))
    widths = [max(len(r[i]) for r in out) for i in range(len(head))]
    table = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in out]
    table.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + table)


def render(report: dict) -> str:
    parts = [f"machine {report['machine']}; BLAS {report['blas_threads']} thread(s) per process",
             "columns: best / median round; vs greedy = best decode tok/s over greedy's best; "
             "per-hop = (t_pipeline_N - t_greedy) / (N + 1) with t = ms/token; hop / ring = best per-hop over the "
             "ring's one-way latency (best rounds are the least disturbed by other work)"]
    parts += [n for n in report["notes"]]
    for m in report["models"]:
        parts += ["", render_model(m)]
    return "\n".join(parts)



def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", metavar="DIR|NAME",
                   help="target checkpoint directory or model name (default: the shipped model)")
    p.add_argument("--no-smollm", action="store_true", help=f"do not also measure {SMOLLM} when it is pulled")
    p.add_argument("--stages", default="1,2,3", help="stage counts to measure (default 1,2,3)")
    p.add_argument("--tokens", type=int, help="new tokens per run (default 64; SmolLM2 32; --quick 32 / 12)")
    p.add_argument("--repeats", type=int, help="rounds; best and median reported (default 5; --quick 2)")
    p.add_argument("--prompt", action="append", help="prompt text; repeat for several (default 'Once upon a time')")
    p.add_argument("--ring-messages", type=int, default=2000, help="ping-pongs for the ring latency (default 2000)")
    p.add_argument("--quick", action="store_true", help="fewer tokens and rounds: under a minute")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    stages = [int(s) for s in args.stages.split(",")]
    repeats = args.repeats or (2 if args.quick else 5)
    prompts = args.prompt or ["Once upon a time"]
    ring_messages = min(args.ring_messages, 500) if args.quick else args.ring_messages

    notes = []
    try:
        main_dir, note = (resolve_model(args.model), None) if args.model is not None else default_model()
    except MinipipeError as e:  # a missing model: one line
        print(f"bench_pipeline: error: {e}", file=sys.stderr)
        return 1
    if note:
        notes.append(f"note    {note}")
    targets = [(main_dir, args.tokens or (32 if args.quick else 64))]
    smol = None if args.no_smollm else smollm_dir()
    if smol is not None and smol.resolve() != main_dir.resolve():
        targets.append((smol, args.tokens or (12 if args.quick else 32)))
    elif smol is None and not args.no_smollm:
        notes.append(f"note    {SMOLLM} is not pulled (minipipe pull {SMOLLM}); not measured")

    load_before = os.getloadavg()
    models = [measure_model(d, prompts, n, stages, repeats, ring_messages) for d, n in targets]
    load_after = os.getloadavg()
    notes.append(f"load    1-minute load average {load_before[0]:.2f} before, {load_after[0]:.2f} after "
                 f"(on {os.cpu_count()} CPUs; other work on the machine slows and scatters every row)")
    report = {"machine": f"{cpu_name()}, {os.cpu_count()} CPUs", "blas_threads": blas.get_threads(),
              "load_average_before": load_before, "load_average_after": load_after,
              "notes": notes, "models": models}
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
