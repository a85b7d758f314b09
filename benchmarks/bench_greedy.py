"""Greedy decode speed of minipipe against the memory-bandwidth bound and against transformers,
measured side by side in one run, in interleaved rounds.

    python benchmarks/bench_greedy.py --model smollm2-135m --tokens 128 [--rounds 5] [--json]
    python benchmarks/bench_greedy.py                          # the shipped tinybard
    python benchmarks/bench_greedy.py --random-smollm          # SmolLM2-135M-sized random weights
    python benchmarks/bench_greedy.py --model smollm2-135m --baseline /tmp/old --no-transformers
                                     # against another checkout (git worktree add /tmp/old COMMIT)

Every round runs, one after the other, in an order that rotates from round to round (after one
warm-up run of each):

* **copy** — `np.copyto` over a 256 MB float32 array (one thread), counting bytes read + bytes
  written (the STREAM "copy" convention; write-allocate traffic is not counted, so real DRAM
  traffic is higher). The **bound** of that round is this bandwidth / the bytes of weights a
  decode step reads (`StageWeights.n_bytes`: all layers, final norm and head, float32, a tied
  head counted once; KV-cache reads left out): a decode step must read every weight once.
* **minipipe** — `greedy.generate_greedy` for N new tokens (eos ignored, so exactly N), decode
  rate from its metrics: (N - 1) / (total time - time to first token), prefill excluded. On one
  thread (the default), and with `--threads` GEMV threads (`kernels.set_gemv_threads`, what
  `minipipe generate --threads` uses; default: every CPU) when the machine has more than one.
* **minipipe @ DIR** (with `--baseline DIR`: another minipipe checkout, e.g. a `git worktree` of
  an older commit) — the same greedy decode with that checkout's code, in a child process that
  imports it, on one thread: a kernel change measured side by side with the code before it.
* **transformers** (when torch and transformers import): `LlamaForCausalLM` on the same
  checkpoint in float32, eager attention, greedy `generate` with eos disabled, timed for N new
  tokens and for 1 new token in the same round; decode rate = (N - 1) / (t_N - t_1), so prefill
  and the call's fixed costs cancel. With `torch.set_num_threads(1)` and with the thread count
  of the minipipe `--threads` row.

Each row's figure is the median over the rounds; the ratios are per round (both engines in the
same round, seconds apart), then the median. `% of bound` divides a row's rate by the bound of
its own round. When the weights fit in the last-level cache the bound is not a DRAM bound and
the script says so.

Progress goes to stderr; the table (or with --json one JSON object) to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

from common import cpu_name, progress  # noqa: E402
from minipipe import blas, kernels  # noqa: E402
from minipipe.config import load_config  # noqa: E402
from minipipe.greedy import generate_greedy  # noqa: E402
from minipipe.model import load_stage  # noqa: E402
from minipipe.paths import resolve_model  # noqa: E402
from minipipe.synthetic import make_random_checkpoint  # noqa: E402
from minipipe.tokenizer import Tokenizer  # noqa: E402

SMOLLM_LIKE = dict(dim=576, ffn_dim=1536, n_layers=30, n_heads=9, n_kv_heads=3, vocab_size=49152,
                   tie_embeddings=True, max_positions=2048, rope_theta=100000.0)
COPY_MB = 256


def last_level_cache_bytes() -> int | None:
    """Size of the largest CPU cache of cpu0 (Linux sysfs), or None."""
    sizes = []
    for f in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = f.read_text().strip()
        unit = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
        try:
            sizes.append(int(text.rstrip("KMG")) * unit)
        except ValueError:
            pass
    return max(sizes) if sizes else None


class Copy:
    """np.copyto over COPY_MB of float32: bytes read + written per second."""

    name, threads = "copy bandwidth (np.copyto)", 1

    def __init__(self):
        self.src = np.ones(COPY_MB * 1024 * 1024 // 4, dtype=np.float32)
        self.dst = np.empty_like(self.src)

    def run(self) -> float:
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            np.copyto(self.dst, self.src)
            best = min(best, time.perf_counter() - t0)
        return 2 * self.src.nbytes / best


class Minipipe:
    def __init__(self, model, prompt: list[int], n_tokens: int, threads: int):
        self.model, self.prompt, self.n_tokens, self.threads = model, prompt, n_tokens, threads
        self.name = "minipipe (NumPy, row-gemv)" + (f", --threads {threads}" if threads > 1 else "")
        self.tokens = None

    def run(self) -> float:
        kernels.set_gemv_threads(self.threads)
        try:
            gen = generate_greedy(self.model, self.prompt, self.n_tokens)  # eos_ids=(): exactly n_tokens
        finally:
            kernels.set_gemv_threads(1)
        self.tokens = gen.tokens
        return gen.metrics.to_dict()["decode_tokens_per_s"]


BASELINE_WORKER = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
from minipipe.greedy import generate_greedy
from minipipe.model import load_stage
model = load_stage(sys.argv[2])
prompt, n_tokens = json.loads(sys.argv[3]), int(sys.argv[4])
print(json.dumps({"ready": True}), flush=True)
for _ in sys.stdin:
    gen = generate_greedy(model, prompt, n_tokens)
    print(json.dumps({"rate": gen.metrics.to_dict()["decode_tokens_per_s"], "tokens": gen.tokens}), flush=True)
"""


class Baseline:
    """minipipe's greedy decode from another checkout, in a child process that imports that
    checkout (one BLAS thread, as minipipe pins it): one run per `run()`."""

    threads = 1

    def __init__(self, checkout: Path, model_dir: Path, prompt: list[int], n_tokens: int):
        import subprocess

        self.name = f"minipipe @ {checkout}"
        self.tokens = None
        self.proc = subprocess.Popen([sys.executable, "-c", BASELINE_WORKER, str(checkout), str(model_dir),
                                      json.dumps(prompt), str(n_tokens)], cwd=checkout, text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        if not json.loads(self.proc.stdout.readline() or "{}").get("ready"):
            raise SystemExit(f"the baseline checkout {checkout} did not start (see its error above)")

    def run(self) -> float:
        self.proc.stdin.write("run\n")
        self.proc.stdin.flush()
        answer = json.loads(self.proc.stdout.readline())
        self.tokens = answer["tokens"]
        return answer["rate"]

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


class Transformers:
    def __init__(self, model, prompt: list[int], n_tokens: int, threads: int, version: str):
        import torch

        self.torch, self.model, self.n_tokens, self.threads = torch, model, n_tokens, threads
        self.ids = torch.tensor([prompt], dtype=torch.long)
        self.name = f"transformers {version} fp32 eager"
        self.tokens = None

    def _timed(self, n: int) -> float:
        torch = self.torch
        t0 = time.perf_counter()
        with torch.no_grad():
            # explicit mask: generate() would otherwise mask prompt ids equal to pad_token_id
            out = self.model.generate(self.ids, attention_mask=torch.ones_like(self.ids), do_sample=False,
                                      max_new_tokens=n, eos_token_id=None, pad_token_id=0)
        dt = time.perf_counter() - t0
        assert out.shape[1] == self.ids.shape[1] + n, "transformers stopped early"
        if n == self.n_tokens:
            self.tokens = out[0, self.ids.shape[1]:].tolist()
        return dt

    def run(self) -> float:
        self.torch.set_num_threads(self.threads)
        t_n, t_1 = self._timed(self.n_tokens), self._timed(1)
        return (self.n_tokens - 1) / (t_n - t_1) if t_n > t_1 else float("nan")


def load_transformers(model_dir: Path):
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    dtype_kw = "dtype" if (major, minor) >= (4, 56) else "torch_dtype"
    model = transformers.LlamaForCausalLM.from_pretrained(str(model_dir), attn_implementation="eager",
                                                          **{dtype_kw: torch.float32})
    model.eval()
    model.generation_config.eos_token_id = None
    return model, transformers.__version__


def median(xs):
    xs = [x for x in xs if x == x]  # drop NaN
    return statistics.median(xs) if xs else float("nan")


def run_rounds(rows: list, copy: Copy, rounds: int) -> tuple[list[float], dict]:
    """Warm up every row, then `rounds` rounds of copy + every row, the order rotating."""
    for row in progress(rows, "warm-up", unit="row"):
        row.run()
    copy.run()
    bandwidths, rates = [], {id(r): [] for r in rows}
    for k in progress(range(rounds), "rounds", unit="round"):
        order = [copy] + rows
        order = order[k % len(order):] + order[: k % len(order)]
        for row in order:
            if row is copy:
                bandwidths.append(copy.run())
            else:
                rates[id(row)].append(row.run())
    return bandwidths, rates


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def render(r: dict) -> str:
    bw = r["copy_bytes_per_s"]
    lines = [
        f"model      {r['model']}  ({r['model_desc']})",
        f"run        prompt {r['n_prompt_tokens']} tokens, {r['n_tokens']} new tokens (eos ignored), "
        f"{r['rounds']} interleaved rounds, medians; {r['machine']}",
        f"weights    {fmt_bytes(r['weight_bytes_per_token'])} read per decode token "
        "(StageWeights.n_bytes: layers + final norm + head, float32; KV cache not counted)",
        f"bandwidth  {median(bw) / 1e9:.1f} GB/s (rounds {min(bw) / 1e9:.1f}-{max(bw) / 1e9:.1f}): np.copyto of "
        f"{COPY_MB} MB float32, read + write bytes, one thread",
        f"bound      {median(r['bound_tokens_per_s']):,.1f} tok/s = bandwidth / weight bytes per token",
    ]
    if r["weights_fit_in_cache"]:
        lines.append(f"note       the weights fit in the {r['last_level_cache_bytes'] / 2 ** 20:.0f} MiB last-level cache: "
                     "decode is not DRAM-bound and the bound is only nominal")
    table = [("engine", "threads", "decode tok/s", "rounds min-max", "% of bound", "minipipe / this")]
    for row in r["rows"]:
        rates = row["decode_tokens_per_s"]
        ratio = row.get("minipipe_over_this")
        table.append((row["engine"], str(row["threads"]), f"{row['median']:,.1f}",
                      f"{min(rates):,.1f}-{max(rates):,.1f}", f"{100 * row['fraction_of_bound']:.0f}%",
                      "" if ratio is None else f"{ratio:.2f}"))
    widths = [max(len(t[i]) for t in table) for i in range(len(table[0]))]
    out = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(t, widths)))
           for t in table]
    out.insert(1, "  ".join("-" * w for w in widths))
    out.append("(minipipe / this: per-round ratio of minipipe with the same thread count to the row, median)")
    if r.get("transformers_skipped"):
        out.append(f"(transformers not measured: {r['transformers_skipped']})")
    for note in r["agreement"]:
        out.append(note)
    return "\n".join(lines + [""] + out)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory or model name (default: the shipped tinybard)")
    src.add_argument("--random-smollm", action="store_true",
                     help="benchmark a random checkpoint with SmolLM2-135M sizes, written to a temp directory")
    p.add_argument("--tokens", type=int, default=128, help="new tokens per run (default 128)")
    p.add_argument("--prompt", default="Once upon a time, in a small village by the sea,",
                   help="prompt text (default: the llama.cpp comparison's)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds; figures are medians (default 5)")
    p.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                   help="GEMV threads of the second minipipe row (and of transformers' second row); "
                        "default: every CPU; 1: no second row")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    p.add_argument("--baseline", metavar="DIR", type=Path,
                   help="another minipipe checkout (e.g. a git worktree of an older commit) whose greedy decode "
                        "runs in the same rounds, on one thread, in a child process")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.tokens < 2:
        p.error("--tokens must be >= 2 (the decode rate needs two tokens)")
    if args.rounds < 1 or args.threads < 1:
        p.error("--rounds and --threads must be >= 1")

    skipped = None
    if args.no_transformers:
        skipped = "--no-transformers"
    else:
        try:
            import torch  # noqa: F401
            import transformers  # noqa: F401
        except ImportError as e:
            skipped = f"{e.name} is not installed (pip install -e '.[hf]')"

    with ExitStack() as stack:
        if args.random_smollm:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="minipipe-smollm-")))
            print(f"writing a random SmolLM2-135M-sized checkpoint to {tmp} ...", file=sys.stderr)
            model_dir = make_random_checkpoint(tmp / "random-smollm", seed=0, dtype="F32", **SMOLLM_LIKE)
            model_name = "random SmolLM2-135M-sized checkpoint (make_random_checkpoint, seed 0, F32)"
        else:
            model_dir = resolve_model(args.model)
            model_name = str(model_dir)
        config = load_config(model_dir)
        prompt = Tokenizer(model_dir, config.eos_ids).encode(args.prompt)
        if len(prompt) + args.tokens > config.max_positions:
            p.error(f"prompt ({len(prompt)}) + --tokens ({args.tokens}) exceed the context ({config.max_positions})")

        print("loading minipipe ...", file=sys.stderr)
        model = load_stage(model_dir, progress=True)
        thread_counts = [1] + ([args.threads] if args.threads > 1 else [])
        rows = [Minipipe(model, prompt, args.tokens, t) for t in thread_counts]
        if args.baseline is not None:
            print(f"loading minipipe @ {args.baseline} ...", file=sys.stderr)
            baseline = Baseline(args.baseline.resolve(), model_dir, prompt, args.tokens)
            stack.callback(baseline.close)
            rows.append(baseline)
        version = None
        if skipped is None:
            print("loading transformers ...", file=sys.stderr)
            hf_model, version = load_transformers(model_dir)
            rows += [Transformers(hf_model, prompt, args.tokens, t, version) for t in thread_counts]
        copy = Copy()
        bandwidths, rates = run_rounds(rows, copy, args.rounds)

    n_bytes = model.weights.n_bytes
    bounds = [bw / n_bytes for bw in bandwidths]
    mp = {row.threads: row for row in rows if isinstance(row, Minipipe)}
    report_rows = []
    for row in rows:
        rs = rates[id(row)]
        entry = {"engine": row.name, "threads": row.threads, "decode_tokens_per_s": rs, "median": median(rs),
                 "fraction_of_bound": median([x / b for x, b in zip(rs, bounds)])}
        if row is not mp[row.threads]:
            entry["minipipe_over_this"] = median([m / x for m, x in zip(rates[id(mp[row.threads])], rs)])
        report_rows.append(entry)
    agreement = []
    one = mp[1].tokens
    for row in rows:
        if row is not mp[1]:
            agreement.append(f"greedy ids identical to minipipe on one thread: {row.name}, {row.threads} "
                             f"thread(s): {row.tokens == one}")
    llc = last_level_cache_bytes()
    c = config
    report = {
        "model": model_name,
        "model_desc": f"{c.n_layers} layers, dim {c.dim}, ffn {c.ffn_dim}, {c.n_heads}/{c.n_kv_heads} heads, "
                      f"vocab {c.vocab_size}, {'tied' if c.tie_embeddings else 'untied'} head",
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs, {blas.info().name.split(' ')[0]} "
                   f"{blas.info().name.split(' ')[1] if ' ' in blas.info().name else ''}".rstrip(),
        "n_prompt_tokens": len(prompt),
        "n_tokens": args.tokens,
        "rounds": args.rounds,
        "weight_bytes_per_token": n_bytes,
        "copy_bytes_per_s": bandwidths,
        "bound_tokens_per_s": bounds,
        "last_level_cache_bytes": llc,
        "weights_fit_in_cache": llc is not None and n_bytes <= llc,
        "rows": report_rows,
        "transformers_version": version,
        "transformers_skipped": skipped,
        "agreement": agreement,
    }
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
