"""Exceptions users can catch by kind."""

from __future__ import annotations


class CheckpointError(Exception):
    """Base class of every error this library raises on purpose."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint at the given location."""


class CheckpointExistsError(CheckpointError, FileExistsError):
    """A committed checkpoint already exists where a save was asked to write."""


class ConcurrentSaveError(CheckpointExistsError):
    """Another save committed at the same location while this one was in flight (racing
    writers): this save is not stored; the location holds the other one."""


class RootInUseError(CheckpointError):
    """Another job's ``ckpt.Manager`` holds the run root (its owner record is live)."""


class StorageFullError(CheckpointError, OSError):
    """The storage has no space left for an object (ENOSPC / EDQUOT); names the object."""


class CheckpointFormatError(CheckpointError):
    """The manifest or a data object is not what the format says it must be."""


class TruncatedObjectError(CheckpointFormatError, EOFError):
    """A data object ends before the bytes the manifest says it holds."""


class MissingObjectError(CheckpointFormatError):
    """A data object the manifest names is not there: never written, or deleted (by gc, retention or an
    overwrite) while the checkpoint was being read."""


class UnsafeObjectError(CheckpointFormatError):
    """An object is not a regular file inside the checkpoint (a symlink, FIFO, device or directory):
    it is never followed or read, so a planted link cannot make a reader read elsewhere or hang."""


class CorruptChunkError(CheckpointError):
    """Bytes read back do not match the checksum recorded at save time."""


class StateDictMismatchError(CheckpointError):
    """The state dict to load into does not match the checkpoint.

    The message starts with a one-line summary and a hint, then lists every problem;
    ``missing_keys`` (in the target, not the checkpoint) and ``unexpected_keys`` (the reverse)
    are the lists ``nn.Module.load_state_dict`` would report.
    """

    def __init__(
        self,
        problems: list[str],
        summary: str = "",
        hint: str = "",
        missing_keys: list[str] | None = None,
        unexpected_keys: list[str] | None = None,
    ):
        self.problems = problems
        self.missing_keys = missing_keys or []
        self.unexpected_keys = unexpected_keys or []
        head = summary or f"{len(problems)} problem(s) loading the checkpoint"
        if hint:
            head += f"\nhint: {hint}"
        super().__init__(head + "\n  " + "\n  ".join(problems))


class UnsupportedValueError(CheckpointError, TypeError):
    """A state-dict value that cannot be stored without pickle."""


class SaveAbortedError(CheckpointError):
    """A save did not commit because a rank failed or did not finish in time.

    ``rank`` is the rank that failed first (None when none is known, e.g. a timeout) and
    ``cause`` the type name of its error, so every rank can tell why the save failed.
    """

    def __init__(self, message: str, rank: int | None = None, cause: str | None = None) -> None:
        super().__init__(message)
        self.rank, self.cause = rank, cause

    def __reduce__(self):  # keep rank and cause through pickling (multiprocessing, gRPC-free reports)
        return type(self), (str(self), self.rank, self.cause)


class RankLostError(SaveAbortedError):
    """A save did not commit because a rank stopped showing signs of life before its part was
    durable (killed, its node lost, hung): its heartbeat went stale. ``rank`` names it."""


class SaveBusyError(CheckpointError):
    """An async save was refused because the previous one still holds the staging buffer."""


class StorageOperationError(CheckpointError, OSError):
    """A storage operation failed for good (after its retries, or at once if not retryable);
    the message names the operation and the object, as do ``operation`` and ``target``."""

    def __init__(self, message: str, operation: str = "", target: str = "", attempts: int = 0) -> None:
        super().__init__(message)
        self.operation, self.target, self.attempts = operation, target, attempts


class ConditionalPutUnsupportedError(CheckpointError, NotImplementedError):
    """The backend cannot create an object only-if-absent in one step (see ``supports_put_if_absent``)."""
