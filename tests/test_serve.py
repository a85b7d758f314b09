"""`minipipe serve`: the OpenAI-compatible server, checked through the official `openai` client.

Oracle: greedy decoding of each request alone (`generate_greedy`, and `minipipe generate --json`
once), compared token id by token id (the server returns them with `return_token_ids`) and
text by text, while 16 clients share the server, for every strategy. Then what a server must
survive: bad requests (OpenAI-style 4xx JSON, never a traceback), a client that leaves
mid-stream (its request aborted, its cells freed), overload (429 with Retry-After), SIGTERM
(exit 0, no stage process or shared-memory segment left).

The server tests need the `serve-test` extra (Starlette, uvicorn, openai) and skip without it;
the protocol tests at the top need nothing.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from minipipe.greedy import generate_greedy
from minipipe.model import load_stage
from minipipe.serve_protocol import APIError, TextAssembler, check_common, check_lengths, sampling_available
from minipipe.tokenizer import Tokenizer

from .conftest import SHIPPED_MODELS

TINYBARD, DRAFT = SHIPPED_MODELS / "tinybard", SHIPPED_MODELS / "tinybard-draft"
PROMPTS = json.loads((TINYBARD / "heldout_prompts.json").read_text())["prompts"]

try:
    import openai
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
    HAVE_SERVE = True
except ImportError:
    HAVE_SERVE = False
needs_serve = pytest.mark.skipif(not HAVE_SERVE, reason="the serve-test extra is not installed "
                                                        "(pip install -e '.[serve-test]')")


# ----------------------------------------------------------------------------------------------
# the protocol, without a server


class FakeDecoder:
    """A stream decoder whose token t decodes to the character chr(t)."""

    def push(self, token: int) -> str:
        return chr(token)

    def flush(self) -> str:
        return ""


def assemble(text: str, stop: tuple[str, ...]) -> tuple[list[str], str, bool, int]:
    a = TextAssembler(FakeDecoder(), stop)
    pieces = []
    for ch in text:
        a.push(ord(ch))
        pieces.append(a.take())
        if a.stopped:
            break
    pieces.append(a.finish())
    return pieces, "".join(pieces), a.stopped, len(a.tokens)


def test_stop_strings_cut_the_text_and_never_leak():
    pieces, text, stopped, n = assemble("Hello, world. Bye", ("world",))
    assert (text, stopped, n) == ("Hello, ", True, len("Hello, world"))
    assert not any("w" in p for p in pieces)  # "w", "wo", ... were held back, never sent
    pieces, text, stopped, _ = assemble("a wor b", ("world",))  # a prefix that does not complete
    assert (text, stopped) == ("a wor b", False)
    _, text, stopped, _ = assemble("xxSTOPyy", ("zz", "STOP", "OPy"))  # the earliest match wins
    assert (text, stopped) == ("xx", True)
    _, text, _, _ = assemble("abc", ())
    assert text == "abc"


def test_parameters_are_checked_like_openai():
    def check(body, chat=False):
        known = {"model", "prompt", "max_tokens", "temperature", "top_p", "top_k", "seed", "stop", "n", "stream",
                 "stream_options", "echo", "logprobs"}
        return check_common(body, known, lambda name: name == "m", chat)

    assert check({"model": "m", "max_tokens": 5, "temperature": 0, "seed": 3, "stop": ["\n"]})["max_tokens"] == 5
    if sampling_available():
        assert check({"temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 5})["sampling"] == {
            "temperature": 0.7, "top_p": 0.9, "top_k": 40, "seed": 5}
    for body, param in [({"model": "x"}, "model"), ({"max_tokens": -1}, "max_tokens"), ({"n": 2}, "n"),
                        ({"temperature": 2.5}, "temperature"), ({"top_p": 1.5}, "top_p"), ({"top_p": 0}, "top_p"),
                        ({"seed": "a"}, "seed"), ({"seed": -1}, "seed"), ({"top_k": 1.5}, "top_k"),
                        ({"stop": ["a"] * 5}, "stop"), ({"stream": "yes"}, "stream"), ({"frobnicate": 1}, "frobnicate"),
                        ({"max_tokens": True}, "max_tokens"), ({"echo": True}, "echo"),
                        ({"stream_options": {"include_usage": True}}, "stream_options")]:
        with pytest.raises(APIError) as e:
            check(body)
        assert e.value.param == param and 400 <= e.value.status < 500, body
        assert set(e.value.body()["error"]) == {"message", "type", "param", "code"}
    if not sampling_available():
        with pytest.raises(APIError, match="sampling is not available in this build"):
            check({"temperature": 0.7})
    with pytest.raises(APIError) as e:
        check_lengths(list(range(10)), 600, None, 2048, 512)
    assert e.value.code == "context_length_exceeded"
    assert check_lengths([1] * 500, None, 16, 2048, 512) == 12  # the default budget is cut to the context


def test_without_the_extra_serve_says_so_in_one_line():
    code = ("import sys; sys.modules['uvicorn'] = None; sys.modules['starlette'] = None\n"
            "from minipipe.cli import main; sys.exit(main(['serve', '--port', '0']))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert out.stderr.strip().splitlines() == [
        "minipipe: error: minipipe serve needs the 'serve' extra (Starlette and uvicorn): "
        "pip install 'minipipe[serve]'"]


# ----------------------------------------------------------------------------------------------
# a server in a subprocess


class Server:
    """`minipipe serve --port 0 ...` in a subprocess; its address is read from its start line."""

    def __init__(self, *args: str, start_timeout: float = 120):
        self.proc = subprocess.Popen([sys.executable, "-m", "minipipe", "serve", "--port", "0", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        started = threading.Event()

        def read() -> None:
            for line in self.proc.stderr:
                self.lines.append(line)
                if "serving" in line and "http://" in line:
                    started.set()
            started.set()  # it ended

        threading.Thread(target=read, daemon=True).start()
        started.wait(start_timeout)
        match = next((re.search(r"http://([\d.]+):(\d+)", line) for line in self.lines if "serving" in line), None)
        if match is None:
            self.stop()
            raise AssertionError("the server did not start:\n" + "".join(self.lines))
        self.host, self.port = match.group(1), int(match.group(2))
        self.url = f"http://{self.host}:{self.port}"

    def client(self) -> "openai.OpenAI":
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=120)

    def get(self, path: str) -> tuple[int, str]:
        conn = http.client.HTTPConnection(self.host, self.port, timeout=30)
        try:
            conn.request("GET", path)
            response = conn.getresponse()
            return response.status, response.read().decode()
        finally:
            conn.close()

    def post(self, path: str, body: bytes | str | dict) -> tuple[int, dict, dict]:
        data = json.dumps(body) if isinstance(body, dict) else body
        conn = http.client.HTTPConnection(self.host, self.port, timeout=60)
        try:
            conn.request("POST", path, data, {"content-type": "application/json"})
            response = conn.getresponse()
            return response.status, dict(response.getheaders()), json.loads(response.read())
        finally:
            conn.close()

    def metrics(self) -> dict[str, float]:
        status, text = self.get("/metrics")
        assert status == 200
        out = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                name, value = line.rsplit(" ", 1)
                out[name] = float(value)
        return out

    def descendants(self) -> list[int]:
        """Process ids of the server's children (its stages), read from /proc."""
        kids = []
        for entry in Path("/proc").iterdir():
            if entry.name.isdigit():
                try:
                    fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
                except OSError:
                    continue
                if int(fields[1]) == self.proc.pid:
                    kids.append(int(entry.name))
        return kids

    def segments(self) -> list[str]:
        return [n for n in os.listdir("/dev/shm") if n.startswith(f"minipipe_{self.proc.pid}_")]

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


@pytest.fixture(scope="module")
def oracle():
    """Greedy decoding of one request alone, and the tokenizer."""
    model, tok = load_stage(TINYBARD), Tokenizer(TINYBARD)
    cache: dict = {}

    def expect(prompt_ids: list[int], max_tokens: int, sampling: dict | None = None) -> list[int]:
        """The tokens of sequential decoding alone: greedy, or sampled with these parameters."""
        key = (tuple(prompt_ids), max_tokens, tuple(sorted((sampling or {}).items())))
        if key not in cache:
            settings = None
            if sampling:
                from minipipe.sampling import Sampling

                settings = Sampling(**sampling)
            cache[key] = generate_greedy(model, prompt_ids, max_tokens, tok.eos_ids, sampling=settings).tokens
        return cache[key]

    expect.tokenizer = tok
    return expect


def chat_prompt_ids(tok: Tokenizer, messages: list[dict]) -> list[int]:
    """The prompt the server builds for a chat on tinybard (which has no template: the fallback)."""
    from minipipe.chat import render_chat
    from minipipe.serve_app import FALLBACK_CHAT_TEMPLATE

    return tok.encode(render_chat(FALLBACK_CHAT_TEMPLATE, messages, bos_token="<s>", eos_token="</s>"))


def text_of(tok: Tokenizer, prompt_ids: list[int], tokens: list[int]) -> str:
    """The text `minipipe generate --json` reports for these tokens."""
    return tok.decode(prompt_ids + tokens)[len(tok.decode(prompt_ids)):]


def extra(obj, name: str):
    """A field the OpenAI client does not model (minipipe's token ids)."""
    return (obj.model_extra or {}).get(name)


def complete(client, prompt: str, max_tokens: int, stream: bool, chat: bool = False, **kw) -> dict:
    """One request through the openai client: its text, token ids, prompt ids, finish reason, usage."""
    body = dict(model="tinybard", max_tokens=max_tokens, stream=stream, extra_body={"return_token_ids": True}, **kw)
    if chat:
        body["messages"] = [{"role": "user", "content": prompt}]
        call = client.chat.completions.create
    else:
        body["prompt"] = prompt
        call = client.completions.create
    if stream:
        body["stream_options"] = {"include_usage": True}
        text, ids, prompt_ids, finish, usage = [], [], None, None, None
        for chunk in call(**body):
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                piece = (choice.delta.content if chat else choice.text) or ""
                text.append(piece)
                ids += extra(choice, "token_ids") or []
                prompt_ids = prompt_ids or extra(choice, "prompt_token_ids")
                finish = choice.finish_reason or finish
        return dict(text="".join(text), ids=ids, prompt_ids=prompt_ids, finish=finish, usage=usage)
    response = call(**body)
    choice = response.choices[0]
    return dict(text=choice.message.content if chat else choice.text, ids=extra(choice, "token_ids"),
                prompt_ids=extra(choice, "prompt_token_ids"), finish=choice.finish_reason, usage=response.usage)


# ----------------------------------------------------------------------------------------------
# the API


@needs_serve
@pytest.mark.timeout(300)
def test_completions_and_chat_streamed_and_not(oracle):
    tok = oracle.tokenizer
    with Server("--strategy", "speculative", "--draft-model", str(DRAFT)) as server:
        client = server.client()
        prompt = PROMPTS[0]
        ids = tok.encode(prompt)
        want = oracle(ids, 20)
        for stream in (False, True):
            got = complete(client, prompt, 20, stream)
            assert got["prompt_ids"] == ids and got["ids"] == want, stream
            assert got["text"] == text_of(tok, ids, want)
            assert got["finish"] == ("stop" if want[-1] in tok.eos_ids else "length")
            assert (got["usage"].prompt_tokens, got["usage"].completion_tokens) == (len(ids), len(want))
        messages = [{"role": "user", "content": "Who comes there?"}]
        chat_ids = chat_prompt_ids(tok, messages)
        want = oracle(chat_ids, 12)
        for stream in (False, True):
            got = complete(client, "Who comes there?", 12, stream, chat=True)
            assert got["prompt_ids"] == chat_ids and got["ids"] == want, stream
            assert got["text"] == text_of(tok, chat_ids, want)
        # a stop string: the text ends before it, tokens after it are dropped
        full = text_of(tok, ids, oracle(ids, 20))
        stop = full[5:8]
        for stream in (False, True):
            got = complete(client, prompt, 20, stream, stop=[stop])
            assert got["text"] == full[:full.index(stop)] and got["finish"] == "stop", stream
            assert len(got["ids"]) < 20 and got["usage"].completion_tokens == len(got["ids"])
        # the same request from `minipipe generate --json`
        out = subprocess.run([sys.executable, "-m", "minipipe", "generate", prompt, "--json", "--max-new-tokens", "20",
                              "--strategy", "speculative", "--quiet"], capture_output=True, text=True, timeout=120)
        generated = json.loads(out.stdout)
        got = complete(client, prompt, 20, False)
        assert got["ids"] == generated["tokens"] and got["text"] == generated["text"]
        assert server.stop() == 0


@needs_serve
@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy", ["pipeline", "speculative", "tree", "pipeinfer", "specpipe"])
def test_sixteen_concurrent_clients_get_exactly_greedy(strategy, oracle):
    """16 clients at once (completions and chat, streamed and not, different lengths and seeds,
    greedy and sampled): each gets the tokens of its request decoded alone."""
    tok = oracle.tokenizer
    jobs = [dict(prompt=PROMPTS[i % len(PROMPTS)] if i % 4 != 3 else f"Good morrow, {i}!", max_tokens=4 + i % 9,
                 stream=i % 2 == 0, chat=i % 4 == 3, seed=1000 + i,
                 temperature=0.8 if i % 3 == 1 and sampling_available() else 0.0, top_p=0.9 if i % 6 == 1 else 1.0)
            for i in range(16)]
    draft = [] if strategy == "pipeline" else ["--draft-model", str(DRAFT)]
    with Server("--strategy", strategy, *draft) as server:
        def run(job):
            job = dict(job)
            return complete(server.client(), job.pop("prompt"), job.pop("max_tokens"), job.pop("stream"),
                            job.pop("chat"), **job)

        with ThreadPoolExecutor(16) as pool:
            results = list(pool.map(run, jobs))
        for job, got in zip(jobs, results):
            if job["chat"]:
                ids = chat_prompt_ids(tok, [{"role": "user", "content": job["prompt"]}])
            else:
                ids = tok.encode(job["prompt"])
            sampled = {k: job[k] for k in ("temperature", "top_p", "seed")} if job["temperature"] else None
            want = oracle(ids, job["max_tokens"], sampled)
            assert got["prompt_ids"] == ids and got["ids"] == want, (strategy, job)
            assert got["text"] == text_of(tok, ids, want), (strategy, job)
            if sampled:  # (the oracle's sampled text differs from its greedy one here: a real check)
                assert want != oracle(ids, job["max_tokens"]) or job["max_tokens"] < 6, job
        m = server.metrics()
        assert m["minipipe_requests_total"] == 16 and m["minipipe_generation_tokens_total"] == sum(
            len(r["ids"]) for r in results)
        assert m["minipipe_requests_running"] == 0 and m["minipipe_kv_cells_reserved"] == 0
        assert server.stop() == 0


# ----------------------------------------------------------------------------------------------
# what a server must survive


@needs_serve
@pytest.mark.timeout(300)
def test_bad_requests_get_openai_errors_never_a_traceback():
    with Server("--strategy", "pipeline", "--kv-cells", "300") as server:
        client = server.client()
        long_prompt = " ".join(["Romeo"] * 600)
        calls = [
            (dict(model="gpt-4", prompt="x"), 404, "model"),
            (dict(model="tinybard", prompt="x", n=2), 400, "n"),
            (dict(model="tinybard", prompt="x", temperature=3), 400, "temperature"),
            (dict(model="tinybard", prompt="x", top_p=-0.5), 400, "top_p"),
            (dict(model="tinybard", prompt="x", max_tokens=-3), 400, "max_tokens"),
            (dict(model="tinybard", prompt="x", stop=["a", "b", "c", "d", "e"]), 400, "stop"),
            (dict(model="tinybard", prompt=long_prompt), 400, "prompt"),
            (dict(model="tinybard", prompt="x", max_tokens=400), 400, "max_tokens"),  # beyond --kv-cells
            (dict(model="tinybard", prompt="x", extra_body={"frobnicate": 1}), 400, "frobnicate"),
        ]
        if not sampling_available():
            calls.append((dict(model="tinybard", prompt="x", temperature=0.8), 400, "temperature"))
        for kwargs, status, param in calls:
            with pytest.raises(openai.APIStatusError) as e:
                client.completions.create(**kwargs)
            assert e.value.status_code == status, kwargs
            error = e.value.body if "message" in e.value.body else e.value.body["error"]
            assert error["param"] == param and error["message"] and "type" in error and "code" in error, kwargs
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tinybard", messages=[])
        with pytest.raises(openai.BadRequestError):
            client.chat.completions.create(model="tinybard", messages=[{"role": "user", "content": "x"}],
                                           max_tokens=600)
        for raw in (b"{not json", b"[1, 2]", b"\xff\xfe", b""):
            status, _, body = server.post("/v1/completions", raw)
            assert status == 400 and set(body["error"]) == {"message", "type", "param", "code"}, raw
        status, _, body = server.post("/v1/chat/completions", {"messages": [{"role": "user"}]})
        assert status == 400 and body["error"]["param"] == "messages"
        assert server.get("/v1/nothing")[0] == 404 and server.get("/v1/completions")[0] == 405
        models = client.models.list()
        assert [m.id for m in models.data] == ["tinybard"]
        assert json.loads(server.get("/health")[1])["status"] == "ok"
        assert client.completions.create(model="tinybard", prompt="ROMEO:", max_tokens=3).choices[0].text
        assert server.stop() == 0
    assert not any("Traceback" in line for line in server.lines), "".join(server.lines)


def stream_then_leave(server: Server, body: dict, chunks: int) -> list[bytes]:
    """Start a streamed request, read `chunks` events, then close the connection."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
    conn.request("POST", "/v1/completions", json.dumps(dict(body, stream=True)), {"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200
    got = []
    while len(got) < chunks:
        line = response.fp.readline()
        if line.startswith(b"data: "):
            got.append(line)
    conn.sock.shutdown(2)
    conn.close()
    return got


def wait_for(predicate, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"timed out waiting for {what}")


@needs_serve
@pytest.mark.timeout(300)
@pytest.mark.parametrize("strategy,stream", [("pipeline", True), ("specpipe", True), ("tree", False)])
def test_a_client_that_leaves_frees_its_request(strategy, stream):
    """Mid-stream, or while waiting for a whole answer: the request is aborted, its cells freed."""
    draft = [] if strategy == "pipeline" else ["--draft-model", str(DRAFT)]
    with Server("--strategy", strategy, *draft) as server:
        body = {"prompt": PROMPTS[1], "max_tokens": 400, "ignore_eos": True}
        if stream:
            stream_then_leave(server, body, chunks=4)
        else:
            conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
            conn.request("POST", "/v1/completions", json.dumps(body), {"content-type": "application/json"})
            wait_for(lambda: server.metrics()["minipipe_generation_tokens_total"] > 0, 60, "the first tokens")
            conn.sock.shutdown(2)
            conn.close()
        # aborted (not finished by its 400-token budget), and everything it held is free again
        def freed():
            m = server.metrics()  # (the gauges are the engine thread's snapshot after its latest step)
            return m if (m.get('minipipe_requests_finished_total{reason="aborted"}') == 1
                         and m["minipipe_requests_running"] == 0 and m["minipipe_requests_waiting"] == 0
                         and m["minipipe_kv_cells_in_use"] == 0 and m["minipipe_kv_cells_reserved"] == 0) else None

        m = wait_for(freed, 60, "the request to be aborted and its cells freed")
        assert m["minipipe_generation_tokens_total"] < 400
        assert m["minipipe_requests_in_server"] == 0
        # the server goes on serving
        status, _, body = server.post("/v1/completions", {"prompt": "ROMEO:", "max_tokens": 3})
        assert status == 200 and body["usage"]["completion_tokens"] == 3
        assert server.stop() == 0


def test_retry_after_follows_the_measured_latency_and_the_backlog():
    """Retry-After: 1 s before any request finished; then about the rounds of `max_running` the
    server's backlog makes, times the mean latency of finished requests; within 1..60 s."""
    from types import SimpleNamespace

    from minipipe.serve_engine import ServeMetrics

    metrics = ServeMetrics()
    assert metrics.retry_after_s(in_server=8, max_running=4) == 2  # 2 rounds of the 1 s default
    ticket = SimpleNamespace(received_s=0.0, request=None)
    for latency in (2.0, 4.0):  # mean 3 s
        metrics.finish(ticket, "length", latency)
    assert metrics.retry_after_s(in_server=4, max_running=4) == 3
    assert metrics.retry_after_s(in_server=9, max_running=4) == 9  # 3 rounds
    assert metrics.retry_after_s(in_server=0, max_running=4) == 3
    assert metrics.retry_after_s(in_server=1000, max_running=1) == 60


@needs_serve
@pytest.mark.timeout(300)
def test_overload_gets_429_with_retry_after():
    with Server("--strategy", "pipeline", "--max-running", "1", "--max-queue", "1") as server:
        long = {"prompt": PROMPTS[2], "max_tokens": 400, "ignore_eos": True, "stream": True}
        holders = []
        for _ in range(2):  # one running, one queued: the server is full
            conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
            conn.request("POST", "/v1/completions", json.dumps(long), {"content-type": "application/json"})
            holders.append(conn)
        holders[0].getresponse().fp.readline()  # the first one streams
        wait_for(lambda: server.metrics()["minipipe_requests_in_server"] == 2, 60, "two requests in the server")
        with pytest.raises(openai.RateLimitError) as e:
            server.client().completions.create(model="tinybard", prompt="x", max_tokens=2)
        assert e.value.status_code == 429 and int(e.value.response.headers["retry-after"]) >= 1
        assert e.value.body["code"] == "queue_full"
        assert server.metrics()["minipipe_requests_rejected_total"] == 1
        for conn in holders:
            conn.close()
        wait_for(lambda: server.metrics()["minipipe_requests_in_server"] == 0, 60, "the queue to empty")
        assert server.client().completions.create(model="tinybard", prompt="x", max_tokens=2).usage.completion_tokens
        assert server.stop() == 0


@needs_serve
@pytest.mark.timeout(300)
def test_sigterm_ends_requests_and_leaves_no_process_or_segment():
    with Server("--strategy", "specpipe", "--draft-model", str(DRAFT), "--grace-s", "1") as server:
        stages = server.descendants()
        assert len(stages) >= 2 and len(server.segments()) > 0
        # a request that would run far past the grace period, streamed
        conn = http.client.HTTPConnection(server.host, server.port, timeout=60)
        conn.request("POST", "/v1/completions", json.dumps({"prompt": PROMPTS[3], "max_tokens": 400,
                                                            "ignore_eos": True, "stream": True}),
                     {"content-type": "application/json"})
        response = conn.getresponse()
        assert response.status == 200
        response.fp.readline()
        server.proc.send_signal(signal.SIGTERM)
        rest = response.fp.read()  # the raw chunked body, to its end (each event is one chunk)
        events = [line for line in rest.split(b"\n") if line.startswith(b"data: ")]
        assert events[-1] == b"data: [DONE]"  # the stream ended properly, aborted after the grace period
        assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "abort"
        assert server.proc.wait(30) == 0
        wait_for(lambda: not any(Path(f"/proc/{pid}").exists() for pid in stages), 30, "the stages to end")
        assert server.segments() == []
