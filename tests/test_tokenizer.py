"""Tokenizer: BOS rules and streaming decode across characters split between tokens (byte-level
BPE and byte-fallback pieces)."""

from __future__ import annotations

import json

import pytest
from hypothesis import assume, given, strategies as st

from minipipe.errors import TokenizerError
from minipipe.synthetic import write_word_tokenizer
from minipipe.tokenizer import Tokenizer

from .conftest import SHIPPED_MODELS as SHIPPED, shared_model


def streamed(tok: Tokenizer, prompt: list[int], ids: list[int]) -> str:
    stream = tok.stream(prompt)
    return "".join(stream.push(i) for i in ids) + stream.flush()


def expected_continuation(tok: Tokenizer, prompt: list[int], ids: list[int]) -> str:
    return tok.decode(prompt + ids)[len(tok.decode(prompt)):]


def test_stories_prompt_gets_bos():
    tok = Tokenizer(shared_model("stories260k"), (2,))
    assert tok.encode("Once upon a time") == [1, 403, 407, 261, 378]
    assert tok.eos_ids == (2,)


TOKENIZERS = ["tinybard", "stories260k"]  # byte-level BPE (shipped); SentencePiece BPE with byte fallback


def tokenizer(name: str) -> Tokenizer:
    return Tokenizer(SHIPPED / "tinybard" if name == "tinybard" else shared_model("stories260k"))


@pytest.mark.parametrize("name", TOKENIZERS)
def test_stream_across_characters_split_between_tokens(name):
    tok = tokenizer(name)
    text = "Naïve café, ☃ snow — 日本語 🙂 done."
    ids = tok.encode(text)
    pieces_of = [tok.decode([i]) for i in ids]
    assert any("\ufffd" in p for p in pieces_of), "test needs characters split across tokens"
    prompt, rest = ids[:3], ids[3:]
    pieces = []
    stream = tok.stream(prompt)
    for i in rest:
        piece = stream.push(i)
        assert "\ufffd" not in piece  # never a half character
        pieces.append(piece)
    assert "".join(pieces) + stream.flush() == expected_continuation(tok, prompt, rest)


@pytest.mark.parametrize("name", TOKENIZERS)
@given(text=st.text(min_size=1, max_size=40), cut=st.integers(1, 5))
def test_stream_equals_full_decode(name, text, cut):
    tok = tokenizer(name)
    ids = tok.encode(text)
    prompt, rest = ids[:cut], ids[cut:]
    assume(not tok.decode(prompt).endswith("\ufffd"))  # a prompt that ends inside a character
    assert streamed(tok, prompt, rest) == expected_continuation(tok, prompt, rest)


def _word_tokenizer(tmp_path, add_bos):
    tmp_path.mkdir()
    write_word_tokenizer(tmp_path, 20)
    cfg = json.loads((tmp_path / "tokenizer_config.json").read_text())
    if add_bos is None:
        del cfg["add_bos_token"]
    else:
        cfg["add_bos_token"] = add_bos
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return Tokenizer(tmp_path)


def test_bos_rules(tmp_path):
    assert _word_tokenizer(tmp_path / "a", True).encode("w5 w6") == [1, 5, 6]
    assert _word_tokenizer(tmp_path / "b", True).encode("<s> w5") == [1, 5]  # never twice
    assert _word_tokenizer(tmp_path / "c", False).encode("w5 w6") == [5, 6]
    assert _word_tokenizer(tmp_path / "d", None).encode("w5 w6") == [5, 6]  # no post-processor here


def test_missing_and_malformed_tokenizer(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.json not found"):
        Tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text('{"version": "1.0", "model": 3}')
    with pytest.raises(TokenizerError, match="could not be read"):
        Tokenizer(tmp_path)
