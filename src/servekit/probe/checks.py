"""Request probes for a vLLM OpenAI-compatible endpoint.

Each probe sends real requests and judges the answers against what vLLM serves (see the
API notes the project keeps for the pinned release). Probes accept what legitimately
varies (generated text, ``reasoning`` vs ``reasoning_content``, older error shapes) and
fail on what is wrong, saying what was expected and what came back. A probe never
raises: every error becomes a failed :class:`ProbeResult`.

This module depends only on ``requests``, so it can verify any vLLM URL.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import requests

from servekit.probe.client import (
    AUTH_REQUIRED,
    Client,
    ProbeFailure,
    ProbeSkipped,
    describe_body,
    error_message,
    parse_json,
    request_failure,
    snippet,
)
from servekit.probe.result import ProbeResult, ProbeRun
from servekit.probe.sse import SSEEvent, iter_events, split_lines

CHAT_PATH = "/v1/chat/completions"
CHAT_MESSAGES = [{"role": "user", "content": "你好，介绍一下你自己"}]  # noqa: RUF001 (Chinese comma)
CHAT_MAX_TOKENS = 32
SAMPLING = {"temperature": 0.7, "top_p": 0.8}
COMPLETION_PROMPT = "The capital of France is"
COMPLETION_MAX_TOKENS = 16
UNKNOWN_MODEL = "servekit-probe-no-such-model"
CONCURRENT_REQUESTS = 16
CONCURRENT_MAX_TOKENS = 8
FINISH_REASONS = ("stop", "length")
REASONING_FIELDS = ("reasoning", "reasoning_content")


@dataclass
class ProbeContext:
    """What the probes of one run share: the client and the expectations."""

    client: Client
    model: str
    max_model_len: int | None = None
    reasoning_parser: str | None = None
    served_max_model_len: int | None = None  # learned from /v1/models
    unreachable: str | None = None  # set after a connection could not be opened


# --------------------------------------------------------------------------- helpers


def _expect(cond: object, detail: str) -> None:
    if not cond:
        raise ProbeFailure(detail)


def _show(value: Any, limit: int = 80) -> str:
    """A value as JSON, bounded, for "got ..." in details."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return snippet(text, limit)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _dig(obj: Any, *keys: Any) -> Any:
    """``obj[k1][k2]...`` or None when any step is missing or the wrong type."""
    for key in keys:
        if isinstance(key, int):
            if not isinstance(obj, list) or len(obj) <= key:
                return None
        elif not isinstance(obj, dict):
            return None
        obj = obj[key] if isinstance(key, int) else obj.get(key)
    return obj


def _chat_body(ctx: ProbeContext, max_tokens: int = CHAT_MAX_TOKENS, **extra: Any) -> dict:
    return {
        "model": ctx.model,
        "messages": CHAT_MESSAGES,
        "max_tokens": max_tokens,
        **SAMPLING,
        **extra,
    }


def _check_usage(usage: Any, max_tokens: int, where: str = "usage") -> tuple[int, int, int]:
    """Check token accounting; return (prompt, completion, total)."""
    _expect(isinstance(usage, dict), f"expected a {where} object, got {_show(usage)}")
    p, c, t = (usage.get(k) for k in ("prompt_tokens", "completion_tokens", "total_tokens"))
    _expect(
        all(_is_count(v) for v in (p, c, t)),
        f"expected integer prompt/completion/total_tokens in {where}, got {_show(usage)}",
    )
    _expect(p > 0, f"expected {where}.prompt_tokens > 0, got {p}")
    _expect(
        t == p + c,
        f"expected {where}.total_tokens == prompt_tokens + completion_tokens "
        f"({p} + {c} = {p + c}), got {t}",
    )
    _expect(
        c <= max_tokens,
        f"expected {where}.completion_tokens <= max_tokens {max_tokens}, got {c}",
    )
    return p, c, t


def _reasoning_of(obj: dict) -> tuple[str | None, str | None]:
    """(reasoning text, field name) from a message or delta, accepting both field names."""
    for name in REASONING_FIELDS:
        value = obj.get(name)
        if isinstance(value, str) and value:
            return value, name
    for name in REASONING_FIELDS:
        if name in obj:
            return obj.get(name), name
    return None, None


def _describe_text(content: Any, reasoning: Any) -> str:
    def one(value: Any) -> str:
        if value is None:
            return "null"
        return f"{len(value)} chars" if isinstance(value, str) else _show(value, 30)

    return f"content {one(content)}, reasoning {one(reasoning)}"


def _check_some_text(content: Any, reasoning: Any, finish: Any, completion_tokens: int) -> None:
    """Generated text must show up in content or reasoning.

    Random-weight test models can stop at once; an empty answer is accepted only then.
    """
    has_text = any(isinstance(v, str) and v for v in (content, reasoning))
    if has_text or (finish == "stop" and completion_tokens <= 1):
        return
    raise ProbeFailure(
        "expected generated text in message content or reasoning, "
        f"got {_describe_text(content, reasoning)} "
        f"(finish_reason {_show(finish)}, completion_tokens {completion_tokens})"
    )


def _check_chat_completion(ctx: ProbeContext, body: Any, max_tokens: int) -> dict[str, Any]:
    """Validate a non-streaming chat completion; return the parts other checks use."""
    _expect(isinstance(body, dict), f"expected a JSON object, got {_show(body)}")
    _expect(
        body.get("object") == "chat.completion",
        f'expected object "chat.completion", got {_show(body.get("object"))}',
    )
    _expect(
        isinstance(body.get("id"), str) and body["id"],
        f"expected an id, got {_show(body.get('id'))}",
    )
    _expect(
        body.get("model") == ctx.model,
        f"expected model {_show(ctx.model)}, got {_show(body.get('model'))}",
    )
    choices = body.get("choices")
    _expect(
        isinstance(choices, list) and choices,
        f"expected a non-empty choices list, got {_show(choices)}",
    )
    message = choices[0].get("message") if isinstance(choices[0], dict) else None
    _expect(isinstance(message, dict), f"expected choices[0].message, got {_show(choices[0])}")
    _expect(
        message.get("role") == "assistant",
        f'expected choices[0].message.role "assistant", got {_show(message.get("role"))}',
    )
    finish = choices[0].get("finish_reason")
    _expect(
        finish in FINISH_REASONS,
        f"expected finish_reason in {FINISH_REASONS}, got {_show(finish)}",
    )
    p, c, t = _check_usage(body.get("usage"), max_tokens)
    content = message.get("content")
    _expect(
        content is None or isinstance(content, str),
        f"expected message.content to be a string or null, got {_show(content)}",
    )
    reasoning, reasoning_field = _reasoning_of(message)
    return {
        "content": content,
        "reasoning": reasoning,
        "reasoning_field": reasoning_field,
        "finish": finish,
        "usage": (p, c, t),
    }


def _post_chat(
    ctx: ProbeContext, max_tokens: int = CHAT_MAX_TOKENS, **extra: Any
) -> dict[str, Any]:
    body = ctx.client.post_json(CHAT_PATH, _chat_body(ctx, max_tokens, **extra))
    return _check_chat_completion(ctx, body, max_tokens)


def _usage_text(usage: tuple[int, int, int]) -> str:
    p, c, t = usage
    return f"usage {p}+{c}={t}"


def _expect_error(resp: requests.Response, ctx: ProbeContext, status: int) -> str:
    """Check an error answer: status and a JSON error body. Return its message."""
    ctx.client.expect_status(resp, status)
    try:
        body = resp.json()
    except ValueError:
        raise ProbeFailure(
            f"expected a JSON error body with HTTP {status}, got {snippet(resp.content)}"
        ) from None
    message = error_message(body)
    _expect(message, f"expected a JSON error object with a message, got {_show(body)}")
    return message


# --------------------------------------------------------------------------- probes


def probe_health(ctx: ProbeContext) -> str:
    resp = ctx.client.request("GET", "/health")
    ctx.client.expect_status(resp, 200, keyed=False)  # vLLM never guards /health
    return "HTTP 200"


def probe_version(ctx: ProbeContext) -> str:
    resp = ctx.client.request("GET", "/version")
    ctx.client.expect_status(resp, 200, keyed=False)  # open even with --api-key
    body = parse_json(resp)
    version = body.get("version") if isinstance(body, dict) else None
    _expect(
        isinstance(version, str) and version,
        f'expected {{"version": "<release>"}}, got {_show(body)}',
    )
    return f"vLLM {version}"


def _served_models(ctx: ProbeContext) -> list[dict]:
    body = ctx.client.get_json("/v1/models")
    _expect(
        isinstance(body, dict) and body.get("object") == "list",
        f'expected object "list" from /v1/models, got {_show(body)}',
    )
    data = body.get("data")
    _expect(isinstance(data, list), f"expected a data list from /v1/models, got {_show(data)}")
    return [m for m in data if isinstance(m, dict)]


def probe_models(ctx: ProbeContext) -> str:
    models = _served_models(ctx)
    ids = [m.get("id") for m in models]
    served = ", ".join(str(i) for i in ids) or "none"
    entry = next((m for m in models if m.get("id") == ctx.model), None)
    _expect(
        entry is not None, f"expected model {_show(ctx.model)} in /v1/models, got ids: {served}"
    )
    served_len = entry.get("max_model_len")
    if _is_count(served_len):
        ctx.served_max_model_len = served_len
    if ctx.max_model_len is not None:
        _expect(
            served_len == ctx.max_model_len,
            f"expected max_model_len {ctx.max_model_len} for {_show(ctx.model)}, "
            f"got {_show(served_len)}",
        )
    return f"serves {served}" + (f" (max_model_len {served_len})" if served_len is not None else "")


def probe_chat(ctx: ProbeContext) -> str:
    got = _post_chat(ctx)
    _check_some_text(got["content"], got["reasoning"], got["finish"], got["usage"][1])
    return (
        f"finish {got['finish']}; {_usage_text(got['usage'])}; "
        f"{_describe_text(got['content'], got['reasoning'])}"
    )


def _read_stream(resp: requests.Response, url: str, timeout: float) -> list[SSEEvent]:
    events: list[SSEEvent] = []
    try:
        for event in iter_events(split_lines(resp.iter_content(chunk_size=1024))):
            events.append(event)
    except requests.RequestException as exc:
        failure = request_failure(exc, url, timeout)
        raise ProbeFailure(f"stream broke after {len(events)} events: {failure.detail}") from exc
    return events


def probe_chat_stream(ctx: ProbeContext) -> str:
    body = _chat_body(ctx, stream=True, stream_options={"include_usage": True})
    start = time.perf_counter()
    resp = ctx.client.request("POST", CHAT_PATH, json_body=body, stream=True)
    with resp:
        ctx.client.expect_status(resp, 200)
        ctype = resp.headers.get("Content-Type", "")
        if not ctype.startswith("text/event-stream"):
            raise ProbeFailure(
                f"expected Content-Type text/event-stream, got {ctype or 'none'}: "
                f"{snippet(resp.content)}"
            )
        events = _read_stream(resp, ctx.client.url(CHAT_PATH), ctx.client.timeout)

    _expect(events, "expected SSE events, got an empty stream")
    merged = next((e for e in events if e.data_lines > 1), None)
    _expect(
        merged is None,
        "expected one `data:` line per event with a blank line between events, got "
        f"{merged.data_lines if merged else 0} `data:` lines in one event (SSE framing broken)",
    )
    done = [i for i, e in enumerate(events) if e.data.strip() == "[DONE]"]
    _expect(
        done,
        f"expected the stream to end with `data: [DONE]`, got {len(events)} events ending with "
        f"{snippet(events[-1].data, 80)}",
    )
    _expect(
        done[0] == len(events) - 1,
        f"expected `data: [DONE]` last, got {len(events) - 1 - done[0]} events after it",
    )

    chunks: list[dict] = []
    for n, event in enumerate(events[:-1], start=1):
        try:
            chunk = json.loads(event.data)
        except ValueError:
            raise ProbeFailure(
                f"expected JSON in event {n}, got {snippet(event.data, 80)}"
            ) from None
        _expect(isinstance(chunk, dict), f"expected a JSON object in event {n}, got {_show(chunk)}")
        message = error_message(chunk) if "error" in chunk else None
        _expect(message is None, f"expected chunks, got an error in event {n}: {message}")
        _expect(
            chunk.get("object") == "chat.completion.chunk",
            f'expected object "chat.completion.chunk" in event {n}, '
            f"got {_show(chunk.get('object'))}",
        )
        _expect(
            chunk.get("model") == ctx.model,
            f"expected model {_show(ctx.model)} in event {n}, got {_show(chunk.get('model'))}",
        )
        chunks.append(chunk)
    _expect(chunks, "expected chunks before `data: [DONE]`, got none")

    choice_chunks = [(i, c) for i, c in enumerate(chunks) if _dig(c, "choices", 0) is not None]
    _expect(choice_chunks, "expected chunks with choices, got none")
    role = _dig(choice_chunks[0][1], "choices", 0, "delta", "role")
    _expect(
        role == "assistant",
        f'expected delta.role "assistant" in the first chunk, got {_show(role)}',
    )

    content_text = reasoning_text = ""
    ttft: float | None = None
    for i, chunk in choice_chunks:
        delta = _dig(chunk, "choices", 0, "delta")
        if not isinstance(delta, dict):
            continue
        content = delta.get("content")
        reasoning, _ = _reasoning_of(delta)
        piece = (content if isinstance(content, str) else "") + (
            reasoning if isinstance(reasoning, str) else ""
        )
        content_text += content if isinstance(content, str) else ""
        reasoning_text += reasoning if isinstance(reasoning, str) else ""
        if piece and ttft is None:
            ttft = events[i].at - start

    finish = _dig(choice_chunks[-1][1], "choices", 0, "finish_reason")
    _expect(
        finish in FINISH_REASONS,
        f"expected finish_reason in {FINISH_REASONS} on the last choice chunk, got {_show(finish)}",
    )
    last = chunks[-1]
    _expect(
        last.get("usage") and not last.get("choices"),
        "expected a final usage chunk with empty choices (stream_options.include_usage), "
        f"got {_show(last, 120)}",
    )
    usage = _check_usage(last["usage"], CHAT_MAX_TOKENS, where="final chunk usage")
    _check_some_text(content_text, reasoning_text, finish, usage[1])
    ttft_text = f"ttft {ttft:.2f}s" if ttft is not None else "no text"
    return (
        f"{ttft_text}; {len(events)} events; finish {finish}; {_usage_text(usage)}; "
        f"content {len(content_text)} chars, reasoning {len(reasoning_text)} chars"
    )


def probe_completions(ctx: ProbeContext) -> str:
    body = ctx.client.post_json(
        "/v1/completions",
        {
            "model": ctx.model,
            "prompt": COMPLETION_PROMPT,
            "max_tokens": COMPLETION_MAX_TOKENS,
            **SAMPLING,
        },
    )
    _expect(isinstance(body, dict), f"expected a JSON object, got {_show(body)}")
    _expect(
        body.get("object") == "text_completion",
        f'expected object "text_completion", got {_show(body.get("object"))}',
    )
    _expect(
        body.get("model") == ctx.model,
        f"expected model {_show(ctx.model)}, got {_show(body.get('model'))}",
    )
    choice = _dig(body, "choices", 0)
    _expect(
        isinstance(choice, dict),
        f"expected a non-empty choices list, got {_show(body.get('choices'))}",
    )
    text = choice.get("text")
    _expect(isinstance(text, str), f"expected choices[0].text to be a string, got {_show(text)}")
    finish = choice.get("finish_reason")
    _expect(
        finish in FINISH_REASONS, f"expected finish_reason in {FINISH_REASONS}, got {_show(finish)}"
    )
    usage = _check_usage(body.get("usage"), COMPLETION_MAX_TOKENS)
    _check_some_text(text, None, finish, usage[1])
    return f"finish {finish}; {_usage_text(usage)}; text {len(text)} chars"


def probe_tokenize(ctx: ProbeContext) -> str:
    tok = ctx.client.post_json("/tokenize", {"model": ctx.model, "messages": CHAT_MESSAGES})
    count = tok.get("count") if isinstance(tok, dict) else None
    _expect(
        _is_count(count) and count > 0,
        f'expected {{"count": <n>, ...}} from /tokenize, got {_show(tok)}',
    )
    tokens = tok.get("tokens")
    if isinstance(tokens, list):
        _expect(len(tokens) == count, f"expected {count} tokens (its count), got {len(tokens)}")
    got = _post_chat(ctx, max_tokens=1)
    prompt_tokens = got["usage"][0]
    _expect(
        count == prompt_tokens,
        f"expected /tokenize count to equal the chat usage.prompt_tokens for the same messages, "
        f"got count {count} vs prompt_tokens {prompt_tokens}",
    )
    return f"{count} prompt tokens, same as chat usage"


def probe_reasoning(ctx: ProbeContext) -> str:
    parser = ctx.reasoning_parser
    if not parser:
        raise ProbeSkipped("no reasoning parser configured")

    on = _post_chat(ctx)
    cut_in_thinking = on["finish"] == "length" and on["content"] is None
    _expect(
        (isinstance(on["reasoning"], str) and on["reasoning"]) or cut_in_thinking,
        "thinking on: expected a non-empty reasoning (or reasoning_content) field, "
        'or finish_reason "length" with content null, '
        f"got {_describe_text(on['content'], on['reasoning'])}, "
        f"finish_reason {_show(on['finish'])} (is the server running --reasoning-parser {parser}?)",
    )

    off = _post_chat(ctx, chat_template_kwargs={"enable_thinking": False})
    content, reasoning = off["content"], off["reasoning"]
    if reasoning and content is None:
        hint = (
            "the deepseek_r1 parser treats all text before </think> as reasoning; "
            "Qwen3 needs --reasoning-parser qwen3"
            if parser == "deepseek_r1"
            else f"reasoning parser {parser!r} put the answer in reasoning"
        )
        raise ProbeFailure(
            "thinking off (enable_thinking false): expected the answer in content and "
            f"no reasoning, got content null and reasoning {len(reasoning)} chars; {hint}"
        )
    _expect(
        not reasoning,
        "thinking off (enable_thinking false): expected reasoning empty or absent, "
        f"got {_describe_text(content, reasoning)}",
    )
    _expect(
        isinstance(content, str),
        f"thinking off (enable_thinking false): expected content present, got {_show(content)}",
    )
    _check_some_text(content, None, off["finish"], off["usage"][1])
    field = on["reasoning_field"] or "reasoning"
    on_text = (
        f"{field} {len(on['reasoning'])} chars"
        if on["reasoning"]
        else "cut inside thinking (content null)"
    )
    return f"parser {parser}; thinking on: {on_text}; thinking off: content {len(content)} chars"


def probe_error_unknown_model(ctx: ProbeContext) -> str:
    body = {**_chat_body(ctx, max_tokens=1), "model": UNKNOWN_MODEL}
    resp = ctx.client.request("POST", CHAT_PATH, json_body=body)
    message = _expect_error(resp, ctx, 404)
    _expect(
        UNKNOWN_MODEL in message,
        f"expected the error message to name the model {UNKNOWN_MODEL!r}, got {snippet(message)}",
    )
    return f"404 {snippet(message, 100)}"


def _known_max_model_len(ctx: ProbeContext) -> tuple[int, str]:
    if ctx.max_model_len is not None:
        return ctx.max_model_len, "given"
    if ctx.served_max_model_len is None:
        entry = next((m for m in _served_models(ctx) if m.get("id") == ctx.model), None)
        served = entry.get("max_model_len") if entry else None
        if _is_count(served):
            ctx.served_max_model_len = served
    if ctx.served_max_model_len is None:
        raise ProbeSkipped("max_model_len unknown (not given, not served by /v1/models)")
    return ctx.served_max_model_len, "from /v1/models"


def probe_error_max_tokens(ctx: ProbeContext) -> str:
    limit, source = _known_max_model_len(ctx)
    resp = ctx.client.request("POST", CHAT_PATH, json_body=_chat_body(ctx, max_tokens=limit + 1))
    message = _expect_error(resp, ctx, 400)
    return f"max_tokens {limit + 1} > max_model_len {limit} ({source}): 400 {snippet(message, 100)}"


def probe_error_bad_json(ctx: ProbeContext) -> str:
    data = json.dumps({"model": ctx.model})[:-1].encode() + b', "messages": ['
    resp = ctx.client.request("POST", CHAT_PATH, data=data)
    message = _expect_error(resp, ctx, 400)
    return f"400 {snippet(message, 100)}"


def probe_auth(ctx: ProbeContext) -> str:
    client = ctx.client
    if not client.api_key:
        resp = client.request("GET", "/v1/models", key=None)
        if resp.status_code == 401:
            client.auth_required = True
            raise ProbeFailure(AUTH_REQUIRED)
        raise ProbeSkipped(
            f"no API key given (GET /v1/models without a key: HTTP {resp.status_code})"
        )

    wrong = "servekit-wrong-" + client.api_key[-4:]
    for label, key in (("without a key", None), ("with a wrong key", wrong)):
        resp = client.request("GET", "/v1/models", key=key)
        _expect(
            resp.status_code == 401,
            f"GET /v1/models {label}: expected HTTP 401, got {resp.status_code}"
            + (" (the endpoint is open to anyone)" if resp.status_code == 200 else ""),
        )
    resp = client.request("GET", "/v1/models")
    _expect(
        resp.status_code == 200,
        f"GET /v1/models with the API key: expected HTTP 200, got {resp.status_code}: "
        f"{describe_body(resp)}",
    )
    return "no key -> 401, wrong key -> 401, right key -> 200"


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def probe_metrics(ctx: ProbeContext) -> str:
    resp = ctx.client.request("GET", "/metrics")
    _expect(
        resp.status_code != 403,
        "expected 200 from /metrics, got 403: the server keeps its metrics private to the host "
        "and listed networks; add this machine to vllm_service_metrics_allowed_cidrs, or set "
        "vllm_service_metrics_public: true",
    )
    ctx.client.expect_status(resp, 200, keyed=False)  # open even with --api-key
    samples = [
        line
        for line in resp.text.splitlines()
        if line.startswith("vllm:") or line.startswith("vllm_")
    ]
    vllm_samples = [line for line in samples if line.startswith("vllm:")]
    _expect(
        vllm_samples,
        "expected Prometheus series named vllm:*, got none"
        + (f" (found {len(samples)} vllm_* series: an older naming?)" if samples else "")
        + f"; body starts {snippet(resp.content, 80)}",
    )
    label = f'model_name="{_label_value(ctx.model)}"'
    ours = [line for line in vllm_samples if label in line]
    if not ours:
        seen = sorted(
            {
                line.split('model_name="', 1)[1].split('"', 1)[0]
                for line in vllm_samples
                if 'model_name="' in line
            }
        )
        raise ProbeFailure(
            f"expected vllm:* series labelled {label}, got model_name values: "
            + (", ".join(seen) if seen else "none")
        )
    names = {line.split("{", 1)[0].split(" ", 1)[0] for line in ours}
    return f"{len(names)} vllm:* series, {len(ours)} samples labelled {label}"


def _percentile(sorted_values: list[float], pct: float) -> float:
    """Nearest-rank percentile of an already sorted, non-empty list."""
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def probe_concurrency(ctx: ProbeContext) -> str:
    client = ctx.client
    body = _chat_body(ctx, max_tokens=CONCURRENT_MAX_TOKENS)

    def one(_: int) -> tuple[float | None, str | None]:
        session = requests.Session()
        start = time.perf_counter()
        try:
            resp = client.request("POST", CHAT_PATH, json_body=body, session=session)
            if resp.status_code != 200:
                return None, f"HTTP {resp.status_code}: {describe_body(resp)}"
            answer = parse_json(resp)
            if not isinstance(answer, dict) or answer.get("object") != "chat.completion":
                return None, f"not a chat.completion: {_show(answer, 60)}"
            return time.perf_counter() - start, None
        except ProbeFailure as exc:
            return None, exc.detail
        except Exception as exc:  # a worker must not take the probe down
            return None, f"{type(exc).__name__}: {exc}"
        finally:
            session.close()

    wall = time.perf_counter()
    with ThreadPoolExecutor(max_workers=CONCURRENT_REQUESTS) as pool:
        outcomes = list(pool.map(one, range(CONCURRENT_REQUESTS)))
    wall = time.perf_counter() - wall
    latencies = sorted(lat for lat, _ in outcomes if lat is not None)
    errors = Counter(err for _, err in outcomes if err is not None)
    if errors:
        if client.auth_required or (not client.api_key and any("HTTP 401" in e for e in errors)):
            client.auth_required = True
            raise ProbeFailure(AUTH_REQUIRED)
        summary = "; ".join(f"{n}x {snippet(err, 100)}" for err, n in errors.most_common(3))
        raise ProbeFailure(
            f"expected {CONCURRENT_REQUESTS}/{CONCURRENT_REQUESTS} parallel chats to answer "
            f"HTTP 200, got {len(latencies)}: {summary}"
        )
    return (
        f"{CONCURRENT_REQUESTS}/{CONCURRENT_REQUESTS} ok; "
        f"latency p50 {_percentile(latencies, 50):.2f}s p95 {_percentile(latencies, 95):.2f}s "
        f"max {latencies[-1]:.2f}s; wall {wall:.2f}s"
    )


# --------------------------------------------------------------------------- running

ProbeFn = Callable[[ProbeContext], str]

# (name, function, needs the API key): order is the run order.
PROBES: tuple[tuple[str, ProbeFn, bool], ...] = (
    ("health", probe_health, False),
    ("version", probe_version, False),
    ("models", probe_models, True),
    ("chat", probe_chat, True),
    ("chat_stream", probe_chat_stream, True),
    ("completions", probe_completions, True),
    ("tokenize", probe_tokenize, True),
    ("reasoning", probe_reasoning, True),
    ("error_unknown_model", probe_error_unknown_model, True),
    ("error_max_tokens", probe_error_max_tokens, True),
    ("error_bad_json", probe_error_bad_json, True),
    ("auth", probe_auth, False),
    ("metrics", probe_metrics, False),
    ("concurrency", probe_concurrency, True),
)
PROBE_NAMES: tuple[str, ...] = tuple(name for name, _, _ in PROBES)


def normalize_base_url(base_url: str) -> str:
    """``host:8000/v1/`` -> ``http://host:8000``: probes address routes from the server root."""
    url = base_url.strip().rstrip("/")
    if "://" not in url:
        url = "http://" + url
    if url.endswith("/v1"):
        url = url[: -len("/v1")]
    return url


def run_probe(name: str, fn: ProbeFn, ctx: ProbeContext, needs_key: bool = False) -> ProbeResult:
    """Run one probe; whatever happens, return a result."""
    start = time.perf_counter()

    def result(ok: bool, detail: str, skipped: bool = False) -> ProbeResult:
        return ProbeResult(name, ok, detail, round(time.perf_counter() - start, 4), skipped)

    if ctx.unreachable:
        return result(False, f"not attempted: {ctx.unreachable}")
    if needs_key and ctx.client.auth_required and not ctx.client.api_key:
        return result(False, AUTH_REQUIRED)
    try:
        return result(True, fn(ctx))
    except ProbeSkipped as exc:
        return result(True, exc.reason, skipped=True)
    except ProbeFailure as exc:
        if exc.unreachable:
            ctx.unreachable = exc.detail
        return result(False, exc.detail)
    except requests.RequestException as exc:
        return result(False, request_failure(exc, ctx.client.base_url, ctx.client.timeout).detail)
    except Exception as exc:  # a probe never raises
        return result(False, f"probe error: {type(exc).__name__}: {exc}")


def _select(checks: Sequence[str] | None) -> list[tuple[str, ProbeFn, bool]]:
    if checks is None:
        return list(PROBES)
    unknown = [c for c in checks if c not in PROBE_NAMES]
    if unknown:
        raise ValueError(f"unknown probe(s): {', '.join(unknown)}; known: {', '.join(PROBE_NAMES)}")
    return [p for p in PROBES if p[0] in checks]


def run_probes(
    base_url: str,
    model: str,
    api_key: str | None = None,
    max_model_len: int | None = None,
    timeout: float = 60.0,
    target: str | None = None,
    reasoning_parser: str | None = None,
    checks: Sequence[str] | None = None,
) -> ProbeRun:
    """Probe one vLLM endpoint and return every result (probes never raise).

    ``base_url`` is the server root (a trailing ``/v1`` is dropped). ``reasoning_parser``
    names the server's ``--reasoning-parser``; without it the ``reasoning`` probe is
    skipped. ``checks`` limits the run to the named probes (see ``PROBE_NAMES``).
    """
    selected = _select(checks)
    url = normalize_base_url(base_url)
    run = ProbeRun(
        target=target or url,
        base_url=url,
        model=model,
        started_at=datetime.now(UTC).isoformat(timespec="seconds"),
    )
    client = Client(url, api_key or None, timeout)
    ctx = ProbeContext(client, model, max_model_len, reasoning_parser)
    start = time.perf_counter()
    try:
        for name, fn, needs_key in selected:
            run.results.append(run_probe(name, fn, ctx, needs_key))
    finally:
        client.close()
    run.seconds = round(time.perf_counter() - start, 4)
    return run


def probe_targets(
    targets: list[tuple[str, str]],
    model: str,
    api_key: str | None = None,
    max_model_len: int | None = None,
    timeout: float = 60.0,
    reasoning_parser: str | None = None,
    checks: Sequence[str] | None = None,
) -> list[ProbeRun]:
    """Probe several ``(target name, url)`` pairs in parallel; runs come back in input order."""
    _select(checks)  # reject unknown names before starting anything
    if not targets:
        return []

    def one(pair: tuple[str, str]) -> ProbeRun:
        name, url = pair
        return run_probes(
            url,
            model,
            api_key=api_key,
            max_model_len=max_model_len,
            timeout=timeout,
            target=name,
            reasoning_parser=reasoning_parser,
            checks=checks,
        )

    with ThreadPoolExecutor(max_workers=min(len(targets), 32)) as pool:
        return list(pool.map(one, targets))
