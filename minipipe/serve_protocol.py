"""The OpenAI wire format of `minipipe serve`: request checking, errors, response bodies, stop strings.

Nothing here touches HTTP or the engine, so it needs no web framework (the `serve` extra) and
can be tested on its own. Terms:

* **completion parameters** (`Params`) — what one request asks for, checked against the
  OpenAI ranges: token budget (`max_tokens`), sampling (`temperature`, `top_p`, `seed`), stop
  strings (`stop`), streaming, and two extensions other servers also accept: `ignore_eos`
  (generate the whole budget) and `return_token_ids` (each choice also carries the token ids,
  so a client can check the exactness promise token by token; vLLM spells it the same way).
* **API error** (`APIError`) — a refused request: an HTTP status and OpenAI's error body
  `{"error": {"message", "type", "param", "code"}}`. Every bad input ends as one, never as a
  traceback.
* **stop string** — text that ends the completion when it appears in the generated text; the
  text is cut before it (it is not returned), and tokens after the one that completed it are
  dropped. While a stream's text ends with the beginning of a stop string, that text is held
  back (`TextAssembler`), so a client never sees part of a stop string.
* **sampling** — `temperature`, `top_p`, `seed` (and `top_k`, `min_p`, as vLLM accepts them)
  become the request's `Sampling` settings (`minipipe.sampling`): the checkpoint's defaults
  (generation_config.json), overridden by what the request gives, exactly as `minipipe generate`
  builds them from its flags. So a request with a seed gets the same text from the server as from
  `minipipe generate --seed`, whatever else the server is doing; temperature 0 (or absent, with a
  checkpoint that does not sample by default) is greedy decoding. A sampled request without a
  seed gets a random one. Builds whose `Request` has no `sampling` field decode greedily only:
  there a non-zero temperature is refused (400), decided at run time by `sampling_available()`.
"""

from __future__ import annotations

import dataclasses
import math
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

from .request import Request

# fields of a request body that are accepted and ignored (they change nothing minipipe does)
IGNORED = {"user", "metadata", "store", "service_tier", "parallel_tool_calls"}
COMMON = {"model", "max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "n", "stream", "stream_options",
          "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "ignore_eos", "return_token_ids"}
COMPLETION_FIELDS = COMMON | IGNORED | {"prompt", "echo", "best_of", "suffix"}
CHAT_FIELDS = COMMON | IGNORED | {"messages", "max_completion_tokens", "top_logprobs", "response_format", "tools",
                                  "tool_choice", "functions", "function_call"}
MAX_STOP_STRINGS = 4  # as OpenAI
FINISH_REASONS = {"eos": "stop", "stop": "stop", "length": "length", "context": "length", "aborted": "abort"}


class APIError(Exception):
    """A refused request: `status` and OpenAI's error body (see the module docstring)."""

    TYPES = {400: "invalid_request_error", 404: "invalid_request_error", 405: "invalid_request_error",
             413: "invalid_request_error", 415: "invalid_request_error", 422: "invalid_request_error",
             429: "rate_limit_error", 500: "server_error", 503: "server_error"}

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: Mapping[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = dict(headers or {})

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.TYPES.get(self.status, "invalid_request_error"),
                          "param": self.param, "code": self.code}}


def bad(message: str, param: str | None = None, code: str | None = None) -> APIError:
    """A 400: the request itself is wrong."""
    return APIError(400, message, param, code)


def sampling_available() -> bool:
    """Whether this build's `Request` carries sampling settings (else it decodes greedily only)."""
    return "sampling" in {f.name for f in dataclasses.fields(Request)}


# ----------------------------------------------------------------------------------------------
# checking parameters


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return (_is_int(value) or isinstance(value, float)) and math.isfinite(value)


def _number(body: Mapping, name: str, lo: float, hi: float, default=None):
    value = body.get(name)
    if value is None:
        return default
    if not _is_number(value) or not lo <= value <= hi:
        raise bad(f"{name} must be a number between {lo:g} and {hi:g}, got {value!r}", name)
    return value


def _flag(body: Mapping, name: str) -> bool:
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad(f"{name} must be true or false, got {value!r}", name)
    return value


def _only_default(body: Mapping, name: str, allowed: tuple, why: str) -> None:
    """Parameters minipipe does not implement: accepted only at their no-op values."""
    value = body.get(name)
    if value is not None and not any(value == a and type(value) is type(a) for a in allowed):
        raise bad(f"{name}={value!r} is not supported: {why}", name)


@dataclass
class Params:
    """One request's checked parameters (see the module docstring)."""

    model: str
    prompt_ids: list[int]
    max_tokens: int | None  # None: up to the context
    stop: tuple[str, ...] = ()
    stream: bool = False
    include_usage: bool = False
    ignore_eos: bool = False
    return_token_ids: bool = False
    sampling: dict = field(default_factory=dict)  # the sampling parameters given (`Sampling` field -> value)
    chat: bool = False


def check_common(body: Mapping, known: set[str], served: Callable[[str], bool], chat: bool) -> dict:
    """Check what completions and chat share; returns the keyword arguments of `Params` (less
    the prompt). `served(name)`: whether a model name is the served model."""
    unknown = sorted(k for k in body if k not in known)
    if unknown:
        raise bad(f"Unrecognized request argument supplied: {unknown[0]}", unknown[0], "unknown_parameter")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad(f"model must be a string, got {model!r}", "model")
    if model is not None and not served(model):
        raise APIError(404, f"The model `{model}` does not exist (this server serves one model: see GET /v1/models)",
                       "model", "model_not_found")
    max_tokens = None
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is not None:
            if not _is_int(value) or value < 0:
                raise bad(f"{name} must be an integer >= 0, got {value!r}", name)
            max_tokens = value
    n = body.get("n")
    if n is not None and (not _is_int(n) or n != 1):
        raise bad(f"n must be 1 (minipipe returns one choice per request), got {n!r}", "n")
    sampling = _sampling(body)
    for name in ("presence_penalty", "frequency_penalty"):
        _number(body, name, -2.0, 2.0)
        _only_default(body, name, (0, 0.0), "minipipe applies no penalties")
    logit_bias = body.get("logit_bias")
    if logit_bias is not None and logit_bias != {}:
        raise bad("logit_bias is not supported: minipipe's tokens are exactly its decoding's", "logit_bias")
    if chat:
        _only_default(body, "logprobs", (False,), "minipipe returns no log probabilities")
        _only_default(body, "top_logprobs", (0,), "minipipe returns no log probabilities")
        fmt = body.get("response_format")
        if fmt is not None and fmt != {"type": "text"}:
            raise bad("response_format must be {\"type\": \"text\"}: minipipe does not constrain its output",
                      "response_format")
        for name in ("tools", "tool_choice", "functions", "function_call"):
            if body.get(name) not in (None, [], "none"):
                raise bad(f"{name} is not supported: minipipe serves plain text completions", name)
    else:
        _only_default(body, "logprobs", (0,), "minipipe returns no log probabilities")
        _only_default(body, "echo", (False,), "the prompt is not echoed")
        _only_default(body, "best_of", (1,), "minipipe returns one choice per request")
        _only_default(body, "suffix", ("",), "minipipe does not insert text")
    stream = _flag(body, "stream")
    options = body.get("stream_options")
    include_usage = False
    if options is not None:
        if not isinstance(options, Mapping) or set(options) - {"include_usage", "continuous_usage_stats"}:
            raise bad("stream_options must be an object like {\"include_usage\": true}", "stream_options")
        if not stream:
            raise bad("stream_options is only allowed with stream: true", "stream_options")
        include_usage = _flag(options, "include_usage")
    stop = body.get("stop")
    if stop is None:
        stop = ()
    elif isinstance(stop, str):
        stop = (stop,)
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop) and len(stop) <= MAX_STOP_STRINGS:
        stop = tuple(stop)
    else:
        raise bad(f"stop must be a string or a list of at most {MAX_STOP_STRINGS} strings, got {stop!r}", "stop")
    if any(s == "" for s in stop):
        raise bad("stop strings must not be empty", "stop")
    return dict(model=model, max_tokens=max_tokens, stop=stop, stream=stream, include_usage=include_usage,
                ignore_eos=_flag(body, "ignore_eos"), return_token_ids=_flag(body, "return_token_ids"),
                sampling=sampling, chat=chat)


def _sampling(body: Mapping) -> dict:
    """The sampling parameters given, checked (OpenAI's ranges; top_k and min_p as vLLM's)."""
    given = {"temperature": _number(body, "temperature", 0.0, 2.0), "min_p": _number(body, "min_p", 0.0, 1.0)}
    top_p = body.get("top_p")
    if top_p is not None and (not _is_number(top_p) or not 0 < top_p <= 1):
        raise bad(f"top_p must be a number above 0 and at most 1, got {top_p!r}", "top_p")
    top_k = body.get("top_k")
    if top_k is not None and (not _is_int(top_k) or top_k < -1):
        raise bad(f"top_k must be an integer >= 0 (0 or -1: no top-k filter), got {top_k!r}", "top_k")
    seed = body.get("seed")
    if seed is not None and (not _is_int(seed) or not 0 <= seed < 2 ** 64):
        raise bad(f"seed must be an integer between 0 and 2**64 - 1, got {seed!r}", "seed")
    given.update(top_p=top_p, top_k=None if top_k is None else max(top_k, 0), seed=seed)
    if given["temperature"] and not sampling_available():
        raise bad(f"sampling is not available in this build: temperature must be 0 or absent (minipipe decodes "
                  f"greedily), got {given['temperature']!r}", "temperature", "sampling_unavailable")
    return {name: value for name, value in given.items() if value is not None}


def sampling_of(defaults, given: dict):
    """A request's `Sampling`: `defaults` (the checkpoint's) with the parameters given; a random
    seed when none is given (None in builds without sampling)."""
    if defaults is None:
        return None
    settings = dataclasses.replace(defaults, **{k: v for k, v in given.items() if k != "seed"})
    return settings.with_seed(given.get("seed"))


def prompt_of_completion(body: Mapping, encode: Callable[[str], list[int]]) -> list[int]:
    """/v1/completions' `prompt`: text, or token ids (a list of integers), or a list holding one
    of these (OpenAI's batch form, with one prompt: minipipe answers one prompt per request)."""
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        return encode(prompt)
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return list(prompt)
    if prompt is None:
        raise bad("prompt is required", "prompt")
    raise bad("prompt must be a string or a list of token ids (one prompt per request)", "prompt")


def messages_of_chat(body: Mapping) -> list[dict]:
    """/v1/chat/completions' `messages`, each content as plain text (a list of text parts is
    joined; other part types are refused)."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages must be a non-empty list of {\"role\", \"content\"} objects", "messages")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, Mapping) or not isinstance(m.get("role"), str):
            raise bad(f"messages[{i}] must be an object with a role and a content", "messages")
        if "content" not in m:
            raise bad(f"messages[{i}] must have a content", "messages")
        content = m["content"]
        if isinstance(content, list):
            texts = []
            for part in content:
                if not isinstance(part, Mapping) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                    raise bad(f"messages[{i}]: only text content parts are supported", "messages")
                texts.append(part["text"])
            content = "".join(texts)
        elif content is None and m["role"] == "assistant":  # (an assistant turn that only called tools)
            content = ""
        elif not isinstance(content, str):
            raise bad(f"messages[{i}].content must be a string or a list of text parts", "messages")
        out.append({"role": m["role"], "content": content})
    return out


def check_lengths(prompt_ids: list[int], max_tokens: int | None, default_max: int | None, vocab_size: int,
                  max_positions: int, param: str = "prompt") -> int:
    """Check the prompt against the vocabulary and the context; returns the token budget.

    An explicit `max_tokens` must fit beside the prompt (OpenAI's rule); the default budget is
    cut to the context instead."""
    if not prompt_ids:
        raise bad("the prompt is empty", param)
    outside = [t for t in prompt_ids if not 0 <= t < vocab_size]
    if outside:
        raise bad(f"token id {outside[0]} is outside the vocabulary (0..{vocab_size - 1})", param)
    room = max_positions - len(prompt_ids)
    if room < 0 or max_tokens is not None and max_tokens > room:
        asked = len(prompt_ids) + (max_tokens or 0)
        raise bad(f"This model's maximum context length is {max_positions} tokens. However, you requested {asked} "
                  f"tokens ({len(prompt_ids)} in the prompt, {max_tokens or 0} for the completion). Please reduce "
                  "the prompt or the completion's max_tokens.", "messages" if False else "prompt",
                  "context_length_exceeded")
    if max_tokens is not None:
        return max_tokens
    return room if default_max is None else min(default_max, room)


# ----------------------------------------------------------------------------------------------
# text, stop strings


class TextAssembler:
    """Generated tokens -> text to send, with stop strings (see the module docstring).

    `push(token)` adds a token; `take()` returns the text that is safe to send now; `finish()`
    the rest. `stopped` turns True when a stop string appeared; `tokens` then ends with the
    token that completed it.
    """

    def __init__(self, decoder, stop: tuple[str, ...] = ()):
        self.decoder, self.stop = decoder, stop
        self.text = ""  # all text so far (cut before a stop string once one appeared)
        self.sent = 0  # characters of `text` already taken
        self.tokens: list[int] = []
        self.stopped = False

    def push(self, token: int) -> None:
        if self.stopped:
            return
        self.tokens.append(int(token))
        self._add(self.decoder.push(int(token)))

    def _add(self, piece: str) -> None:
        if not piece:
            return
        start = max(0, len(self.text) - max((len(s) for s in self.stop), default=0) + 1)
        self.text += piece
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.stopped = self.text[:min(hits)], True

    def take(self) -> str:
        """Text that can be sent now: all of it, less an ending that may begin a stop string."""
        end = len(self.text)
        if not self.stopped:
            for s in self.stop:
                for k in range(min(len(s) - 1, len(self.text)), 0, -1):
                    if self.text.endswith(s[:k]):
                        end = min(end, len(self.text) - k)
                        break
        end = max(end, self.sent)
        piece, self.sent = self.text[self.sent:end], end
        return piece

    def finish(self) -> str:
        """The rest of the text, once generation is over (held-back text included)."""
        if not self.stopped:
            self._add(self.decoder.flush())
        piece, self.sent = self.text[self.sent:], len(self.text)
        return piece


# ----------------------------------------------------------------------------------------------
# response bodies


def new_id(chat: bool) -> str:
    return ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex


def usage(n_prompt: int, n_completion: int) -> dict:
    return {"prompt_tokens": n_prompt, "completion_tokens": n_completion, "total_tokens": n_prompt + n_completion}


@dataclass
class Responder:
    """Builds one request's response bodies (whole or chunks) in OpenAI's shapes."""

    id: str
    model: str
    chat: bool
    prompt_ids: list[int]
    return_token_ids: bool = False
    created: int = field(default_factory=lambda: int(time.time()))
    _prompt_ids_sent: bool = False

    def _choice(self, text: str | None, finish: str | None, token_ids: list[int] | None, delta: bool,
                first: bool = False) -> dict:
        choice: dict = {"index": 0}
        if self.chat:
            if delta:
                choice["delta"] = ({"role": "assistant", "content": text or ""} if first
                                   else {} if text is None else {"content": text})
            else:
                choice["message"] = {"role": "assistant", "content": text}
        else:
            choice["text"] = text or ""
        choice["logprobs"] = None
        choice["finish_reason"] = finish
        if self.return_token_ids and token_ids is not None:
            choice["token_ids"] = list(token_ids)
            if not delta or not self._prompt_ids_sent:  # a stream sends them once, in its first chunk
                choice["prompt_token_ids"] = list(self.prompt_ids)
                self._prompt_ids_sent = delta
        return choice

    def whole(self, text: str, finish: str, token_ids: list[int]) -> dict:
        return {"id": self.id, "object": "chat.completion" if self.chat else "text_completion",
                "created": self.created, "model": self.model,
                "choices": [self._choice(text, finish, token_ids, delta=False)],
                "usage": usage(len(self.prompt_ids), len(token_ids))}

    def chunk(self, text: str | None, token_ids: list[int] | None = None, finish: str | None = None,
              first: bool = False) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model,
                "choices": [self._choice(text, finish, token_ids, delta=True, first=first)]}

    def usage_chunk(self, n_completion: int) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk" if self.chat else "text_completion",
                "created": self.created, "model": self.model, "choices": [],
                "usage": usage(len(self.prompt_ids), n_completion)}
