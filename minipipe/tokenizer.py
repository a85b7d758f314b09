"""Text <-> token ids through the Hugging Face `tokenizers` library, with streaming decode.

A checkpoint's `tokenizer.json` holds the model (BPE, byte-level or SentencePiece-style with
byte fallback); `tokenizer_config.json` says whether to prepend BOS (`add_bos_token`) and names
the special tokens. Some tokenizer.json files add BOS in their own post-processor; BOS is never
added twice.

Streaming: a token can end in the middle of a UTF-8 character (byte-level and byte-fallback
pieces), and SentencePiece decoders strip a leading space only at the start of a text. So
`StreamDecoder` decodes a short window of recent ids, emits only the new suffix, and holds text
back while it ends in an incomplete character (U+FFFD).
"""

from __future__ import annotations

from pathlib import Path

from .config import read_json
from .errors import TokenizerError

REPLACEMENT_CHAR = "\ufffd"


class Tokenizer:
    def __init__(self, model_dir: str | Path, eos_ids: tuple[int, ...] = ()):
        from tokenizers import Tokenizer as HFTokenizer

        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.is_file():
            raise TokenizerError(f"tokenizer.json not found in {model_dir}")
        try:
            self._tok = HFTokenizer.from_file(str(path))
        except Exception as e:  # noqa: BLE001 - the library raises plain Exception subclasses
            raise TokenizerError(f"{path} could not be read ({str(e).splitlines()[0]})") from None
        cfg_path = model_dir / "tokenizer_config.json"
        cfg = read_json(cfg_path, "tokenizer_config.json") if cfg_path.is_file() else {}
        self.config = cfg if isinstance(cfg, dict) else {}
        self.bos_id = self._special_id("bos_token")
        self.add_bos: bool | None = self.config.get("add_bos_token")  # None: the post-processor decides
        eos = list(eos_ids)
        eos_from_cfg = self._special_id("eos_token")
        if eos_from_cfg is not None and eos_from_cfg not in eos:
            eos.append(eos_from_cfg)
        self.eos_ids = tuple(eos)
        self.chat_template = self.config.get("chat_template")

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    def _special_id(self, key: str) -> int | None:
        token = self.config.get(key)
        if isinstance(token, dict):  # {"content": "<s>", ...} in some files
            token = token.get("content")
        return None if token is None else self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        """Prompt text -> ids, with BOS prepended when the checkpoint asks for it."""
        if self.add_bos is None:
            return list(self._tok.encode(text, add_special_tokens=True).ids)
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        if self.add_bos and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids: list[int], skip_special: bool = True) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=skip_special)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(i)

    def stream(self, prompt_ids: list[int]) -> "StreamDecoder":
        return StreamDecoder(self, prompt_ids)


class StreamDecoder:
    """Turns generated ids into text pieces as they arrive (the suffix each new id adds).

    Keeps two offsets into the id list: `prefix` (start of the decode window: the start of the
    last emitted piece, so spacing rules see context) and `read` (ids already turned into
    emitted text; always the end of a complete character).
    """

    WINDOW = 6  # ids of prompt context decoded with the first generated id

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int]):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids)
        self.read = len(self.ids)
        # the window must not start inside a multi-byte character: byte-fallback decoders turn
        # every byte of a broken run into U+FFFD, which would garble the characters after it
        self.prefix = max(0, self.read - self.WINDOW)
        for _ in range(4):  # a UTF-8 character spans at most 4 byte pieces
            if self.prefix == 0 or not tokenizer.decode(self.ids[self.prefix:self.read]).startswith(REPLACEMENT_CHAR):
                break
            self.prefix -= 1

    def push(self, token: int) -> str:
        """Add one generated id; return the text it completes (possibly empty)."""
        self.ids.append(int(token))
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read])
        after = decode(self.ids[self.prefix:])
        if len(after) <= len(before) or after.endswith(REPLACEMENT_CHAR):
            return ""  # nothing new yet, or a character still incomplete
        self.prefix, self.read = self.read, len(self.ids)  # `read` ended a complete character
        return after[len(before):]

    def flush(self) -> str:
        """Text still held back at the end (e.g. an incomplete character, shown as U+FFFD)."""
        decode = self.tokenizer.decode
        before = decode(self.ids[self.prefix:self.read])
        after = decode(self.ids[self.prefix:])
        self.read = len(self.ids)
        return after[len(before):] if len(after) > len(before) else ""
