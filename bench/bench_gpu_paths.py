"""CUDA paths of ckpt on a GPU machine: pinned staging, D2H on a side stream, lazy
snapshots overlapping compute, NCCL process groups, and load back onto the GPU.

Not part of the test suite (CI has no GPU). Run on a machine with one GPU:

    PYTHONPATH=.:server python3 bench/bench_gpu_paths.py --gib 2 --dir /tmp/gpu-bench

Prints one table; with --json writes the figures too.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time

import torch
import torch.distributed as dist

import ckpt

GiB = 1 << 30


def make_state(gib: float, device: str) -> dict:
    """Transformer-ish model + AdamW state on the GPU: bf16 weights, fp32 moments."""
    g = torch.Generator(device=device).manual_seed(0)
    n = int(gib * GiB / (2 + 4 + 4) / (4096 * 4096))  # layers of (bf16 w, fp32 m, fp32 v)
    sd = {"model": {}, "optim": {}, "step": 7}
    for i in range(max(n, 1)):
        sd["model"][f"layers.{i}.w"] = torch.randn(4096, 4096, generator=g, device=device).to(torch.bfloat16)
        sd["optim"][f"layers.{i}.exp_avg"] = torch.randn(4096, 4096, generator=g, device=device)
        sd["optim"][f"layers.{i}.exp_avg_sq"] = torch.rand(4096, 4096, generator=g, device=device)
    return sd


def nbytes(sd: dict) -> int:
    return sum(t.numel() * t.element_size() for part in ("model", "optim") for t in sd[part].values())


def tensors(sd: dict) -> list[torch.Tensor]:
    return [t for part in ("model", "optim") for t in sd[part].values()]


def memcpy_floor(sd: dict) -> float:
    """D2H of the whole state into preallocated pinned memory: the floor of any snapshot."""
    dst = [torch.empty(t.shape, dtype=t.dtype, pin_memory=True) for t in tensors(sd)]
    best = float("inf")
    for _ in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for d, s in zip(dst, tensors(sd)):
            d.copy_(s, non_blocking=True)
        torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t0)
    return best


def dcp_async_stall(sd: dict, root: str) -> float | None:
    import torch.distributed.checkpoint as dcp

    stalls = []
    for i in range(3):
        t0 = time.perf_counter()
        fut = dcp.async_save(sd, checkpoint_id=f"{root}/dcp-{i}")
        stalls.append(time.perf_counter() - t0)
        fut.result()
    return min(stalls[1:])


def run(args: argparse.Namespace) -> dict:
    device = "cuda"
    root = args.dir or tempfile.mkdtemp(prefix="ckpt-gpu-")
    os.makedirs(root, exist_ok=True)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    # DCP's async_save needs a CPU backend beside NCCL; ckpt works with either.
    dist.init_process_group("cpu:gloo,cuda:nccl", rank=0, world_size=1)
    torch.cuda.set_device(0)
    sd = make_state(args.gib, device)
    size = nbytes(sd)
    out: dict = {"gpu": torch.cuda.get_device_name(), "torch": torch.__version__, "state_gib": size / GiB}

    out["memcpy_floor_s"] = memcpy_floor(sd)

    # ckpt.async_save: first save allocates the pinned buffer; later ones reuse it.
    stalls, persist = [], []
    for i in range(4):
        t0 = time.perf_counter()
        h = ckpt.async_save(sd, f"{root}/ckpt-{i}", step=i)
        stalls.append(time.perf_counter() - t0)
        h.wait()
        persist.append(time.perf_counter() - t0)
    out["ckpt_async_stall_first_s"] = stalls[0]
    out["ckpt_async_stall_s"] = min(stalls[1:])
    out["ckpt_async_end_to_end_s"] = min(persist[1:])
    out["ckpt_timings"] = dict(h.timings)

    # Saved bytes equal the GPU state at the call although the GPU state changes right after.
    ref = {k: v.clone() for k, v in sd["model"].items()}
    saved = [t.clone() for t in tensors(sd)]  # what ckpt-3 holds
    h = ckpt.async_save(sd, f"{root}/mutated", step=99)
    for t in tensors(sd):
        t.add_(1)
    h.wait()
    back = {"model": {k: torch.empty_like(v) for k, v in sd["model"].items()}}
    ckpt.load(back, f"{root}/mutated", strict=False)
    out["snapshot_isolated"] = all(torch.equal(back["model"][k], ref[k]) for k in ref)

    # Lazy: the copy overlaps GPU compute; the stall is what the loop sees before compute.
    a = torch.randn(8192, 8192, device=device, dtype=torch.bfloat16)
    lazy = []
    for i in range(3):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        h = ckpt.async_save(sd, f"{root}/lazy-{i}", lazy=True)
        lazy.append(time.perf_counter() - t0)
        for _ in range(40):
            a = (a @ a).tanh_()
        h.wait_staged()
        h.wait()
    out["ckpt_lazy_stall_s"] = min(lazy)

    # Load back onto the GPU (same layout), verify, time.
    target = {
        "model": {k: torch.empty_like(v) for k, v in sd["model"].items()},
        "optim": {k: torch.empty_like(v) for k, v in sd["optim"].items()},
        "step": 0,
    }
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    ckpt.load(target, f"{root}/ckpt-3")
    torch.cuda.synchronize()
    out["ckpt_load_to_gpu_s"] = time.perf_counter() - t0
    for t, orig in zip(tensors(sd), saved):
        t.copy_(orig)  # undo the mutation above: sd equals what ckpt-3 saved
    out["load_bitwise_equal"] = all(torch.equal(target[p][k], sd[p][k]) for p in ("model", "optim") for k in sd[p])

    # DTensor on a CUDA mesh with NCCL (world 1 on one GPU) and the Manager's NCCL agreement.
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor

    mesh = init_device_mesh("cuda", (1,))
    dt = distribute_tensor(torch.arange(4096 * 64, device=device, dtype=torch.float32).view(4096, 64), mesh, [Shard(0)])
    mgr = ckpt.Manager(f"{root}/mgr", every_steps=1, retention=ckpt.RetentionPolicy(keep_last=1), handle_sigterm=False)
    mgr.maybe_save(0, {"dt": dt})
    mgr.close()
    restore = {"dt": distribute_tensor(torch.zeros(4096, 64, device=device), mesh, [Shard(0)])}
    out["nccl_manager_restore_step"] = ckpt.Manager(f"{root}/mgr", handle_sigterm=False).restore(restore)
    out["nccl_dtensor_equal"] = torch.equal(restore["dt"].full_tensor(), dt.full_tensor())

    try:
        out["dcp_async_stall_s"] = dcp_async_stall(sd, root)
    except Exception as e:  # noqa: BLE001 - report, do not hide, a peer's failure
        out["dcp_async_error"] = f"{type(e).__name__}: {e}"
    dist.destroy_process_group()
    if not args.dir:
        shutil.rmtree(root, ignore_errors=True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gib", type=float, default=2.0)
    p.add_argument("--dir")
    p.add_argument("--json")
    args = p.parse_args()
    out = run(args)
    gib = out["state_gib"]
    floor = out["memcpy_floor_s"]
    print(f"{out['gpu']}  torch {out['torch']}  state {gib:.2f} GiB")
    rows = [
        ("D2H memcpy floor (pinned)", floor),
        ("ckpt.async_save stall, first", out["ckpt_async_stall_first_s"]),
        ("ckpt.async_save stall", out["ckpt_async_stall_s"]),
        ("ckpt lazy stall", out["ckpt_lazy_stall_s"]),
        ("ckpt async end to end", out["ckpt_async_end_to_end_s"]),
        ("ckpt load to GPU", out["ckpt_load_to_gpu_s"]),
        ("DCP async_save stall", out.get("dcp_async_stall_s")),
    ]
    for name, s in rows:
        if s is None:
            print(f"{name:32s}  n/a")
            continue
        print(f"{name:32s} {s:8.3f} s  {gib / s:7.2f} GiB/s  {s / floor:6.2f}x floor")
    for k in ("snapshot_isolated", "load_bitwise_equal", "nccl_manager_restore_step", "nccl_dtensor_equal"):
        print(f"{k}: {out[k]}")
    if "dcp_async_error" in out:
        print("DCP async_save failed:", out["dcp_async_error"])
    print("phases of the last async save:", {k: round(v, 3) for k, v in out["ckpt_timings"].items()})
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
