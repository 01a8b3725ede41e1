"""A small, strict reader for the server-sent events that vLLM streams.

vLLM frames each chunk as ``data: {json}`` followed by a blank line and ends with
``data: [DONE]``. The reader keeps what a checker needs to judge the framing: how many
``data:`` lines each event had (more than one means a blank line was missing, which a
standard SSE client would join into one unparsable event) and when each event arrived.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass


@dataclass
class SSEEvent:
    data: str  # the data lines joined with "\n", as an SSE client sees them
    data_lines: int
    at: float  # time.perf_counter() when the event was complete
    terminated: bool = True  # False for a trailing event that the stream cut before its blank line


def split_lines(chunks: Iterable[bytes]) -> Iterator[str]:
    """Yield lines (without their end-of-line) from raw byte chunks, decoding UTF-8 per line.

    Handles ``\\n`` and ``\\r\\n`` endings and lines split across chunks. A trailing
    partial line is yielded as-is at the end.
    """
    buf = b""
    for chunk in chunks:
        if not chunk:
            continue
        buf += chunk
        while True:
            nl = buf.find(b"\n")
            if nl < 0:
                break
            line, buf = buf[:nl], buf[nl + 1 :]
            if line.endswith(b"\r"):
                line = line[:-1]
            yield line.decode("utf-8", errors="replace")
    if buf:
        yield buf.decode("utf-8", errors="replace")


def iter_events(lines: Iterable[str]) -> Iterator[SSEEvent]:
    """Group lines into events at blank lines. Comments (``:``) and other fields are ignored."""
    data: list[str] = []
    for line in lines:
        if line == "":
            if data:
                yield SSEEvent("\n".join(data), len(data), time.perf_counter())
                data = []
            continue
        if line.startswith(":"):
            continue
        field, _, value = line.partition(":")
        if field != "data":
            continue
        data.append(value[1:] if value.startswith(" ") else value)
    if data:
        yield SSEEvent("\n".join(data), len(data), time.perf_counter(), terminated=False)
