"""Greedy decode speed of minipipe against the memory-bandwidth bound and against transformers.

    python benchmarks/bench_greedy.py [--model DIR|NAME] [--tokens N] [--prompt TEXT] [--json]
    python benchmarks/bench_greedy.py --random-smollm          # SmolLM2-135M-sized random weights

What it measures, all in one run on this machine:

* **minipipe decode tokens/s**: `greedy.generate_greedy` on the prompt for N new tokens (eos
  ignored, so every run makes exactly N), reading `decode_tokens_per_s` from its metrics
  ((N - 1) / (total time - time to first token): prefill excluded). Best of `--repeats` runs.
  minipipe runs with one BLAS thread (its default, `minipipe.blas`).
* **bandwidth bound**: a decode step must read every weight once, so it cannot beat
  bandwidth / (bytes of weights read per token). The bytes are `StageWeights.n_bytes` (all layers,
  final norm and head; a tied head counted once; float32, as minipipe holds them in memory);
  KV-cache reads are left out. The bandwidth is that of `np.copyto` over a 256 MB float32 array
  (best of several runs, after a warm-up), counting bytes read + bytes written (the STREAM "copy"
  convention; write-allocate traffic is not counted, so real DRAM traffic is higher). When the
  weights fit in the last-level cache the bound is not a DRAM bound and the script says so.
* **transformers decode tokens/s** (when torch and transformers import): `LlamaForCausalLM` on
  the same checkpoint in float32 with eager attention, greedy `generate` with eos disabled, timed
  for N new tokens and for 1 new token; decode rate = (N - 1) / (t_N - t_1), so prefill and the
  call's fixed costs cancel (best time of `--repeats` each). Once with `torch.set_num_threads(1)`
  (like minipipe) and once with torch's default thread count. The ratio minipipe / transformers
  compares decode rates.

Progress goes to stderr; the table (or with --json one JSON object) to stdout.
"""

from __future__ import annotations

import argparse
import json
import os
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
from minipipe import blas  # noqa: E402
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


def measure_copy_bandwidth(mb: int = COPY_MB, repeats: int = 5) -> dict:
    """np.copyto over an `mb`-MB float32 array; bytes read + bytes written per second (best run)."""
    src = np.ones(mb * 1024 * 1024 // 4, dtype=np.float32)
    dst = np.empty_like(src)
    np.copyto(dst, src)  # warm-up: fault in the destination pages
    best = float("inf")
    for _ in progress(range(repeats), "copy bandwidth"):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - t0)
    return {"array_mb": mb, "repeats": repeats, "best_s": best,
            "bytes_per_s": 2 * src.nbytes / best, "convention": "read + write bytes (STREAM copy)"}


def bench_minipipe(model, prompt: list[int], n_tokens: int, repeats: int) -> dict:
    generate_greedy(model, prompt, min(n_tokens, 4))  # warm-up
    rates, tokens = [], None
    for _ in progress(range(repeats), "minipipe greedy", unit="run"):
        gen = generate_greedy(model, prompt, n_tokens)  # eos_ids=(): exactly n_tokens
        rates.append(gen.metrics.to_dict()["decode_tokens_per_s"])
        tokens = gen.tokens
    return {"decode_tokens_per_s": max(rates), "runs": rates, "blas_threads": blas.get_threads(),
            "tokens": tokens}


def bench_transformers(model_dir: Path, prompt: list[int], n_tokens: int, repeats: int, threads: list[int]) -> list[dict]:
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
    ids = torch.tensor([prompt], dtype=torch.long)

    def timed(n: int) -> tuple[float, list[int]]:
        t0 = time.perf_counter()
        with torch.no_grad():
            # explicit mask: generate() would otherwise mask prompt ids equal to pad_token_id
            out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n, eos_token_id=None, pad_token_id=0)
        dt = time.perf_counter() - t0
        assert out.shape[1] == len(prompt) + n, "transformers stopped early"
        return dt, out[0, len(prompt):].tolist()

    results = []
    for n_threads in threads:
        torch.set_num_threads(n_threads)
        timed(min(n_tokens, 4))  # warm-up
        t_n, t_1, tokens = float("inf"), float("inf"), None
        for _ in progress(range(repeats), f"transformers, {n_threads} thread(s)", unit="run"):
            dt, tokens = timed(n_tokens)
            t_n = min(t_n, dt)
            t_1 = min(t_1, timed(1)[0])
        results.append({"threads": n_threads, "t_n_tokens_s": t_n, "t_1_token_s": t_1,
                        "decode_tokens_per_s": (n_tokens - 1) / (t_n - t_1) if t_n > t_1 else None,
                        "tokens": tokens})
    return results


def fmt_bytes(n: float) -> str:
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:.0f} B"


def render(r: dict) -> str:
    bw, bound = r["copy_bandwidth"], r["bound_tokens_per_s"]
    lines = [
        f"model      {r['model']}  ({r['model_desc']})",
        f"run        prompt {r['n_prompt_tokens']} tokens, {r['n_tokens']} new tokens (eos ignored), "
        f"best of {r['repeats']}; {r['machine']}",
        f"weights    {fmt_bytes(r['weight_bytes_per_token'])} read per decode token "
        "(StageWeights.n_bytes: layers + final norm + head, float32; KV cache not counted)",
        f"bandwidth  {bw['bytes_per_s'] / 1e9:.1f} GB/s: np.copyto of {bw['array_mb']} MB float32, "
        f"{bw['convention']}, best of {bw['repeats']}",
        f"bound      {bound:,.0f} tok/s = bandwidth / weight bytes per token",
    ]
    if r["weights_fit_in_cache"]:
        lines.append(f"note       the weights fit in the {r['last_level_cache_bytes'] / 2 ** 20:.0f} MiB last-level cache: "
                     "decode is not DRAM-bound and the bound is only nominal")
    rows = [("engine", "threads", "decode tok/s", "% of bound", "minipipe / this")]
    mp = r["minipipe"]["decode_tokens_per_s"]
    rows.append(("minipipe (NumPy, row-gemv kernels)", f"{r['minipipe']['blas_threads']} (BLAS)",
                 f"{mp:,.1f}", f"{100 * mp / bound:.1f}%", "1.00"))
    if r.get("minipipe_all_threads"):
        m2 = r["minipipe_all_threads"]
        rows.append(("minipipe --threads (decode GEMVs)", f"{m2['blas_threads']} (BLAS)",
                     f"{m2['decode_tokens_per_s']:,.1f}", f"{100 * m2['decode_tokens_per_s'] / bound:.1f}%",
                     f"{mp / m2['decode_tokens_per_s']:.2f}"))
    for h in r.get("transformers") or []:
        rate = h["decode_tokens_per_s"]
        rows.append((f"transformers {r['transformers_version']} fp32 eager", f"{h['threads']} (torch)",
                     "n/a" if rate is None else f"{rate:,.1f}",
                     "n/a" if rate is None else f"{100 * rate / bound:.1f}%",
                     "n/a" if not rate else f"{mp / rate:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    table = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    table.insert(1, "  ".join("-" * w for w in widths))
    if r.get("transformers_skipped"):
        table.append(f"(transformers not measured: {r['transformers_skipped']})")
    if r.get("tokens_agree") is not None:
        table.append(f"greedy ids identical in minipipe and transformers: {r['tokens_agree']}")
    if r.get("minipipe_all_threads"):
        table.append(f"greedy ids identical with 1 and {r['minipipe_all_threads']['blas_threads']} BLAS threads: "
                     f"{r['minipipe_all_threads']['same_tokens']}")
    return "\n".join(lines + [""] + table)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", help="checkpoint directory or model name (default: the shipped tinybard)")
    src.add_argument("--random-smollm", action="store_true",
                     help="benchmark a random checkpoint with SmolLM2-135M sizes, written to a temp directory")
    p.add_argument("--tokens", type=int, default=32, help="new tokens per run (default 32)")
    p.add_argument("--prompt", default="Once upon a time", help="prompt text (default 'Once upon a time')")
    p.add_argument("--repeats", type=int, default=3, help="runs per measurement; the best counts (default 3)")
    p.add_argument("--no-transformers", action="store_true", help="skip the transformers comparison")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    args = p.parse_args(argv)
    if args.tokens < 2:
        p.error("--tokens must be >= 2 (the decode rate needs two tokens)")

    # Read torch's default thread count before anything sets it.
    hf_threads, skipped = [], None
    if not args.no_transformers:
        try:
            import torch
            import transformers  # noqa: F401
            default_threads = torch.get_num_threads()
            hf_threads = sorted({1, default_threads})
        except ImportError as e:
            skipped = f"{e.name} is not installed"
    else:
        skipped = "--no-transformers"

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
        n_bytes = model.weights.n_bytes
        bandwidth = measure_copy_bandwidth()
        bound = bandwidth["bytes_per_s"] / n_bytes
        mp = bench_minipipe(model, prompt, args.tokens, args.repeats)
        mp_all = None
        if (os.cpu_count() or 1) > 1 and blas.info().controllable:  # `generate --threads N`: decode GEMVs on every core
            blas.set_threads(os.cpu_count())
            try:
                mp_all = bench_minipipe(model, prompt, args.tokens, args.repeats)
            finally:
                blas.set_threads(1)
            mp_all["same_tokens"] = mp_all["tokens"] == mp["tokens"]
        del model

        hf_results = None
        if hf_threads:
            print("loading transformers ...", file=sys.stderr)
            hf_results = bench_transformers(model_dir, prompt, args.tokens, args.repeats, hf_threads)

    llc = last_level_cache_bytes()
    c = config
    report = {
        "model": model_name,
        "model_desc": f"{c.n_layers} layers, dim {c.dim}, ffn {c.ffn_dim}, {c.n_heads}/{c.n_kv_heads} heads, "
                      f"vocab {c.vocab_size}, {'tied' if c.tie_embeddings else 'untied'} head",
        "machine": f"{cpu_name()}, {os.cpu_count()} CPUs",
        "n_prompt_tokens": len(prompt),
        "n_tokens": args.tokens,
        "repeats": args.repeats,
        "weight_bytes_per_token": n_bytes,
        "copy_bandwidth": bandwidth,
        "bound_tokens_per_s": bound,
        "last_level_cache_bytes": llc,
        "weights_fit_in_cache": llc is not None and n_bytes <= llc,
        "minipipe": mp,
        "minipipe_all_threads": mp_all,
        "minipipe_fraction_of_bound": mp["decode_tokens_per_s"] / bound,
        "transformers": hf_results,
        "transformers_skipped": skipped,
        "tokens_agree": None,
    }
    if hf_results:
        import transformers

        report["transformers_version"] = transformers.__version__
        report["tokens_agree"] = all(h["tokens"] == mp["tokens"] for h in hf_results)
        for h in hf_results:
            rate = h["decode_tokens_per_s"]
            h["minipipe_over_transformers"] = mp["decode_tokens_per_s"] / rate if rate else None
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
