"""Retries for storage operations: exponential backoff with jitter, bounded in total time.

Object stores fail transiently all the time (503 SlowDown under load, 500s,
connections dropped by load balancers, responses that stall). One policy
decides for every storage call whether an error is worth another try and how
long to wait, and gives up with an error that names the object and the
operation once attempts or the time budget run out. Errors that retrying
cannot fix (missing object, access denied, bad request) surface at once.
"""

from __future__ import annotations

import asyncio
import errno
import random
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from ..errors import CheckpointError, StorageOperationError

T = TypeVar("T")

# S3 error codes (and HTTP statuses as codes) that mean "try again later".
RETRYABLE_CODES = frozenset(
    {
        "SlowDown",
        "Throttling",
        "ThrottlingException",
        "ThrottledException",
        "RequestThrottled",
        "RequestLimitExceeded",
        "TooManyRequests",
        "TooManyRequestsException",
        "ProvisionedThroughputExceededException",
        "BandwidthLimitExceeded",
        "RequestTimeout",
        "RequestTimeoutException",
        "PriorRequestNotComplete",
        "InternalError",
        "ServiceUnavailable",
        "OperationAborted",
        "ConditionalRequestConflict",  # a conditional PUT raced another write to the key: ask again
        "500",
        "502",
        "503",
        "504",
        "429",
    }
)

# Exception type names (from botocore, aiohttp, urllib3, fsspec) that mean the
# connection dropped, timed out or returned a garbled response. Matched by name
# so this module imports none of those packages.
RETRYABLE_TYPES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectionClosedError",
        "ReadTimeoutError",
        "ConnectTimeoutError",
        "HTTPClientError",
        "ProxyConnectionError",
        "ResponseStreamingError",
        "IncompleteReadError",
        "ResponseParserError",
        "ClientPayloadError",
        "ClientConnectionError",
        "ClientConnectorError",
        "ClientOSError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "SocketTimeoutError",
        "ConnectionTimeoutError",
        "FSTimeoutError",
        "IncompleteRead",
        "ProtocolError",
    }
)

# errno values s3fs gives the OSErrors it translates retryable S3 codes into.
RETRYABLE_ERRNOS = frozenset({errno.EBUSY, errno.ETIMEDOUT, errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE})


# Packages whose exceptions are storage failures even when they are not OSErrors (missing
# credentials, a bad endpoint or region configuration), matched by module name.
BACKEND_PACKAGES = frozenset({"botocore", "aiobotocore", "s3fs", "aiohttp", "fsspec", "urllib3"})
CREDENTIAL_TYPES = frozenset(
    {"NoCredentialsError", "PartialCredentialsError", "CredentialRetrievalError", "NoAuthTokenError"}
)

# Definite answers that callers handle by type (a missing manifest, an existing object, ...).
KEEP_AS_IS = (
    FileNotFoundError,
    FileExistsError,
    PermissionError,
    IsADirectoryError,
    NotADirectoryError,
    CheckpointError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard to try one storage operation.

    max_attempts: tries in all (1 = no retry).
    base_delay_s / max_delay_s: the n-th wait is drawn from [d/2, d], d = min(max, base * 2**n)
      ("equal jitter": ranks that failed together do not retry together, yet always back off).
    deadline_s: no new attempt starts after this long since the first; with the per-request
      timeouts of the client this bounds the operation's total time.
    """

    max_attempts: int = 10
    base_delay_s: float = 0.1
    max_delay_s: float = 10.0
    deadline_s: float = 300.0

    def __post_init__(self) -> None:
        if self.max_attempts < 1 or self.base_delay_s < 0 or self.max_delay_s < 0 or self.deadline_s <= 0:
            raise ValueError(f"invalid retry policy: {self}")

    @classmethod
    def of(cls, value: RetryPolicy | dict[str, Any] | None) -> RetryPolicy:
        """A policy from itself, a dict of its fields, or None (the default)."""
        if value is None:
            return cls()
        if isinstance(value, RetryPolicy):
            return value
        if isinstance(value, dict):
            return cls(**value)
        raise TypeError(f"retry: expected RetryPolicy or dict, got {type(value).__name__}")

    def delay(self, attempt: int, rng: random.Random = random._inst) -> float:  # type: ignore[attr-defined]
        """Seconds to wait after failed attempt number ``attempt`` (0-based)."""
        d = min(self.max_delay_s, self.base_delay_s * (2**attempt))
        return d / 2 + rng.uniform(0, d / 2)

    def call(self, operation: str, target: str, fn: Callable[[], T], on_retry: Callable[[], None] | None = None) -> T:
        """Run ``fn`` until it succeeds, retrying transient errors.

        ``operation`` and ``target`` (the object's URI) name the call in the
        final error; ``on_retry`` runs before each new attempt (e.g. to drop
        cached state).
        """
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                return fn()
            except Exception as e:
                attempt += 1
                wait = self._next_wait(e, attempt, start, operation, target)
            time.sleep(wait)
            if on_retry is not None:
                on_retry()

    async def acall(self, operation: str, target: str, fn: Callable[[], Any]) -> Any:
        """:meth:`call` for coroutines: ``fn`` returns a fresh awaitable per attempt."""
        start = time.monotonic()
        attempt = 0
        while True:
            try:
                return await fn()
            except Exception as e:
                attempt += 1
                wait = self._next_wait(e, attempt, start, operation, target)
            await asyncio.sleep(wait)

    def _next_wait(self, e: Exception, attempt: int, start: float, operation: str, target: str) -> float:
        """The wait before the next attempt, or raise the final error."""
        elapsed = time.monotonic() - start
        if not is_retryable(e):
            backend = type(e).__module__.split(".")[0] in BACKEND_PACKAGES
            if isinstance(e, KEEP_AS_IS) or not (isinstance(e, OSError) or _code(e) is not None or backend):
                raise e  # callers rely on these types; anything else is a bug, not storage
            hint = ""
            if type(e).__name__ in CREDENTIAL_TYPES:
                hint = (
                    " (no usable S3 credentials: set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE, "
                    "or pass storage_options={'key': ..., 'secret': ...})"
                )
            raise StorageOperationError(
                f"{target}: {operation} failed (not retryable): {error_text(e)}{hint}", operation, target, attempt
            ) from e
        wait = self.delay(attempt - 1)
        if attempt >= self.max_attempts or elapsed + wait >= self.deadline_s:
            raise StorageOperationError(
                f"{target}: {operation} failed after {attempt} attempt(s) over {elapsed:.1f}s "
                f"(retry budget: {self.max_attempts} attempts, {self.deadline_s:.0f}s): {error_text(e)}",
                operation,
                target,
                attempt,
            ) from e
        return wait


def _chain(e: BaseException):
    seen = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        yield cur
        cur = cur.__cause__ or cur.__context__


def _code(e: BaseException) -> str | None:
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        err = response.get("Error") or {}
        code = err.get("Code")
        if code:
            return str(code)
        status = (response.get("ResponseMetadata") or {}).get("HTTPStatusCode")
        if status:
            return str(status)
    return None


def error_code(e: BaseException) -> str | None:
    """The server's error code (or HTTP status) nearest the top of ``e``'s cause chain, if any."""
    for x in _chain(e):
        code = _code(x)
        if code is not None:
            return code
    return None


def is_retryable(e: BaseException) -> bool:
    """Whether ``e`` (or anything in its cause chain) is a transient failure."""
    for x in _chain(e):
        if isinstance(x, StorageOperationError):
            return False  # already retried to exhaustion below us
        code = _code(x)
        if code is not None:
            if code in RETRYABLE_CODES:
                return True
            if code.isdigit() and (int(code) >= 500 or int(code) == 429):
                return True
            return False  # the server answered with a definite error
        if type(x).__name__ in RETRYABLE_TYPES:
            return True
        if isinstance(x, (ConnectionError, TimeoutError, socket.timeout, asyncio.TimeoutError)):
            return True
        if isinstance(x, OSError) and x.errno in RETRYABLE_ERRNOS:
            return True
    return False


def error_text(e: BaseException) -> str:
    """``Type: message`` of the most specific error in the chain (the server's code if any)."""
    for x in _chain(e):
        code = _code(x)
        if code is not None:
            msg = (getattr(x, "response", {}).get("Error") or {}).get("Message", "")
            return f"{code}: {msg}".rstrip(": ") if msg else code
    return f"{type(e).__name__}: {e}"
