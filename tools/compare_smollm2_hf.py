"""Compare minipipe with Hugging Face transformers on an imported checkpoint (e.g. SmolLM2-135M).

    python tools/compare_smollm2_hf.py [MODEL_DIR_OR_NAME] [--tokens N] [--json OUT]

Both engines load the same converted directory (`minipipe pull smollm2-135m`): transformers as
`LlamaForCausalLM.from_pretrained(dir, dtype=torch.float32)` on one CPU thread, minipipe through
`load_stage`. For each prompt (chat-templated questions and raw text) both decode greedily and
the token ids are compared step by step. A step where either engine's top-1/top-2 logit margin
is below NEAR_TIE is a genuine near-tie: float rounding alone may pick either token, so a
mismatch there ends the comparison of that prompt without failing it. The tokenizers are
compared too: HF's (AutoTokenizer and PreTrainedTokenizerFast on the same directory) against
minipipe's on strings with digits, unicode, whitespace and special tokens.

Needs torch and transformers (`pip install 'minipipe[hf]'`); the tests import this file.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

NEAR_TIE = 1e-2  # logit margin (top-1 minus top-2) below which fp32 rounding may flip the argmax

CHAT_PROMPTS = [
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "How many legs does a spider have?",
    "Explain in one sentence what a CPU does.",
    "Give me three tips for learning Python.",
]
RAW_PROMPTS = [
    "Once upon a time",
    "The year 1969 was important because",
    "def fibonacci(n):",
]
TOKENIZER_STRINGS = [
    "Hello world",
    "12345 apples cost $3.99 in 2024, not 1,000,000.",
    "naïve café résumé — Ångström, 日本語のテキスト, 😀👍🏽 and ❤️",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces\ttabs\n\n\nnewlines   trailing  ",
    "def f(x):\n    return x ** 2  # comment",
    "I'm sure they'll say it's fine, don't you think?",
]


@dataclass
class PromptResult:
    prompt: str
    chat: bool
    n_prompt_tokens: int
    n_compared: int  # steps compared (both engines produced a token there)
    n_matched: int  # leading steps where the ids agree
    verdict: str  # "match", "near-tie" (first mismatch at a near-tie) or "MISMATCH"
    hf_text: str
    minipipe_text: str
    mismatch_step: int | None = None
    hf_margin: float | None = None
    minipipe_margin: float | None = None
    max_logit_diff: float = 0.0  # over the compared steps with equal prefixes


def margin(logits: np.ndarray) -> float:
    top2 = np.partition(logits, -2)[-2:]
    return float(top2[1] - top2[0])


def hf_greedy(model, torch, prompt_ids: list[int], n: int, eos_id: int) -> tuple[list[int], list[np.ndarray]]:
    """HF greedy decoding with the raw logits of every step."""
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt_ids]), max_new_tokens=n, do_sample=False, num_beams=1,
                             eos_token_id=eos_id, pad_token_id=eos_id, output_logits=True,
                             return_dict_in_generate=True, temperature=None, top_p=None, top_k=None)
    tokens = out.sequences[0, len(prompt_ids):].tolist()
    return tokens, [step[0].float().numpy() for step in out.logits]


def minipipe_greedy(model, prompt_ids: list[int], n: int, eos_ids) -> tuple[list[int], list[np.ndarray]]:
    """minipipe greedy decoding (the oracle's own steps), keeping each step's logits."""
    from minipipe import kernels
    from minipipe.batch import Batch
    from minipipe.greedy import prefill

    cache = model.new_cache(capacity=len(prompt_ids) + n)
    logits = prefill(model, cache, prompt_ids)
    tokens, all_logits = [], []
    for step in range(n):
        all_logits.append(np.array(logits))
        token = int(kernels.argmax_rows(logits[None, :])[0])
        tokens.append(token)
        if token in eos_ids or step == n - 1:
            break
        logits = model.forward(cache, Batch.chain([token], len(prompt_ids) + step))[0]
    return tokens, all_logits


def compare_prompt(prompt: str, chat: bool, tok, hf_model, mp_model, torch, n: int) -> PromptResult:
    from minipipe.chat import chat_prompt

    text = chat_prompt(tok, prompt) if chat else prompt
    ids = tok.encode(text)
    hf_tokens, hf_logits = hf_greedy(hf_model, torch, ids, n, tok.eos_ids[0])
    mp_tokens, mp_logits = minipipe_greedy(mp_model, ids, n, set(tok.eos_ids))
    n_compared = min(len(hf_tokens), len(mp_tokens))
    matched, diff = 0, 0.0
    result = PromptResult(prompt=prompt, chat=chat, n_prompt_tokens=len(ids), n_compared=n_compared, n_matched=0,
                          verdict="match", hf_text=tok.decode(hf_tokens), minipipe_text=tok.decode(mp_tokens))
    for i in range(n_compared):
        diff = max(diff, float(np.max(np.abs(hf_logits[i] - mp_logits[i]))))
        if hf_tokens[i] != mp_tokens[i]:
            result.mismatch_step = i
            result.hf_margin, result.minipipe_margin = margin(hf_logits[i]), margin(mp_logits[i])
            near = min(result.hf_margin, result.minipipe_margin) < NEAR_TIE
            result.verdict = "near-tie" if near else "MISMATCH"
            break
        matched += 1
    if result.verdict == "match" and len(hf_tokens) != len(mp_tokens):
        result.verdict = "MISMATCH"  # one stopped at EOS, the other did not
    result.n_matched, result.max_logit_diff = matched, diff
    return result


def compare_tokenizers(model_dir: Path, tok) -> list[dict]:
    """minipipe's tokenizer against HF's two ways of loading the same directory."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    auto = AutoTokenizer.from_pretrained(str(model_dir))
    fast = PreTrainedTokenizerFast(tokenizer_file=str(model_dir / "tokenizer.json"))
    rows = []
    for s in TOKENIZER_STRINGS:
        mine = tok.encode(s)
        rows.append({"text": s, "minipipe": mine, "auto_equal": auto(s)["input_ids"] == mine,
                     "fast_equal": fast(s)["input_ids"] == mine,
                     "roundtrip": tok.decode(mine, skip_special=False) == s})
    return rows


def compare_chat_templates(model_dir: Path, tok) -> list[dict]:
    """minipipe's rendering of the chat template against HF's `apply_chat_template`."""
    from transformers import AutoTokenizer

    from minipipe.chat import chat_prompt

    auto = AutoTokenizer.from_pretrained(str(model_dir))
    rows = []
    for system in (None, "You are a pirate."):
        for question in CHAT_PROMPTS[:2]:
            messages = ([{"role": "system", "content": system}] if system else []) + [
                {"role": "user", "content": question}]
            hf_text = auto.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            mine = chat_prompt(tok, question, system)
            rows.append({"system": system, "question": question, "equal": hf_text == mine})
    return rows


def run(model_dir: Path, n_tokens: int = 48, prompts=None, log=print) -> dict:
    import torch
    from transformers import LlamaForCausalLM

    from minipipe.config import load_config
    from minipipe.model import load_stage
    from minipipe.tokenizer import Tokenizer

    torch.set_num_threads(1)
    config = load_config(model_dir)
    tok = Tokenizer(model_dir, config.eos_ids)
    hf_model = LlamaForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    mp_model = load_stage(model_dir)
    if prompts is None:
        prompts = [(p, True) for p in CHAT_PROMPTS] + [(p, False) for p in RAW_PROMPTS]
    results = []
    for prompt, chat in prompts:
        t0 = time.perf_counter()
        r = compare_prompt(prompt, chat, tok, hf_model, mp_model, torch, n_tokens)
        results.append(r)
        extra = "" if r.mismatch_step is None else (
            f" (step {r.mismatch_step}: margins HF {r.hf_margin:.4g}, minipipe {r.minipipe_margin:.4g})")
        log(f"{r.verdict:8s} {r.n_matched:3d}/{r.n_compared:<3d} max|dlogit| {r.max_logit_diff:.2e} "
            f"{time.perf_counter() - t0:5.1f}s  {'chat' if chat else 'raw '} {prompt!r}{extra}")
    tokenizers = compare_tokenizers(model_dir, tok)
    for row in tokenizers:
        log(f"tokenizer auto={row['auto_equal']} fast={row['fast_equal']} roundtrip={row['roundtrip']} "
            f"{len(row['minipipe'])} ids  {row['text']!r}")
    templates = compare_chat_templates(model_dir, tok)
    n_equal = sum(r["equal"] for r in templates)
    log(f"chat template: {n_equal}/{len(templates)} renderings equal HF's apply_chat_template")
    return {"model_dir": str(model_dir), "n_tokens": n_tokens, "near_tie": NEAR_TIE,
            "prompts": [asdict(r) for r in results], "tokenizer": tokenizers, "chat_template": templates,
            "versions": {"torch": torch.__version__, "transformers": __import__("transformers").__version__}}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m", help="directory or imported model name")
    parser.add_argument("--tokens", type=int, default=48, help="greedy tokens per prompt (default 48)")
    parser.add_argument("--json", metavar="OUT", help="also write the results as JSON")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from minipipe.paths import resolve_model

    report = run(resolve_model(args.model), args.tokens)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, ensure_ascii=False))
    bad = [p for p in report["prompts"] if p["verdict"] == "MISMATCH"]
    bad_tok = [t for t in report["tokenizer"] if not (t["auto_equal"] and t["fast_equal"])]
    bad_tok += [t for t in report["chat_template"] if not t["equal"]]
    print(f"{len(report['prompts']) - len(bad)}/{len(report['prompts'])} prompts agree (match or near-tie); "
          f"{len(bad_tok)} tokenizer / chat-template disagreements")
    return 1 if bad or bad_tok else 0


def require(*modules: str) -> None:
    """Stop with one line naming what to install when an optional module is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"{Path(__file__).name} needs {' and '.join(missing)} (not installed here): "
                 "pip install -e '.[hf]'")


if __name__ == "__main__":
    require("torch", "transformers")
    sys.exit(main())
