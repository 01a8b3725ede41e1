"""A small streaming client for the serving smoke: time to first token and output tokens/s.

Each request streams a chat completion with ``ignore_eos`` (every request generates exactly
``max_tokens`` tokens, so runs are comparable) and ``stream_options.include_usage`` (the token
count comes from the server, not from counting chunks). Text in ``reasoning`` or
``reasoning_content`` (Qwen3 thinking) counts as output like ``content``.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import requests

from servekit.probe.sse import iter_events, split_lines

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."
TEXT_FIELDS = ("content", "reasoning", "reasoning_content")
# Events parsed from one socket read are stamped microseconds apart; a new read of a stream
# that arrives token by token comes at least this long after the previous one.
SAME_READ_S = 0.001


@dataclass
class Stream:
    """One streamed request, times in seconds from the moment it was sent."""

    ttft: float  # first chunk that carries generated text
    last: float  # last chunk that carries generated text
    total: float  # end of the response
    tokens: int  # usage.completion_tokens
    arrivals: int = 0  # reads that brought text: arrivals at least SAME_READ_S apart

    @property
    def decode_tokens_per_s(self) -> float | None:
        """Tokens after the first, over the time after the first (the decode rate).

        None when the text did not arrive token by token: a server that outruns the client
        delivers many chunks in one read, and a rate over such bursts measures the reads.
        """
        if self.tokens < 2 or self.last <= self.ttft or self.arrivals < max(2, self.tokens // 2):
            return None
        return (self.tokens - 1) / (self.last - self.ttft)

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.total if self.total > 0 else None


def chunk_has_text(chunk: dict) -> bool:
    for choice in chunk.get("choices") or []:
        delta = choice.get("delta") or {}
        if any(isinstance(delta.get(k), str) and delta.get(k) for k in TEXT_FIELDS):
            return True
    return False


def measure(events: Iterable[tuple[float, str]], sent_at: float, end_at: float) -> Stream:
    """A :class:`Stream` from ``(arrival time, data)`` SSE events of one request."""
    first = last = None
    tokens = None
    arrivals = 0
    for at, data in events:
        if data.strip() == "[DONE]":
            continue
        chunk = json.loads(data)
        if chunk_has_text(chunk):
            if last is None or at - last >= SAME_READ_S:
                arrivals += 1
            first = at if first is None else first
            last = at
        usage = chunk.get("usage")
        if isinstance(usage, dict) and isinstance(usage.get("completion_tokens"), int):
            tokens = usage["completion_tokens"]
    if first is None or last is None:
        raise RuntimeError("the stream carried no generated text")
    if tokens is None:
        raise RuntimeError("the stream carried no usage (stream_options.include_usage)")
    return Stream(first - sent_at, last - sent_at, end_at - sent_at, tokens, arrivals)


def request_body(model: str, max_tokens: int) -> dict:
    return {
        "model": model,
        "messages": [{"role": "user", "content": PROMPT}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "ignore_eos": True,
        "stream": True,
        "stream_options": {"include_usage": True},
    }


def stream_once(
    url: str,
    model: str,
    max_tokens: int,
    *,
    api_key: str | None = None,
    session: requests.Session | None = None,
    timeout: float = 300,
) -> Stream:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    http = session or requests.Session()
    sent_at = time.perf_counter()
    resp = http.post(
        f"{url.rstrip('/')}/v1/chat/completions",
        json=request_body(model, max_tokens),
        headers=headers,
        stream=True,
        timeout=timeout,
    )
    with resp:
        if resp.status_code != 200:
            raise RuntimeError(f"HTTP {resp.status_code}: {resp.text[:300]}")
        events = [
            (e.at, e.data) for e in iter_events(split_lines(resp.iter_content(chunk_size=None)))
        ]
    return measure(events, sent_at, time.perf_counter())


def concurrent(
    url: str, model: str, max_tokens: int, clients: int, *, api_key: str | None = None
) -> tuple[list[Stream], float]:
    """``clients`` requests released at once; their streams and the wall time of the batch."""
    barrier = threading.Barrier(clients + 1)

    def one(_: int) -> Stream:
        with requests.Session() as session:
            barrier.wait()
            return stream_once(url, model, max_tokens, api_key=api_key, session=session)

    with ThreadPoolExecutor(max_workers=clients) as pool:
        futures = [pool.submit(one, i) for i in range(clients)]
        barrier.wait()
        start = time.perf_counter()
        streams = [f.result() for f in futures]
        wall = time.perf_counter() - start
    return streams, wall


def aggregate_tokens_per_s(streams: Sequence[Stream], wall: float) -> float:
    return sum(s.tokens for s in streams) / wall if wall > 0 else 0.0


def server_version(url: str, timeout: float = 10) -> str | None:
    try:
        resp = requests.get(f"{url.rstrip('/')}/version", timeout=timeout)
        return resp.json().get("version") if resp.status_code == 200 else None
    except (requests.RequestException, ValueError, AttributeError):
        return None
