"""ckpt.sizes: the one size parser; "5GB" means 5*10^9 bytes in every command line."""

from __future__ import annotations

import argparse

import pytest

from ckpt.cli import build_parser
from ckpt.sizes import format_size, parse_size


@pytest.mark.parametrize(
    "text,n",
    [
        ("5GB", 5 * 10**9),
        ("5GiB", 5 * 2**30),
        ("5gib", 5 * 2**30),
        ("5Gi", 5 * 2**30),
        ("64MiB", 64 << 20),
        ("512MiB", 512 << 20),
        ("1.5KiB", 1536),
        ("1.5kb", 1500),
        (".5KB", 500),
        (" 7 MB ", 7 * 10**6),
        ("2TB", 2 * 10**12),
        ("1PiB", 2**50),
        ("4096", 4096),
        ("123", 123),
        ("5B", 5),
    ],
)
def test_parse_size(text, n):
    assert parse_size(text) == n


@pytest.mark.parametrize(
    "text,why",
    [
        ("lots", "is not a size"),
        ("five", "is not a size"),
        ("", "is not a size"),
        ("-3MB", "is not a size"),
        ("1e3", "is not a size"),
        ("5ib", "is not a size"),
        ("0", "must be positive"),
        ("0GiB", "must be positive"),
        ("0.5", "not a whole number of bytes"),
        ("1.0000001KB", "not a whole number of bytes"),
        ("5G", r"ambiguous: write 5GB \(5\*10\^9\) or 5GiB \(5\*2\^30\)"),
        ("16m", "ambiguous: write 16MB"),
    ],
)
def test_parse_size_refuses_with_the_reason(text, why):
    with pytest.raises(argparse.ArgumentTypeError, match=why):
        parse_size(text)


def test_every_command_line_reads_sizes_alike():
    from ckpt_server.main import build_parser as server_parser

    ckpt = build_parser()
    export = ckpt.parse_args(["export", "a", "b", "--to", "safetensors", "--max-shard-size", "5GB"])
    merge = ckpt.parse_args(["merge", "a", "-o", "b", "--max-shard-size", "5GB", "--chunk-size", "5GiB"])
    reshard = ckpt.parse_args(["reshard", "a", "b", "--chunk-bytes", "5GB", "--block-bytes", "5GiB"])
    server = server_parser().parse_args(["--memory-budget", "5GB", "--ram-tier-budget", "5GiB"])
    assert export.max_shard_size == merge.max_shard_size == reshard.chunk_bytes == server.memory_budget == 5 * 10**9
    assert merge.chunk_size == reshard.block_bytes == server.ram_tier_budget == 5 * 2**30


def test_format_size():
    assert [format_size(n) for n in (0, 1023, 1536, 64 << 20, 5 * 2**40, 2**50)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "64.0 MiB",
        "5.0 TiB",
        "1024.0 TiB",
    ]
