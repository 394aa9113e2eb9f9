"""A stand-in OpenAI-compatible server for quick tests (a fake at the process boundary only):
streamed chat completions with fixed answers, and ``/v1/moderations`` flagging the inputs
that contain given words. The real sampler and the real moderation client talk to it over
HTTP; the real vLLM is in the slow tests.

As a vLLM replica it answers like vLLM 0.32's OpenAI server (read from its source,
``entrypoints/openai/models/serving.py``): ``GET /v1/models`` lists ``base`` and each LoRA
adapter with its path as ``root``; ``POST /v1/load_lora_adapter`` is 200 with a text body,
400 for a name already loaded, 404 for a folder that does not exist; ``POST
/v1/unload_lora_adapter`` is 200, or 404 for an unknown name; a chat completion for a model
it does not serve is 404. :meth:`StubServer.kill` ends it as SIGKILL ends vLLM: streams cut
off (connection reset), new connections refused; a new ``stub_server(port=...)`` is the same
replica restarted, with no adapters. With ``model_name`` set it serves its model under that
name instead of ``base``, as a vLLM started with ``--served-model-name`` does (a champion
engine). Asked for ``return_token_ids``, a whole (not streamed) answer i comes as the one
token 1000 + i after the prompt [1, 2, 3]; ``POST /v1/completions`` with ``prompt_logprobs``
scores such a token −1 under ``base`` and −1 + ``rewards[i]`` under any other model, so that
answer i's implicit reward is ``rewards[i]``.
"""

from __future__ import annotations

import json
import socket
import struct
import threading
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

HOLD_LIMIT_S = 600.0  # a held stream goes on after this, so a failing test cannot hang it


class StubServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, port: int = 0) -> None:
        super().__init__(("127.0.0.1", port), StubHandler)
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
        # 0: before the first chunk, so the pair has no text yet.
        self.hold_after: int | None = None
        self.release = threading.Event()
        self.model_name = "base"  # the name its model is served under (--served-model-name)
        self.chat_status = 200  # another status: every chat completion fails with it
        self.adapters: dict[str, str] = {}  # LoRA name -> path, as vLLM's /v1/models lists
        self.refuse: set[str] = set()  # adapter names a load is refused for (400)
        self.served: Counter[str] = Counter()  # chat completion requests per model
        self.requests: list[dict] = []  # each chat completion request's body
        self.rewards: list[float] = []  # answer i's log-ratio adapter vs base (see above)
        self.token_ids = True  # False: return_token_ids is ignored, as by an older server
        self.dead = threading.Event()

    def kill(self) -> None:
        """Die as a SIGKILLed vLLM does: open streams are cut off, new connections refused."""
        self.dead.set()
        self.shutdown()
        self.server_close()

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a stream cut off by kill()

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

    def _error(self, status: int, kind: str, message: str) -> None:
        """vLLM's error body."""
        self._json(status, {"error": {"message": message, "type": kind, "param": None,
                                      "code": status}})

    def do_GET(self) -> None:
        self.server.hits[self.path] += 1
        if self.path == "/health":
            self._json(200, {})
        elif self.path == "/v1/models":
            cards = [{"id": self.server.model_name, "object": "model", "root": "/models/stub",
                      "parent": None}]
            cards += [{"id": name, "object": "model", "root": path, "parent": "base"}
                      for name, path in list(self.server.adapters.items())]
            self._json(200, {"object": "list", "data": cards})
        else:
            self._json(404, {"error": "no"})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
        self.server.hits[self.path] += 1
        if self.path.endswith("/chat/completions"):
            model = body.get("model", "base")
            if model != self.server.model_name and model not in self.server.adapters:
                self._error(404, "NotFoundError", f"The model `{model}` does not exist.")
                return
            if self.server.chat_status != 200:
                self._error(self.server.chat_status, "InternalServerError", "stub fails")
                return
            self.server.served[model] += 1
            self.server.requests.append(body)
            self._stream(body)
        elif self.path == "/v1/completions":
            self._score(body)
        elif self.path == "/v1/load_lora_adapter":
            self._load(body)
        elif self.path == "/v1/unload_lora_adapter":
            name = body.get("lora_name")
            if self.server.adapters.pop(name, None) is None:
                self._error(404, "NotFoundError", f"The lora adapter '{name}' cannot be found.")
            else:
                self._text(f"Success: LoRA adapter '{name}' removed successfully.")
        elif self.path.endswith("/moderations"):
            self._moderate(body)
        elif self.path == "/tokenize":
            count = sum(len(m["content"].split()) for m in body.get("messages", []))
            self._json(200, {"count": count})
        else:
            self._json(404, {"error": f"no {self.path}"})

    def _text(self, text: str) -> None:
        data = text.encode()
        self.send_response(200)
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def _load(self, body: dict) -> None:
        name, path = body.get("lora_name"), body.get("lora_path")
        if not name or not path:
            self._error(400, "InvalidUserInput",
                        "Both 'lora_name' and 'lora_path' must be provided.")
        elif name == "base":
            self._error(400, "InvalidUserInput",
                        f"The lora adapter '{name}' conflicts with a served base model.")
        elif name in self.server.adapters:
            self._error(400, "InvalidUserInput",
                        f"The lora adapter '{name}' has already been loaded. If you want to "
                        "load the adapter in place, set 'load_inplace' to True.")
        elif not Path(path).is_dir():
            self._error(404, "NotFoundError", f"Loading lora {name} failed: No adapter found "
                                              f"for {path}")
        elif name in self.server.refuse:
            self._error(400, "BadRequestError", f"stub refuses {name}")
        else:
            self.server.adapters[name] = path
            self._text(f"Success: LoRA adapter '{name}' added successfully.")

    def _wait_or_die(self) -> None:
        """Hold the stream until released; cut it off if the server is killed meanwhile."""
        deadline = time.monotonic() + HOLD_LIMIT_S
        while not self.server.release.wait(0.02) and time.monotonic() < deadline:
            if self.server.dead.is_set():
                self._cut_off()
        if self.server.dead.is_set():
            self._cut_off()

    def _cut_off(self) -> None:
        """End the connection with a reset, as the kernel does for a killed process."""
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                   struct.pack("ii", 1, 0))
        self.connection.close()
        raise ConnectionAbortedError("stub killed")

    def _answer(self, body: dict) -> None:
        """A chat completion that is not streamed: every answer whole, in one body."""
        n, seed = body.get("n", 1), body.get("seed", 0)
        choices = [{"index": i, "finish_reason": "stop", "message": {
            "role": "assistant", "content": self._answer_text(i, seed)}} for i in range(n)]
        reply = {"id": "stub", "object": "chat.completion", "created": 0,
                 "model": body.get("model", "stub"), "choices": choices}
        if body.get("return_token_ids") and self.server.token_ids:
            reply["prompt_token_ids"] = [1, 2, 3]
            for choice in choices:
                choice["token_ids"] = [1000 + choice["index"]]
        self._json(200, reply)

    def _score(self, body: dict) -> None:
        """Prompt log-probs of token ids (see the module's docstring); one token back."""
        ids, model = body["prompt"], body.get("model", "base")
        entries: list[dict | None] = [None]
        for token in ids[1:]:
            logprob = -0.5 if token < 1000 else -1.0 + (
                0.0 if model == self.server.model_name else self.server.rewards[token - 1000])
            entries.append({str(token): {"logprob": logprob, "rank": 1}})
        self._json(200, {"id": "stub", "object": "text_completion", "model": model,
                         "choices": [{"index": 0, "text": ".", "finish_reason": "length",
                                      "prompt_logprobs": entries}]})

    def _answer_text(self, i: int, seed: int) -> str:
        return (self.server.sides[i] if self.server.sides
                else self.server.answers[(seed + i) % len(self.server.answers)])

    def _stream(self, body: dict) -> None:
        n, seed = body.get("n", 1), body.get("seed", 0)
        if not body.get("stream"):
            self._answer(body)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.end_headers()  # HTTP/1.0: the stream ends when the connection closes
        sent = 0
        if self.server.hold_after == 0:
            self.wfile.flush()
            self._wait_or_die()
        for i in range(n):
            text = self._answer_text(i, seed)
            for word, last in _words(text):
                choice = {"index": i, "delta": {"content": word},
                          "finish_reason": "stop" if last else None}
                chunk = {"id": "stub", "object": "chat.completion.chunk", "created": 0,
                         "model": body.get("model", "stub"), "choices": [choice]}
                self.wfile.write(f"data: {json.dumps(chunk)}\n\n".encode())
                sent += 1
                if sent == self.server.hold_after:
                    self.wfile.flush()
                    self._wait_or_die()
                if self.server.dead.is_set():
                    self._cut_off()
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
def stub_server(port: int = 0) -> Iterator[StubServer]:
    server = StubServer(port)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        if not server.dead.is_set():
            server.shutdown()
            server.server_close()
