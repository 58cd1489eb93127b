"""One small error hierarchy; the CLI renders these once, as one line, with the class's exit status.

Library code raises these for anything a user can fix (a bad spec, a missing file, an impossible
batch size, a full disk). Everything else is a bug and keeps its traceback.

Exit statuses (also what `launch` returns when a rank raised one):

| status | meaning |
|---|---|
| 0 | finished (or nothing left to train) |
| 1 | a bug or a crash: a traceback says where; resuming from the last checkpoint helps after a crash |
| 2 | a user error: fix what the line names |
| 3 | training stopped: too many non-finite steps in a row (a checkpoint is kept) |
| 73 | the run directory cannot be written (read-only, permissions) |
| 74 | out of disk space or quota |
| 75 | stopped by a signal (preemption, SIGTERM/SIGUSR1/SIGINT) before the end: run the same command |
"""

from __future__ import annotations

import errno

EXIT_USER = 2
EXIT_NONFINITE = 3
EXIT_CANTCREAT = 73
"""sysexits EX_CANTCREAT: a file cannot be created (read-only file system, permission denied)."""
EXIT_IOERR = 74
"""sysexits EX_IOERR: out of disk space or quota."""
EXIT_STOPPED = 75
"""sysexits EX_TEMPFAIL: stopped before the end; run the same command again (e.g. `scontrol requeue`)."""


class UserError(Exception):
    """A problem the user can fix. `where` names the file and/or dotted field; `hint` says how."""

    exit_code = EXIT_USER

    def __init__(self, message: str, *, where: str | None = None, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.where = where
        self.hint = hint

    def one_line(self) -> str:
        """The single line the CLI prints: `where: message (hint)`."""
        text = f"{self.where}: {self.message}" if self.where else self.message
        if self.hint:
            text += f" ({self.hint})"
        return " ".join(text.split())

    def __str__(self) -> str:
        return self.one_line()


class SpecError(UserError):
    """The run spec is malformed, has an unknown key, a wrong type or an impossible value."""


class BatchArithmeticError(SpecError):
    """global_batch cannot be split evenly over the ranks and accumulation steps."""


class DataError(UserError):
    """Input data (manifest, volume, store) is missing or malformed."""


class LaunchError(UserError):
    """The cluster or launcher cannot be set up (bad host list, missing launcher)."""


class FollowOnError(UserError):
    """This rank stops because another rank failed; that rank's error says why."""


class TrainingError(UserError):
    """Training cannot go on (e.g. too many non-finite steps in a row); a checkpoint is kept."""

    exit_code = EXIT_NONFINITE


class CheckpointError(UserError):
    """The run directory's checkpoints cannot be resumed (none complete, another store, a format
    this version cannot read)."""


class RunDirBusy(UserError):
    """Another live job holds the run directory's lock."""


class StorageError(UserError):
    """A file could not be written: out of space (exit 74) or not writable (exit 73)."""

    def __init__(self, message: str, *, exit_code: int, where: str | None = None, hint: str | None = None) -> None:
        super().__init__(message, where=where, hint=hint)
        self.exit_code = exit_code


class Stopped(UserError):
    """A stop signal arrived before training could start or finish; nothing is lost."""

    exit_code = EXIT_STOPPED


_FULL = (errno.ENOSPC, errno.EDQUOT)
_NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)


def storage_error(exc: BaseException, doing: str, where: str | None = None) -> StorageError | None:
    """A one-line StorageError for an OSError that is a full disk or an unwritable place, else None.

    `doing`: what was being written, e.g. "writing checkpoint step_20".
    """
    if not isinstance(exc, OSError) or exc.errno not in _FULL + _NOT_WRITABLE:
        return None
    where = where or (exc.filename and str(exc.filename))
    if exc.errno in _FULL:
        return StorageError(
            f"{exc.strerror.lower()} while {doing}",
            exit_code=EXIT_IOERR,
            where=where,
            hint="free space (older checkpoints, other runs) and run the same command to resume",
        )
    return StorageError(
        f"{exc.strerror.lower()} while {doing}",
        exit_code=EXIT_CANTCREAT,
        where=where,
        hint="the run directory must be writable: choose another output_dir or fix its permissions",
    )


def warn(message: str) -> None:
    """A one-line warning on stderr (`warning: ...`); the run goes on."""
    import sys

    print(f"warning: {' '.join(message.split())}", file=sys.stderr, flush=True)
