"""HTTP plumbing for the probes: one client per endpoint, failures as exceptions.

Every request error is turned into a :class:`ProbeFailure` whose detail names the URL and
the error, so a probe body can simply let it propagate; the runner turns it into a
failed :class:`~servekit.probe.result.ProbeResult`.
"""

from __future__ import annotations

import json
import re
from typing import Any

import requests
import urllib3.exceptions

AUTH_REQUIRED = "server requires an API key; pass --api-key"

# Sentinel for "send the configured key, if any".
DEFAULT_KEY = object()

_CONNECT_TIMEOUT_CAP = 10.0
_SNIPPET = 200


class ProbeFailure(Exception):
    """A probe saw something wrong. ``detail`` is the human-readable reason."""

    def __init__(self, detail: str, *, unreachable: bool = False) -> None:
        super().__init__(detail)
        self.detail = detail
        self.unreachable = unreachable


class ProbeSkipped(Exception):
    """A probe does not apply to this endpoint or configuration."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def snippet(text: str | bytes, limit: int = _SNIPPET) -> str:
    """A one-line, bounded excerpt of a body for failure details."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = " ".join(text.split())
    if not text:
        return "(empty body)"
    return text if len(text) <= limit else text[: limit - 1] + "…"


def error_message(body: Any) -> str | None:
    """The message of an OpenAI-style error body, tolerant of the shapes vLLM has used.

    ``{"error": {"message": ...}}`` (current), ``{"error": "Unauthorized"}`` (auth),
    ``{"object": "error", "message": ...}`` (older releases), ``{"detail": ...}`` (FastAPI).
    """
    if not isinstance(body, dict):
        return None
    err = body.get("error")
    if isinstance(err, dict):
        msg = err.get("message")
        if msg is not None:
            kind = err.get("type")
            return f"{kind}: {msg}" if kind else str(msg)
    if isinstance(err, str) and err:
        return err
    msg = body.get("message")
    if isinstance(msg, str) and msg:
        kind = body.get("type")
        return f"{kind}: {msg}" if kind else msg
    detail = body.get("detail")
    if detail:
        return detail if isinstance(detail, str) else json.dumps(detail, ensure_ascii=False)
    return None


def describe_body(resp: requests.Response) -> str:
    """The error message of a response when it has one, else an excerpt of its body."""
    try:
        msg = error_message(resp.json())
    except ValueError:
        msg = None
    return snippet(msg) if msg else snippet(resp.content)


def _describe_exception(exc: BaseException) -> str:
    """Short reason for a requests exception, without urllib3's object reprs."""
    text = str(exc)
    match = re.search(r"\[Errno -?\d+\][^'\")]*", text)
    if match:
        return match.group(0).strip()
    if "timed out" in text.lower():
        return "timed out"
    for marker in ("RemoteDisconnected(", "ProtocolError("):
        if marker in text:
            inner = text.split(marker, 1)[1]
            return snippet(inner.strip("'\"() "), 120)
    return snippet(text, 160)


def _is_connect_failure(exc: BaseException) -> bool:
    """True when the connection could not be opened at all (refused, DNS, connect timeout)."""
    if isinstance(exc, requests.exceptions.ConnectTimeout):
        return True
    seen: set[int] = set()
    stack: list[Any] = [exc]
    while stack:
        cur = stack.pop()
        if cur is None or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(
            cur, urllib3.exceptions.NewConnectionError | urllib3.exceptions.ConnectTimeoutError
        ):
            return True
        if isinstance(cur, BaseException):
            stack.extend([cur.__cause__, cur.__context__, getattr(cur, "reason", None)])
            stack.extend(a for a in cur.args if isinstance(a, BaseException))
    return False


def request_failure(exc: requests.RequestException, url: str, timeout: float) -> ProbeFailure:
    """Turn a requests exception into a failure naming the URL and the error."""
    if isinstance(exc, requests.exceptions.ReadTimeout):
        return ProbeFailure(f"no answer from {url} within {timeout:g}s")
    if _is_connect_failure(exc):
        reason = _describe_exception(exc)
        return ProbeFailure(f"cannot connect to {url}: {reason}", unreachable=True)
    if isinstance(
        exc, requests.exceptions.ConnectionError | requests.exceptions.ChunkedEncodingError
    ):
        return ProbeFailure(f"connection to {url} broke: {_describe_exception(exc)}")
    return ProbeFailure(
        f"request to {url} failed: {type(exc).__name__}: {_describe_exception(exc)}"
    )


class Client:
    """Requests against one vLLM endpoint, with the configured key and timeouts."""

    def __init__(self, base_url: str, api_key: str | None, timeout: float) -> None:
        self.base_url = base_url
        self.api_key = api_key
        self.timeout = timeout
        self.session = requests.Session()
        # Set once an unauthenticated request got 401: the server wants a key we do not have.
        self.auth_required = False

    def close(self) -> None:
        self.session.close()

    def url(self, path: str) -> str:
        return self.base_url + path

    def timeouts(self) -> tuple[float, float]:
        return (min(self.timeout, _CONNECT_TIMEOUT_CAP), self.timeout)

    def headers(self, key: Any = DEFAULT_KEY) -> dict[str, str]:
        if key is DEFAULT_KEY:
            key = self.api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        data: bytes | None = None,
        key: Any = DEFAULT_KEY,
        stream: bool = False,
        session: requests.Session | None = None,
    ) -> requests.Response:
        """Send one request; raise :class:`ProbeFailure` if no HTTP answer came back."""
        url = self.url(path)
        headers = self.headers(key)
        if data is not None:
            headers["Content-Type"] = "application/json"
        try:
            return (session or self.session).request(
                method,
                url,
                json=json_body,
                data=data,
                headers=headers,
                timeout=self.timeouts(),
                stream=stream,
                allow_redirects=False,
            )
        except requests.RequestException as exc:
            raise request_failure(exc, url, self.timeout) from exc

    def expect_status(self, resp: requests.Response, expected: int, *, keyed: bool = True) -> None:
        """Fail unless ``resp`` has status ``expected``.

        A 401 on a route that vLLM guards with ``--api-key`` (``keyed``) gets a specific
        detail: either the server needs a key and none was given, or it rejected the given one.
        """
        if resp.status_code == expected:
            return
        what = f"{resp.request.method} {_path_of(resp.url, self.base_url)}"
        if resp.status_code == 401 and keyed and expected != 401:
            if not self.api_key:
                self.auth_required = True
                raise ProbeFailure(AUTH_REQUIRED)
            raise ProbeFailure(
                f"{what}: the server rejected the API key (HTTP 401: {describe_body(resp)})"
            )
        raise ProbeFailure(
            f"{what}: expected HTTP {expected}, got {resp.status_code}: {describe_body(resp)}"
        )

    def get_json(self, path: str, **kwargs: Any) -> Any:
        resp = self.request("GET", path, **kwargs)
        self.expect_status(resp, 200)
        return parse_json(resp)

    def post_json(self, path: str, body: Any, **kwargs: Any) -> Any:
        resp = self.request("POST", path, json_body=body, **kwargs)
        self.expect_status(resp, 200)
        return parse_json(resp)


def parse_json(resp: requests.Response) -> Any:
    try:
        return resp.json()
    except ValueError:
        path = resp.request.path_url if resp.request is not None else resp.url
        raise ProbeFailure(
            f"{path}: expected a JSON body, "
            f"got {resp.headers.get('Content-Type', 'no content type')}: {snippet(resp.content)}"
        ) from None


def _path_of(url: str, base_url: str) -> str:
    return url[len(base_url) :] if url.startswith(base_url) else url
