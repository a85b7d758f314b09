"""The papers' plots, on minipipe's virtual clock: PNG figures for docs/benchmarks.md.

    python benchmarks/bench_figures.py [--out docs/figures] [--tokens 48] [--quick]

Needs matplotlib (`pip install -e '.[plots]'`). Every run goes through `minipipe generate` on the
local runtime with **fixed costs** (`--cost fixed`: computed from the models' shapes, the same
on every machine), the shipped tinybard target, and an oracle draft (`--draft-model oracle:P`:
its first guess is the target's own token with probability P, so P is the draft's accuracy,
under control). So the figures are reproducible anywhere, bit for bit, and every run's tokens
are greedy decoding's (each strategy's exactness is tested elsewhere; here the text of every
run is compared with the pipeline's).

Figures (and `figures.json`, the numbers behind them):

* `speedup.png` — what PipeInfer and SpecPipe plot: decode speed relative to plain pipelining
  and to synchronous speculative decoding, against the draft's accuracy P, for each strategy, at
  4 and 8 stages. SpecPipe's sanity model S = N / (1 + (1 − h)(N − 1)), with its measured hit
  rate h, is drawn dotted.
* `tbt_vs_stages.png` — mean time between tokens against the number of stages (P = 0.8).
* `throughput_vs_concurrency.png` — tokens/s of the whole engine against the number of
  requests served at once (`--requests`, 4 stages, P = 0.8), each request a held-out prompt.

Settings: the command line's defaults, except `--draft 4` for pipeinfer (the original's README
suggests 3-8; its default of 16 makes an oracle draft run far ahead) — `speculative` drafts
chains of 4, `tree` SpecInfer's <1,1,3,1,1,1,1,1>, `specpipe` layers of width 4.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from minipipe.cli import main as minipipe  # noqa: E402

STRATEGIES = ["speculative", "tree", "pipeinfer", "specpipe"]
EXTRA = {"pipeinfer": ["--draft", "4"]}
COLORS = {"pipeline": "#555555", "speculative": "#4a7bd0", "tree": "#9b59b6", "pipeinfer": "#d04040",
          "specpipe": "#f0a030"}


def generate(strategy: str, stages: int, p: float | None, tokens: int, requests: Path | None = None) -> dict:
    """One `minipipe generate --json` run on the virtual clock; its JSON (or, with requests, the summary)."""
    argv = ["generate", "--strategy", strategy, "--stages", str(stages), "--runtime", "local", "--cost", "fixed",
            "--max-new-tokens", str(tokens), "--ignore-eos", "--json", "--quiet", *EXTRA.get(strategy, [])]
    if p is not None:
        argv += ["--draft-model", f"oracle:{p}"]
    argv += ["--requests", str(requests)] if requests is not None else ["ROMEO:"]
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        code = minipipe(argv)
    if code != 0:
        raise SystemExit(f"minipipe {' '.join(argv)} failed")
    lines = [json.loads(line) for line in out.getvalue().splitlines() if line.strip()]
    return lines[-1]["summary"] if requests is not None else lines[0]


def speedups(tokens: int, ps: list[float], stage_counts: list[int]) -> dict:
    data = {}
    for n in stage_counts:
        base = generate("pipeline", n, None, tokens)
        rows = {"pipeline": [base["metrics"]["decode_tokens_per_s"]] * len(ps)}
        hits = []
        for strategy in STRATEGIES:
            rows[strategy] = []
            for p in ps:
                r = generate(strategy, n, p, tokens)
                assert r["tokens"] == base["tokens"], (strategy, n, p)  # greedy's tokens, every run
                rows[strategy].append(r["metrics"]["decode_tokens_per_s"])
                if strategy == "specpipe":
                    hits.append(r["metrics"]["speculation"]["hit_rate"])
            print(f"  {n} stages, {strategy}: " + ", ".join(f"{v:.0f}" for v in rows[strategy]) + " tok/s",
                  file=sys.stderr)
        data[n] = {"tokens_per_s": rows, "specpipe_hit_rate": hits}
    return data


def tbt(tokens: int, stage_counts: list[int], p: float) -> dict:
    data = {}
    for strategy in ["pipeline", *STRATEGIES]:
        data[strategy] = []
        for n in stage_counts:
            r = generate(strategy, n, None if strategy == "pipeline" else p, tokens)
            data[strategy].append(r["metrics"]["inter_token_latency_s"]["mean"] * 1e3)
        print(f"  {strategy}: " + ", ".join(f"{v:.2f}" for v in data[strategy]) + " ms", file=sys.stderr)
    return data


def concurrency(tokens: int, levels: list[int], stages: int, p: float) -> dict:
    prompts = json.loads((REPO / "models" / "tinybard" / "heldout_prompts.json").read_text())["prompts"]
    data = {}
    with tempfile.TemporaryDirectory() as tmp:
        for strategy in ["pipeline", *STRATEGIES]:
            data[strategy] = []
            for k in levels:
                path = Path(tmp) / f"{k}.jsonl"
                path.write_text("".join(json.dumps({"id": i, "prompt": prompts[i]}) + "\n" for i in range(k)))
                s = generate(strategy, stages, None if strategy == "pipeline" else p, tokens, path)
                data[strategy].append(s["tokens_per_s"])
            print(f"  {strategy}: " + ", ".join(f"{v:.0f}" for v in data[strategy]) + " tok/s", file=sys.stderr)
    return data


def s_model(h: float, n: int) -> float:
    return n / (1 + (1 - h) * (n - 1))


def plot(results: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 8})
    ps = results["p"]
    sp = results["speedup"]
    fig, axes = plt.subplots(2, 2, figsize=(8, 6), sharex=True)
    for row, n in enumerate(sorted(sp, key=int)):
        rows = sp[n]["tokens_per_s"]
        for col, base in enumerate(["pipeline", "speculative"]):
            ax = axes[row][col]
            for strategy in ["pipeline", *STRATEGIES]:
                ax.plot(ps, [a / b for a, b in zip(rows[strategy], rows[base])], marker="o", ms=3,
                        color=COLORS[strategy], label=strategy)
            if base == "pipeline":
                ax.plot(ps, [s_model(h, int(n)) for h in sp[n]["specpipe_hit_rate"]], ":", color=COLORS["specpipe"],
                        label="S(h, N), specpipe's h")
            ax.axhline(1.0, color="#999", lw=0.5)
            ax.set_title(f"{n} stages: speedup over {base}")
            ax.set_ylabel(f"tokens/s ÷ {base}'s")
            ax.grid(alpha=0.3)
            if row == 1:
                ax.set_xlabel("draft accuracy P (oracle: first guess right with probability P)")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("minipipe on the virtual clock (fixed costs), tinybard + oracle draft", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "speedup.png", dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for strategy, values in results["tbt"].items():
        ax.plot(results["stages"], values, marker="o", ms=3, color=COLORS[strategy], label=strategy)
    ax.set_xscale("log", base=2)
    ax.set_xticks(results["stages"], [str(n) for n in results["stages"]])
    ax.set_xlabel("pipeline stages")
    ax.set_ylabel("mean time between tokens (ms, virtual)")
    ax.set_title(f"time between tokens against stages (P = {results['tbt_p']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "tbt_vs_stages.png", dpi=80)
    plt.close(fig)

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for strategy, values in results["concurrency"].items():
        ax.plot(results["levels"], values, marker="o", ms=3, color=COLORS[strategy], label=strategy)
    ax.set_xscale("log", base=2)
    ax.set_xticks(results["levels"], [str(n) for n in results["levels"]])
    ax.set_xlabel("requests served at once")
    ax.set_ylabel("tokens/s of the engine (virtual)")
    ax.set_title(f"throughput against concurrency ({results['concurrency_stages']} stages, P = {results['tbt_p']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "throughput_vs_concurrency.png", dpi=80)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(REPO / "docs" / "figures"), help="where the PNGs go (default docs/figures)")
    parser.add_argument("--tokens", type=int, default=48, help="tokens per run (default 48; --quick 16)")
    parser.add_argument("--quick", action="store_true", help="fewer points and tokens: a smoke run")
    parser.add_argument("--data", metavar="JSON", help="plot these numbers (a figures.json) instead of measuring")
    args = parser.parse_args(argv)
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        print("bench_figures.py needs matplotlib (not installed here): pip install -e '.[plots]'", file=sys.stderr)
        return 1
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.data:
        results = json.loads(Path(args.data).read_text())
    else:
        quick = args.quick
        tokens = 16 if quick else args.tokens
        ps = [0.4, 0.95] if quick else [0.2, 0.4, 0.6, 0.8, 0.95]
        stage_counts = [4] if quick else [4, 8]
        results = {"p": ps, "tokens": tokens, "stages": [1, 2] if quick else [1, 2, 4, 8],
                   "levels": [1, 2] if quick else [1, 2, 4, 8, 16], "tbt_p": 0.8, "concurrency_stages": 4}
        print("speedup against P:", file=sys.stderr)
        results["speedup"] = speedups(tokens, ps, stage_counts)
        print("time between tokens against stages:", file=sys.stderr)
        results["tbt"] = tbt(tokens, results["stages"], results["tbt_p"])
        print("throughput against concurrency:", file=sys.stderr)
        results["concurrency"] = concurrency(max(8, tokens // 2), results["levels"], results["concurrency_stages"],
                                             results["tbt_p"])
        (out / "figures.json").write_text(json.dumps(results, indent=1))
    plot(results, out)
    print(f"wrote {', '.join(sorted(p.name for p in out.glob('*.png')))} in {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
