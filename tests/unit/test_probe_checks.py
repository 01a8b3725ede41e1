"""Probe tests against a local fake vLLM server that replays recorded real responses.

``fixtures/vllm/<server>/`` holds what vLLM 0.32.0 answered to the probes' own requests, one
directory per server configuration (``qwen3``, ``deepseek_r1``, ``no_parser``, ``api_key``;
see the README there and ``record.py``, which made them): bodies byte for byte, and the
status and headers of each in ``exchanges.json``. The fake routes a request the way vLLM does
(404 for an unknown model, 400 for a too-large ``max_tokens`` or a malformed body, 401 on
``/v1/*`` without the key when started with one, SSE for ``stream``) and answers with the
matching recording. Each test of a broken server derives its variant from a recording: it
overrides a route, edits a recorded body on the fly or reshapes the recorded stream, and
checks that the matching probe fails and says why.
"""

from __future__ import annotations

import asyncio
import copy
import json
import socket
import threading
import time
from collections.abc import Callable
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import requests
from aiohttp import web

from servekit.probe import PROBE_NAMES, ProbeResult, ProbeRun, probe_targets, run_probes
from servekit.probe.checks import UNKNOWN_MODEL, ProbeContext, run_probe
from servekit.probe.client import AUTH_REQUIRED, Client
from servekit.probe.sse import iter_events, split_lines

FIXTURES = Path(__file__).parent / "fixtures" / "vllm"
RECORDINGS = ("qwen3", "deepseek_r1", "no_parser", "api_key")
RECORDED_KEY = "sk-servekit-recording"  # what the api_key server was started with
MODEL = "Qwen3-8B"
MAX_MODEL_LEN = 8192
V1_PROBES = [n for n in PROBE_NAMES if n not in ("health", "version", "metrics")]

Handler = Callable[[web.Request, bytes], Any]


class Recording:
    """The recorded answers of one vLLM server configuration."""

    def __init__(self, server: str) -> None:
        self.server = server
        self.dir = FIXTURES / server
        self.exchanges: dict[str, dict] = json.loads(
            (self.dir / "exchanges.json").read_text(encoding="utf-8")
        )

    def __contains__(self, name: str) -> bool:
        return name in self.exchanges

    def raw(self, name: str) -> bytes:
        return (self.dir / name).read_bytes()

    def text(self, name: str) -> str:
        return self.raw(name).decode("utf-8")

    def json(self, name: str) -> Any:
        return json.loads(self.raw(name))

    def status(self, name: str) -> int:
        return self.exchanges[name]["status"]

    def headers(self, name: str) -> dict[str, str]:
        return dict(self.exchanges[name]["headers"])

    def events(self, name: str = "chat_completion_stream.sse") -> list[str]:
        """The payloads of a recorded SSE stream, ``[DONE]`` included."""
        return [block[len("data: ") :] for block in self.text(name).split("\n\n") if block]


@cache
def recording(server: str = "qwen3") -> Recording:
    return Recording(server)


def dumps(body: Any) -> bytes:
    """JSON the way vLLM writes it: compact, UTF-8."""
    return json.dumps(body, ensure_ascii=False, separators=(",", ":")).encode()


def json_reply(status: int, body: Any) -> web.Response:
    return web.Response(status=status, body=dumps(body), content_type="application/json")


class FakeVLLM:
    """A stand-in for vLLM's OpenAI-compatible server, on 127.0.0.1 and an ephemeral port.

    ``server`` picks the recording it replays: "qwen3" (the default), "deepseek_r1",
    "no_parser" (no ``--reasoning-parser``) or "api_key" (the default when ``api_key`` is
    given: then ``/v1/*`` answers the recorded 401s without ``Bearer <api_key>``).
    Hooks for broken variants:
      ``routes["METHOD /path"]`` (or ``routes["*"]`` for every request) replaces a handler;
      ``mutate[file name]`` edits a recorded JSON body (a deep copy) before it is sent;
      ``stream_events`` reshapes the list of recorded SSE payloads (``[DONE]`` included);
      ``stream_sep`` is what follows each ``data:`` line; ``stream_cut_after`` drops the
      connection after that many events.
    """

    def __init__(self, *, server: str | None = None, api_key: str | None = None) -> None:
        self.api_key = api_key
        self.rec = recording(server or ("api_key" if api_key else "qwen3"))
        self.auth_rec = recording("api_key")  # the recorded 401s
        self.routes: dict[str, Handler] = {}
        self.mutate: dict[str, Callable[[Any], None]] = {}
        self.stream_events: Callable[[list[str]], list[str]] | None = None
        self.stream_sep = "\n\n"
        self.stream_cut_after: int | None = None
        self.requests: list[dict[str, Any]] = []
        self.url = ""
        self._release = asyncio.Event()
        self._loop = asyncio.new_event_loop()
        self._thread: threading.Thread | None = None
        self._runner: web.AppRunner | None = None
        self._defaults: dict[str, Handler] = {
            "GET /health": lambda r, b: self.reply("health.txt"),
            "GET /ping": lambda r, b: self.reply("ping.txt"),
            "GET /version": lambda r, b: self.reply("version.json"),
            "GET /v1/models": lambda r, b: self.reply("models.json"),
            "GET /metrics": lambda r, b: self.reply("metrics.txt"),
            "POST /v1/chat/completions": self._chat,
            "POST /v1/completions": lambda r, b: self.reply("completion.json"),
            "POST /tokenize": lambda r, b: self.reply("tokenize.json"),
        }

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> FakeVLLM:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.bind(("127.0.0.1", 0))
        sock.listen(128)
        self.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._dispatch)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        started = threading.Event()

        def serve() -> None:
            asyncio.set_event_loop(self._loop)
            self._loop.run_until_complete(self._runner.setup())
            self._loop.run_until_complete(web.SockSite(self._runner, sock).start())
            started.set()
            self._loop.run_forever()

        self._thread = threading.Thread(target=serve, name="fake-vllm", daemon=True)
        self._thread.start()
        assert started.wait(10), "fake vLLM did not start"
        deadline = time.monotonic() + 10
        while True:  # readiness: poll until it answers
            try:
                if requests.get(self.url + "/ping", timeout=1).status_code == 200:
                    break
            except requests.ConnectionError:
                if time.monotonic() > deadline:
                    raise
        self.requests.clear()
        return self

    def stop(self) -> None:
        self._loop.call_soon_threadsafe(self._release.set)
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
        self._loop.close()

    # ------------------------------------------------------------------ handlers

    def reply(self, name: str, edit: Callable[[Any], None] | None = None) -> web.Response:
        """The recorded answer ``name``: its status, headers and body (exact bytes unless
        ``edit`` or a ``mutate`` hook changes the JSON)."""
        rec = self.rec if name in self.rec else self.auth_rec
        raw = rec.raw(name)
        if edit or name in self.mutate:
            body = copy.deepcopy(json.loads(raw))
            if edit:
                edit(body)
            if name in self.mutate:
                self.mutate[name](body)
            raw = dumps(body)
        return web.Response(status=rec.status(name), body=raw, headers=rec.headers(name))

    async def hang(self, request: web.Request, raw: bytes) -> web.Response:
        """A handler that answers only when the server stops (for timeouts)."""
        await self._release.wait()
        return web.Response(status=200)

    async def _dispatch(self, request: web.Request) -> web.StreamResponse:
        raw = await request.read()
        key = f"{request.method} {request.path}"
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": dict(request.headers),
                "body": raw,
            }
        )
        handler = self.routes.get(key) or self.routes.get("*")
        if handler is None:
            # vLLM 0.32 guards /v1/* only: /tokenize, /health, /version, /metrics stay open.
            given = request.headers.get("Authorization")
            if (
                self.api_key
                and request.path.startswith("/v1/")
                and given != f"Bearer {self.api_key}"
            ):
                return self.reply(
                    "unauthorized.json" if given is None else "unauthorized_wrong_key.json"
                )
            handler = self._defaults.get(key)
        if handler is None:
            return self.reply("not_found.json")
        out = handler(request, raw)
        return await out if asyncio.iscoroutine(out) else out

    async def _chat(self, request: web.Request, raw: bytes) -> web.StreamResponse:
        try:
            body = json.loads(raw)
        except ValueError:
            return self.reply("error_bad_json.json")
        if not isinstance(body, dict) or "messages" not in body:
            return self.reply("error_missing_messages.json")
        if body.get("model") != MODEL:

            def name_it(err: Any) -> None:
                msg = err["error"]["message"]
                err["error"]["message"] = msg.replace(UNKNOWN_MODEL, str(body.get("model")))

            edit = None if body.get("model") == UNKNOWN_MODEL else name_it
            return self.reply("error_unknown_model.json", edit)
        max_tokens = body.get("max_tokens") or 16
        if max_tokens > MAX_MODEL_LEN:
            return self.reply("error_max_tokens.json")
        if body.get("stream"):
            return await self._stream(request)
        if not (body.get("chat_template_kwargs") or {}).get("enable_thinking", True):
            return self.reply("chat_completion_thinking_off.json")
        name = f"chat_completion_max_tokens_{max_tokens}.json"
        return self.reply(name if name in self.rec else "chat_completion.json")

    async def _stream(self, request: web.Request) -> web.StreamResponse:
        name = "chat_completion_stream.sse"
        events = self.rec.events(name)
        if self.stream_events:
            events = self.stream_events(events)
        resp = web.StreamResponse(status=self.rec.status(name), headers=self.rec.headers(name))
        resp.enable_chunked_encoding()
        await resp.prepare(request)
        for i, event in enumerate(events):
            if self.stream_cut_after is not None and i == self.stream_cut_after:
                assert request.transport is not None
                request.transport.close()
                return resp
            await resp.write(f"data: {event}{self.stream_sep}".encode())
        await resp.write_eof()
        return resp


def edit_chunks(fn: Callable[[list[dict]], None]) -> Callable[[list[str]], list[str]]:
    """A ``stream_events`` transform that edits the JSON chunks (``[DONE]`` kept as is)."""

    def transform(events: list[str]) -> list[str]:
        chunks = [json.loads(e) for e in events if e != "[DONE]"]
        fn(chunks)
        out = [dumps(c).decode() for c in chunks]
        return out + (["[DONE]"] if "[DONE]" in events else [])

    return transform


@pytest.fixture
def make_fake():
    servers: list[FakeVLLM] = []

    def make(**kwargs: Any) -> FakeVLLM:
        server = FakeVLLM(**kwargs).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def fake(make_fake) -> FakeVLLM:
    return make_fake()


def probe(url: str, *checks: str, **kwargs: Any) -> dict[str, ProbeResult]:
    kwargs.setdefault("timeout", 10.0)
    run = run_probes(url, kwargs.pop("model", MODEL), checks=list(checks) or None, **kwargs)
    return {r.name: r for r in run.results}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bodies(server: FakeVLLM, path: str) -> list[Any]:
    """The JSON bodies sent to ``path``, in order (malformed ones left out)."""
    out = []
    for r in server.requests:
        if r["path"] == path and r["body"]:
            try:
                out.append(json.loads(r["body"]))
            except ValueError:
                continue
    return out


# ---------------------------------------------------------------------- the recordings


def recorded_usage(server: str = "qwen3", name: str = "chat_completion.json") -> dict:
    if name.endswith(".sse"):
        return json.loads(recording(server).events(name)[-2])["usage"]
    return recording(server).json(name)["usage"]


def send_recorded(url: str, request: dict, api_key: str | None) -> requests.Response:
    headers = {}
    if request["auth"] == "the key":
        headers["Authorization"] = f"Bearer {api_key}"
    elif request["auth"] == "a wrong key":
        headers["Authorization"] = "Bearer sk-servekit-wrong"
    data = request.get("data")
    if data is not None:
        headers["Content-Type"] = "application/json"
    return requests.request(
        request["method"],
        url + request["path"],
        json=request.get("json"),
        data=data.encode() if data is not None else None,
        headers=headers,
        timeout=10,
    )


@pytest.mark.parametrize("server", RECORDINGS)
def test_the_fake_answers_every_recorded_request_as_recorded(make_fake, server):
    """The fake routes each request the probes (and record.py) send to its recording and
    answers it byte for byte, with the recorded status and headers."""
    rec = recording(server)
    key = RECORDED_KEY if server == "api_key" else None
    fake = make_fake(server=server, api_key=key)
    replayed = 0
    for name, exchange in rec.exchanges.items():
        if name == "error_engine_dead.json":  # needs a dead engine; replayed below
            continue
        resp = send_recorded(fake.url, exchange["request"], key)
        assert resp.status_code == exchange["status"], name
        assert resp.content == rec.raw(name), name
        for header, value in exchange["headers"].items():
            assert resp.headers.get(header) == value, (name, header)
        replayed += 1
    assert replayed >= 17


def test_recordings_were_made_with_the_probes_own_requests(fake):
    probe(fake.url, "chat", "chat_stream", "completions", "tokenize")
    sent = {(r["path"], r["body"].decode()) for r in fake.requests if r["method"] == "POST"}
    recorded = {
        (e["request"]["path"], json.dumps(e["request"]["json"]))
        for e in recording("qwen3").exchanges.values()
        if "json" in e["request"]
    }
    assert {(path, json.dumps(json.loads(body))) for path, body in sent} <= recorded


def test_recorded_facts_the_probes_rely_on():
    """What vLLM 0.32 really does, as recorded (the probes accept exactly this)."""
    qwen3, r1, bare, keyed = (recording(s) for s in RECORDINGS)
    assert qwen3.json("version.json") == {"version": "0.32.0"}
    assert qwen3.status("not_found.json") == 404
    # reasoning lands in `reasoning`; a budget spent inside thinking leaves content null
    message = qwen3.json("chat_completion.json")["choices"][0]["message"]
    assert message["content"] is None and message["reasoning"]
    assert "reasoning_content" not in message
    # thinking off: qwen3 answers in content, deepseek_r1 puts the answer in reasoning
    off = qwen3.json("chat_completion_thinking_off.json")["choices"][0]["message"]
    assert off["content"] and off["reasoning"] is None
    off = r1.json("chat_completion_thinking_off.json")["choices"][0]["message"]
    assert off["content"] is None and off["reasoning"]
    # without a parser, everything is content
    on = bare.json("chat_completion.json")["choices"][0]["message"]
    assert on["content"] and on["reasoning"] is None
    # the stream: role first, then deltas, finish_reason, a usage chunk with no choices, [DONE]
    events = qwen3.events()
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]
    assert chunks[-2]["choices"][0]["finish_reason"] in ("stop", "length")
    assert qwen3.headers("chat_completion_stream.sse")["content-type"].startswith(
        "text/event-stream"
    )
    # /metrics is Prometheus text with vllm:* series labelled by the served name
    assert qwen3.headers("metrics.txt")["content-type"].startswith("text/plain; version=")
    assert f'model_name="{MODEL}"' in qwen3.text("metrics.txt")
    # with a key: /v1/* answers 401 {"error": "Unauthorized"}; /tokenize and the rest stay open
    assert keyed.status("unauthorized.json") == 401
    assert keyed.json("unauthorized.json") == {"error": "Unauthorized"}
    assert keyed.status("unauthorized_wrong_key.json") == 401
    assert keyed.status("unauthorized_chat.json") == 401
    assert keyed.status("tokenize_without_key.json") == 200
    for name in ("health.txt", "version.json", "metrics.txt"):
        assert keyed.exchanges[name]["request"]["auth"] == "none"
        assert keyed.status(name) == 200
    # a dead engine core: 500 InternalServerError (the API server exits right after)
    assert qwen3.status("error_engine_dead.json") == 500
    assert qwen3.json("error_engine_dead.json")["error"]["type"] == "InternalServerError"


# ---------------------------------------------------------------------- healthy servers


def test_recorded_qwen3_server_passes_every_probe(fake):
    run = run_probes(
        fake.url,
        MODEL,
        max_model_len=MAX_MODEL_LEN,
        reasoning_parser="qwen3",
        timeout=10,
        target="sandbox-1",
    )
    assert isinstance(run, ProbeRun)
    assert (run.target, run.base_url, run.model) == ("sandbox-1", fake.url, MODEL)
    assert [r.name for r in run.results] == list(PROBE_NAMES)
    assert {r.name: r.detail for r in run.results if r.failed} == {}
    assert [r.name for r in run.results if r.skipped] == ["auth"]  # no key given
    assert run.ok
    by_name = {r.name: r for r in run.results}
    assert by_name["version"].detail == "vLLM 0.32.0"
    assert "ttft" in by_name["chat_stream"].detail
    u = recorded_usage(name="chat_completion_stream.sse")
    usage = f"usage {u['prompt_tokens']}+{u['completion_tokens']}={u['total_tokens']}"
    assert usage in by_name["chat_stream"].detail
    assert "p50" in by_name["concurrency"].detail and "p95" in by_name["concurrency"].detail
    assert "content null" in by_name["chat"].detail  # cut inside thinking is accepted
    assert by_name["tokenize"].detail == (
        f"{recorded_usage()['prompt_tokens']} prompt tokens, same as chat usage"
    )
    assert by_name["reasoning"].detail.startswith("parser qwen3; thinking on: reasoning ")
    assert all(r.seconds >= 0 for r in run.results)


def test_recorded_server_with_a_key_passes_every_probe_given_the_key(make_fake):
    server = make_fake(api_key=RECORDED_KEY)
    run = run_probes(server.url, MODEL, api_key=RECORDED_KEY, reasoning_parser="qwen3", timeout=10)
    assert {r.name: r.detail for r in run.results if not r.ok or r.skipped} == {}
    auth = next(r for r in run.results if r.name == "auth")
    assert auth.detail == "no key -> 401, wrong key -> 401, right key -> 200"


def test_recorded_server_without_a_parser_passes_when_none_is_expected(make_fake):
    server = make_fake(server="no_parser")
    run = run_probes(server.url, MODEL, max_model_len=MAX_MODEL_LEN, timeout=10)
    assert {r.name: r.detail for r in run.results if r.failed} == {}
    assert [r.name for r in run.results if r.skipped] == ["reasoning", "auth"]


def test_requests_carry_the_documented_parameters(fake):
    results = probe(fake.url, "chat", "chat_stream")
    assert all(r.ok for r in results.values())
    plain, streamed = bodies(fake, "/v1/chat/completions")
    assert plain == {
        "model": MODEL,
        "messages": [{"role": "user", "content": "你好，介绍一下你自己"}],  # noqa: RUF001
        "max_tokens": 32,
        "temperature": 0.7,
        "top_p": 0.8,
    }
    assert streamed["stream"] is True
    assert streamed["stream_options"] == {"include_usage": True}
    assert all("Authorization" not in r["headers"] for r in fake.requests)


def test_reasoning_is_skipped_without_a_parser(fake):
    run = run_probes(fake.url, MODEL, checks=["reasoning"], timeout=10)
    (result,) = run.results
    assert result.skipped and result.ok
    assert result.detail == "no reasoning parser configured"
    assert result.status == "SKIP"
    assert fake.requests == []


def test_error_max_tokens_learns_max_model_len_from_models(fake):
    result = probe(fake.url, "error_max_tokens")["error_max_tokens"]
    assert result.ok, result.detail
    assert "from /v1/models" in result.detail
    assert "max_tokens=8193 cannot be greater than max_model_len=8192" in result.detail
    assert bodies(fake, "/v1/chat/completions")[0]["max_tokens"] == MAX_MODEL_LEN + 1


def test_error_max_tokens_is_skipped_when_max_model_len_is_unknown(fake):
    fake.mutate["models.json"] = lambda b: b["data"][0].pop("max_model_len")
    result = probe(fake.url, "error_max_tokens")["error_max_tokens"]
    assert result.skipped, result.detail
    assert "max_model_len unknown" in result.detail


def test_base_url_may_carry_v1_and_no_scheme(fake):
    hostport = fake.url.removeprefix("http://")
    run = run_probes(f"{hostport}/v1/", MODEL, checks=["health", "models"], timeout=10)
    assert run.ok, run.results
    assert run.base_url == fake.url
    assert run.target == fake.url


def test_older_reasoning_content_field_is_accepted(make_fake):
    server = make_fake()

    def rename(body: Any) -> None:
        message = body["choices"][0]["message"]
        message["reasoning_content"] = message.pop("reasoning")

    def rename_deltas(chunks: list[dict]) -> None:
        for chunk in chunks:
            for choice in chunk["choices"]:
                if "reasoning" in choice["delta"]:
                    choice["delta"]["reasoning_content"] = choice["delta"].pop("reasoning")

    server.mutate["chat_completion.json"] = rename
    server.mutate["chat_completion_thinking_off.json"] = rename
    server.stream_events = edit_chunks(rename_deltas)
    results = probe(server.url, "chat", "chat_stream", "reasoning", reasoning_parser="qwen3")
    assert {n: r.detail for n, r in results.items() if not r.ok} == {}
    assert "reasoning_content" in results["reasoning"].detail


def test_an_immediate_stop_with_empty_text_is_accepted(fake):
    prompt = recorded_usage()["prompt_tokens"]

    def stop_at_once(body: Any) -> None:
        body["choices"][0]["message"].update(content="", reasoning=None)
        body["choices"][0]["finish_reason"] = "stop"
        body["usage"].update(completion_tokens=1, total_tokens=prompt + 1)

    fake.mutate["chat_completion.json"] = stop_at_once
    assert probe(fake.url, "chat")["chat"].ok


def test_recorded_noise_with_control_characters_is_generated_text(fake):
    """Random-weight test models answer noise (control characters here): still text."""
    reasoning = recording().json("chat_completion.json")["choices"][0]["message"]["reasoning"]
    assert any(ord(c) < 0x20 or c == "\ufffd" for c in reasoning)
    assert probe(fake.url, "chat")["chat"].ok


# ---------------------------------------------------------------------- broken servers


def test_wrong_model_lists_served_ids_and_chat_reports_404(fake):
    results = probe(fake.url, "models", "chat", model="Qwen3-14B")
    assert not results["models"].ok
    assert results["models"].detail == 'expected model "Qwen3-14B" in /v1/models, got ids: Qwen3-8B'
    chat = results["chat"].detail
    assert "expected HTTP 200, got 404" in chat
    assert "NotFoundError: The model `Qwen3-14B` does not exist" in chat


def test_max_model_len_mismatch(fake):
    result = probe(fake.url, "models", max_model_len=4096)["models"]
    assert not result.ok
    assert "expected max_model_len 4096" in result.detail and "got 8192" in result.detail


def test_chat_answering_for_another_model_fails(fake):
    fake.mutate["chat_completion.json"] = lambda b: b.update(model="other")
    result = probe(fake.url, "chat")["chat"]
    assert not result.ok
    assert result.detail == 'expected model "Qwen3-8B", got "other"'


def test_inconsistent_usage_fails_chat(fake):
    u = recorded_usage()
    fake.mutate["chat_completion.json"] = lambda b: b["usage"].update(total_tokens=999)
    detail = probe(fake.url, "chat")["chat"].detail
    p, c = u["prompt_tokens"], u["completion_tokens"]
    assert f"total_tokens == prompt_tokens + completion_tokens ({p} + {c} = {p + c}), got 999" in (
        detail
    )


def test_more_tokens_than_asked_fails_chat(fake):
    p = recorded_usage()["prompt_tokens"]
    fake.mutate["chat_completion.json"] = lambda b: b["usage"].update(
        completion_tokens=40, total_tokens=p + 40
    )
    detail = probe(fake.url, "chat")["chat"].detail
    assert "completion_tokens <= max_tokens 32, got 40" in detail


def test_inconsistent_usage_fails_stream(fake):
    fake.stream_events = edit_chunks(lambda chunks: chunks[-1]["usage"].update(total_tokens=999))
    result = probe(fake.url, "chat_stream")["chat_stream"]
    assert not result.ok
    assert "final chunk usage.total_tokens" in result.detail and "got 999" in result.detail


def engine_dead(fake: FakeVLLM) -> Handler:
    return lambda request, raw: fake.reply("error_engine_dead.json")


def test_engine_error_500_fails_chat_with_the_server_message(fake):
    fake.routes["POST /v1/chat/completions"] = engine_dead(fake)
    detail = probe(fake.url, "chat")["chat"].detail
    assert detail.startswith("POST /v1/chat/completions: expected HTTP 200, got 500")
    assert "InternalServerError: EngineCore encountered an issue" in detail


def test_non_json_body_fails_with_an_excerpt(fake):
    fake.routes["POST /v1/chat/completions"] = lambda r, b: web.Response(
        status=200, text="<html>gateway says hi</html>", content_type="text/html"
    )
    detail = probe(fake.url, "chat")["chat"].detail
    assert "expected a JSON body" in detail and "text/html" in detail
    assert "<html>gateway says hi</html>" in detail


def test_missing_finish_reason_fails_chat(fake):
    fake.mutate["chat_completion.json"] = lambda b: b["choices"][0].update(finish_reason=None)
    detail = probe(fake.url, "chat")["chat"].detail
    assert detail == "expected finish_reason in ('stop', 'length'), got null"


def test_empty_answer_fails_chat(fake):
    fake.mutate["chat_completion.json"] = lambda b: b["choices"][0]["message"].update(
        content=None, reasoning=None
    )
    detail = probe(fake.url, "chat")["chat"].detail
    assert "expected generated text in message content or reasoning" in detail
    assert "content null, reasoning null" in detail


def test_stream_without_done_fails(fake):
    fake.stream_events = lambda events: events[:-1]
    detail = probe(fake.url, "chat_stream")["chat_stream"].detail
    assert "expected the stream to end with `data: [DONE]`" in detail


def test_stream_without_blank_lines_fails_framing(fake):
    fake.stream_sep = "\n"
    detail = probe(fake.url, "chat_stream")["chat_stream"].detail
    assert "SSE framing broken" in detail


def test_stream_without_finish_reason_fails(fake):
    def drop(chunks: list[dict]) -> None:
        for chunk in chunks:
            for choice in chunk["choices"]:
                choice["finish_reason"] = None

    fake.stream_events = edit_chunks(drop)
    detail = probe(fake.url, "chat_stream")["chat_stream"].detail
    assert "finish_reason in ('stop', 'length') on the last choice chunk, got null" in detail


def test_stream_without_usage_chunk_fails(fake):
    fake.stream_events = edit_chunks(lambda chunks: chunks.pop())
    detail = probe(fake.url, "chat_stream")["chat_stream"].detail
    assert "expected a final usage chunk" in detail


def test_stream_without_role_fails(fake):
    fake.stream_events = edit_chunks(lambda chunks: chunks[0]["choices"][0]["delta"].pop("role"))
    detail = probe(fake.url, "chat_stream")["chat_stream"].detail
    assert detail == 'expected delta.role "assistant" in the first chunk, got null'


def test_stream_with_wrong_chunk_object_fails(fake):
    fake.stream_events = edit_chunks(lambda chunks: chunks[3].update(object="chat.completion"))
    detail = probe(fake.url, "chat_stream")["chat_stream"].detail
    assert detail == 'expected object "chat.completion.chunk" in event 4, got "chat.completion"'


def test_stream_cut_midway_fails(fake):
    fake.stream_cut_after = 5
    result = probe(fake.url, "chat_stream")["chat_stream"]
    assert not result.ok
    assert result.detail.startswith(f"stream broke after 5 events: connection to {fake.url}")


def test_stream_answered_as_plain_json_fails(fake):
    fake.routes["POST /v1/chat/completions"] = lambda r, b: fake.reply("chat_completion.json")
    results = probe(fake.url, "chat", "chat_stream")
    assert results["chat"].ok
    assert "expected Content-Type text/event-stream, got application/json" in (
        results["chat_stream"].detail
    )


def test_connection_refused_names_the_url_and_fails_fast(monkeypatch):
    """A refused connection ends the run at once: one connection attempt, no retry, and the
    other probes are not attempted (none of them waits out its timeout)."""
    import urllib3.util.connection

    attempts: list[tuple] = []
    connect = urllib3.util.connection.create_connection

    def counted(address, *args, **kwargs):
        attempts.append(address)
        return connect(address, *args, **kwargs)

    monkeypatch.setattr(urllib3.util.connection, "create_connection", counted)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    run = run_probes(url, MODEL, timeout=10)
    assert attempts == [("127.0.0.1", port)]
    assert not run.ok
    assert all(r.failed for r in run.results)
    first, *rest = run.results
    assert first.detail.startswith(f"cannot connect to {url}/health: ")
    assert "refused" in first.detail.lower()
    assert all(r.detail.startswith("not attempted: cannot connect to") for r in rest)


def test_read_timeout_is_a_failure(fake):
    fake.routes["GET /health"] = fake.hang
    result = probe(fake.url, "health", timeout=0.5)["health"]
    assert not result.ok
    assert result.detail == f"no answer from {fake.url}/health within 0.5s"


def test_server_wanting_a_key_fails_every_v1_probe(make_fake):
    server = make_fake(api_key="sk-test")
    run = run_probes(server.url, MODEL, timeout=10)
    by_name = {r.name: r for r in run.results}
    assert all(by_name[n].ok for n in ("health", "version", "metrics"))
    assert {n: by_name[n].detail for n in V1_PROBES} == dict.fromkeys(V1_PROBES, AUTH_REQUIRED)
    # once known, the remaining probes fail without sending requests
    assert sum(r["path"].startswith("/v1/") for r in server.requests) <= 3


def test_401_everywhere(fake):
    fake.routes["*"] = lambda r, b: fake.reply("unauthorized.json")
    results = probe(fake.url, "health", "models", "chat")
    assert results["health"].detail == "GET /health: expected HTTP 200, got 401: Unauthorized"
    assert results["models"].detail == AUTH_REQUIRED
    assert results["chat"].detail == AUTH_REQUIRED


def test_right_key_passes_and_is_sent(make_fake):
    server = make_fake(api_key="sk-test")
    run = run_probes(server.url, MODEL, api_key="sk-test", timeout=10)
    assert {r.name: r.detail for r in run.results if r.failed} == {}
    auth = next(r for r in run.results if r.name == "auth")
    assert not auth.skipped
    assert auth.detail == "no key -> 401, wrong key -> 401, right key -> 200"
    chats = [r for r in server.requests if r["path"] == "/v1/chat/completions"]
    assert chats and all(r["headers"]["Authorization"] == "Bearer sk-test" for r in chats)


def test_wrong_key_is_reported_as_rejected(make_fake):
    server = make_fake(api_key="sk-test")
    results = probe(server.url, "models", "auth", api_key="sk-wrong")
    assert "the server rejected the API key (HTTP 401: Unauthorized)" in results["models"].detail
    assert "with the API key: expected HTTP 200, got 401" in results["auth"].detail


def test_open_server_fails_auth_when_a_key_is_expected(fake):
    result = probe(fake.url, "auth", api_key="sk-test")["auth"]
    assert not result.ok
    assert result.detail == (
        "GET /v1/models without a key: expected HTTP 401, got 200 (the endpoint is open to anyone)"
    )


def test_bad_json_answered_500_fails(fake):
    fake.routes["POST /v1/chat/completions"] = engine_dead(fake)
    detail = probe(fake.url, "error_bad_json")["error_bad_json"].detail
    assert "expected HTTP 400, got 500" in detail


def test_bad_json_error_must_be_json(fake):
    fake.routes["POST /v1/chat/completions"] = lambda r, b: web.Response(status=400, text="nope")
    detail = probe(fake.url, "error_bad_json")["error_bad_json"].detail
    assert detail == "expected a JSON error body with HTTP 400, got nope"


def test_unknown_model_with_wrong_status_or_message_fails(fake):
    fake.routes["POST /v1/chat/completions"] = lambda r, b: fake.reply("error_bad_json.json")
    detail = probe(fake.url, "error_unknown_model")["error_unknown_model"].detail
    assert "expected HTTP 404, got 400" in detail

    def another_name(err: Any) -> None:
        err["error"]["message"] = err["error"]["message"].replace(UNKNOWN_MODEL, "nope")

    fake.routes["POST /v1/chat/completions"] = lambda r, b: fake.reply(
        "error_unknown_model.json", another_name
    )
    detail = probe(fake.url, "error_unknown_model")["error_unknown_model"].detail
    assert "expected the error message to name the model 'servekit-probe-no-such-model'" in detail


def test_max_tokens_over_the_limit_accepted_fails(fake):
    fake.routes["POST /v1/chat/completions"] = lambda r, b: fake.reply("chat_completion.json")
    detail = probe(fake.url, "error_max_tokens")["error_max_tokens"].detail
    assert "expected HTTP 400, got 200" in detail


def test_version_must_be_json(fake):
    fake.routes["GET /version"] = lambda r, b: web.Response(status=200, text="0.32.0")
    detail = probe(fake.url, "version")["version"].detail
    assert "/version: expected a JSON body" in detail


def test_metrics_for_another_model_fail(fake):
    fake.routes["GET /metrics"] = lambda r, b: web.Response(
        text=recording().text("metrics.txt").replace("Qwen3-8B", "Other-1B")
    )
    detail = probe(fake.url, "metrics")["metrics"].detail
    assert detail == (
        'expected vllm:* series labelled model_name="Qwen3-8B", got model_name values: Other-1B'
    )


def test_metrics_kept_private_name_the_setting(fake):
    fake.routes["GET /metrics"] = lambda r, b: web.json_response(
        {"error": {"message": "/metrics is not served to this address", "code": 403}}, status=403
    )
    detail = probe(fake.url, "metrics")["metrics"].detail
    assert "got 403" in detail and "vllm_service_metrics_allowed_cidrs" in detail


def test_metrics_without_vllm_series_fail(fake):
    fake.routes["GET /metrics"] = lambda r, b: web.Response(text="python_info 1.0\n")
    detail = probe(fake.url, "metrics")["metrics"].detail
    assert detail.startswith("expected Prometheus series named vllm:*, got none")


def test_tokenize_count_mismatch_fails(fake):
    count = recording().json("tokenize.json")["count"]
    fake.mutate["tokenize.json"] = lambda b: b.update(count=count + 1, tokens=[*b["tokens"], 1])
    detail = probe(fake.url, "tokenize")["tokenize"].detail
    assert f"got count {count + 1} vs prompt_tokens {count}" in detail


def test_recorded_deepseek_r1_server_fails_only_reasoning(make_fake):
    """The parser many tutorials use: with thinking off, Qwen3's answer lands in reasoning."""
    server = make_fake(server="deepseek_r1")
    run = run_probes(
        server.url, MODEL, max_model_len=MAX_MODEL_LEN, reasoning_parser="deepseek_r1", timeout=10
    )
    assert [r.name for r in run.results if r.failed] == ["reasoning"]
    detail = next(r.detail for r in run.results if r.name == "reasoning")
    assert detail.startswith("thinking off (enable_thinking false): expected the answer in content")
    assert "got content null and reasoning" in detail
    assert "--reasoning-parser qwen3" in detail
    kwargs = [
        b["chat_template_kwargs"]
        for b in bodies(server, "/v1/chat/completions")
        if "chat_template_kwargs" in b
    ]
    assert kwargs == [{"enable_thinking": False}]


def test_reasoning_without_parser_on_the_server_fails(make_fake):
    server = make_fake(server="no_parser")
    detail = probe(server.url, "reasoning", reasoning_parser="qwen3")["reasoning"].detail
    assert detail.startswith("thinking on: expected a non-empty reasoning")
    assert "--reasoning-parser qwen3" in detail


def test_concurrency_reports_partial_failures(fake):
    count = {"n": 0}

    def flaky(request: web.Request, raw: bytes) -> web.Response:
        count["n"] += 1
        if count["n"] % 2:
            return json_reply(503, {"error": {"message": "busy", "type": "ServiceUnavailable"}})
        return fake.reply("chat_completion.json")

    fake.routes["POST /v1/chat/completions"] = flaky
    detail = probe(fake.url, "concurrency")["concurrency"].detail
    assert "parallel chats to answer HTTP 200, got 8" in detail
    assert "8x HTTP 503: ServiceUnavailable: busy" in detail
    assert count["n"] == 16


# ---------------------------------------------------------------------- running


def test_probe_targets_runs_in_parallel_and_keeps_order(make_fake):
    a, b = make_fake(), make_fake()
    dead = f"http://127.0.0.1:{free_port()}"
    runs = probe_targets([("a", a.url), ("dead", dead), ("b", b.url)], MODEL, timeout=10)
    assert [r.target for r in runs] == ["a", "dead", "b"]
    assert [r.ok for r in runs] == [True, False, True]
    assert runs[1].base_url == dead


def test_probe_selection(fake):
    run = run_probes(fake.url, MODEL, checks=["version", "health"], timeout=10)
    assert [r.name for r in run.results] == ["health", "version"]  # run order is fixed
    with pytest.raises(ValueError, match="unknown probe"):
        run_probes(fake.url, MODEL, checks=["nope"])
    with pytest.raises(ValueError, match="unknown probe"):
        probe_targets([("a", fake.url)], MODEL, checks=["nope"])
    assert probe_targets([], MODEL) == []


def test_a_crashing_probe_becomes_a_failure():
    ctx = ProbeContext(Client("http://127.0.0.1:9", None, 1.0), MODEL)
    result = run_probe("boom", lambda c: str(1 / 0), ctx)
    assert result.failed
    assert result.detail == "probe error: ZeroDivisionError: division by zero"


def test_result_types():
    r = ProbeResult("health", True, "HTTP 200", 0.01)
    assert r.skipped is False and r.status == "PASS"
    assert ProbeResult("x", False, "bad", 0.0).status == "FAIL"
    assert not ProbeRun("t", "http://x").ok  # nothing ran: not ok


# ---------------------------------------------------------------------- SSE reader


def test_split_lines_handles_crlf_and_split_utf8():
    raw = "data: 你好\r\n\r\ndata: [DONE]\n\n".encode()
    chunks = [raw[i : i + 3] for i in range(0, len(raw), 3)]  # splits multi-byte characters
    assert list(split_lines(chunks)) == ["data: 你好", "", "data: [DONE]", ""]


def test_iter_events_groups_data_lines_and_ignores_comments():
    lines = [": ping", "data: a", "", "data: b", "data: c", "", "event: x", "data:[DONE]"]
    events = list(iter_events(lines))
    assert [(e.data, e.data_lines, e.terminated) for e in events] == [
        ("a", 1, True),
        ("b\nc", 2, True),
        ("[DONE]", 1, False),
    ]
