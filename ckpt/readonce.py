"""What a distributed load reads from storage, read once: rank 0 fetches the manifest (or lists a
run root), the other ranks receive it by broadcast.

At thousands of ranks, every rank fetching ``manifest.json`` (and resolving a run root's
``latest``) is thousands of requests on one key at the same instant; a broadcast over the
job's process group costs storage one. Rank 0 sends what it resolved and read, or the error it
met; every rank then parses and verifies the bytes itself (the digest check runs on the
received bytes), so each raises exactly what it would have raised reading them. The bytes
travel as a uint8 tensor, not a pickle. A rank that asked for another URI than rank 0 still
joins both broadcasts, then reads its own.
"""

from __future__ import annotations

import json
from typing import Any

from . import agree
from .catalog import Entry, scan
from .format import MANIFEST, Manifest
from .locate import open_checkpoint, read_manifest_bytes, resolve
from .share import backend_devices
from .storage import Storage, open_storage


def can_broadcast(group: Any) -> bool:
    """Whether ``group``'s backend broadcasts tensors of a device this process has (the same on every rank)."""
    import torch

    devices = backend_devices(group)
    return "cpu" in devices or ("cuda" in devices and torch.cuda.is_available())


def open_checkpoint_once(
    uri: str, storage_options: dict[str, Any] | None, group: Any
) -> tuple[Storage, Manifest]:
    """``locate.open_checkpoint`` on every rank of ``group``, with one rank reading the manifest.

    Every rank must call it (two broadcasts); each raises the error rank 0 met (same type, its
    message), or its own parsing error, or returns the bound manifest."""
    import torch.distributed as dist

    me = dist.get_rank(group)
    head: dict[str, Any] = {"asked": uri}
    raw, error, storage = b"", None, None
    if me == 0:
        try:
            head["uri"], storage = resolve(uri, storage_options)
            raw = read_manifest_bytes(storage)
        except Exception as e:  # sent to every rank: all raise it, none waits on a broadcast
            error, head["error"] = e, agree.record(e)
    head_bytes, raw = _broadcast(json.dumps(head).encode(), raw, group)
    head = json.loads(head_bytes)
    if head["asked"] != uri:  # another checkpoint than rank 0's: read it here
        return open_checkpoint(uri, storage_options)
    if error is not None:
        raise error
    if "error" in head:
        raise agree.rebuilt(head["error"])
    if storage is None:
        storage = open_storage(head["uri"], **(storage_options or {})).confine()
    return storage, Manifest.from_json_bytes(raw, storage.uri_of(MANIFEST), storage)


def scan_once(root: str, storage_options: dict[str, Any] | None, group: Any) -> list[Entry]:
    """``catalog.scan(root)`` on rank 0 (one manifest read per checkpoint for the whole job), its
    entries on every rank of ``group``, so that all ranks also judge the same listing. Every rank
    must call it; each raises the error rank 0 met. A root that does not exist lists as empty."""
    import torch.distributed as dist

    head: dict[str, Any] = {}
    error = None
    if dist.get_rank(group) == 0:
        try:
            head["entries"] = [e.to_json() for e in scan(root, storage_options)]
        except FileNotFoundError:
            head["entries"] = []
        except Exception as e:  # sent to every rank: all raise it, none waits on a broadcast
            error, head["error"] = e, agree.record(e)
    sent, _ = _broadcast(json.dumps(head).encode(), b"", group)
    if error is not None:
        raise error
    head = json.loads(sent)
    if "error" in head:
        raise agree.rebuilt(head["error"])
    return [Entry.from_json(d) for d in head["entries"]]


def _broadcast(head: bytes, raw: bytes, group: Any) -> tuple[bytes, bytes]:
    """Rank 0's ``head`` and ``raw`` on every rank: their lengths, then their bytes, as tensors."""
    import torch
    import torch.distributed as dist

    on_cpu = "cpu" in backend_devices(group)
    device = torch.device("cpu") if on_cpu else torch.device("cuda", torch.cuda.current_device())
    sizes = torch.tensor([len(head), len(raw)], dtype=torch.int64, device=device)
    dist.broadcast(sizes, group=group, group_src=0)
    n_head, n_raw = (int(n) for n in sizes.tolist())
    buf = torch.empty(n_head + n_raw, dtype=torch.uint8, device=device)
    if dist.get_rank(group) == 0:
        buf.copy_(torch.frombuffer(bytearray(head + raw), dtype=torch.uint8))
    dist.broadcast(buf, group=group, group_src=0)
    data = buf.cpu().numpy().tobytes()
    return data[:n_head], data[n_head:]
