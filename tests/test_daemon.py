"""The ``ckpt-server`` daemon, end to end, with real daemon processes.

Ranks (gloo CPU processes) save through daemons on Unix sockets and over TCP
with a token; one job may use two daemons; the daemon persists and commits
after its trainers are SIGKILLed; a SIGKILLed daemon fails its clients' saves
clearly, leaves earlier checkpoints intact, and a restarted one serves the next
save; SIGTERM drains; the memory budget refuses or queues; health and
Prometheus metrics report.

A save is held "in flight" deterministically by the commit protocol itself:
rank 0's data is handed over while rank 1 has not saved yet, so the committer
in the daemon waits for rank 1's part in storage until the test lets it go.
"""

from __future__ import annotations

import glob
import logging
import os
import signal
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpc
import pytest
import torch
from ckpt_server.main import main as server_main
from daemon_util import (
    Daemon,
    health_status,
    metrics_http,
    metrics_rpc,
    parse_prometheus,
    remove_shm_files_of,
    shm_files_of,
    start_daemons,
    stop_all,
    wait_for,
)
from dist import run_ranks, run_ranks_outcomes
from helpers import manifest_of, random_tensor

import ckpt
import ckpt.client
from ckpt import SaveAbortedError, SaveOptions, Sharded
from ckpt._proto import ckpt_pb2, ckpt_pb2_grpc
from ckpt.format import MANIFEST, Manifest

RANK_TIMEOUT_S = 240.0
SIGNAL_TIMEOUT_S = 120.0
TOKEN = "s3cret-token"
BUDGET = 1536 << 10


@dataclass
class Daemons:
    """Every daemon this module needs, started together (interpreter start-up is the slow part)."""

    a: Daemon  # Unix socket + TCP with TOKEN + Prometheus over HTTP
    b: Daemon  # --memory-budget BUDGET (the other tests' saves through it are far smaller)
    drained: Daemon  # gets SIGTERM
    victim: Daemon  # gets SIGKILL


@pytest.fixture(scope="module")
def daemons(tmp_path_factory) -> Iterator[Daemons]:
    token_file = tmp_path_factory.mktemp("token") / "token"
    token_file.write_text(TOKEN + "\n")
    token_file.chmod(0o600)
    started = start_daemons(
        [
            ["--listen", "127.0.0.1:0", "--token-file", str(token_file), "--metrics-port", "0"],
            ["--memory-budget", str(BUDGET), "--budget-wait", "90"],
            [],
            [],
        ]
    )
    try:
        yield Daemons(*started)
    finally:
        stop_all(started)


def jobs_ok(d: Daemon) -> float:
    return samples_of(d.address).get('ckpt_jobs_total{status="ok"}', 0.0)


def count_logs(d: Daemon, msg: str) -> int:
    return sum(1 for r in d.logs() if r.get("msg") == msg)


# -- state every rank and the checking parent agree on ----------------------------------------------


def global_weight(world: int, seed: int, rows: int, cols: int) -> torch.Tensor:
    return random_tensor((world * rows, cols), torch.float32, seed)


def replicated(seed: int) -> torch.Tensor:
    return random_tensor((33,), torch.bfloat16, seed + 10_000)


def rank_state(rank: int, world: int, seed: int, rows: int = 8, cols: int = 96) -> dict:
    """Rank's row block of a global weight, plus a replicated bf16 tensor and a value."""
    full = global_weight(world, seed, rows, cols)
    local = full[rank * rows : (rank + 1) * rows].clone()
    return {"w": Sharded.box(local, full.shape, (rank * rows, 0)), "rep": replicated(seed), "seed": seed}


def refill(state: dict, rank: int, world: int, seed: int) -> None:
    """New values in the same tensors (what training does between saves)."""
    rows, cols = state["w"].tensor.shape
    state["w"].tensor.copy_(global_weight(world, seed, rows, cols)[rank * rows : (rank + 1) * rows])
    state["rep"].copy_(replicated(seed))
    state["seed"] = seed


def scramble(state: dict) -> None:
    """Overwrite every tensor in place, as the next optimizer step would."""
    state["w"].tensor.view(torch.uint8).bitwise_not_()
    state["rep"].view(torch.uint8).bitwise_not_()


def assert_loads(uri: str, world: int, seed: int, rows: int = 8, cols: int = 96) -> Manifest:
    """The checkpoint at ``uri`` is, bitwise, what ``rank_state(.., seed)`` held on every rank."""
    target = {"w": torch.zeros(world * rows, cols), "rep": torch.zeros(33, dtype=torch.bfloat16), "seed": -1}
    manifest = ckpt.load(target, uri)
    want = global_weight(world, seed, rows, cols)
    assert torch.equal(target["w"].view(torch.uint8), want.view(torch.uint8)), f"{uri}: weight differs"
    assert torch.equal(target["rep"].view(torch.uint8), replicated(seed).view(torch.uint8)), f"{uri}: rep differs"
    assert target["seed"] == seed
    return manifest


def signal_file(directory: str, name: str) -> None:
    with open(os.path.join(directory, name), "w"):
        pass


def await_file(directory: str, name: str, timeout: float = SIGNAL_TIMEOUT_S) -> None:
    wait_for(lambda: os.path.exists(os.path.join(directory, name)), timeout, f"signal {name!r}", interval=0.01)


def run_in_thread(fn, *args, **kwargs) -> tuple[threading.Thread, dict]:
    """Run ``fn`` in the background; the dict gets ``result`` or ``error``."""
    out: dict = {}

    def target() -> None:
        try:
            out["result"] = fn(*args, **kwargs)
        except BaseException as e:
            out["error"] = e

    t = threading.Thread(target=target, daemon=True)
    t.start()
    return t, out


def join(t: threading.Thread, out: dict, timeout: float = RANK_TIMEOUT_S):
    t.join(timeout)
    assert not t.is_alive(), "background call did not finish"
    if "error" in out:
        raise out["error"]
    return out["result"]


def samples_of(address: str) -> dict[str, float]:
    return parse_prometheus(metrics_rpc(address))


@pytest.fixture
def cleanup_pids():
    """Trainer pids whose /dev/shm staging files a test leaves behind on failure."""
    pids: list[int] = []
    yield pids
    remove_shm_files_of(pids)


# -- rank functions (module level: they run in the ranks) ------------------------------------------------


def _save_through(rank: int, world: int, addresses: list[str], uri: str, seed: int) -> int:
    state = rank_state(rank, world, seed)
    h = ckpt.async_save(state, uri, step=seed, options=SaveOptions(daemon=addresses[rank]))
    scramble(state)  # the daemon persists the snapshot, not the live tensors
    h.wait()
    return os.getpid()


def _save_then_get_killed(rank: int, world: int, address: str, root: str, seed: int) -> None:
    options = SaveOptions(daemon=address)
    state = rank_state(rank, world, seed)
    ckpt.async_save(state, f"{root}/first", options=options).wait()  # plans (the only collective)
    refill(state, rank, world, seed + 1)
    ckpt.async_save(state, f"{root}/final", step=seed + 1, options=options)  # no wait()
    scramble(state)
    signal_file(root, f"pid-{rank}-{os.getpid()}")
    os.kill(os.getpid(), signal.SIGKILL)


def _committer_killed_after_handoff(rank: int, world: int, address: str, root: str, seed: int) -> float:
    """Rank 0 hands its part to the daemon and is SIGKILLed; rank 1 saves at once and waits,
    watching the committer's heartbeat; rank 2 saves 16 heartbeat intervals later. Only the
    daemon's heartbeat can keep rank 1 from taking the committer for dead meanwhile."""
    options = SaveOptions(daemon=address, heartbeat_s=0.5)
    state = rank_state(rank, world, seed)
    ckpt.async_save(state, f"{root}/first", options=options).wait()  # plans (the only collective)
    refill(state, rank, world, seed + 1)
    if rank == 2:
        wait_for(lambda: glob.glob(f"{root}/pid-0-*"), SIGNAL_TIMEOUT_S, "rank 0's kill")
        time.sleep(8)
    h = ckpt.async_save(state, f"{root}/final", step=seed + 1, options=options)
    if rank == 0:
        h.wait_handed_off(60)
        signal_file(root, f"pid-{rank}-{os.getpid()}")
        os.kill(os.getpid(), signal.SIGKILL)
    t0 = time.monotonic()
    h.wait()
    return time.monotonic() - t0


def _hold_second_save(rank: int, world: int, addresses: list[str], root: str, seed: int) -> int:
    """Save ``warm`` on both ranks, then ``held``: rank 0 hands its part over at
    once, rank 1 only after the test signals ``go``. Until then the committer waits."""
    options = SaveOptions(daemon=addresses[rank])
    state = rank_state(rank, world, seed)
    ckpt.async_save(state, f"{root}/warm", options=options).wait()
    refill(state, rank, world, seed + 1)
    if rank == 1:
        await_file(root, "go")
    h = ckpt.async_save(state, f"{root}/held", step=seed + 1, options=options)
    if rank == 0:
        signal_file(root, "submitted")
    scramble(state)
    h.wait()
    return os.getpid()


def _daemon_dies_mid_save(rank: int, world: int, addresses: list[str], root: str, rows: int) -> dict:
    """Save 1 commits; in save 2 (same location, overwrite) rank 0's daemon is killed
    mid-upload; save 3 goes through the restarted daemon. Rank 1 uses another daemon."""
    options = SaveOptions(daemon=addresses[rank], overwrite=True, commit_timeout_s=120)
    uri = f"{root}/c"
    cols = 1024
    state = rank_state(rank, world, 1, rows, cols)
    ckpt.async_save(state, uri, step=1, options=options).wait()
    refill(state, rank, world, 2)
    out: dict = {"pid": os.getpid()}
    if rank == 1:
        await_file(root, "daemon-killed")  # rank 1 is late: save 2 cannot commit, wherever the kill lands
    t0 = time.monotonic()
    try:
        h = ckpt.async_save(state, uri, step=2, options=options)
        if rank == 0:
            signal_file(root, "submitted")
        h.wait()
        out["save2"] = "committed"
    except SaveAbortedError as e:
        out["save2"] = f"SaveAbortedError: {e}"
    out["save2_s"] = time.monotonic() - t0
    signal_file(root, f"save2-done-{rank}")
    await_file(root, "daemon-restarted")
    refill(state, rank, world, 3)
    ckpt.async_save(state, uri, step=3, options=options).wait()
    return out


def _budget_job(rank: int, world: int, address: str, root: str) -> None:
    """Rank 0 hands over 1 MiB and holds it (its commit waits for rank 1, which saves 4 KiB on ``go``)."""
    options = SaveOptions(daemon=address)
    state = {f"r{rank}": torch.full(((256 << 10) if rank == 0 else 1024,), float(rank))}
    ckpt.async_save(state, f"{root}/warm", options=options).wait()
    if rank == 1:
        await_file(root, "go")
    h = ckpt.async_save(state, f"{root}/held", options=options)
    if rank == 0:
        signal_file(root, "submitted")
    h.wait()


# -- one daemon, several ranks ---------------------------------------------------------------------------


@pytest.mark.daemon
def test_socket_is_private_and_health_reports_serving(daemons):
    d = daemons.a
    assert stat.S_IMODE(os.stat(d.socket).st_mode) == 0o600
    assert health_status(d.address) == "SERVING"
    assert health_status(d.address, "ckpt.v1.Checkpointer") == "SERVING"
    ready = d.wait_log("ready")
    assert ready["level"] == "info" and ready["pid"] == d.pid  # structured (JSON) logs


@pytest.mark.daemon
@pytest.mark.dist
def test_three_ranks_save_through_one_daemon(tmp_path, daemons, cleanup_pids):
    d = daemons.a
    before = jobs_ok(d)
    uri = str(tmp_path / "c")
    pids = run_ranks(_save_through, 3, [d.address] * 3, uri, 5, start_method="forkserver", timeout=RANK_TIMEOUT_S)
    cleanup_pids.extend(pids)
    manifest = assert_loads(uri, 3, 5)
    assert manifest.step == 5 and manifest.topology["world_size"] == 3
    assert jobs_ok(d) == before + 3
    # Ranks that exited cleanly took their staging files with them.
    assert not [f for p in pids for f in shm_files_of(p)]


@pytest.mark.daemon
@pytest.mark.dist
def test_two_daemons_one_job_commit_through_storage(tmp_path, daemons, cleanup_pids):
    a, b = daemons.a, daemons.b
    ok = jobs_ok(a), jobs_ok(b)
    committed = count_logs(a, "committed"), count_logs(b, "committed")
    persisted_b = count_logs(b, "persisted")
    uri = str(tmp_path / "c")
    addresses = [a.address, a.address, b.address, b.address]
    pids = run_ranks(_save_through, 4, addresses, uri, 9, start_method="forkserver", timeout=RANK_TIMEOUT_S)
    cleanup_pids.extend(pids)
    assert_loads(uri, 4, 9)
    assert (jobs_ok(a), jobs_ok(b)) == (ok[0] + 2, ok[1] + 2)
    # Rank 0's daemon committed; the other daemon only persisted its ranks' parts.
    assert (count_logs(a, "committed"), count_logs(b, "committed")) == (committed[0] + 1, committed[1])
    assert count_logs(b, "persisted") == persisted_b + 2


# -- TCP with a token -----------------------------------------------------------------------------------


def test_tcp_listener_needs_a_token_to_start(tmp_path, monkeypatch, capsys):
    root = logging.getLogger()
    monkeypatch.setattr(root, "handlers", list(root.handlers))  # main() configures logging
    monkeypatch.setenv("CKPT_SERVER_TOKEN", "")
    assert server_main(["--socket", str(tmp_path / "s.sock"), "--listen", "127.0.0.1:0"]) == 2
    assert "--token" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "s.sock")


@pytest.mark.daemon
def test_tcp_with_token_streams_the_snapshot(tmp_path, daemons, monkeypatch):
    d = daemons.a
    host, port = d.tcp.rsplit(":", 1)
    assert host == "127.0.0.1" and int(port) > 0
    before = jobs_ok(d)
    state = rank_state(0, 1, 21)
    options = SaveOptions(daemon=d.tcp)

    monkeypatch.setenv("CKPT_SERVER_TOKEN", TOKEN)
    h = ckpt.async_save(state, str(tmp_path / "ok"), step=21, options=options)
    scramble(state)
    h.wait()
    assert_loads(str(tmp_path / "ok"), 1, 21)
    assert jobs_ok(d) == before + 1

    for bad in ("wrong-token", None):
        if bad is None:
            monkeypatch.delenv("CKPT_SERVER_TOKEN")
        else:
            monkeypatch.setenv("CKPT_SERVER_TOKEN", bad)
        with pytest.raises(SaveAbortedError, match="UNAUTHENTICATED.*token"):
            ckpt.async_save(state, str(tmp_path / f"refused-{bad}"), options=options).wait()
        assert not os.path.exists(tmp_path / f"refused-{bad}" / MANIFEST)
    assert jobs_ok(d) == before + 1


@pytest.mark.daemon
def test_daemon_compresses_and_references_as_the_options_say(tmp_path, daemons):
    """The encoding travels in the job's head: the daemon compresses and writes only what changed."""
    from ckpt.options import Compression

    root = tmp_path / "run"
    weights = (torch.randn(256, 256, generator=torch.Generator().manual_seed(31)) * 0.02).to(torch.bfloat16)
    state = {"w": weights, "adapter": torch.zeros(4, 256)}
    ckpt.async_save(state, str(root / "s1"), options=SaveOptions(
        daemon=daemons.b.address, compression=Compression(), incremental=True)).wait()
    state["adapter"] += 1
    ckpt.async_save(state, str(root / "s2"), options=SaveOptions(
        daemon=daemons.b.address, compression=Compression(), incremental_from=str(root / "s1"))).wait()
    m = manifest_of(str(root / "s2"))
    (w,) = m.tensors["w"].chunks
    assert w.object.startswith("../s1/") and w.codec is not None and set(m.refs) == {"s1"}
    assert not m.tensors["adapter"].chunks[0].object.startswith("../")
    out = {"w": torch.zeros_like(weights), "adapter": torch.zeros(4, 256)}
    ckpt.load(out, str(root / "s2"))
    assert torch.equal(out["w"], weights) and torch.equal(out["adapter"], state["adapter"])


@pytest.mark.daemon
def test_tcp_streams_parts_over_4_mib_and_a_large_head(tmp_path, daemons, monkeypatch):
    """gRPC refuses messages over 4 MiB unless both sides raise the limit: a rank's snapshot
    of several MiB and a head (JSON values) of several MiB must both cross, in pieces."""
    monkeypatch.setenv("CKPT_SERVER_TOKEN", TOKEN)
    rows, cols = 2048, 768  # 6 MiB of float32
    state = rank_state(0, 1, 23, rows, cols)
    notes = "x" * (6 << 20)  # a 6 MiB value: the head must stream too
    state["notes"] = notes
    h = ckpt.async_save(state, str(tmp_path / "big"), step=23, options=SaveOptions(daemon=daemons.a.tcp))
    scramble(state)
    state["notes"] = "mutated"
    h.wait_handed_off(timeout=120)
    assert h.handed_off()
    h.wait()
    target = {"w": torch.zeros(rows, cols), "rep": torch.zeros(33, dtype=torch.bfloat16), "seed": -1, "notes": ""}
    ckpt.load(target, str(tmp_path / "big"))
    assert torch.equal(target["w"].view(torch.uint8), global_weight(1, 23, rows, cols).view(torch.uint8))
    assert target["notes"] == notes


def _hand_over_by_tcp_then_get_killed(rank: int, world: int, address: str, root: str, seed: int) -> None:
    os.environ["CKPT_SERVER_TOKEN"] = TOKEN
    options = SaveOptions(daemon=address)
    state = rank_state(rank, world, seed, 2048, 768)
    ckpt.async_save(state, f"{root}/first", options=options).wait()  # plans (the only collective)
    refill(state, rank, world, seed + 1)
    h = ckpt.async_save(state, f"{root}/final", step=seed + 1, options=options)
    scramble(state)
    h.wait_handed_off(timeout=RANK_TIMEOUT_S)  # the daemon holds every byte: dying now loses nothing
    os.kill(os.getpid(), signal.SIGKILL)


@pytest.mark.daemon
def test_daemon_commits_after_tcp_trainers_are_killed_once_handed_off(tmp_path, daemons):
    root = str(tmp_path)
    outcomes = run_ranks_outcomes(
        _hand_over_by_tcp_then_get_killed, 2, daemons.a.tcp, root, 70, start_method="forkserver",
        timeout=RANK_TIMEOUT_S,
    )
    assert [(o.status, o.exitcode) for o in outcomes] == [("died", -signal.SIGKILL)] * 2, outcomes
    wait_for(lambda: os.path.exists(f"{root}/final/{MANIFEST}"), 120, "the orphaned save to commit")
    assert assert_loads(f"{root}/final", 2, 71, 2048, 768).step == 71


@pytest.mark.daemon
def test_persist_maps_only_staging_files_and_only_for_local_clients(tmp_path, daemons):
    """Persist makes the daemon map a file by name (and delete it once its trainer is
    dead): a remote client must not reach it, and no client may name another file."""
    victim = tmp_path / "precious"
    victim.write_bytes(b"x" * 4096)
    proc = subprocess.Popen(["true"])
    proc.wait()
    dead_pid = proc.pid
    request = ckpt_pb2.PersistRequest(
        uri=str(tmp_path / "c"),
        save_id="x-000000",
        rank=0,
        world_size=1,
        shm_path=str(victim),
        buffer_bytes=4096,
        block_bytes=4096,
        commit_timeout_s=5,
        client_pid=dead_pid,
    )
    d = daemons.a
    with grpc.insecure_channel(d.address) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ckpt_pb2_grpc.CheckpointerStub(ch).Persist(request, timeout=30)
    assert e.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "staging file" in e.value.details()
    with grpc.insecure_channel(d.tcp) as ch:
        request.shm_path = "/dev/shm/ckpt-0-nothing"
        with pytest.raises(grpc.RpcError) as e:
            ckpt_pb2_grpc.CheckpointerStub(ch).Persist(
                request, timeout=30, metadata=(("authorization", f"Bearer {TOKEN}"),)
            )
    assert e.value.code() == grpc.StatusCode.PERMISSION_DENIED
    time.sleep(0.5)
    assert victim.read_bytes() == b"x" * 4096
    assert not os.path.exists(tmp_path / "c")


@pytest.mark.daemon
def test_default_budget_refuses_a_stream_no_machine_could_hold_before_reading_it(tmp_path, daemons):
    """Without --memory-budget the daemon still bounds what it holds (half of RAM): a remote
    client announcing a snapshot the size of all RAM is refused before any allocation."""
    d = daemons.a  # default budget
    all_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    request = ckpt_pb2.PersistRequest(
        uri=str(tmp_path / "c"),
        save_id="x-000000",
        rank=0,
        world_size=1,
        buffer_bytes=all_ram,
        block_bytes=4096,
        commit_timeout_s=5,
    )

    def parts():
        yield ckpt_pb2.PersistPart(request=request)
        yield ckpt_pb2.PersistPart(data=b"x" * 1024)

    with grpc.insecure_channel(d.tcp) as ch:
        with pytest.raises(grpc.RpcError) as e:
            ckpt_pb2_grpc.CheckpointerStub(ch).PersistStream(
                parts(), timeout=30, metadata=(("authorization", f"Bearer {TOKEN}"),)
            )
    assert e.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED, e.value.details()
    assert "can never fit" in e.value.details()
    assert samples_of(d.address)["ckpt_bytes_held"] == 0
    assert not os.path.exists(tmp_path / "c")


# -- operability ------------------------------------------------------------------------------------------


@pytest.mark.daemon
def test_metrics_over_rpc_and_http(tmp_path, daemons):
    d = daemons.a
    s0 = samples_of(d.address)
    state = rank_state(0, 1, 3)
    ckpt.async_save(state, str(tmp_path / "a"), options=SaveOptions(daemon=d.address)).wait()
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(SaveAbortedError, match="failed in ckpt-server"):
        ckpt.async_save(state, str(blocker / "c"), options=SaveOptions(daemon=d.address)).wait()

    content_type, text = metrics_http(d.metrics_url)
    assert content_type.startswith("text/plain")
    for body in (text, metrics_rpc(d.address)):
        s = parse_prometheus(body)
        assert s['ckpt_jobs_total{status="ok"}'] == s0.get('ckpt_jobs_total{status="ok"}', 0) + 1
        assert s["ckpt_failures_total"] == s0["ckpt_failures_total"] + 1
        assert s["ckpt_bytes_persisted_total"] >= s0["ckpt_bytes_persisted_total"] + 8 * 96 * 4 + 33 * 2
        for phase in ("serialize", "upload", "commit"):
            key = f'ckpt_phase_seconds_total{{phase="{phase}"}}'
            assert s[key] > s0.get(key, 0.0)
        assert s["ckpt_queue_depth"] == 0 and s["ckpt_bytes_held"] == 0
        assert "# TYPE ckpt_queue_depth gauge" in body and "# TYPE ckpt_bytes_persisted_total counter" in body


@pytest.mark.daemon
@pytest.mark.dist
def test_sigterm_drains_the_save_in_flight_then_exits_zero(tmp_path, daemons, cleanup_pids):
    root = str(tmp_path)
    a, b = daemons.drained, daemons.b
    t, out = run_in_thread(run_ranks, _hold_second_save, 2, [a.address, b.address], root, 40, start_method="forkserver")
    await_file(root, "submitted")
    # In flight: queue depth and held bytes show it.
    s = samples_of(a.address)
    assert s["ckpt_queue_depth"] == 1 and s["ckpt_bytes_held"] > 0
    a.proc.send_signal(signal.SIGTERM)
    a.wait_log("draining")
    time.sleep(1.0)
    assert a.alive(), "the daemon exited with a checkpoint in flight"
    assert health_status(a.address) == "NOT_SERVING"
    with pytest.raises(SaveAbortedError, match="shutting down"):
        ckpt.async_save(rank_state(0, 1, 1), str(tmp_path / "late"), options=SaveOptions(daemon=a.address))
    assert not os.path.exists(tmp_path / "held" / MANIFEST)
    signal_file(root, "go")
    cleanup_pids.extend(join(t, out))
    assert a.proc.wait(60) == 0
    assert a.wait_log("stopped")["drained"] is True
    assert_loads(str(tmp_path / "held"), 2, 41)


@pytest.mark.daemon
@pytest.mark.dist
def test_memory_budget_refuses_a_save_larger_than_it_and_queues_concurrent_ones(tmp_path, daemons):
    root = str(tmp_path)
    d = daemons.b
    options = SaveOptions(daemon=d.address)
    too_big = {"x": torch.zeros((2 << 20) // 4)}
    t0 = time.monotonic()
    with pytest.raises(SaveAbortedError, match="RESOURCE_EXHAUSTED: memory budget.* can never fit"):
        ckpt.async_save(too_big, str(tmp_path / "big"), options=options)
    assert time.monotonic() - t0 < 30, "a save that can never fit was not refused at once"

    job, job_out = run_in_thread(run_ranks, _budget_job, 2, d.address, root, start_method="forkserver")
    await_file(root, "submitted")  # rank 0 holds 1 MiB of the 1.5 MiB budget until rank 1 saves
    mine = {"m": torch.arange((1 << 20) // 4, dtype=torch.float32)}
    waiter, waiter_out = run_in_thread(ckpt.async_save, mine, str(tmp_path / "queued"), options=options)
    waiter.join(1.5)
    assert waiter.is_alive(), "a save that does not fit the budget now was admitted anyway"
    assert samples_of(d.address)["ckpt_bytes_held"] <= BUDGET
    signal_file(root, "go")
    join(job, job_out)
    join(waiter, waiter_out).wait()
    target = {"m": torch.zeros_like(mine["m"])}
    ckpt.load(target, str(tmp_path / "queued"))
    assert torch.equal(target["m"], mine["m"])


# -- surviving crashes ----------------------------------------------------------------------------------


@pytest.mark.daemon
@pytest.mark.dist
@pytest.mark.faults
def test_daemon_commits_after_every_trainer_is_killed(tmp_path, daemons, cleanup_pids):
    root = str(tmp_path)
    d = daemons.b
    outcomes = run_ranks_outcomes(
        _save_then_get_killed, 2, d.address, root, 60, start_method="forkserver", timeout=RANK_TIMEOUT_S
    )
    pids = [int(os.path.basename(p).split("-")[2]) for p in glob.glob(f"{root}/pid-*")]
    cleanup_pids.extend(pids)
    assert [(o.status, o.exitcode) for o in outcomes] == [("died", -signal.SIGKILL)] * 2, outcomes
    assert len(pids) == 2
    wait_for(lambda: os.path.exists(f"{root}/final/{MANIFEST}"), 120, "the orphaned save to commit")
    manifest = assert_loads(f"{root}/final", 2, 61)
    assert manifest.step == 61
    # Nobody is left to remove the trainers' staging files but the daemon.
    wait_for(lambda: not [f for p in pids for f in shm_files_of(p)], 30, "the daemon to unlink dead shm")


@pytest.mark.daemon
@pytest.mark.dist
@pytest.mark.faults
def test_a_committer_killed_after_handoff_is_alive_through_its_daemon(tmp_path, daemons, cleanup_pids):
    """Liveness follows the snapshot: once the daemon holds it, the daemon beats for the rank."""
    root = str(tmp_path)
    outcomes = run_ranks_outcomes(
        _committer_killed_after_handoff, 3, daemons.a.address, root, 80, start_method="forkserver",
        timeout=RANK_TIMEOUT_S,
    )
    cleanup_pids.extend(int(os.path.basename(p).split("-")[2]) for p in glob.glob(f"{root}/pid-*"))
    assert (outcomes[0].status, outcomes[0].exitcode) == ("died", -signal.SIGKILL), outcomes
    assert [o.status for o in outcomes[1:]] == ["ok", "ok"], outcomes
    assert outcomes[1].value > 8 * 0.8, outcomes  # rank 1 really waited through the committer's silence
    manifest = assert_loads(f"{root}/final", 3, 81)
    assert manifest.step == 81


@pytest.mark.daemon
@pytest.mark.dist
@pytest.mark.faults
def test_killed_daemon_fails_the_save_keeps_the_old_checkpoint_and_restarts(tmp_path, daemons, cleanup_pids):
    """Rank 0 saves through the daemon that gets SIGKILLed mid-upload, rank 1 through
    another one: both ranks' wait() fail promptly, save 1 stays, save 3 works."""
    root = str(tmp_path)
    rows = 4 << 10  # x 1024 fp32 columns: 16 MiB per rank, so the upload takes a while
    d = daemons.victim
    try:
        t, out = run_in_thread(
            run_ranks,
            _daemon_dies_mid_save,
            2,
            [d.address, daemons.a.address],
            root,
            rows,
            start_method="forkserver",
            timeout=300,
        )
        await_file(root, "submitted")
        first = manifest_of(f"{root}/c")
        old_objects = {f"{root}/c/{o}" for o in first.objects}
        # Kill as soon as rank 0's new data object appears: mid-upload.
        wait_for(lambda: set(glob.glob(f"{root}/c/data/*")) - old_objects, 60, "the upload to start")
        d.kill()
        signal_file(root, "daemon-killed")
        await_file(root, "save2-done-0")
        await_file(root, "save2-done-1")
        # Not committed; the checkpoint there is still save 1, whole.
        assert manifest_of(f"{root}/c").save_id == first.save_id
        assert_loads(f"{root}/c", 2, 1, rows, 1024)

        d = d.restart()
        signal_file(root, "daemon-restarted")
        results = join(t, out, timeout=300)
        cleanup_pids.extend(r["pid"] for r in results)
        r0, r1 = results
        assert r0["save2"].startswith("SaveAbortedError") and "was lost" in r0["save2"], r0
        assert "not committed" in r0["save2"], r0
        # Rank 1's own daemon is fine; it learns through storage that rank 0's part is gone.
        assert r1["save2"].startswith("SaveAbortedError") and "not committed" in r1["save2"], r1
        assert "rank 0: SaveAbortedError" in r1["save2"], r1
        assert r0["save2_s"] < 60 and r1["save2_s"] < 60, "a rank noticed the dead daemon only at its commit timeout"
        manifest = assert_loads(f"{root}/c", 2, 3, rows, 1024)
        assert manifest.step == 3 and manifest.topology["world_size"] == 2
    finally:
        d.stop()


def test_unreachable_daemon_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(ckpt.client, "CONNECT_TIMEOUT_S", 1.0)
    address = f"unix://{tmp_path}/nobody-listens.sock"
    state = rank_state(0, 1, 2)
    with pytest.raises(SaveAbortedError, match="not reachable.*is it running"):
        ckpt.async_save(state, str(tmp_path / "c"), options=SaveOptions(daemon=address))
    assert not os.path.exists(tmp_path / "c" / MANIFEST)
