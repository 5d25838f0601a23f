"""RetryPolicy without a server: what is retried, how long it waits, how it gives up."""

from __future__ import annotations

import random

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError, ReadTimeoutError

from ckpt.storage.retry import RetryPolicy, StorageOperationError, is_retryable

FAST = RetryPolicy(max_attempts=5, base_delay_s=0.001, max_delay_s=0.004, deadline_s=10.0)


def client_error(code: str, status: int) -> ClientError:
    return ClientError(
        {"Error": {"Code": code, "Message": f"{code} message"}, "ResponseMetadata": {"HTTPStatusCode": status}},
        "PutObject",
    )


def translated(code: str, status: int) -> OSError:
    """What s3fs raises: an OSError whose cause is botocore's ClientError."""
    err = OSError(16, f"{code} message")
    err.__cause__ = client_error(code, status)
    return err


@pytest.mark.parametrize(
    "error",
    [
        client_error("SlowDown", 503),
        translated("SlowDown", 503),
        client_error("InternalError", 500),
        client_error("503", 503),
        client_error("RequestTimeout", 400),
        EndpointConnectionError(endpoint_url="http://127.0.0.1:1"),
        ReadTimeoutError(endpoint_url="http://127.0.0.1:1"),
        ConnectionResetError(104, "Connection reset by peer"),
        TimeoutError(),
    ],
)
def test_transient_errors_are_retryable(error):
    assert is_retryable(error)


@pytest.mark.parametrize(
    "error",
    [
        client_error("AccessDenied", 403),
        client_error("NoSuchKey", 404),
        client_error("InvalidRange", 416),
        FileNotFoundError("gone"),
        ValueError("a bug"),
    ],
)
def test_definite_errors_are_not(error):
    assert not is_retryable(error)


def test_succeeds_after_transient_failures():
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) < 3:
            raise translated("SlowDown", 503)
        return "ok"

    assert FAST.call("PutObject", "s3://b/k", flaky) == "ok" and len(calls) == 3


def test_gives_up_naming_object_operation_and_cause():
    calls = []

    def always():
        calls.append(1)
        raise client_error("SlowDown", 503)

    with pytest.raises(StorageOperationError) as info:
        FAST.call("UploadPart 3", "s3://b/ckpt/data/x.safetensors", always)
    assert len(calls) == 5
    msg = str(info.value)
    assert msg.startswith("s3://b/ckpt/data/x.safetensors: UploadPart 3 failed after 5 attempt(s)")
    assert "SlowDown: SlowDown message" in msg
    assert isinstance(info.value, OSError) and info.value.attempts == 5


class FakeClock:
    """Stands in for the time module: sleeping advances the clock, each attempt costs ``attempt_s``."""

    def __init__(self, attempt_s: float) -> None:
        self.now, self.attempt_s, self.attempt_starts = 0.0, attempt_s, []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.now += seconds

    def failing_attempt(self):
        self.attempt_starts.append(self.now)
        self.now += self.attempt_s
        raise ConnectionResetError()


@pytest.mark.parametrize("attempt_s", [0.0, 0.03, 0.2])
def test_no_attempt_starts_after_the_deadline(monkeypatch, attempt_s):
    # A fake clock: the rule under test is about time, and a loaded machine must not decide it.
    clock = FakeClock(attempt_s)
    monkeypatch.setattr("ckpt.storage.retry.time", clock)
    policy = RetryPolicy(max_attempts=1000, base_delay_s=0.05, max_delay_s=0.1, deadline_s=0.5)
    with pytest.raises(StorageOperationError, match="GetObject failed after") as info:
        policy.call("GetObject", "s3://b/k", clock.failing_attempt)
    assert len(clock.attempt_starts) == info.value.attempts >= 2
    assert all(t < 0.5 for t in clock.attempt_starts)
    assert clock.now < 0.5 + attempt_s  # the last attempt began before the deadline and took attempt_s
    # It kept trying while there was time: one more backoff (at most max_delay_s) would pass the deadline.
    assert clock.now + 0.1 >= 0.5 - attempt_s


def test_definite_errors_surface_at_once_with_their_type():
    calls = []

    def denied():
        calls.append(1)
        raise PermissionError("Access Denied")

    with pytest.raises(PermissionError):
        FAST.call("PutObject", "s3://b/k", denied)
    with pytest.raises(ValueError):  # a bug is not a storage failure: not wrapped, not retried
        FAST.call("PutObject", "s3://b/k", lambda: int("x"))
    with pytest.raises(StorageOperationError, match="not retryable.*InvalidRange"):
        FAST.call("GetObject", "s3://b/k", lambda: (_ for _ in ()).throw(client_error("InvalidRange", 416)))
    assert len(calls) == 1


def test_backoff_grows_exponentially_with_jitter_up_to_the_cap():
    policy = RetryPolicy(base_delay_s=0.1, max_delay_s=2.0)
    rng = random.Random(0)
    for attempt in range(8):
        d = min(2.0, 0.1 * 2**attempt)
        waits = [policy.delay(attempt, rng) for _ in range(200)]
        assert all(d / 2 <= w <= d for w in waits)
        assert max(waits) - min(waits) > d / 4  # jittered, not fixed


def test_policy_from_options():
    assert RetryPolicy.of(None) == RetryPolicy()
    assert RetryPolicy.of({"max_attempts": 3}).max_attempts == 3
    with pytest.raises(ValueError):
        RetryPolicy(max_attempts=0)
    with pytest.raises(TypeError):
        RetryPolicy.of(3)  # type: ignore[arg-type]
