"""Client of the node-local daemon (``ckpt-server``): hand over staged snapshots.

Over a Unix socket the snapshot stays where it was staged (a /dev/shm file the
daemon maps); over TCP its bytes are streamed. Either way the daemon persists
and commits with the same engine as the in-process path.
"""

from __future__ import annotations

import json
import os
import threading
from concurrent.futures import Future

import grpc

from ._proto import ckpt_pb2, ckpt_pb2_grpc
from .engine import PersistJob, Timings
from .errors import SaveAbortedError
from .format import dtype_name
from .stage import HostBuffer

STREAM_PART_BYTES = 4 << 20


class DaemonPersister:
    """Persists through a ckpt-server; one per address per process."""

    name = "daemon"
    needs_host_buffer = True

    def __init__(self, address: str, token: str | None = None) -> None:
        self.address = address
        self.needs_shared_memory = address.startswith("unix:")
        token = token or os.environ.get("CKPT_SERVER_TOKEN")
        self._metadata = (("authorization", f"Bearer {token}"),) if token else ()
        ca = os.environ.get("CKPT_SERVER_TLS_CA")
        options = [("grpc.max_receive_message_length", 64 << 20), ("grpc.max_send_message_length", 64 << 20)]
        if ca:
            with open(ca, "rb") as f:
                channel = grpc.secure_channel(address, grpc.ssl_channel_credentials(f.read()), options)
        else:
            channel = grpc.insecure_channel(address, options)
        self.stub = ckpt_pb2_grpc.CheckpointerStub(channel)

    def lookup(self, uri: str) -> tuple[str, str, set[str]] | None:
        """The daemon's RAM-tier copy of ``uri``: (save_id, directory, objects), or None."""
        try:
            reply = self.stub.Lookup(ckpt_pb2.LookupRequest(uri=uri), timeout=10, metadata=self._metadata)
        except grpc.RpcError:
            return None
        return (reply.save_id, reply.directory, set(reply.objects)) if reply.found else None

    def shm_path(self, tag: str) -> str:
        return f"/dev/shm/ckpt-{os.getpid()}-{tag}"

    def submit(
        self, job: PersistJob, timings: Timings, release: threading.Lock | None, buf: HostBuffer | None = None
    ) -> Future:
        assert buf is not None, "the daemon persists from a staged buffer"
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
        try:
            if self.needs_shared_memory:
                request.shm_path = buf.shm_path or ""
                reply = self.stub.Persist(request, timeout=120, metadata=self._metadata)
            else:
                reply = self.stub.PersistStream(_parts(request, buf), timeout=None, metadata=self._metadata)
        except grpc.RpcError as e:
            raise SaveAbortedError(
                f"{job.storage.uri}: ckpt-server at {self.address} did not take save {job.save_id}: "
                f"{e.code().name}: {e.details()}"
            ) from None
        future: Future = Future()
        threading.Thread(
            target=self._wait, args=(reply.job_id, job, timings, release, future), name="ckpt-daemon-wait", daemon=True
        ).start()
        return future

    def _wait(self, job_id: str, job: PersistJob, timings: Timings, release, future: Future) -> None:
        try:
            while True:
                try:
                    reply = self.stub.Wait(ckpt_pb2.WaitRequest(job_id=job_id, timeout_s=30), metadata=self._metadata)
                except grpc.RpcError as e:
                    raise SaveAbortedError(
                        f"{job.storage.uri}: ckpt-server at {self.address} was lost while persisting save "
                        f"{job.save_id} ({e.code().name}: {e.details()}); the checkpoint is not committed"
                    ) from None
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


def _parts(request: ckpt_pb2.PersistRequest, buf: HostBuffer):
    yield ckpt_pb2.PersistPart(request=request)
    view = memoryview(buf.data.numpy())[: buf.nbytes]
    for at in range(0, buf.nbytes, STREAM_PART_BYTES):
        yield ckpt_pb2.PersistPart(data=bytes(view[at : at + STREAM_PART_BYTES]))


_persisters: dict[str, DaemonPersister] = {}
_lock = threading.Lock()


def daemon_persister(address: str) -> DaemonPersister:
    with _lock:
        if address not in _persisters:
            _persisters[address] = DaemonPersister(address)
        return _persisters[address]
