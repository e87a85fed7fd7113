"""A real OpenAI-compatible chat-completions endpoint on 127.0.0.1 for the tests that talk to one."""

from __future__ import annotations

import json
import threading
import time
from collections import deque
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ChatServer:
    """An OpenAI-compatible `/v1/chat/completions` endpoint that records each request and plays queued replies.

    A reply is `(status, body)` (a dict is sent as JSON, bytes as they are), `("sleep", seconds)` (then `default`),
    `("hang", None)` (no answer until the server closes) or `("trickle", seconds)` (the headers, then one byte of
    the body every `seconds`, never the end); when the queue is empty it answers `default`.
    """

    def __init__(self):
        self.requests: list[dict] = []
        self.replies: deque = deque()
        self.default = (200, self.completion("an enhanced prompt"))
        self.closing = threading.Event()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep the test output clean
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                server.requests.append(
                    {"path": self.path, "headers": {k.lower(): v for k, v in self.headers.items()}, "body": body}
                )
                status, payload = server.replies.popleft() if server.replies else server.default
                if status == "sleep":
                    time.sleep(payload)
                    status, payload = server.default
                if status == "hang":
                    server.closing.wait()
                    return
                if status == "trickle":
                    self.trickle(payload)
                    return
                if callable(payload):
                    payload = payload(self.headers)
                data = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout test)
                    pass

            def trickle(self, seconds):
                try:
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", "1000000")
                    self.end_headers()
                    while not server.closing.wait(seconds):
                        self.wfile.write(b" ")
                        self.wfile.flush()
                except (BrokenPipeError, ConnectionResetError):
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_port}/v1"

    @staticmethod
    def completion(content: str) -> dict:
        return {
            "id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": "test-model",
            "choices": [{"index": 0, "finish_reason": "stop", "message": {"role": "assistant", "content": content}}],
        }  # fmt: skip

    def close(self):
        self.closing.set()  # ends the hanging and trickling replies
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join(timeout=5)
