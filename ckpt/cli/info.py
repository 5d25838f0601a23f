"""``ckpt info``: a checkpoint's tensors, chunking, topology and metadata (also of DCP, HF, torch.save)."""

from __future__ import annotations

import argparse
import json
from typing import TYPE_CHECKING, Any

from ..sizes import format_size
from .common import EXIT_OK, add_command, emit_json, metrics_text, table

if TYPE_CHECKING:
    from ..format import Manifest


def register(subparsers: argparse._SubParsersAction) -> None:
    sp = add_command(
        subparsers,
        "info",
        "show a checkpoint's tensors, chunking, topology and metadata",
        run,
        "Show a checkpoint's tensors (shape, dtype, chunks, layout), the topology it was saved from, "
        "step, metrics and metadata. Also reads DCP, safetensors and torch.save checkpoints.",
    )
    sp.add_argument("ckpt", metavar="CKPT")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp.add_argument("--chunks", action="store_true", help="list every chunk (box, object, offset)")
    sp.add_argument("--format", choices=["ckpt", "dcp", "safetensors", "torch"], help="skip format detection")


def run(args: argparse.Namespace) -> int:
    if args.format in (None, "ckpt"):  # a ckpt checkpoint is described from its manifest, without torch
        from ..format import MANIFEST
        from ..locate import read_manifest
        from ..storage import open_storage

        storage = open_storage(args.ckpt).confine()
        if args.format == "ckpt" or storage.exists(MANIFEST):
            return _info_ckpt(args, read_manifest(storage))
    from ..interop import detect_format, open_source

    # what the files hold: an HF model directory's tied weights are not listed twice, which would import transformers
    with open_source(args.ckpt, args.format or detect_format(args.ckpt), tied=False) as src:
        return _info_foreign(args, src)


def _info_ckpt(args: argparse.Namespace, m: Manifest) -> int:
    size = sum(m.objects.values())
    tensors = {}
    for key, rec in sorted(m.tensors.items()):
        t: dict[str, Any] = {
            "shape": list(rec.shape),
            "dtype": rec.dtype_name,
            "nbytes": rec.nbytes,
            "chunks": len(rec.chunks),
            "layout": rec.layout,
        }
        if args.chunks:
            t["chunk_list"] = [c.to_json() | {"checksums": len(c.checksums)} for c in rec.chunks]
        tensors[key] = t
    doc = {
        "uri": args.ckpt,
        "format": "ckpt",
        "save_id": m.save_id,
        "library_version": m.library_version,
        "created": m.created,
        "step": m.step,
        "metrics": m.metrics,
        "metadata": m.metadata,
        "topology": m.topology,
        "block_bytes": m.block_bytes,
        "objects": len(m.objects),
        "size": size,
        "shared": m.shared_bytes,
        "refs": sorted(m.refs),
        "compressed_chunks": sum(1 for r in m.tensors.values() for c in r.chunks if c.codec is not None),
        "values": m.values,
        "tensors": tensors,
    }
    if args.json:
        emit_json(doc)
        return EXIT_OK
    nbytes = sum(t["nbytes"] for t in tensors.values())
    print(f"checkpoint  {args.ckpt}")
    print(f"saved       {m.created or '-'} by ckpt {m.library_version or '?'} (save {m.save_id})")
    print(f"step        {m.step if m.step is not None else '-'}")
    print(f"metrics     {metrics_text(m.metrics)}")
    if m.metadata:
        print(f"metadata    {json.dumps(m.metadata, default=str)}")
    topo = " ".join(f"{k}={v}" for k, v in m.topology.items() if k != "bytes_written_per_rank") or "-"
    print(f"topology    {topo}")
    blocks = format_size(m.block_bytes)
    print(f"storage     {format_size(size)} in {len(m.objects)} object(s), checksum blocks of {blocks}")
    if m.refs:
        print(f"shared      {format_size(m.shared_bytes)} in objects of {', '.join(sorted(m.refs))} (incremental)")
    if doc["compressed_chunks"]:
        stored = sum(c.stored for r in m.tensors.values() for c in r.chunks)
        raw = sum(c.length for r in m.tensors.values() for c in r.chunks)
        print(f"compressed  {doc['compressed_chunks']} chunk(s); {format_size(raw)} stored in {format_size(stored)}")
    print(f"contents    {len(tensors)} tensor(s), {format_size(nbytes)}; {len(m.values)} value(s)")
    rows = [("KEY", "SHAPE", "DTYPE", "CHUNKS", "SIZE", "LAYOUT")]
    for key, t in tensors.items():
        rows.append((key, str(t["shape"]), t["dtype"], str(t["chunks"]), format_size(t["nbytes"]), t["layout"] or "-"))
        for c in t.get("chunk_list", []):
            box = f"  @{c['offsets']} {c['sizes']}"
            rows.append((box, "", "", "", format_size(c["length"]), f"{c['object']} +{c['offset']}"))
    print()
    table(rows)
    if m.values:
        print()
        for key, v in sorted(m.values.items()):
            print(f"{key} = {json.dumps(v, default=str)}")
    return EXIT_OK


def _info_foreign(args: argparse.Namespace, src) -> int:
    tensors = {
        k: {"shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch."), "nbytes": t.nbytes}
        for k, t in src.tensors().items()
    }
    values = src.values()
    if args.json:
        emit_json({"uri": args.ckpt, "format": src.format, "values": values, "tensors": tensors})
        return EXIT_OK
    nbytes = sum(t["nbytes"] for t in tensors.values())
    print(f"checkpoint  {args.ckpt}")
    print(f"format      {src.format}")
    print(f"contents    {len(tensors)} tensor(s), {format_size(nbytes)}; {len(values)} value(s)")
    rows = [("KEY", "SHAPE", "DTYPE", "SIZE")]
    rows += [(k, str(t["shape"]), t["dtype"], format_size(t["nbytes"])) for k, t in tensors.items()]
    print()
    table(rows)
    for key, v in sorted(values.items()):
        print(f"{key} = {json.dumps(v, default=str)}")
    return EXIT_OK
