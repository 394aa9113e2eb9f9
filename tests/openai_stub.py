"""A stand-in OpenAI-compatible server for quick tests (a fake at the process boundary only):
streamed chat completions with fixed answers, and ``/v1/moderations`` flagging the inputs
that contain given words. The real sampler and the real moderation client talk to it over
HTTP; the real vLLM is in the slow tests."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

HOLD_LIMIT_S = 600.0  # a held stream goes on after this, so a failing test cannot hang it


class StubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self) -> None:
        super().__init__(("127.0.0.1", 0), StubHandler)
        # Answer i of a request seeded s is answers[(s + i) % 2]: with n=2 and seed 0, answer
        # A is answers[0] and B answers[1]; a duel's two requests (s, s + 1) agree with that.
        self.answers = ["Apples are red.", "Bananas are yellow."]
        self.sides: list[str] | None = None  # when set, answer i is sides[i] whatever the seed
        self.flag_words: dict[str, str] = {}  # word -> category: inputs holding it are flagged
        self.moderation_status = 200
        self.hits: Counter[str] = Counter()
        self.moderated: list[str] = []  # every input the moderation endpoint saw
        # A stream pauses after its `hold_after`-th chunk until `release` is set (or ten minutes
        # has passed): a test catches answer B half written, A complete (n=2 streams A first).
        self.hold_after: int | None = None
        self.release = threading.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class StubHandler(BaseHTTPRequestHandler):
    server: StubServer

    def log_message(self, *args: Any) -> None:
        pass

    def _json(self, status: int, body: Any) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self) -> None:
        self.server.hits[self.path] += 1
        self._json(200, {}) if self.path == "/health" else self._json(404, {"error": "no"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        self.server.hits[self.path] += 1
        if self.path.endswith("/chat/completions"):
            self._stream(body)
        elif self.path.endswith("/moderations"):
            self._moderate(body)
        elif self.path == "/tokenize":
            count = sum(len(m["content"].split()) for m in body.get("messages", []))
            self._json(200, {"count": count})
        else:
            self._json(404, {"error": f"no {self.path}"})

    def _stream(self, body: dict) -> None:
        n, seed = body.get("n", 1), body.get("seed", 0)
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
        sent = 0
        for i in range(n):
            text = (self.server.sides[i] if self.server.sides
                    else self.server.answers[(seed + i) % len(self.server.answers)])
            for word, last in _words(text):
                choice = {"index": i, "delta": {"content": word},
                          "finish_reason": "stop" if last else None}
                chunk = {"id": "stub", "object": "chat.completion.chunk", "created": 0,
                         "model": body.get("model", "stub"), "choices": [choice]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                sent += 1
                if sent == self.server.hold_after:
                    self.wfile.flush()
                    self.server.release.wait(HOLD_LIMIT_S)
        self.wfile.write(b"data: [DONE]\n\n")

    def _moderate(self, body: dict) -> None:
        if self.server.moderation_status != 200:
            self._json(self.server.moderation_status, {"error": "stub says no"})
            return
        inputs = body["input"] if isinstance(body["input"], list) else [body["input"]]
        self.server.moderated.extend(inputs)
        results = []
        for text in inputs:
            hit = {cat for word, cat in self.server.flag_words.items() if word in text.lower()}
            results.append({"flagged": bool(hit), "categories": {c: True for c in hit},
                            "category_scores": {c: 0.99 for c in hit}})
        self._json(200, {"id": "modr-stub", "model": "stub", "results": results})


def _words(text: str) -> Iterator[tuple[str, bool]]:
    words = text.split(" ")
    for i, word in enumerate(words):
        yield (word if i == 0 else " " + word), i == len(words) - 1


@contextmanager
def stub_server() -> Iterator[StubServer]:
    server = StubServer()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.shutdown()
        server.server_close()
