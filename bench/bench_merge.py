"""Merge N checkpoints of ~G GiB each: ckpt.merge (streaming) vs. load-everything-and-average.

Every contender runs in a subprocess of its own; its peak RSS is that child's
``ru_maxrss`` (os.wait4) and its time the wall time of the merge call as the
child measures it (imports excluded; the child's whole lifetime is reported too).
This parent process never imports torch: a child forked from a large parent
would report the parent's RSS as its own peak. Data generation and exports run
in children too.
The yardstick is this disk: the time to read every source to /dev/null plus the
time to write (and fsync) a file the size of the output. When the page cache can
be dropped (root, writable /proc/sys/vm/drop_caches) every run starts cold;
otherwise all runs read warm and the report says so.

The checkpoints are Llama-shaped (HF tensor names and a config.json), so their
safetensors exports are a model mergekit can merge: when a mergekit install is
found (``--mergekit``, default /tmp/mk/bin/mergekit-yaml) its linear merge runs
on the same data.

    .venv/bin/python bench/bench_merge.py                 # 8 x ~1 GiB
    .venv/bin/python bench/bench_merge.py --gib 0.25 --sources 4
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("OMP_NUM_THREADS", "1")

from common import drop_page_cache, format_table, median, page_cache_droppable, write_json  # noqa: E402

GIB = 1 << 30
HIDDEN, INTER, VOCAB, HEADS = 1024, 2816, 32000, 16


def llama_shapes(gib: float) -> tuple[dict[str, tuple[int, ...]], int]:
    """HF Llama tensor names and shapes totalling about ``gib`` GiB in fp32; and the layer count."""
    per_layer = (4 * HIDDEN * HIDDEN + 3 * HIDDEN * INTER + 2 * HIDDEN) * 4
    fixed = (2 * VOCAB * HIDDEN + HIDDEN) * 4
    layers = max(1, round((gib * GIB - fixed) / per_layer))
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (VOCAB, HIDDEN)}
    for i in range(layers):
        p = f"model.layers.{i}."
        for n in ("q", "k", "v", "o"):
            shapes[p + f"self_attn.{n}_proj.weight"] = (HIDDEN, HIDDEN)
        shapes[p + "mlp.gate_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.up_proj.weight"] = (INTER, HIDDEN)
        shapes[p + "mlp.down_proj.weight"] = (HIDDEN, INTER)
        shapes[p + "input_layernorm.weight"] = (HIDDEN,)
        shapes[p + "post_attention_layernorm.weight"] = (HIDDEN,)
    shapes["model.norm.weight"] = (HIDDEN,)
    shapes["lm_head.weight"] = (VOCAB, HIDDEN)
    return shapes, layers


def llama_config(layers: int) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": HIDDEN,
        "intermediate_size": INTER,
        "num_hidden_layers": layers,
        "num_attention_heads": HEADS,
        "num_key_value_heads": HEADS,
        "vocab_size": VOCAB,
        "max_position_embeddings": 2048,
        "rms_norm_eps": 1e-5,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "torch_dtype": "float32",
    }


def generate(paths: list[str], shapes: dict[str, tuple[int, ...]]) -> None:  # runs in a child
    """Source i holds base * (1 + i/1000): every element differs between sources (no
    shortcut applies), and only one tensor is in memory at a time."""
    import torch

    from ckpt import SaveOptions
    from ckpt.writer import CheckpointWriter

    g = torch.Generator().manual_seed(0)
    writers = [CheckpointWriter(p, SaveOptions()) for p in paths]
    for key, shape in shapes.items():
        base = torch.randn(shape, generator=g)
        for i, w in enumerate(writers):
            w.write_tensor(key, base * (1 + i / 1000))
    for i, w in enumerate(writers):
        w.set_value("note", f"synthetic source {i}")
        w.commit(step=1000 * (i + 1), metrics={"loss": 2.0 - 0.1 * i})


def files_under(path: str) -> list[str]:
    return sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)


def read_to_devnull(paths: list[str]) -> tuple[int, float]:
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    total = 0
    t = time.perf_counter()
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            while n := f.readinto(view):
                total += n
    return total, time.perf_counter() - t


def write_fsync(path: str, nbytes: int) -> float:
    block = os.urandom(16 << 20)
    t = time.perf_counter()
    with open(path, "wb", buffering=0) as f:
        left = nbytes
        while left > 0:
            left -= f.write(block[: min(len(block), left)])
        os.fsync(f.fileno())
    dt = time.perf_counter() - t
    os.unlink(path)
    return dt


def spawn(argv: list[str], cold: bool) -> tuple[float, float, str, str]:
    """Run a command; return its wall time, peak RSS (GiB, this child alone), stdout, stderr."""
    if cold:
        drop_page_cache()
    with tempfile.TemporaryFile() as err:
        t = time.perf_counter()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=err)
        assert proc.stdout is not None
        out = proc.stdout.read()
        proc.stdout.close()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t
        proc.returncode = os.waitstatus_to_exitcode(status)
        err.seek(0)
        err_text = err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(f"{argv[0]} failed ({proc.returncode}):\n{err_text[-4000:]}")
    return wall, usage.ru_maxrss * 1024 / GIB, out.decode(errors="replace"), err_text


def run_child(code: str, cold: bool = False) -> dict:
    """Run ``code`` in a fresh interpreter (it prints one JSON line); add peak RSS and wall time."""
    wall, rss, out, _ = spawn([sys.executable, "-c", code], cold)
    doc = json.loads(out.strip().splitlines()[-1])
    doc.update(process_s=wall, peak_rss_gib=rss)
    return doc


GENERATE_CODE = """
import json, sys
sys.path.insert(0, {here!r})
from bench_merge import generate, llama_shapes
from common import machine_info
generate({srcs!r}, llama_shapes({gib!r})[0])
print(json.dumps(machine_info()))
"""

EXPORT_CODE = """
import json, ckpt
for src, hf in zip({srcs!r}, {hfs!r}):
    ckpt.merge([src], hf, output_format="hf", max_shard_bytes=2 << 30)  # one source: a bit-exact copy
    with open(hf + "/config.json", "w") as f:
        json.dump({config!r}, f)
print("{{}}")
"""


# Every timed child reports its own peak RSS (VmHWM) beside its time.
PEAK_RSS = """
def hwm():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM"):
            return int(line.split()[1]) * 1024 / 2**30
"""

STREAM_CODE = (
    PEAK_RSS
    + """import json, time, ckpt
t = time.perf_counter()
r = ckpt.merge({srcs!r}, {out!r}, "uniform")
print(json.dumps({{"merge_s": time.perf_counter() - t, "vm_hwm_gib": hwm()}}))
"""
)

NAIVE_CODE = (
    PEAK_RSS
    + """import json, time, torch, ckpt
from ckpt.reader import CheckpointReader
torch.set_num_threads(1)
t = time.perf_counter()
readers = [CheckpointReader(p) for p in {srcs!r}]
models = [{{k: r.read(k) for k in r.keys()}} for r in readers]  # everything in memory
w = 1.0 / len(models)
avg = {{k: sum(m[k] * w for m in models) for k in models[0]}}
ckpt.save(avg, {out!r})
print(json.dumps({{"merge_s": time.perf_counter() - t, "vm_hwm_gib": hwm()}}))
"""
)

NAIVE_RUNNING_CODE = (
    PEAK_RSS
    + """import json, time, torch, ckpt
from ckpt.reader import CheckpointReader
torch.set_num_threads(1)
t = time.perf_counter()
avg = None
for p in {srcs!r}:
    r = CheckpointReader(p)
    m = {{k: r.read(k) for k in r.keys()}}  # one whole model at a time
    if avg is None:
        avg = {{k: v / {n} for k, v in m.items()}}
    else:
        for k, v in m.items():
            avg[k].add_(v, alpha=1 / {n})
    del m
ckpt.save(avg, {out!r})
print(json.dumps({{"merge_s": time.perf_counter() - t, "vm_hwm_gib": hwm()}}))
"""
)


def mem_available() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gib", type=float, default=1.0, help="size of each source checkpoint (GiB)")
    ap.add_argument("--sources", type=int, default=8)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where to put the data (same disk as /tmp here)")
    ap.add_argument("--mergekit", default="/tmp/mk/bin/mergekit-yaml", help="mergekit-yaml to compare with")
    ap.add_argument("--skip-naive", action="store_true")
    ap.add_argument("--keep", action="store_true", help="keep the generated checkpoints")
    ap.add_argument("--json", help="write the figures here")
    ap.add_argument("--repeat", type=int, default=3, help="disk probe + ckpt.merge runs, interleaved (medians)")
    args = ap.parse_args()

    shapes, layers = llama_shapes(args.gib)
    size = sum(math.prod(s) for s in shapes.values()) * 4
    have_mergekit = os.path.exists(args.mergekit)
    need = size * (args.sources + 2) + (size * (args.sources + 1) if have_mergekit else 0)
    free = shutil.disk_usage(args.dir).free
    if free < need * 1.1:
        sys.exit(f"needs {need * 1.1 / GIB:.1f} GiB free under {args.dir}, has {free / GIB:.1f} GiB; lower --gib")
    root = tempfile.mkdtemp(prefix="bench-merge-", dir=args.dir)
    cold = page_cache_droppable()
    results: dict = {"sources": args.sources, "source_gib": size / GIB, "cold_cache": cold}
    rows = []
    try:
        srcs = [os.path.join(root, f"src-{i}") for i in range(args.sources)]
        here = os.path.dirname(os.path.abspath(__file__))
        gen = run_child(GENERATE_CODE.format(here=here, srcs=srcs, gib=args.gib))
        info = results["machine"] = {k: v for k, v in gen.items() if k not in ("process_s", "peak_rss_gib")}
        print(f"generated {args.sources} x {size / GIB:.2f} GiB in {gen['process_s']:.0f}s under {root}")

        disks, merges = [], []
        for _ in range(args.repeat):  # interleaved: the machine is shared, its load drifts
            if cold:
                drop_page_cache()
            nread, t_read = read_to_devnull([f for s in srcs for f in files_under(s)])
            t_write = write_fsync(os.path.join(root, "write-probe"), size)
            disks.append({"read_bytes": nread, "read_s": t_read, "write_bytes": size, "write_s": t_write})
            out = os.path.join(root, "merged")
            merges.append(run_child(STREAM_CODE.format(srcs=srcs, out=out), cold))
            shutil.rmtree(out)
        results["disk"], results["ckpt_merge"] = disks, merges
        t_read = median([d["read_s"] for d in disks])
        t_write = median([d["write_s"] for d in disks])
        disk = median([d["read_s"] + d["write_s"] for d in disks])
        print(
            f"disk (median of {args.repeat}): read {nread / GIB:.2f} GiB in {t_read:.2f}s "
            f"({nread / GIB / t_read:.2f} GiB/s), write+fsync {size / GIB:.2f} GiB in {t_write:.2f}s "
            f"({size / GIB / t_write:.2f} GiB/s)"
        )
        rows.append(["read all + write output (disk)", disk, float("nan"), float("nan"), 1.0])
        r = {k: median([m[k] for m in merges]) for k in ("merge_s", "process_s", "peak_rss_gib")}
        ratios = [m["merge_s"] / (d["read_s"] + d["write_s"]) for m, d in zip(merges, disks)]
        results["ckpt_merge_ratio_to_disk"] = ratios
        rows.append(
            [
                "ckpt.merge (streaming)",
                r["merge_s"],
                r["process_s"],
                max(m["peak_rss_gib"] for m in merges),
                median(ratios),
            ]
        )

        if not args.skip_naive:
            full = mem_available() > size * (args.sources + 2) * 1.2
            code = NAIVE_CODE if full else NAIVE_RUNNING_CODE
            label = "naive: load all, average" if full else "naive: one model at a time (RAM too small for all)"
            out = os.path.join(root, "naive")
            r = run_child(code.format(srcs=srcs, out=out, n=args.sources), cold)
            results["naive"] = {**r, "variant": label}
            rows.append([label, r["merge_s"], r["process_s"], r["peak_rss_gib"], r["merge_s"] / disk])
            shutil.rmtree(out)

        if have_mergekit:
            results["mergekit"] = bench_mergekit(args.mergekit, srcs, root, layers, cold, size)
            m = results["mergekit"]
            rows.append(
                ["mergekit linear (HF safetensors)", m["merge_s"], m["merge_s"], m["peak_rss_gib"], m["merge_s"] / disk]
            )
        else:
            results["mergekit"] = f"not found at {args.mergekit}"
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(
        f"{args.sources} sources x {size / GIB:.2f} GiB fp32, page cache {'cold' if cold else 'WARM (cannot drop)'}, "
        f"load avg at start {info['loadavg_at_start'][0]:.1f} on {info['cpus']} cpus"
    )
    print(format_table(["", "merge s", "process s", "peak RSS GiB", "x disk time"], rows))
    print("ckpt.merge: median of the runs, peak RSS the highest, x disk time the median of per-run ratios;")
    print("process s = the child's whole life (imports included); mergekit's figures are its whole process.")
    if args.json:
        write_json(args.json, results)


def bench_mergekit(mergekit: str, srcs: list[str], root: str, layers: int, cold: bool, size: int) -> dict:
    """Export every source as an HF model (ckpt.merge of one source = a bit-exact copy), merge linearly."""
    models = [os.path.join(root, f"hf-{i}") for i in range(len(srcs))]
    run_child(EXPORT_CODE.format(srcs=srcs, hfs=models, config=llama_config(layers)))
    cfg = os.path.join(root, "mergekit.yml")
    with open(cfg, "w") as f:
        f.write("merge_method: linear\ndtype: float32\nmodels:\n")
        for m in models:
            f.write(f"  - model: {m}\n    parameters:\n      weight: 1.0\n")
    out = os.path.join(root, "mergekit-out")
    wall, rss, _, err = spawn([mergekit, cfg, out], cold)
    if not (os.path.exists(out) and any(n.endswith(".safetensors") for n in os.listdir(out))):
        raise RuntimeError(f"mergekit produced no model:\n{textwrap.indent(err[-3000:], '  ')}")
    shutil.rmtree(out)
    for m in models:
        shutil.rmtree(m)
    return {"merge_s": wall, "peak_rss_gib": rss, "note": "wall time of the whole mergekit-yaml process"}


if __name__ == "__main__":
    main()
