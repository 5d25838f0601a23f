"""Client of the node-local daemon (``ckpt-server``): hand over staged snapshots, look up its RAM tier.

Over a Unix socket the snapshot stays where it was staged (a /dev/shm file the
daemon maps); over TCP its bytes are streamed. Either way the daemon persists
and commits with the same engine as the in-process path. The load path asks
the same daemon, over the same channel, what it holds in RAM
(:func:`ram_tier_lookup`); that is a read, so it does not go through the persister.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import Future
from typing import NamedTuple

import grpc

from ._proto import ckpt_pb2, ckpt_pb2_grpc
from .commit import rank_index_name, report_failure
from .engine import PersistJob, Timings
from .errors import SaveAbortedError
from .format import MANIFEST, dtype_name
from .persist import PendingFutures
from .stage import HostBuffer

# Largest gRPC message either side accepts (the server sets the same limit). A streamed part
# carries STREAM_PART_BYTES of payload plus a few bytes of framing, well under it.
MESSAGE_LIMIT_BYTES = 64 << 20
STREAM_PART_BYTES = 4 << 20
# A daemon that does not accept a connection within this long is reported as unreachable.
CONNECT_TIMEOUT_S = 10.0
# gRPC backs off up to 120 s between reconnection attempts by default, so a restarted daemon
# would go unnoticed for minutes; on a node-local link, retry at least every second.
_RECONNECT = [
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
]


class DaemonChannel:
    """One gRPC channel to a ckpt-server, with the bearer token its calls carry."""

    def __init__(self, address: str, token: str | None = None) -> None:
        self.address = address
        self.metadata = (("authorization", f"Bearer {token}"),) if token else ()
        ca = os.environ.get("CKPT_SERVER_TLS_CA")
        options = [
            ("grpc.max_receive_message_length", MESSAGE_LIMIT_BYTES),
            ("grpc.max_send_message_length", MESSAGE_LIMIT_BYTES),
            *_RECONNECT,
        ]
        if ca:
            with open(ca, "rb") as f:
                channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(f.read()), options)
        else:
            channel = grpc.insecure_channel(address, options)
        self.channel = channel
        self.stub = ckpt_pb2_grpc.CheckpointerStub(channel)


_channels: dict[tuple[str, str | None], DaemonChannel] = {}
_lock = threading.Lock()


def daemon_channel(address: str) -> DaemonChannel:
    """The channel to ``address`` with the current $CKPT_SERVER_TOKEN (read on every
    call, so a rotated token takes effect without restarting the trainer)."""
    token = os.environ.get("CKPT_SERVER_TOKEN") or None
    with _lock:
        if (address, token) not in _channels:
            _channels[address, token] = DaemonChannel(address, token)
        return _channels[address, token]


class RamTierCopy(NamedTuple):
    """What a daemon holds in its RAM tier of one checkpoint location."""

    save_id: str
    directory: str  # where on this node the copied objects are
    objects: set[str]


def ram_tier_lookup(address: str, uri: str) -> RamTierCopy | None:
    """The RAM-tier copy of ``uri`` held by the daemon at ``address``; None when it holds
    none or cannot be asked (the caller then reads storage)."""
    channel = daemon_channel(address)
    try:
        reply = channel.stub.Lookup(ckpt_pb2.LookupRequest(uri=uri), timeout=10, metadata=channel.metadata)
    except grpc.RpcError:
        return None
    return RamTierCopy(reply.save_id, reply.directory, set(reply.objects)) if reply.found else None


class DaemonPersister:
    """Persists through a ckpt-server over its :class:`DaemonChannel`."""

    name = "daemon"
    needs_host_buffer = True

    def __init__(self, channel: DaemonChannel) -> None:
        self.address = channel.address
        self.needs_shared_memory = channel.address.startswith("unix:")
        self._channel = channel.channel
        self._metadata = channel.metadata
        self.stub = channel.stub

    def shm_path(self, tag: str) -> str:
        return f"/dev/shm/ckpt-{os.getpid()}-{tag}"

    def submit(
        self,
        job: PersistJob,
        timings: Timings,
        release: threading.Lock | None,
        buf: HostBuffer | None = None,
        handoff: Future | None = None,
    ) -> Future:
        """Hand the snapshot to the daemon; ``handoff`` resolves once the daemon holds every
        byte (at once over a Unix socket, after the stream over TCP)."""
        assert buf is not None, "the daemon persists from a staged buffer"
        handoff = handoff if handoff is not None else Future()
        base = buf.data.data_ptr()
        request = ckpt_pb2.PersistRequest(
            uri=job.storage.uri,
            storage_options_json=json.dumps(job.storage.options),
            save_id=job.save_id,
            rank=job.rank,
            world_size=job.world_size,
            buffer_bytes=buf.nbytes,
            chunks=[
                ckpt_pb2.ChunkRef(
                    key=c.spec.key,
                    offsets=c.spec.box.offsets,
                    sizes=c.spec.box.sizes,
                    dtype=dtype_name(c.spec.dtype),
                    buffer_offset=c.data.data_ptr() - base if c.spec.nbytes else 0,
                )
                for c in job.chunks
            ],
            block_bytes=job.block_bytes,
            head_json=json.dumps(job.head) if job.head is not None else "",
            commit_timeout_s=job.commit_timeout_s,
            client_pid=os.getpid(),
        )
        job_id = None
        if self.needs_shared_memory:
            request.shm_path = buf.shm_path or ""
            # Synchronous: once Persist returns the daemon has mapped the snapshot, so the
            # trainer may exit (or be killed) without losing the save.
            try:
                job_id = self._take(job, self.stub.Persist, request, timeout=120).job_id
            except BaseException as e:
                handoff.set_exception(e)
                raise
            handoff.set_result(None)
        future: Future = Future()
        _streams.track(handoff)
        threading.Thread(
            target=self._wait,
            args=(job_id, request, buf, job, timings, release, future, handoff),
            name="ckpt-daemon-wait",
            daemon=True,
        ).start()
        return future

    def _take(self, job: PersistJob, rpc, request, **kwargs) -> ckpt_pb2.PersistReply:
        try:
            # Connect first (an RPC on a channel in reconnect back-off would fail at once).
            grpc.channel_ready_future(self._channel).result(timeout=CONNECT_TIMEOUT_S)
        except grpc.FutureTimeoutError:
            raise SaveAbortedError(
                f"{job.storage.uri}: ckpt-server at {self.address} is not reachable "
                f"(no connection within {CONNECT_TIMEOUT_S:.0f}s; is it running?); save {job.save_id} not taken"
            ) from None
        try:
            return rpc(request, metadata=self._metadata, **kwargs)
        except grpc.RpcError as e:
            raise SaveAbortedError(
                f"{job.storage.uri}: ckpt-server at {self.address} did not take save {job.save_id}: "
                f"{e.code().name}: {e.details()}"
            ) from None

    def _wait(
        self,
        job_id: str | None,
        request: ckpt_pb2.PersistRequest,
        buf: HostBuffer,
        job: PersistJob,
        timings: Timings,
        release: threading.Lock | None,
        future: Future,
        handoff: Future,
    ) -> None:
        try:
            if job_id is None:
                # Streaming sends the whole buffer over the network: behind the training loop, not in it.
                try:
                    job_id = self._take(job, self.stub.PersistStream, _parts(request, buf)).job_id
                except BaseException as e:
                    handoff.set_exception(e)
                    report_failure(job.storage, job.save_id, job.rank, e)
                    raise
                handoff.set_result(None)
            while True:
                try:
                    reply = self.stub.Wait(ckpt_pb2.WaitRequest(job_id=job_id, timeout_s=30), metadata=self._metadata)
                except grpc.RpcError as e:
                    error = SaveAbortedError(
                        f"{job.storage.uri}: ckpt-server at {self.address} was lost while persisting save "
                        f"{job.save_id} ({e.code().name}: {e.details()}); the checkpoint is not committed"
                    )
                    _report_lost(job, error)
                    raise error from None
                if reply.done:
                    break
            timings.update(reply.timings)
            if not reply.ok:
                raise SaveAbortedError(f"{job.storage.uri}: save {job.save_id} failed in ckpt-server: {reply.error}")
            future.set_result(None)
        except BaseException as e:
            future.set_exception(e)
        finally:
            if release is not None:
                release.release()


def _report_lost(job: PersistJob, error: BaseException) -> None:
    """The daemon died holding this rank's part. Tell the other ranks now rather than
    at their commit timeout: unless the part is safe (a non-committer's data is durable
    once its index exists; the committer's save once the manifest names it)."""
    try:
        job.storage.invalidate()
        if job.rank == 0:
            safe = json.loads(job.storage.read_bytes(MANIFEST)).get("save_id") == job.save_id
        else:
            safe = job.storage.exists(rank_index_name(job.save_id, job.rank, job.world_size))
        if safe:
            return
    except Exception:
        pass
    report_failure(job.storage, job.save_id, job.rank, error)


def _parts(request: ckpt_pb2.PersistRequest, buf: HostBuffer):
    """The request, then its head (values can be large) and the buffer, in pieces."""
    head = request.head_json.encode()
    first = ckpt_pb2.PersistPart(request=request)
    first.request.head_json = ""
    yield first
    for at in range(0, len(head), STREAM_PART_BYTES):
        yield ckpt_pb2.PersistPart(head=head[at : at + STREAM_PART_BYTES])
    view = memoryview(buf.data.numpy())[: buf.nbytes]
    for at in range(0, buf.nbytes, STREAM_PART_BYTES):
        yield ckpt_pb2.PersistPart(data=bytes(view[at : at + STREAM_PART_BYTES]))


EXIT_STREAM_TIMEOUT_S = 600.0
# Snapshots still streaming to a daemon (TCP): finished at interpreter exit, before threads are
# torn down (threading's exit hooks run before shutdown, unlike atexit's).
_streams = PendingFutures()
threading._register_atexit(lambda: _streams.finish(EXIT_STREAM_TIMEOUT_S))


def daemon_persister(address: str) -> DaemonPersister:
    """The persister for ``address`` on its current channel (see :func:`daemon_channel`)."""
    return DaemonPersister(daemon_channel(address))
