"""The demo's printed report: short, in the order things happened, every figure measured in this run."""

from __future__ import annotations

import os
import statistics

from ckpt.catalog import Entry
from ckpt.sizes import format_size

from .model import entropy, n_params
from .story import EVAL_RTOL, DemoResult, Phase, checkpoint_name


def _ms(s: float) -> str:
    return f"{s * 1e3:.0f} ms"


def _count(n: int) -> str:
    return f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n / 1e3:.0f} k"


def _median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def _listing(entries: list[Entry], marker: str | None) -> list[str]:
    out = []
    for e in entries:
        flag = "  <- latest marker" if e.name == marker else ""
        out.append(f"          {e.name}  {e.status:<10} {format_size(e.size):>10}{flag}")
    return out


def _saves(phase: Phase, persist: dict[str, dict[str, float]]) -> list[str]:
    rows = []
    for i, (step, s) in enumerate(sorted(phase.saves().items())):
        t = s["timings"]
        rest = s["stall_s"] - t.get("plan", 0.0) - t.get("stage", 0.0)
        p = persist.get(checkpoint_name(step), {})
        persisted = f"{p['committed'] - p['accepted']:.2f} s" if "committed" in p else "not committed"
        note = "   (first of this job: plans, allocates the buffer)" if i == 0 else ""
        rows.append(
            f"  {step:>5} {phase.world:>6} {_ms(s['stall_s']):>8} {_ms(t.get('plan', 0.0)):>8} "
            f"{_ms(t.get('stage', 0.0)):>9} {_ms(rest):>8}   {persisted}{note}"
        )
    return rows


def _losses(losses: dict[int, float], steps: list[int]) -> str:
    return "  ".join(f"{s}: {losses[s]:.4f}" for s in steps)


def report(res: DemoResult) -> str:
    """A readable account of the run."""
    cfg, m, kill, r = res.cfg, res.cfg.model, res.kill, res.restored
    lines = [
        f"ckpt demo: a {m.layers}-layer transformer, {_count(n_params(m))} params (dim {m.dim}, vocab {m.vocab}), "
        f"{m.batch}x{m.seq} tokens/step, FSDP2 on CPU gloo ranks;",
        f"ckpt.Manager saves every {cfg.every} steps through a ckpt-server daemon; one checkpoint is "
        f"{format_size(res.sizes['total'])} (model {format_size(res.sizes['model'])}, "
        f"AdamW state {format_size(res.sizes['optim'])})",
        "",
        f"1. train   {cfg.train_world} ranks from step 1, {_median(res.train.step_seconds):.2f} s/step (median)",
    ]
    if kill is not None:
        if kill.manifest_at_kill:
            fate = "that checkpoint had already committed (the daemon was quicker than the kill)"
        elif kill.committed_after_kill_s is not None:
            fate = (
                "that save was in flight (no manifest yet); the daemon holds its snapshot and "
                f"committed it {kill.committed_after_kill_s:.2f} s after the kill"
            )
        else:
            fate = "that checkpoint never committed; restore skips it"
        lines += [
            f"2. kill    SIGKILL to all {cfg.train_world} ranks {_ms(kill.after_handoff_s)} after they handed the save "
            f"of step {kill.step} to the daemon;",
            f"          {fate}.",
            (
                "          The latest marker names it too (rank 0 moved it before it died)."
                if kill.latest_marker == checkpoint_name(kill.step)
                else f"          The latest marker still names {kill.latest_marker or 'nothing'} (rank 0's marker "
                "thread died); restore scans instead."
            ),
            "          run/ after the kill:",
            *_listing(kill.checkpoints, kill.latest_marker),
        ]
        if kill.orphan_buffer_bytes:
            orphans = format_size(kill.orphan_buffer_bytes)
            lines.append(f"          ({orphans} of staging buffers left in /dev/shm removed)")
    ram = r.get("ram_tier") or {}
    if ram.get("served"):
        tier = f"{format_size(ram['bytes'])} of {format_size(ram['total'])} of tensor data from the daemon's RAM tier"
    else:
        tier = f"from storage ({ram.get('why', 'no daemon')})"
    want = res.latest_committed_step
    verdict = "ok" if want is not None and res.resume_at == want + 1 else "WRONG"
    before, after = res.eval_before_kill, res.eval_after_restore
    drift = abs(after - before) / abs(before) if before else float("nan")
    lines += [
        f"3. resume  {cfg.resume_world} ranks: Manager.restore loaded step {r['loaded_step']} in {r['seconds']:.2f} s, "
        f"{tier};",
        f"          resumed at step {res.resume_at} = latest complete checkpoint ({want}) + 1: {verdict}; "
        f"{_median(res.resume.step_seconds):.2f} s/step",
        f"          held-out loss of the restored weights {after:.6f} ({cfg.resume_world} ranks) vs {before:.6f} "
        f"at save ({cfg.train_world} ranks): rel. diff {drift:.0e}",
    ]
    weights = ", ".join(f"{os.path.basename(u)} {w:.2f}" for u, w in res.merge.weights.items())
    how = "MWA on recorded held-out loss" if cfg.merge_method == "mwa" else "uniform"
    lines += [
        f"4. merge   {how}, model only: {weights} ({res.merge.seconds:.2f} s)",
        f"          held-out loss in 1 process: merged {res.eval_merged:.4f} vs last checkpoint ({res.last.name}) "
        f"{res.eval_last:.4f}; the data's entropy is {entropy(m):.2f}",
        f"          run/ at the end (keep_last={cfg.keep_last}):",
        *_listing(res.final, res.final_marker),
        "",
        "saves: stall = time maybe_save held up the training loop (plan + snapshot copy + handoff to the daemon",
        "and rank agreement); persist = the daemon writing and committing it, behind training",
        "   step  ranks    stall     plan  snapshot  handoff   persist",
        *_saves(res.train, res.persist),
        *_saves(res.resume, res.persist),
        "",
        "loss across the kill (training loss of each step, all ranks)",
        f"   before the kill  ({cfg.train_world} ranks)  {_losses(res.train.losses, sorted(res.train.losses)[-4:])}",
        f"   after the resume ({cfg.resume_world} ranks)  {_losses(res.resume.losses, sorted(res.resume.losses)[:4])}",
    ]
    held_out = [f"{e['step']}: {e['loss']:.4f}" for e in res.train.of("eval") if e["step"] <= (res.resume_at or 1) - 1]
    resumed = [f"{e['step']}: {e['loss']:.4f}" for e in res.resume.of("eval")]
    lines.append(f"   held-out loss at the saves  {'  '.join(held_out)}  | restored {'  '.join(resumed)}")
    overlap = sorted(set(res.train.losses) & set(res.resume.losses))
    if overlap:
        d = max(abs(res.train.losses[s] - res.resume.losses[s]) / abs(res.train.losses[s]) for s in overlap)
        lines.append(f"   steps {overlap[0]}-{overlap[-1]} ran in both jobs: rel. diff {d:.0e}")
    if res.reference_drift is not None:
        lines.append(
            f"   vs an uninterrupted {cfg.train_world}-rank run: the resumed losses are within "
            f"{res.reference_drift:.0e} relative"
        )
    lines.append("")
    if res.directory:
        run, merged = os.path.join(res.directory, "run"), os.path.join(res.directory, "merged")
        lines += [
            f"kept in {res.directory}: run/, merged/, events/ (per-rank JSON lines), ckpt-server.log",
            f"   .venv/bin/ckpt ls {run}   |   .venv/bin/ckpt info {merged}",
        ]
    startup = f" + {res.startup_s:.0f} s interpreter start and imports" if res.startup_s else ""
    lines.append(f"{res.seconds:.0f} s from the daemon's start to this report{startup}")
    if res.ok:
        lines.append(f"story holds (held-out losses agree within {EVAL_RTOL:.0e})")
    else:
        lines.append("STORY BROKEN:\n  " + "\n  ".join(res.problems))
    return "\n".join(lines)
