"""What would distilling a draft for SmolLM2-135M cost on this CPU? Measure, then estimate.

    python tools/smollm2_draft_cost.py [MODEL_DIR_OR_NAME] [--json OUT]

Runs on one torch thread (the development machine has 2 shared cores) and reports:

* teacher (SmolLM2, fp32) forward throughput on batched sequences, no grad: the cost of teacher
  logits for token-level distillation;
* teacher batched greedy generation throughput: the cost of making sequence-level distillation
  data (the draft must predict SmolLM2's *greedy* tokens on chat prompts);
* one training step (forward, KL to teacher logits, backward, AdamW) of a small draft that reuses
  SmolLM2's vocabulary and (frozen, tied) embedding: 2 decoder layers of SmolLM2's width;
* the resulting hours for 5M and 20M distillation tokens;
* the top-1 agreement with SmolLM2's greedy tokens on held-out chat prompts of *untrained*
  layer-truncated drafts (SmolLM2's own first k layers + final norm + head), a zero-cost baseline.

Needs torch and transformers (`pip install 'minipipe[hf]'`).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

HELD_OUT = [
    "What is the boiling point of water?",
    "Name three primary colors.",
    "Write a short poem about autumn.",
    "What does a compiler do?",
    "Give me a tip for sleeping better.",
    "Who wrote Romeo and Juliet?",
    "Translate 'good morning' into Spanish.",
    "Why is the sky blue?",
]


def timed(fn, repeat: int = 3) -> float:
    fn()  # warm-up
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", nargs="?", default="smollm2-135m")
    parser.add_argument("--json", metavar="OUT")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

    import torch
    import torch.nn.functional as F
    from transformers import LlamaConfig, LlamaForCausalLM

    from minipipe.chat import chat_prompt
    from minipipe.config import load_config
    from minipipe.paths import resolve_model
    from minipipe.tokenizer import Tokenizer

    torch.set_num_threads(1)
    torch.manual_seed(0)
    d = resolve_model(args.model)
    teacher = LlamaForCausalLM.from_pretrained(str(d), dtype=torch.float32).eval()
    tok = Tokenizer(d, load_config(d).eos_ids)
    V = teacher.config.vocab_size
    report: dict = {"threads": torch.get_num_threads(), "torch": torch.__version__}

    # 1. teacher forward throughput (token-level distillation needs teacher logits for every token)
    for B, T in ((1, 256), (4, 256), (8, 128)):
        x = torch.randint(100, V, (B, T))
        with torch.no_grad():
            s = timed(lambda x=x: teacher(x).logits, repeat=2)
        report[f"teacher_forward_tok_s_b{B}_t{T}"] = round(B * T / s, 1)
        print(f"teacher forward  B={B} T={T}: {B * T / s:7.1f} tokens/s", flush=True)

    # 2. teacher batched greedy generation (sequence-level distillation data)
    prompts = [tok.encode(chat_prompt(tok, q)) for q in HELD_OUT]
    n_new = 32
    width = max(map(len, prompts))
    batch = torch.full((len(prompts), width), tok.eos_ids[0])
    mask = torch.zeros_like(batch)
    for i, p in enumerate(prompts):  # left padding
        batch[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    t = time.perf_counter()
    with torch.no_grad():
        out = teacher.generate(batch, attention_mask=mask, max_new_tokens=n_new, do_sample=False,
                               pad_token_id=tok.eos_ids[0], eos_token_id=None)
    s = time.perf_counter() - t
    report["teacher_generate_tok_s_b8"] = round(len(prompts) * n_new / s, 1)
    print(f"teacher generate B={len(prompts)}: {len(prompts) * n_new / s:7.1f} new tokens/s", flush=True)

    # 3. one training step of a 2-layer draft sharing SmolLM2's vocabulary and frozen embedding
    cfg = LlamaConfig(**{**teacher.config.to_dict(), "num_hidden_layers": 2})
    draft = LlamaForCausalLM(cfg)
    draft.model.embed_tokens.weight.data.copy_(teacher.model.embed_tokens.weight.data)
    draft.model.embed_tokens.weight.requires_grad_(False)  # tied head: frozen too
    for i, src in enumerate((0, teacher.config.num_hidden_layers - 1)):
        draft.model.layers[i].load_state_dict(teacher.model.layers[src].state_dict())
    draft.model.norm.load_state_dict(teacher.model.norm.state_dict())
    params = [p for p in draft.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-4)
    B, T = 4, 256
    x = torch.randint(100, V, (B, T))
    with torch.no_grad():
        target = F.log_softmax(teacher(x).logits, -1)

    def step():
        opt.zero_grad()
        logp = F.log_softmax(draft(x).logits, -1)
        loss = F.kl_div(logp.view(-1, V), target.view(-1, V), log_target=True, reduction="batchmean")
        loss.backward()
        opt.step()

    s = timed(step, repeat=2)
    report["draft_params_trainable"] = sum(p.numel() for p in params)
    report["draft_train_tok_s"] = round(B * T / s, 1)
    print(f"draft train step B={B} T={T}: {s:.2f} s = {B * T / s:7.1f} tokens/s "
          f"({report['draft_params_trainable'] / 1e6:.1f}M trainable)", flush=True)

    # 4. estimate: per distillation token, teacher forward + draft step (+ data generation for
    #    sequence-level KD, at the batched generation rate)
    per_tok = 1 / report["teacher_forward_tok_s_b4_t256"] + 1 / report["draft_train_tok_s"]
    per_tok_seq = per_tok + 1 / report["teacher_generate_tok_s_b8"]
    for n in (5e6, 20e6):
        report[f"hours_token_kd_{int(n / 1e6)}M"] = round(n * per_tok / 3600, 1)
        report[f"hours_sequence_kd_{int(n / 1e6)}M"] = round(n * per_tok_seq / 3600, 1)
        print(f"{n / 1e6:.0f}M tokens: {n * per_tok / 3600:6.1f} h (teacher logits on given text), "
              f"{n * per_tok_seq / 3600:6.1f} h (on SmolLM2's own greedy text)", flush=True)

    # 5. zero-cost baseline: truncated SmolLM2 (first k layers) as a draft, teacher-forced on the
    #    teacher's own greedy continuations of held-out chat prompts
    seqs = out  # [B, width + n_new], teacher greedy
    with torch.no_grad():
        full = teacher(seqs, attention_mask=torch.cat([mask, torch.ones(len(prompts), n_new, dtype=mask.dtype)], 1),
                       output_hidden_states=True)
        greedy = seqs[:, width:]  # what the teacher chose
        check = full.logits[:, width - 1:-1].argmax(-1)  # the measurement itself: all 30 layers
        report["agreement_all_layers_check"] = round(float((check == greedy).float().mean()), 3)
        print(f"check: the full model teacher-forced agrees with its own greedy tokens "
              f"{report['agreement_all_layers_check']:.3f}", flush=True)
        for k in (2, 4, 8, 15, 22):
            h = full.hidden_states[k][:, width - 1:-1]  # states before each generated token
            guess = teacher.lm_head(teacher.model.norm(h)).argmax(-1)
            report[f"agreement_first_{k}_layers"] = round(float((guess == greedy).float().mean()), 3)
            print(f"untrained draft = first {k:2d} layers + norm + head: top-1 agreement "
                  f"{report[f'agreement_first_{k}_layers']:.3f}", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


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
