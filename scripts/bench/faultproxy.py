"""A fault-injecting HTTP proxy on 127.0.0.1, for the tests and the soak (`--sections faults`).

It forwards each request on a fresh connection to the upstream server (an `mlflow server`, moto's
S3) and, by a seeded schedule, injects one fault per request:

- `drop`: forward the request, let the server act, then reset the client's connection instead
  of replying (the server acted, the client never hears);
- `reset`: reset the client's connection before forwarding (the server never acted, but the
  client cannot tell that from `drop`);
- `delay`: wait `delay` seconds, then forward;
- `503`, `429`: answer that status (Retry-After: 1) without forwarding;
- `500`: answer 500 with MLflow's INTERNAL_ERROR body without forwarding (a server that fails);
- `cut`: close the listening socket for `cut_seconds` (connections are refused), then open it
  again on the same port; the request that drew it is reset.

`only` limits faults to requests whose "METHOD /path" matches a regular expression (e.g. the
creations); others pass. Every injected fault is counted by kind in `injected`.
"""

from __future__ import annotations

import random
import re
import socket
import struct
import threading
import time
from collections import Counter

KINDS = ("drop", "reset", "delay", "503", "429", "500", "cut")


class FaultProxy:
    def __init__(self, upstream_port: int, seed: int, rates: dict[str, float] | None = None,
                 only: str | None = None, delay: float = 0.5, cut_seconds: float = 2.0):
        self.upstream_port = upstream_port
        self.rng = random.Random(seed)
        self.rates = dict(rates or {})
        unknown = set(self.rates) - set(KINDS)
        if unknown:
            raise ValueError(f"unknown fault kinds {sorted(unknown)}; known: {KINDS}")
        self.only = re.compile(only) if only else None
        self.delay, self.cut_seconds = delay, cut_seconds
        self.injected: Counter = Counter()
        self.requests = 0
        self.lock = threading.Lock()
        self.enabled = True
        self.listener = self._listen(0)
        self.port = self.listener.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.closed = False
        threading.Thread(target=self._accept_loop, daemon=True, name="faultproxy").start()

    # -- the schedule ------------------------------------------------------------------------

    def _draw(self, request_line: str) -> str | None:
        with self.lock:
            self.requests += 1
            if not self.enabled or (self.only and not self.only.search(request_line)):
                return None
            roll, total = self.rng.random(), 0.0
            for kind in KINDS:
                total += self.rates.get(kind, 0.0)
                if roll < total:
                    self.injected[kind] += 1
                    return kind
            return None

    # -- sockets -----------------------------------------------------------------------------

    @staticmethod
    def _listen(port: int) -> socket.socket:
        listener = socket.socket()
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("127.0.0.1", port))
        listener.listen(64)
        return listener

    def _accept_loop(self) -> None:
        while not self.closed:
            listener = self.listener
            try:
                if listener is None:
                    raise OSError("cut")
                client, _ = listener.accept()
            except OSError:  # closed by a cut (reopened below) or by close()
                time.sleep(0.05)
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _cut(self) -> None:
        with self.lock:
            listener, self.listener = self.listener, None
        if listener is None:
            return
        self._unlisten(listener)

        def reopen():
            time.sleep(self.cut_seconds)
            while not self.closed:
                try:
                    self.listener = self._listen(self.port)
                    return
                except OSError:
                    time.sleep(0.1)

        threading.Thread(target=reopen, daemon=True).start()

    @staticmethod
    def _unlisten(listener: socket.socket) -> None:
        # Without shutdown, Linux keeps listening until the accept blocked in `_accept_loop`
        # returns: it would take one more connection.
        try:
            listener.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        listener.close()

    @staticmethod
    def _reset(sock: socket.socket) -> None:
        # SO_LINGER 0: close sends RST, as a crashed peer or a dropped middlebox would.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()

    @staticmethod
    def _read_request(sock: socket.socket) -> bytes | None:
        data = b""
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return None
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = re.search(rb"(?im)^content-length:\s*(\d+)", head)
        if length:
            while len(body) < int(length.group(1)):
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                body += chunk
        elif re.search(rb"(?im)^transfer-encoding:\s*chunked", head):
            while not body.endswith(b"0\r\n\r\n"):
                chunk = sock.recv(65536)
                if not chunk:
                    return None
                body += chunk
        # One request per upstream connection: the reply ends when the server closes it.
        head = re.sub(rb"(?im)^connection:[^\r\n]*\r\n?", b"", head).rstrip(b"\r\n")
        return head + b"\r\nConnection: close\r\n\r\n" + body

    def _forward(self, request: bytes) -> bytes:
        with socket.create_connection(("127.0.0.1", self.upstream_port), timeout=120) as up:
            up.sendall(request)
            reply = b""
            while chunk := up.recv(65536):
                reply += chunk
        return reply

    def _serve(self, client: socket.socket) -> None:
        try:
            request = self._read_request(client)
            if request is None:
                client.close()
                return
            line = request.split(b"\r\n", 1)[0].decode("latin-1")
            kind = self._draw(line.rsplit(" ", 1)[0])
            if kind in ("reset", "cut"):
                if kind == "cut":
                    self._cut()
                self._reset(client)
                return
            if kind == "500":
                body = b'{"error_code": "INTERNAL_ERROR", "message": "injected failure"}'
                client.sendall(b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: "
                               b"application/json\r\nContent-Length: " + str(len(body)).encode()
                               + b"\r\nConnection: close\r\n\r\n" + body)
                client.close()
                return
            if kind in ("503", "429"):
                reason = "Service Unavailable" if kind == "503" else "Too Many Requests"
                client.sendall(f"HTTP/1.1 {kind} {reason}\r\nRetry-After: 1\r\n"
                               "Content-Length: 0\r\nConnection: close\r\n\r\n".encode())
                client.close()
                return
            if kind == "delay":
                time.sleep(self.delay)
            try:
                reply = self._forward(request)
            except OSError:  # the upstream is down: the client sees its connection reset
                self._reset(client)
                return
            if kind == "drop":
                self._reset(client)
                return
            client.sendall(reply)
            client.close()
        except OSError:
            client.close()

    def close(self) -> None:
        self.closed = True
        with self.lock:
            if self.listener is not None:
                self._unlisten(self.listener)


class TcpFaultProxy(FaultProxy):
    """The same schedule for a plain TCP stream (PostgreSQL's protocol): each chunk the client
    sends draws a fault. A stream has no statuses, so the kinds are `drop` (forward the chunk, let
    the server act on it, then reset both sides: the client never hears the reply), `reset`
    (reset both sides before forwarding), `delay` and `cut`. `only` matches nothing here."""

    def __init__(self, upstream_port: int, seed: int, rates: dict[str, float] | None = None,
                 delay: float = 0.5, cut_seconds: float = 2.0):
        wrong = set(rates or {}) - {"drop", "reset", "delay", "cut"}
        if wrong:
            raise ValueError(f"{sorted(wrong)} are HTTP faults; a TCP stream takes drop, reset, "
                             "delay and cut")
        super().__init__(upstream_port, seed, rates, None, delay, cut_seconds)
        self.url = f"127.0.0.1:{self.port}"

    def _serve(self, client: socket.socket) -> None:
        try:
            upstream = socket.create_connection(("127.0.0.1", self.upstream_port), timeout=10)
        except OSError:  # the server is down: the client sees its connection reset
            self._reset(client)
            return
        upstream.settimeout(None)
        ended = threading.Event()

        def end() -> None:
            if not ended.is_set():
                ended.set()
                for sock in (client, upstream):
                    try:
                        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER,
                                        struct.pack("ii", 1, 0))
                        # Shut down first: a close alone waits for the recv the other thread
                        # is blocked in, so neither peer would hear (a server's session would
                        # stay idle in its transaction, holding its locks).
                        sock.shutdown(socket.SHUT_RDWR)
                    except OSError:
                        pass
                    sock.close()

        def replies() -> None:
            try:
                while chunk := upstream.recv(65536):
                    if ended.is_set():
                        return
                    client.sendall(chunk)
            except OSError:
                pass
            end()

        threading.Thread(target=replies, daemon=True).start()
        try:
            while chunk := client.recv(65536):
                kind = self._draw("tcp")
                if kind in ("reset", "cut"):
                    if kind == "cut":
                        self._cut()
                    break
                if kind == "delay":
                    time.sleep(self.delay)
                if kind == "drop":
                    ended.set()  # the reply is not passed on
                    upstream.sendall(chunk)
                    time.sleep(0.2)  # the server acts (a COMMIT commits) before the reset
                    ended.clear()
                    break
                upstream.sendall(chunk)
        except OSError:
            pass
        end()
