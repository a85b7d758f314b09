"""Request files: JSON Lines, one request per line, for `minipipe generate --requests FILE`.

    {"id": "a", "prompt": "ROMEO:"}
    {"id": "b", "prompt_ids": [1, 1889, 28], "max_new_tokens": 32, "arrival_s": 0.5}

Fields: `prompt` (text, tokenized with the model's tokenizer, BOS as the model wants) or
`prompt_ids` (raw ids, no BOS added); optional `id` (default: the line number), `max_new_tokens`
(default: `--max-new-tokens`), `arrival_s` (seconds after the start; default 0: at once), and
sampling settings `temperature`, `top_k`, `top_p`, `min_p`, `seed` (defaults: the command line's;
a sampling request without a seed gets a random one, reported in its metrics).
Blank lines and lines starting with `#` are skipped. Any other line that is not such an object
is refused with its line number, before any work starts.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path

from .errors import InputError
from .generation import check_prompt
from .request import Request
from .sampling import GREEDY, Sampling

SAMPLING = ("temperature", "top_k", "top_p", "min_p", "seed")
FIELDS = {"id", "prompt", "prompt_ids", "max_new_tokens", "arrival_s", *SAMPLING}


def read_requests(path: str | Path, tokenizer, vocab_size: int, max_positions: int, max_new_tokens: int,
                  stop_ids=(), sampling: Sampling = GREEDY, seed: int | None = None) -> list[Request]:
    """Parse and check every request of a request file (one-line errors naming the line).
    `sampling` and `seed` are the defaults a line's own settings override."""
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"--requests {path}: cannot read it ({getattr(e, 'strerror', None) or e})") from None
    requests: list[Request] = []
    seen: set = set()
    for number, line in enumerate(lines, start=1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        where = f"--requests {path}, line {number}"
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{where}: not JSON ({e.msg})") from None
        if not isinstance(fields, dict):
            raise InputError(f"{where}: a request is a JSON object, got {type(fields).__name__}")
        unknown = set(fields) - FIELDS
        if unknown:
            raise InputError(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(FIELDS)}")
        rid = fields.get("id", number)
        if not isinstance(rid, (str, int)) or isinstance(rid, bool):
            raise InputError(f"{where}: id must be a string or an integer")
        if rid in seen:
            raise InputError(f"{where}: id {rid!r} is used twice")
        seen.add(rid)
        prompt = _prompt(fields, where, tokenizer)
        try:
            check_prompt(prompt, vocab_size, max_positions)
        except InputError as e:
            raise InputError(f"{where}: {e}") from None
        n = fields.get("max_new_tokens", max_new_tokens)
        if not isinstance(n, int) or isinstance(n, bool) or n < 0:
            raise InputError(f"{where}: max_new_tokens must be an integer >= 0")
        arrival = fields.get("arrival_s", 0.0)
        if not isinstance(arrival, (int, float)) or isinstance(arrival, bool) or not math.isfinite(arrival) \
                or arrival < 0:
            raise InputError(f"{where}: arrival_s must be a number of seconds >= 0")
        settings = {f: fields[f] for f in SAMPLING if f in fields}
        try:
            own = replace(sampling, **{f: v for f, v in settings.items() if f != "seed"})
            own = own.with_seed(settings.get("seed", seed))
        except (InputError, TypeError) as e:
            raise InputError(f"{where}: {e}") from None
        requests.append(Request(rid, prompt, n, tuple(stop_ids), float(arrival), sampling=own))
    if not requests:
        raise InputError(f"--requests {path}: no requests in the file")
    return requests


def _prompt(fields: dict, where: str, tokenizer) -> list[int]:
    if ("prompt" in fields) == ("prompt_ids" in fields):
        raise InputError(f"{where}: give either \"prompt\" or \"prompt_ids\"")
    if "prompt" in fields:
        if not isinstance(fields["prompt"], str):
            raise InputError(f"{where}: prompt must be a string")
        if tokenizer is None:
            raise InputError(f"{where}: a text prompt needs the model's tokenizer (give prompt_ids)")
        return tokenizer.encode(fields["prompt"])
    ids = fields["prompt_ids"]
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise InputError(f"{where}: prompt_ids must be a list of integers")
    return ids
