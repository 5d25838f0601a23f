"""A fault-injecting HTTP/1.1 proxy on 127.0.0.1, between an S3 client and server.

Point the client's ``endpoint_url`` at :attr:`FaultProxy.endpoint_url`; every
request is forwarded byte for byte (the Host header too, so SigV4 signatures
stay valid) unless a :class:`Rule` matches it, in which case the proxy can:

- answer with an S3 error itself (``503 SlowDown``, ``500 InternalError``, ...),
- reset the connection before forwarding, or after the server has processed the
  request (the client never learns it succeeded),
- stall (hold the response past the client's read timeout),
- truncate the response body (connection reset mid-body),
- corrupt one byte of the response body.

Every request is logged (method, path, query, Range, status, fault, bytes), so
tests can check what the client actually sent: ranged GETs, part counts, retries.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

S3_ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
    502: ("BadGateway", "Bad gateway."),
    429: ("TooManyRequests", "Too many requests."),
    403: ("AccessDenied", "Access Denied"),
    501: ("NotImplemented", "A header you provided implies functionality that is not implemented."),
}


@dataclass
class Request:
    method: str
    path: str
    query: str
    headers: dict[str, str]

    @property
    def op(self) -> str:
        """The S3 operation this request is (enough of them to aim faults)."""
        q, m = self.query, self.method
        if m == "PUT":
            return "UploadPart" if "partNumber=" in q else "PutObject"
        if m == "POST":
            if q.startswith("uploads") or "&uploads" in q:
                return "CreateMultipartUpload"
            if "uploadId=" in q:
                return "CompleteMultipartUpload"
            if "delete" in q:
                return "DeleteObjects"
        if m == "DELETE":
            return "AbortMultipartUpload" if "uploadId=" in q else "DeleteObject"
        if m == "GET":
            if "list-type" in q or "prefix=" in q or "uploads" in q:
                return "List"
            return "GetObject"
        if m == "HEAD":
            return "HeadObject"
        return m

    @property
    def range(self) -> str | None:
        return self.headers.get("range")


@dataclass
class Fault:
    """What to do to a matching request.

    kind: "status" (answer ``status`` without forwarding), "reset" (drop the connection
    before forwarding), "reset_after" (forward, let the server act, then drop the
    connection instead of answering), "stall" (forward, then hold the response for
    ``seconds`` and drop it), "truncate" (send half the body, then reset), "corrupt"
    (flip one byte in the middle of the body).
    """

    kind: str
    status: int = 503
    seconds: float = 30.0


@dataclass
class Rule:
    fault: Fault
    match: Callable[[Request], bool]
    times: int = 1  # how many matching requests to hit; -1 = all
    hits: int = 0


@dataclass
class Entry:
    op: str
    method: str
    path: str
    query: str
    range: str | None
    status: int | None = None
    fault: str | None = None
    request_bytes: int = 0
    response_bytes: int = 0
    at: float = field(default_factory=time.monotonic)


class FaultProxy:
    """Start with :meth:`start`, stop with :meth:`stop` (or use ``with``)."""

    def __init__(self, upstream_url: str) -> None:
        u = urlsplit(upstream_url)
        self.upstream = (u.hostname or "127.0.0.1", u.port or 80)
        self.rules: list[Rule] = []
        self.log: list[Entry] = []
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []
        self._conns: set[socket.socket] = set()
        self._stopping = threading.Event()

    @property
    def endpoint_url(self) -> str:
        assert self._sock is not None
        return f"http://127.0.0.1:{self._sock.getsockname()[1]}"

    # -- configuration ---------------------------------------------------------------------

    def add(self, fault: Fault, *, op: str | None = None, path: str | None = None, times: int = 1) -> Rule:
        """Inject ``fault`` into the next ``times`` requests of S3 operation ``op`` whose
        path contains ``path`` (either may be None: any)."""

        def match(r: Request) -> bool:
            return (op is None or r.op == op) and (path is None or path in r.path)

        rule = Rule(fault, match, times)
        with self._lock:
            self.rules.append(rule)
        return rule

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()
            self.log.clear()

    def entries(self, op: str | None = None, path: str | None = None) -> list[Entry]:
        with self._lock:
            return [e for e in self.log if (op is None or e.op == op) and (path is None or path in e.path)]

    def _take(self, req: Request) -> Fault | None:
        with self._lock:
            for rule in self.rules:
                if (rule.times < 0 or rule.hits < rule.times) and rule.match(req):
                    rule.hits += 1
                    return rule.fault
        return None

    # -- lifecycle ---------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(128)
        t = threading.Thread(target=self._accept, name="faultproxy-accept", daemon=True)
        t.start()
        self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            try:
                self._sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            self._sock.close()
        with self._lock:
            conns = list(self._conns)
        for c in conns:
            try:
                c.shutdown(socket.SHUT_RDWR)  # wakes a thread blocked in recv (close alone does not)
            except OSError:
                pass
            _close(c)
        for t in self._threads:
            t.join(timeout=5)

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            t = threading.Thread(target=self._serve, args=(client,), name="faultproxy-conn", daemon=True)
            t.start()
            with self._lock:
                self._threads = [x for x in self._threads if x.is_alive()]
                self._threads.append(t)

    # -- one client connection ----------------------------------------------------------------

    def _serve(self, client: socket.socket) -> None:
        upstream: socket.socket | None = None
        cr = _Reader(client)
        with self._lock:
            self._conns.add(client)
        try:
            while not self._stopping.is_set():
                head = cr.read_head()
                if head is None:
                    return
                line, headers = _parse_head(head)
                method, target, _ = line.split(" ", 2)
                path, _, query = target.partition("?")
                req = Request(method, path, query, headers)
                entry = Entry(req.op, method, path, query, req.range)
                with self._lock:
                    self.log.append(entry)
                fault = self._take(req)
                entry.fault = fault.kind if fault else None

                if fault is not None and fault.kind == "status":
                    cr.skip_body(headers)
                    _send_error(client, fault.status)
                    entry.status = fault.status
                    return  # Connection: close was sent
                if fault is not None and fault.kind == "reset":
                    _reset(client)
                    return

                if upstream is None:
                    upstream = socket.create_connection(self.upstream)
                    with self._lock:
                        self._conns.add(upstream)
                ur = _Reader(upstream)
                upstream.sendall(head)
                if headers.get("expect", "").lower() == "100-continue":
                    interim = ur.read_head()
                    if interim is None:
                        return
                    if _status(interim) == 100:
                        client.sendall(interim)
                    else:  # the server answered before the body: relay and start over
                        body = ur.read_body(_parse_head(interim)[1], method, _status(interim))
                        client.sendall(interim + body)
                        return
                entry.request_bytes = cr.pipe_body(headers, upstream)

                resp_head = ur.read_head()
                if resp_head is None:
                    return
                status = _status(resp_head)
                while status == 100:  # a stray interim response
                    resp_head = ur.read_head()
                    if resp_head is None:
                        return
                    status = _status(resp_head)
                resp_headers = _parse_head(resp_head)[1]
                body = ur.read_body(resp_headers, method, status)
                entry.status = status
                entry.response_bytes = len(body)

                if fault is not None and fault.kind == "reset_after":
                    _reset(client)
                    return
                if fault is not None and fault.kind == "stall":
                    self._stopping.wait(fault.seconds)
                    _reset(client)
                    return
                if fault is not None and fault.kind == "truncate" and len(body) > 1:
                    client.sendall(resp_head + body[: len(body) // 2])
                    _reset(client)
                    return
                if fault is not None and fault.kind == "corrupt" and body and "chunked" not in str(resp_headers):
                    i = len(body) // 2
                    body = body[:i] + bytes([body[i] ^ 0xFF]) + body[i + 1 :]
                client.sendall(resp_head + body)
                if resp_headers.get("connection", "").lower() == "close":
                    return
        except OSError:
            return
        finally:
            for s in (client, upstream):
                if s is not None:
                    _close(s)
                    with self._lock:
                        self._conns.discard(s)


class _Reader:
    """Buffered reads of HTTP framing from a socket, returning raw bytes."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = bytearray()

    def _fill(self) -> bool:
        data = self.sock.recv(1 << 20)
        if not data:
            return False
        self.buf += data
        return True

    def read_head(self) -> bytes | None:
        while True:
            i = self.buf.find(b"\r\n\r\n")
            if i >= 0:
                head = bytes(self.buf[: i + 4])
                del self.buf[: i + 4]
                return head
            if not self._fill():
                return None

    def read_exact(self, n: int) -> bytes:
        while len(self.buf) < n:
            if not self._fill():
                raise ConnectionError("peer closed mid-message")
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def read_line(self) -> bytes:
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                return self.read_exact(i + 2)
            if not self._fill():
                raise ConnectionError("peer closed mid-line")

    def read_chunked(self) -> bytes:
        out = bytearray()
        while True:
            line = self.read_line()
            out += line
            size = int(line.split(b";", 1)[0].strip(), 16)
            if size == 0:
                while True:  # trailers, then the empty line
                    t = self.read_line()
                    out += t
                    if t == b"\r\n":
                        return bytes(out)
            out += self.read_exact(size + 2)

    def read_body(self, headers: dict[str, str], method: str, status: int) -> bytes:
        if method == "HEAD" or status in (204, 304) or 100 <= status < 200:
            return b""
        if "chunked" in headers.get("transfer-encoding", "").lower():
            return self.read_chunked()
        if "content-length" in headers:
            return self.read_exact(int(headers["content-length"]))
        while self._fill():
            pass
        out = bytes(self.buf)
        self.buf.clear()
        return out

    def skip_body(self, headers: dict[str, str]) -> None:
        if headers.get("expect", "").lower() == "100-continue":
            return  # the client waits for 100 before sending it; we answer first
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.read_chunked()
        elif "content-length" in headers:
            self.read_exact(int(headers["content-length"]))

    def pipe_body(self, headers: dict[str, str], out: socket.socket) -> int:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            body = self.read_chunked()
            out.sendall(body)
            return len(body)
        n = int(headers.get("content-length", "0"))
        left = n
        while left:
            if not self.buf and not self._fill():
                raise ConnectionError("client closed mid-body")
            take = min(left, len(self.buf))
            out.sendall(memoryview(self.buf)[:take])
            del self.buf[:take]
            left -= take
        return n


def _parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for h in lines[1:]:
        if ":" in h:
            k, v = h.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    return lines[0], headers


def _status(head: bytes) -> int:
    return int(head.split(b" ", 2)[1])


def _send_error(sock: socket.socket, status: int) -> None:
    code, message = S3_ERRORS.get(status, ("InternalError", "Injected error."))
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message><RequestId>faultproxy</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {code}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    sock.sendall(head + body)


def _reset(sock: socket.socket) -> None:
    """Close with RST (SO_LINGER 0): the peer sees 'connection reset', not a clean EOF."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    _close(sock)


def _close(sock: socket.socket) -> None:
    try:
        sock.close()
    except OSError:
        pass
