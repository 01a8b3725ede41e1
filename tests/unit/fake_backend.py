"""A stand-in for a vLLM server behind the gateway: the routes the gateway and the rolling
update touch, and switches for the ways a server fails.

``mode`` (settable while it runs): ``ok``; ``unhealthy`` (/health answers 503, requests still
work); ``drop`` (POSTs: the connection is closed without an answer, as by a crash);
``hang`` (POSTs never answer; ``hung`` is set while one waits, ``cut`` once the client closed
it); ``error`` (chat completions answer 500).

A stream asked for with ``"lockstep": true`` is written a chunk at a time: the next chunk only
once the client has read this one and said so (``acks.release()``); ``acked`` records, chunk by
chunk, whether that came (False: the chunk never reached the client while the server waited).
"""

from __future__ import annotations

import json
import select
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODEL = "Qwen3-8B"
#: Seconds a lockstep stream waits for the client to read a chunk before it writes the next.
LOCKSTEP_WAIT_S = 10


class _QuietServer(ThreadingHTTPServer):
    def handle_error(self, request, client_address) -> None:
        """HAProxy's health checks reset their connections: not an error here."""


class FakeBackend:
    def __init__(self, name: str) -> None:
        self.name = name
        self.posts = 0
        self._release = threading.Event()
        self.reset()
        backend = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:
                pass

            def _send(self, code: int, body: str, ctype: str = "application/json") -> None:
                data = body.encode()
                self.send_response(code)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path == "/health":
                    self._send(503 if backend.mode == "unhealthy" else 200, "", "text/plain")
                elif self.path.startswith("/metrics"):
                    self._send(200, f'vllm:num_requests_running{{model_name="{MODEL}"}} 0\n')
                elif self.path == "/v1/models":
                    self._send(200, json.dumps({"object": "list", "data": [{"id": MODEL}]}))
                else:
                    self._send(200, json.dumps({"server": backend.name, "path": self.path}))

            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                body = json.loads(self.rfile.read(length) or b"{}")
                backend.posts += 1
                if backend.mode == "drop":
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                if backend.mode == "hang":
                    backend.hung.set()
                    while not backend._release.wait(0.05):
                        if self._closed_by_client():
                            backend.cut.set()
                            break
                    self.close_connection = True
                    return
                if backend.mode == "error":
                    self._send(500, json.dumps({"error": {"message": "EngineCore died"}}))
                    return
                if body.get("stream"):
                    self.send_response(200)
                    self.send_header("Content-Type", "text/event-stream")
                    self.send_header("Transfer-Encoding", "chunked")
                    self.end_headers()
                    for i in range(int(body.get("chunks", 2))):
                        self._chunk(f'data: {{"i": {i}, "server": "{backend.name}"}}\n\n')
                        if body.get("lockstep"):
                            backend.acked.append(backend.acks.acquire(timeout=LOCKSTEP_WAIT_S))
                    self._chunk("data: [DONE]\n\n")
                    self.wfile.write(b"0\r\n\r\n")
                    return
                answer = {"object": "chat.completion", "model": MODEL, "server": backend.name}
                self._send(200, json.dumps(answer))

            def _closed_by_client(self) -> bool:
                try:
                    readable, _, _ = select.select([self.connection], [], [], 0)
                    return bool(readable) and not self.connection.recv(1, socket.MSG_PEEK)
                except OSError:  # reset
                    return True

            def _chunk(self, text: str) -> None:
                data = text.encode()
                self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
                self.wfile.flush()

        self.server = _QuietServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.port = self.server.server_address[1]
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def reset(self) -> None:
        """Healthy, with fresh records; a request still hanging here is let go."""
        self.mode = "ok"
        self._release.set()
        self._release.clear()
        self.hung = threading.Event()
        self.cut = threading.Event()
        self.acks = threading.Semaphore(0)
        self.acked: list[bool] = []

    def start(self) -> FakeBackend:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._release.set()
        self.server.shutdown()
        self.server.server_close()
