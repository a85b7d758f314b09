"""The HTTP side of `minipipe serve`: a Starlette application speaking OpenAI's API.

| route                        | what                                                          |
|------------------------------|---------------------------------------------------------------|
| `POST /v1/completions`       | text (or token ids) in, a completion out; `stream: true` for SSE |
| `POST /v1/chat/completions`  | messages in (the checkpoint's chat template), a reply out     |
| `GET /v1/models`             | the one served model                                          |
| `GET /health`                | 200 while serving; 503 while shutting down or after a failure |
| `GET /metrics`               | Prometheus text (`minipipe.serve_engine.ServeMetrics`)        |

Handlers run on uvicorn's event loop and never call the engine: they submit `Ticket`s to the
engine thread and read their events (`minipipe.serve_engine`). A stream sends one server-sent
event per committed group of tokens (`data: {chunk}`), a last chunk with `finish_reason`, then
`data: [DONE]`. A client that goes away (the server reads `http.disconnect` while it waits)
has its request aborted at once: its runs are cancelled and its cells freed.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from dataclasses import dataclass, field

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request as HTTPRequest
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from .chat import ChatTemplateError, render_chat
from .errors import MinipipeError
from .request import Request
from .serve_engine import EngineHost, ServeMetrics, Ticket
from .serve_protocol import (CHAT_FIELDS, COMPLETION_FIELDS, FINISH_REASONS, APIError, Params, Responder,
                             TextAssembler, bad, check_common, check_lengths, messages_of_chat, new_id,
                             prompt_of_completion, sampling_of)

log = logging.getLogger("minipipe.serve")

# For checkpoints without a chat template (the shipped tinybard pair): a plain transcript,
# "USER:\n<text>\n\n" per message, then "ASSISTANT:\n" (the shape of tinybard's plays).
FALLBACK_CHAT_TEMPLATE = ("{% for message in messages %}{{ message['role'] | upper }}:\n{{ message['content'] }}\n\n"
                          "{% endfor %}{% if add_generation_prompt %}ASSISTANT:\n{% endif %}")
DEFAULT_MAX_TOKENS = 16  # /v1/completions without max_tokens (OpenAI's default); chat: up to the context


@dataclass
class ServeState:
    """What the handlers share (all of it used on the event loop's thread only, except `host`
    and `metrics`, which are thread-safe)."""

    host: EngineHost
    metrics: ServeMetrics
    tokenizer: object
    model_name: str
    aliases: set[str]  # other names accepted for the model (its directory, its path)
    vocab_size: int
    max_positions: int
    capacity: int  # HTTP requests in the server at most (running + queued); beyond: 429
    chat_template: str
    chat_template_source: str  # "checkpoint", a file, or "fallback"
    kv_cells: int | None = None
    sampling_defaults: object = None  # the checkpoint's `Sampling` (None: a build without sampling)
    draining: bool = False
    in_server: int = 0  # accepted, not yet answered
    created: int = field(default_factory=lambda: int(time.time()))

    def serves(self, name: str) -> bool:
        return name == self.model_name or name in self.aliases

    def refuse_if_closed(self) -> None:
        if self.host.failure is not None:
            raise APIError(503, f"the engine stopped: {self.host.failure}", code="engine_failed")
        if self.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down")

    def admit(self, params: Params, max_new_tokens: int, received_s: float) -> Ticket:
        """Accept a checked request (429 when the server already holds `capacity`)."""
        self.refuse_if_closed()
        need = self.host.reservation(len(params.prompt_ids), max_new_tokens)
        if self.kv_cells is not None and need > self.kv_cells:
            raise bad(f"this request needs up to {need} KV cells (prompt, max_tokens and the strategy's speculation) "
                      f"but the server's budget is {self.kv_cells} per stage; lower max_tokens", "max_tokens",
                      "kv_budget_exceeded")
        if self.in_server >= self.capacity:
            self.metrics.count("rejected_total")
            raise APIError(429, f"the server is at capacity ({self.capacity} requests running or queued); retry later",
                           code="queue_full",
                           headers={"Retry-After": str(self.metrics.retry_after_s(self.in_server, self.host.max_running))})
        eos = () if params.ignore_eos else self.tokenizer.eos_ids
        sampling = sampling_of(self.sampling_defaults, params.sampling)
        request = Request(new_id(params.chat), params.prompt_ids, max_new_tokens, tuple(eos),
                          **({} if sampling is None else {"sampling": sampling}))
        ticket = Ticket(request, asyncio.get_running_loop(), received_s)
        self.in_server += 1
        self.metrics.count("requests_total")
        self.metrics.count("prompt_tokens_total", len(params.prompt_ids))
        self.metrics.set(requests_in_server=self.in_server)
        self.host.submit(ticket)
        return ticket

    def release(self, ticket: Ticket) -> None:
        """The handler is done with `ticket`: abort its request if the engine still has it."""
        self.in_server -= 1
        self.metrics.set(requests_in_server=self.in_server)
        if not ticket.over:
            self.host.abort(ticket.id)


class ClientGone(Exception):
    """The client closed its connection."""


async def _wait_disconnect(receive) -> None:
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def _next_event(ticket: Ticket, gone: asyncio.Future) -> tuple:
    """The ticket's next event, or ClientGone if the client leaves first."""
    if not ticket.queue.empty():
        return ticket.queue.get_nowait()
    get = asyncio.ensure_future(ticket.queue.get())
    await asyncio.wait({get, gone}, return_when=asyncio.FIRST_COMPLETED)
    if get.done():
        return get.result()
    get.cancel()
    raise ClientGone


class Generation:
    """Reads a ticket's events into text, applying stop strings: `run` yields
    `(text, token_ids, finish_reason)` steps, finish_reason set on the last."""

    def __init__(self, state: ServeState, ticket: Ticket, params: Params):
        self.state, self.ticket, self.params = state, ticket, params
        self.text = TextAssembler(state.tokenizer.stream(params.prompt_ids), params.stop)

    async def run(self, gone: asyncio.Future):
        while True:
            event = await _next_event(self.ticket, gone)
            if event[0] == "tokens":
                before = len(self.text.tokens)
                for token in event[1]:
                    self.text.push(token)
                    if self.text.stopped:
                        break
                ids = self.text.tokens[before:]
                if self.text.stopped:  # a stop string: the engine's request is aborted on release
                    yield self.text.take() + self.text.finish(), ids, "stop"
                    return
                yield self.text.take(), ids, None
            elif event[0] == "finished":
                self.ticket.over = True
                yield self.text.finish(), [], FINISH_REASONS.get(event[1], event[1])
                return
            else:  # ("failure", status, message)
                self.ticket.over = True
                raise APIError(event[1], event[2], code="engine_failed" if event[1] >= 500 else None)


# ----------------------------------------------------------------------------------------------
# handlers


async def _body(request: HTTPRequest) -> dict:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(f"We could not parse the JSON body of your request ({e}). The body must be a JSON object.",
                  code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad("The body of your request must be a JSON object.", code="invalid_json")
    return body


def _prepare(state: ServeState, body: dict, chat: bool) -> tuple[Params, int]:
    """Check a request body: its parameters, its prompt ids and its token budget."""
    common = check_common(body, CHAT_FIELDS if chat else COMPLETION_FIELDS, state.serves, chat)
    tokenizer = state.tokenizer
    try:
        if chat:
            messages = messages_of_chat(body)
            cfg = tokenizer.config
            text = render_chat(state.chat_template, messages, add_generation_prompt=True,
                               bos_token=_special_text(cfg, "bos_token"), eos_token=_special_text(cfg, "eos_token"))
            prompt_ids = tokenizer.encode(text)
        else:
            prompt_ids = prompt_of_completion(body, tokenizer.encode)
    except ChatTemplateError as e:
        raise bad(str(e), "messages", "chat_template_error") from None
    except MinipipeError as e:
        raise bad(str(e), "messages" if chat else "prompt") from None
    default = None if chat else DEFAULT_MAX_TOKENS  # chat: up to the context, and within the KV budget
    if state.kv_cells is not None:
        room = state.kv_cells - state.host.reservation(len(prompt_ids), 0)
        default = max(0, room) if default is None else min(default, max(0, room))
    max_new = check_lengths(prompt_ids, common["max_tokens"], default, state.vocab_size, state.max_positions,
                            "messages" if chat else "prompt")
    common["model"] = state.model_name
    return Params(prompt_ids=prompt_ids, **common), max_new


def _special_text(cfg: dict, key: str) -> str | None:
    value = cfg.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


async def completions(request: HTTPRequest) -> Response:
    return await _complete(request, chat=False)


async def chat_completions(request: HTTPRequest) -> Response:
    return await _complete(request, chat=True)


async def _complete(request: HTTPRequest, chat: bool) -> Response:
    state: ServeState = request.app.state.serve
    received = time.monotonic()
    state.refuse_if_closed()
    params, max_new = _prepare(state, await _body(request), chat)
    ticket = state.admit(params, max_new, received)
    responder = Responder(ticket.id, params.model, chat, params.prompt_ids, params.return_token_ids)
    if params.stream:
        return EventStream(state, ticket, params, responder)
    gone = asyncio.ensure_future(_wait_disconnect(request.receive))
    try:
        text, ids, finish = [], [], None
        async for piece, piece_ids, finish in Generation(state, ticket, params).run(gone):
            text.append(piece)
            ids.extend(piece_ids)
        return JSONResponse(responder.whole("".join(text), finish, ids))
    except ClientGone:
        return Response(status_code=499)  # nobody reads it
    finally:
        gone.cancel()
        state.release(ticket)


class EventStream:
    """A server-sent-event response (an ASGI callable) that owns its ticket: it streams the
    chunks, aborts the request if the client leaves, and releases the ticket at the end,
    whatever happens."""

    raw_headers = [(b"content-type", b"text/event-stream; charset=utf-8"), (b"cache-control", b"no-cache"),
                   (b"x-accel-buffering", b"no")]

    def __init__(self, state: ServeState, ticket: Ticket, params: Params, responder: Responder):
        self.state, self.ticket, self.params, self.responder = state, ticket, params, responder

    async def __call__(self, scope, receive, send) -> None:
        gone = asyncio.ensure_future(_wait_disconnect(receive))

        async def event(data) -> None:
            text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False)
            await send({"type": "http.response.body", "body": f"data: {text}\n\n".encode(), "more_body": True})

        try:
            await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
            r = self.responder
            if r.chat:
                await event(r.chunk("", [], first=True))
            n_tokens = 0
            try:
                async for piece, ids, finish in Generation(self.state, self.ticket, self.params).run(gone):
                    n_tokens += len(ids)
                    if ids or piece:
                        await event(r.chunk(piece, ids))
                    if finish is not None:
                        await event(r.chunk(None if r.chat else "", [] if r.return_token_ids else None, finish))
                if self.params.include_usage:
                    await event(r.usage_chunk(n_tokens))
            except APIError as e:  # the engine failed mid-stream
                await event(e.body())
            await event("[DONE]")
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except (ClientGone, OSError):
            pass  # the client left: its request is aborted on release
        finally:
            gone.cancel()
            self.state.release(self.ticket)


async def models(request: HTTPRequest) -> Response:
    state: ServeState = request.app.state.serve
    return JSONResponse({"object": "list", "data": [_model_card(state)]})


async def model(request: HTTPRequest) -> Response:
    state: ServeState = request.app.state.serve
    name = request.path_params["name"]
    if not state.serves(name):
        raise APIError(404, f"The model `{name}` does not exist", "model", "model_not_found")
    return JSONResponse(_model_card(state))


def _model_card(state: ServeState) -> dict:
    return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "minipipe",
            "max_model_len": state.max_positions, **state.metrics.info}


async def health(request: HTTPRequest) -> Response:
    state: ServeState = request.app.state.serve
    if state.host.failure is not None:
        return JSONResponse({"status": "failed", "error": state.host.failure}, status_code=503)
    if state.draining:
        return JSONResponse({"status": "shutting down"}, status_code=503)
    return JSONResponse({"status": "ok", "model": state.model_name, **state.metrics.info})


async def metrics(request: HTTPRequest) -> Response:
    state: ServeState = request.app.state.serve
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4; charset=utf-8")


# ----------------------------------------------------------------------------------------------
# errors


async def _api_error(request: HTTPRequest, exc: APIError) -> Response:
    return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)


async def _http_error(request: HTTPRequest, exc: HTTPException) -> Response:
    messages = {404: f"Unknown route {request.method} {request.url.path} (see GET /v1/models, POST "
                     "/v1/completions, POST /v1/chat/completions, GET /health, GET /metrics)",
                405: f"Method {request.method} is not allowed on {request.url.path}"}
    error = APIError(exc.status_code, messages.get(exc.status_code, str(exc.detail)))
    return JSONResponse(error.body(), status_code=exc.status_code, headers=getattr(exc, "headers", None))


async def _internal_error(request: HTTPRequest, exc: Exception) -> Response:
    log.exception("internal error on %s %s", request.method, request.url.path)
    error = APIError(500, f"internal error ({type(exc).__name__}); this is a bug in minipipe")
    return JSONResponse(error.body(), status_code=500)


def create_app(state: ServeState) -> Starlette:
    routes = [Route("/v1/completions", completions, methods=["POST"]),
              Route("/v1/chat/completions", chat_completions, methods=["POST"]),
              Route("/v1/models", models, methods=["GET"]),
              Route("/v1/models/{name:path}", model, methods=["GET"]),
              Route("/health", health, methods=["GET"]),
              Route("/metrics", metrics, methods=["GET"])]
    app = Starlette(routes=routes, exception_handlers={APIError: _api_error, HTTPException: _http_error,
                                                       Exception: _internal_error})
    app.state.serve = state
    return app
