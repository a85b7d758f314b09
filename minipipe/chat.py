"""Chat prompts: render a checkpoint's chat template (tokenizer_config.json's `chat_template`).

Templates are Jinja2, rendered the way Hugging Face transformers renders them
(`apply_chat_template`), so a prompt built here is the prompt the model was tuned on:

* a sandboxed environment with `trim_blocks` and `lstrip_blocks`, and the `loopcontrols`
  extension (`{% break %}`, `{% continue %}`);
* variables `messages` (a list of {"role": ..., "content": ...}), `add_generation_prompt`,
  `bos_token`, `eos_token` (and any extra keyword, e.g. `tools=None`);
* `raise_exception(message)` (templates use it to reject bad conversations), `strftime_now(fmt)`
  and a `tojson` filter that keeps non-ASCII text as is.

The rendered text holds the special tokens as text (e.g. `<|im_start|>`); the checkpoint's
tokenizer matches them whole, so it needs no BOS of its own (`add_bos_token` decides).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from functools import lru_cache

from .errors import InputError, MinipipeError


class ChatTemplateError(MinipipeError):
    """The checkpoint has no usable chat template, or the template rejected the conversation."""


def _raise_exception(message: str):
    from jinja2.exceptions import TemplateError

    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    from datetime import datetime

    return datetime.now().strftime(fmt)


def _tojson(value, ensure_ascii: bool = False, indent=None, separators=None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


@lru_cache(maxsize=8)
def _compile(template: str):
    try:
        from jinja2.exceptions import TemplateSyntaxError
        from jinja2.sandbox import ImmutableSandboxedEnvironment
    except ImportError:
        raise ChatTemplateError("chat templates need the 'jinja2' package: pip install jinja2") from None
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    try:
        return env.from_string(template)
    except TemplateSyntaxError as e:
        raise ChatTemplateError(f"the chat template does not parse (line {e.lineno}: {e.message})") from None


def select_template(chat_template, name: str = "default") -> str:
    """tokenizer_config.json's `chat_template`: a string, or a list of {"name", "template"}."""
    if isinstance(chat_template, str) and chat_template:
        return chat_template
    if isinstance(chat_template, list):
        named = {t.get("name"): t.get("template") for t in chat_template if isinstance(t, Mapping)}
        if isinstance(named.get(name), str):
            return named[name]
        raise ChatTemplateError(f"the checkpoint has no chat template named {name!r} (it has: "
                                f"{', '.join(str(n) for n in named) or 'none'})")
    raise ChatTemplateError("this model has no chat template (tokenizer_config.json lacks chat_template); "
                            "drop --chat and give the raw prompt")


def render_chat(chat_template, messages: Sequence[Mapping[str, str]], *, add_generation_prompt: bool = True,
                bos_token: str | None = None, eos_token: str | None = None, **extra) -> str:
    """Render `messages` with a chat template, as HF's `apply_chat_template(tokenize=False)` does.

    Args:
        chat_template: the template string (or HF's list of named templates).
        messages: [{"role": "system" | "user" | "assistant", "content": str}, ...]
        add_generation_prompt: end with the header that opens the assistant's turn.
        bos_token, eos_token: the special tokens' text, for templates that mention them.
        extra: further template variables (e.g. `tools`).
    Returns:
        The prompt text, special tokens included as text.
    Raises:
        ChatTemplateError: no template, a template that does not parse, or one that rejects
        the conversation (`raise_exception`).
    """
    from jinja2.exceptions import TemplateError

    for m in messages:
        if not isinstance(m, Mapping) or "role" not in m or "content" not in m:
            raise InputError(f"a chat message must have a role and a content, got {m!r}")
    template = _compile(select_template(chat_template))
    try:
        return template.render(messages=[dict(m) for m in messages], add_generation_prompt=add_generation_prompt,
                               bos_token=bos_token or "", eos_token=eos_token or "", **extra)
    except TemplateError as e:
        raise ChatTemplateError(f"the chat template rejected the conversation: {e}") from None


def _token_text(config: Mapping, key: str) -> str | None:
    value = config.get(key)
    if isinstance(value, Mapping):  # {"content": "<s>", ...} in some files
        value = value.get("content")
    return value if isinstance(value, str) else None


def chat_prompt(tokenizer, user_text: str, system: str | None = None) -> str:
    """The prompt text for one user message, from a `minipipe.tokenizer.Tokenizer`'s checkpoint.

    This is what `minipipe generate --chat "..."` feeds to `tokenizer.encode`.
    """
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": user_text})
    cfg = tokenizer.config
    return render_chat(tokenizer.chat_template, messages, add_generation_prompt=True,
                       bos_token=_token_text(cfg, "bos_token"), eos_token=_token_text(cfg, "eos_token"))
