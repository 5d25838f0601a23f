"""The demo's story: train, get killed mid-save, resume on another world size, merge, evaluate.

1. A ``ckpt-server`` daemon starts on a Unix socket in a temp dir.
2. ``train_world`` ranks train the model (FSDP2), ``ckpt.Manager`` handing a
   snapshot to the daemon every ``every`` steps and going straight back to
   training (the stall is planning, the snapshot copy and the handoff).
3. As soon as every rank has handed over the save of step ``kill_at``, the
   driver SIGKILLs all ranks: the save is in flight in the daemon, the
   trainers that would wait for it and move the ``latest`` marker are gone.
4. ``resume_world`` ranks (another number) restore with ``Manager.restore``
   from the newest complete checkpoint, reading it from the daemon's RAM tier
   where it has one, and train to the end.
5. The last ``merge_last`` checkpoints are merged (``ckpt.merge``) and the
   merged model and the last checkpoint are evaluated in this process (a
   third layout: plain tensors).

Optionally (``reference``) the same run goes uninterrupted on ``train_world``
ranks, to measure how closely the resumed losses follow it.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import ckpt
from ckpt.catalog import Entry, EntryStatus, scan
from ckpt.format import LATEST
from ckpt.merge import MergeResult
from ckpt.reader import CheckpointReader

from .launch import Daemon, Job, remove_orphan_buffers, warm_up
from .model import ModelConfig, Transformer, evaluate
from .train import RunSpec, read_events, train_rank

# Relative difference allowed between the held-out loss of the model saved at
# step K (computed on train_world ranks before the kill) and of the model
# restored from it (on resume_world ranks). The weights are bitwise equal; the
# losses differ only by the order of float sums across another number of ranks
# (observed ~1e-7); a wrong or partial restore moves them by orders of magnitude more.
EVAL_RTOL = 1e-4
ARTIFACTS = ("run", "merged", "reference", "events", "ckpt-server.log")


def checkpoint_name(step: int) -> str:
    """What ``ckpt.Manager`` (default ``name_format``) calls the checkpoint of ``step``."""
    return ckpt.Manager.name_format.format(step=step)


@dataclass(frozen=True)
class DemoConfig:
    """The run: model size, schedule, topologies and when the job is killed."""

    model: ModelConfig = field(default_factory=ModelConfig)
    steps: int = 40
    every: int = 5
    kill_at: int = 25  # the job dies right after handing over this step's save
    keep_last: int = 3
    train_world: int = 2
    resume_world: int = 3
    merge_last: int = 3
    merge_method: str = "mwa"  # "mwa" (weighs by recorded held-out loss) or "uniform"
    reference: bool = False
    timeout_s: float = 900.0

    def check(self) -> None:
        problems = []
        if not 0 < self.every <= self.kill_at < self.steps:
            problems.append("need 0 < every <= kill_at < steps")
        if self.kill_at % self.every:
            problems.append(f"kill_at ({self.kill_at}) must be a save step: a multiple of every ({self.every})")
        for w in (self.train_world, self.resume_world):
            if w < 1 or self.model.batch % w:
                problems.append(f"batch ({self.model.batch}) must split evenly over {w} ranks")
        if self.model.dim % self.model.heads:
            problems.append(f"dim ({self.model.dim}) must be a multiple of heads ({self.model.heads})")
        if not 1 <= self.merge_last <= self.keep_last:
            problems.append("need 1 <= merge_last <= keep_last (retention would delete what the merge needs)")
        if self.merge_method not in ("mwa", "uniform"):
            problems.append(f"merge_method must be 'mwa' or 'uniform', not {self.merge_method!r}")
        if problems:
            raise ValueError("; ".join(problems))


@dataclass
class Phase:
    """One launch of the job: its ranks' events."""

    name: str
    world: int
    events: list[list[dict[str, Any]]]  # per rank
    seconds: float

    def of(self, kind: str, rank: int = 0) -> list[dict[str, Any]]:
        return [e for e in self.events[rank] if e["kind"] == kind]

    @property
    def losses(self) -> dict[int, float]:
        return {e["step"]: e["loss"] for e in self.of("step")}

    @property
    def step_seconds(self) -> list[float]:
        return [e["seconds"] for e in self.of("step")]

    def saves(self) -> dict[int, dict[str, Any]]:
        """Per saved step: the longest stall over ranks and rank 0's timings."""
        out: dict[int, dict[str, Any]] = {}
        for r, evs in enumerate(self.events):
            for e in evs:
                if e["kind"] == "save":
                    s = out.setdefault(e["step"], {"stall_s": 0.0, "ranks": 0, "timings": {}})
                    s["stall_s"] = max(s["stall_s"], e["stall_s"])
                    s["ranks"] += 1
                    if r == 0:
                        s["timings"] = e["timings"]
        return out


@dataclass
class Kill:
    """What the SIGKILL interrupted and what the daemon did afterwards."""

    step: int  # the save that was handed over just before
    last_step_logged: int
    after_handoff_s: float  # from the last rank's handoff to the kill
    manifest_at_kill: bool  # had the in-flight save committed already?
    committed_after_kill_s: float | None  # when the daemon committed it (None: it never did)
    latest_marker: str | None  # what the root's ``latest`` marker said after the kill
    checkpoints: list[Entry]  # under the root once the daemon was idle
    pids: list[int]  # of the killed ranks
    orphan_buffer_bytes: int


@dataclass
class DemoResult:
    cfg: DemoConfig
    directory: str  # "" when the artifacts were in a temp dir, removed
    train: Phase
    kill: Kill | None
    resume: Phase
    reference: Phase | None
    persist: dict[str, dict[str, float]]  # checkpoint name -> daemon's accepted/committed times
    sizes: dict[str, int]  # model / optim / total tensor bytes of one checkpoint
    final: list[Entry]
    final_marker: str | None
    merge: MergeResult
    eval_merged: float
    eval_last: float  # the last checkpoint, evaluated here (1 process, plain tensors)
    last: Entry
    seconds: float
    problems: list[str] = field(default_factory=list)
    daemon_exit: int | None = None  # 0: it drained and stopped cleanly
    startup_s: float = 0.0  # before run_demo: interpreter start and imports (set by the command line)

    @property
    def restored(self) -> dict[str, Any]:
        return self.resume.of("restored")[0]

    @property
    def resume_at(self) -> int | None:
        return self.restored["resume_at"]

    @property
    def latest_committed_step(self) -> int | None:
        steps = [e.step for e in (self.kill.checkpoints if self.kill else []) if e.status is EntryStatus.COMPLETE]
        return max(steps) if steps else None

    @property
    def eval_before_kill(self) -> float | None:
        want = (self.resume_at or 1) - 1
        found = [e["loss"] for e in self.train.of("eval") if e["step"] == want]
        return found[0] if found else None

    @property
    def eval_after_restore(self) -> float:
        return self.resume.of("eval")[0]["loss"]

    @property
    def reference_drift(self) -> float | None:
        """Largest relative difference of the resumed losses from the uninterrupted run's."""
        if self.reference is None:
            return None
        ref = self.reference.losses
        return max(abs(v - ref[s]) / abs(ref[s]) for s, v in self.resume.losses.items())

    @property
    def ok(self) -> bool:
        return not self.problems


def _phase_events(prefix: str, world: int) -> list[list[dict[str, Any]]]:
    return [read_events(f"{prefix}-rank{r}.jsonl") for r in range(world)]


def _run_until_kill(job: Job, prefix: str, cfg: DemoConfig) -> tuple[float, float]:
    """Wait until every rank has handed over the save of ``kill_at``, then SIGKILL the job.

    Returns (the last handoff's time, the kill's time), wall clock.
    """
    deadline = time.monotonic() + cfg.timeout_s
    try:
        while True:
            if job.check():
                raise RuntimeError(f"the job finished before step {cfg.kill_at} could be killed")
            handed = []
            for evs in _phase_events(prefix, job.world):
                t = [e["t"] for e in evs if e["kind"] == "save" and e["step"] == cfg.kill_at]
                handed.append(t[0] if t else None)
            if all(t is not None for t in handed):
                job.kill()
                return max(t for t in handed if t is not None), time.time()
            if time.monotonic() > deadline:
                raise TimeoutError(f"step {cfg.kill_at} was not reached within {cfg.timeout_s:.0f}s")
            time.sleep(0.005)
    except BaseException:
        job.kill()
        raise


def _persist_times(daemon: Daemon) -> dict[str, dict[str, float]]:
    """Per checkpoint name: when the daemon accepted its first rank and committed it (rank 0)."""
    uri_of: dict[str, str] = {}
    out: dict[str, dict[str, float]] = {}
    for r in daemon.logs():
        job = r.get("job")
        if not job:
            continue
        if r.get("msg") == "accepted":
            uri_of[job] = r["uri"]
            name = os.path.basename(r["uri"].rstrip("/"))
            out.setdefault(name, {"accepted": r["ts"]})
        elif r.get("msg") == "committed" and job in uri_of:
            out[os.path.basename(uri_of[job].rstrip("/"))]["committed"] = r["ts"]
    return out


def _latest_marker(root: str) -> str | None:
    try:
        with open(os.path.join(root, LATEST)) as f:
            return json.load(f).get("name")
    except (OSError, ValueError):
        return None


def _eval_checkpoint(cfg: ModelConfig, uri: str) -> float:
    """Held-out loss of a checkpoint's model, loaded into plain tensors in this process."""
    model = Transformer(cfg)
    state = {"model": model.state_dict()}
    manifest = ckpt.load(state, uri, strict=False)  # the model only (a merge holds nothing else)
    missing = [k for k in state["model"] if f"model.{k}" not in manifest.tensors]
    if missing:
        raise RuntimeError(f"{uri} lacks model tensors {missing[:3]}")
    return evaluate(model, cfg)


def _prepare_dir(directory: str, overwrite: bool) -> None:
    os.makedirs(directory, exist_ok=True)
    present = [a for a in ARTIFACTS if os.path.exists(os.path.join(directory, a))]
    if present and not overwrite:
        raise FileExistsError(f"{directory} holds an earlier demo's {', '.join(present)}; pass --overwrite")
    for a in present:
        path = os.path.join(directory, a)
        shutil.rmtree(path) if os.path.isdir(path) else os.unlink(path)


def run_demo(cfg: DemoConfig, directory: str | None = None, overwrite: bool = False) -> DemoResult:
    """Run the whole story; return what happened (``report`` prints it)."""
    cfg.check()
    t_start = time.perf_counter()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    if directory:
        _prepare_dir(directory, overwrite)
    warm_up()  # the forkserver imports torch while the daemon starts
    with tempfile.TemporaryDirectory(prefix="ckpt-demo-") as tmp:
        work = directory or tmp
        root, events = os.path.join(work, "run"), os.path.join(work, "events")
        os.makedirs(events, exist_ok=True)
        shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
        ram_dir = tempfile.mkdtemp(prefix="ckpt-demo-ram-", dir=shm)
        # A short path: Unix socket paths are limited to ~107 bytes, whatever --dir is.
        daemon = Daemon.start(os.path.join(tmp, "d.sock"), os.path.join(work, "ckpt-server.log"), ram_dir)
        try:
            daemon.wait_ready()
            res = _story(cfg, work, root, events, daemon)
        finally:
            exit_code = daemon.stop()
            shutil.rmtree(ram_dir, ignore_errors=True)
        res.daemon_exit = exit_code
        if exit_code != 0:
            res.problems.append(f"ckpt-server exited with {exit_code} (not drained cleanly); see its log")
        res.persist = _persist_times(daemon)
        res.directory = directory or ""
        res.seconds = time.perf_counter() - t_start
        return res


def _story(cfg: DemoConfig, work: str, root: str, events: str, daemon: Daemon) -> DemoResult:
    m = cfg.model
    common = {"model": m, "root": root, "steps": cfg.steps, "keep_last": cfg.keep_last}

    # 2-3. Train on train_world ranks; SIGKILL them right after the save of kill_at is handed over.
    prefix = os.path.join(events, "train")
    spec = RunSpec(**common, events=prefix, every=cfg.every, daemon=daemon.address, restore=False)
    t0 = time.perf_counter()
    job = Job.start("train", train_rank, cfg.train_world, events, spec)
    handed_at, killed_at = _run_until_kill(job, prefix, cfg)
    train = Phase("train", cfg.train_world, _phase_events(prefix, cfg.train_world), time.perf_counter() - t0)
    in_flight = os.path.join(root, checkpoint_name(cfg.kill_at))
    manifest_at_kill = os.path.exists(os.path.join(in_flight, "manifest.json"))
    daemon.wait_idle(timeout_s=spec.commit_timeout_s + 30)  # whatever it accepted is committed or failed now
    persist = _persist_times(daemon).get(os.path.basename(in_flight), {})
    committed = persist.get("committed")
    kill = Kill(
        step=cfg.kill_at,
        last_step_logged=max(train.losses, default=0),
        after_handoff_s=killed_at - handed_at,
        manifest_at_kill=manifest_at_kill,
        committed_after_kill_s=None if committed is None else committed - killed_at,
        latest_marker=_latest_marker(root),
        checkpoints=scan(root),
        pids=job.pids,
        orphan_buffer_bytes=remove_orphan_buffers(job.pids),
    )

    # 4. Resume on resume_world ranks from the newest complete checkpoint, train to the end.
    prefix = os.path.join(events, "resume")
    spec = RunSpec(**common, events=prefix, every=cfg.every, daemon=daemon.address, restore=True)
    t0 = time.perf_counter()
    Job.start("resume", train_rank, cfg.resume_world, events, spec).wait(cfg.timeout_s)
    resume = Phase("resume", cfg.resume_world, _phase_events(prefix, cfg.resume_world), time.perf_counter() - t0)

    reference = None
    if cfg.reference:  # the same run, never interrupted, never saved
        prefix = os.path.join(events, "reference")
        spec = RunSpec(
            **{**common, "root": os.path.join(work, "reference")}, events=prefix, every=None, daemon=None, restore=False
        )
        t0 = time.perf_counter()
        Job.start("reference", train_rank, cfg.train_world, events, spec).wait(cfg.timeout_s)
        reference = Phase(
            "reference", cfg.train_world, _phase_events(prefix, cfg.train_world), time.perf_counter() - t0
        )

    # 5. Merge the last checkpoints; evaluate the merge and the last checkpoint here, as plain tensors.
    final = scan(root)
    complete = [e for e in final if e.status is EntryStatus.COMPLETE]
    sources = complete[-cfg.merge_last :]
    options = {"metric": "eval_loss"} if cfg.merge_method == "mwa" else {}
    merged = ckpt.merge(
        [e.uri for e in sources], os.path.join(work, "merged"), cfg.merge_method, include=["model.*"], **options
    )
    last = complete[-1]
    manifest = CheckpointReader(last.uri).manifest
    sizes = {
        "model": sum(r.nbytes for k, r in manifest.tensors.items() if k.startswith("model.")),
        "optim": sum(r.nbytes for k, r in manifest.tensors.items() if k.startswith("optim.")),
        "total": last.size,
    }
    res = DemoResult(
        cfg=cfg,
        directory="",
        train=train,
        kill=kill,
        resume=resume,
        reference=reference,
        persist={},
        sizes=sizes,
        final=final,
        final_marker=_latest_marker(root),
        merge=merged,
        eval_merged=_eval_checkpoint(m, merged.uri),
        eval_last=_eval_checkpoint(m, last.uri),
        last=last,
        seconds=0.0,
    )
    res.problems = check(res)
    return res


def check(res: DemoResult) -> list[str]:
    """The story's invariants; each broken one as a sentence."""
    problems = []
    want = res.latest_committed_step
    if want is None or res.resume_at != want + 1:
        problems.append(f"resumed at step {res.resume_at}, but the latest complete checkpoint is of step {want}")
    before, after = res.eval_before_kill, res.eval_after_restore
    if before is None or not math.isclose(before, after, rel_tol=EVAL_RTOL):
        problems.append(f"held-out loss {after} after the restore, {before} when that checkpoint was saved")
    losses = list(res.resume.losses.values())
    if not losses or not all(math.isfinite(v) for v in losses):
        problems.append(f"resumed losses are not all finite: {losses}")
    if max(res.resume.losses, default=0) != res.cfg.steps:
        problems.append(f"the resumed job stopped at step {max(res.resume.losses, default=0)}, not {res.cfg.steps}")
    recorded = res.last.metrics.get("eval_loss")
    if recorded is None or not math.isclose(res.eval_last, recorded, rel_tol=EVAL_RTOL):
        problems.append(f"{res.last.name} scores {res.eval_last} here, {recorded} when saved")
    if not math.isfinite(res.eval_merged):
        problems.append(f"the merged model's held-out loss is {res.eval_merged}")
    return problems
