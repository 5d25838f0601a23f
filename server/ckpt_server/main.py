"""``ckpt-server``: run the daemon.

Listens on a Unix socket (mode 0600) by default; TCP only when asked, and then
only with a token (and optionally TLS). SIGTERM drains accepted checkpoints
before exiting.

Memory is bounded by default: snapshots held at once (mapped from trainers'
shared memory or received over TCP) within half of this machine's RAM, the
RAM tier within a quarter; a save that does not fit waits --budget-wait
seconds for room, then is refused.
"""

from __future__ import annotations

import argparse
import hashlib
import http.server
import json
import logging
import os
import shutil
import signal
import sys
import threading
from concurrent.futures import ThreadPoolExecutor

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from ckpt._proto import ckpt_pb2_grpc
from ckpt.client import MESSAGE_LIMIT_BYTES
from ckpt.sizes import parse_size

from .metrics import Metrics
from .ramtier import RamTier
from .service import Budget, CheckpointerService

log = logging.getLogger("ckpt_server")


def physical_memory() -> int:
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def default_socket() -> str:
    base = os.environ.get("XDG_RUNTIME_DIR") or "/tmp"
    return os.path.join(base, f"ckpt-{os.getuid()}.sock")


class JsonFormatter(logging.Formatter):
    """One JSON object per line: machine-readable logs."""

    _skip = set(logging.LogRecord("", 0, "", 0, "", None, None).__dict__) | {"message", "asctime"}

    def format(self, record: logging.LogRecord) -> str:
        doc = {"ts": round(record.created, 3), "level": record.levelname.lower(), "msg": record.getMessage()}
        doc.update({k: v for k, v in record.__dict__.items() if k not in self._skip})
        return json.dumps(doc, default=str)


def read_json_log(path: str) -> list[dict]:
    """The records a :class:`JsonFormatter` wrote to ``path``; other lines (a traceback
    on a crash, say) are skipped."""
    records = []
    with open(path, errors="replace") as f:
        for line in f:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            if isinstance(doc, dict):
                records.append(doc)
    return records


class TokenInterceptor(grpc.ServerInterceptor):
    """Rejects calls without ``authorization: Bearer <token>`` (TCP listeners)."""

    def __init__(self, token: str) -> None:
        self._expected = f"Bearer {token}"

        def deny(request, context):
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or wrong token")

        self._deny = grpc.unary_unary_rpc_method_handler(deny)

    def intercept_service(self, continuation, handler_call_details):
        if dict(handler_call_details.invocation_metadata or ()).get("authorization") == self._expected:
            return continuation(handler_call_details)
        return self._deny


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ckpt-server", description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--socket", default=default_socket(), help="Unix socket path (default: %(default)s)")
    p.add_argument("--listen", metavar="HOST:PORT", help="also listen on TCP (requires --token or --token-file)")
    p.add_argument("--token", help="shared secret TCP clients must send (or set CKPT_SERVER_TOKEN)")
    p.add_argument("--token-file", help="read the token from this file")
    p.add_argument("--tls-cert", help="PEM certificate for TLS on the TCP listener")
    p.add_argument("--tls-key", help="PEM private key for TLS on the TCP listener")
    p.add_argument(
        "--memory-budget",
        type=parse_size,
        default=physical_memory() // 2,
        help="most snapshot bytes held at once, e.g. 16GiB or 16GB (default: half of RAM, %(default)s)",
    )
    p.add_argument("--budget-wait", type=float, default=30.0, help="seconds a job waits for budget before refusal")
    p.add_argument(
        "--ram-tier",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep each job's latest checkpoint in memory for fast restore (default: on)",
    )
    p.add_argument("--ram-tier-dir", help="tmpfs directory for the RAM tier (default: under /dev/shm)")
    p.add_argument(
        "--ram-tier-budget",
        type=parse_size,
        default=physical_memory() // 4,
        help="most bytes the RAM tier holds (default: a quarter of RAM, %(default)s)",
    )
    p.add_argument("--metrics-port", type=int, help="serve Prometheus metrics over HTTP on 127.0.0.1:PORT (0: any)")
    p.add_argument("--drain-timeout", type=float, default=None, help="on SIGTERM, wait at most this long")
    p.add_argument("--log-level", default="info")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logging.basicConfig(level=args.log_level.upper(), handlers=[handler])

    token = args.token or os.environ.get("CKPT_SERVER_TOKEN")
    if args.token_file:
        with open(args.token_file) as f:
            token = f.read().strip()
    if args.listen and not token:
        print("ckpt-server: --listen needs --token, --token-file or CKPT_SERVER_TOKEN", file=sys.stderr)
        return 2

    metrics = Metrics()
    ram_tier = None
    if args.ram_tier:
        tag = hashlib.sha256(os.path.abspath(args.socket).encode()).hexdigest()[:12]
        base = args.ram_tier_dir or f"/dev/shm/ckpt-ram-{os.getuid()}-{tag}"
        shutil.rmtree(base, ignore_errors=True)  # copies of a previous daemon: their index died with it
        ram_tier = RamTier(base, args.ram_tier_budget)
    service = CheckpointerService(Budget(args.memory_budget), args.budget_wait, metrics, ram_tier)
    health_servicer = health.HealthServicer()

    def make_server(interceptors=()) -> grpc.Server:
        server = grpc.server(
            ThreadPoolExecutor(32, thread_name_prefix="rpc"),
            interceptors=list(interceptors),
            # gRPC's default 4 MiB would refuse a streamed part (4 MiB of data plus framing) or a large request
            options=[("grpc.max_receive_message_length", MESSAGE_LIMIT_BYTES)],
        )
        ckpt_pb2_grpc.add_CheckpointerServicer_to_server(service, server)
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        return server

    servers = []
    unix = make_server()
    if os.path.exists(args.socket):
        os.unlink(args.socket)  # a stale socket from a killed daemon
    old = os.umask(0o177)
    try:
        unix.add_insecure_port(f"unix://{args.socket}")
        unix.start()
    finally:
        os.umask(old)
    os.chmod(args.socket, 0o600)
    servers.append(unix)
    if args.listen:
        tcp = make_server([TokenInterceptor(token)])
        if args.tls_cert and args.tls_key:
            with open(args.tls_key, "rb") as k, open(args.tls_cert, "rb") as c:
                creds = grpc.ssl_server_credentials([(k.read(), c.read())])
            port = tcp.add_secure_port(args.listen, creds)
        else:
            port = tcp.add_insecure_port(args.listen)
        tcp.start()
        servers.append(tcp)
        log.info("listening", extra={"tcp": f"{args.listen.rsplit(':', 1)[0]}:{port}", "tls": bool(args.tls_cert)})
    if args.metrics_port is not None:
        _serve_metrics(metrics, args.metrics_port)
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("ckpt.v1.Checkpointer", health_pb2.HealthCheckResponse.SERVING)
    log.info("ready", extra={"socket": args.socket, "pid": os.getpid(), "budget": args.memory_budget})

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    log.info("draining", extra={"in_flight": metrics.queue_depth})
    health_servicer.enter_graceful_shutdown()
    drained = service.drain(args.drain_timeout)
    for s in servers:
        s.stop(grace=2).wait()
    if os.path.exists(args.socket):
        os.unlink(args.socket)
    if ram_tier is not None:
        ram_tier.clear()
        shutil.rmtree(ram_tier.base, ignore_errors=True)
    log.info("stopped", extra={"drained": drained})
    return 0 if drained else 1


def _serve_metrics(metrics: Metrics, port: int) -> None:
    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802
            body = metrics.render().encode()
            self.send_response(200 if self.path == "/metrics" else 404)
            self.send_header("Content-Type", "text/plain; version=0.0.4")
            self.end_headers()
            if self.path == "/metrics":
                self.wfile.write(body)

        def log_message(self, *args) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Handler)
    threading.Thread(target=server.serve_forever, name="metrics-http", daemon=True).start()
    # The bound port: --metrics-port 0 lets the kernel pick a free one.
    log.info("metrics", extra={"http": f"127.0.0.1:{server.server_address[1]}"})


if __name__ == "__main__":
    sys.exit(main())
