"""One live job per run directory: a lock file naming its holder, taken over only when the holder is gone.

`<run>/lock` holds the holder's host, pid, process start time and a token, and its modification
time is a heartbeat (touched every `HEARTBEAT_S`). A holder on this host is alive while its process
runs (pid and start time); a holder on another host, whose process cannot be seen, while its
heartbeat is younger than `STALE_S`. A second job finding a live holder stops with `RunDirBusy`
before it writes anything; a lock whose holder is gone (killed job, dead node) is taken over with a
warning. Contenders serialise on `flock` of the run directory where the file system supports it.

`launch` holds the lock for the whole job and passes its token to the ranks (`LOCK_ENV`); a rank 0
started without `launch` (`ds_simclr train`) takes the lock itself.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from ds_simclr.atomic import write_atomic
from ds_simclr.errors import RunDirBusy, warn
from ds_simclr.lifeline import process_alive, process_start_time

LOCK_ENV = "DS_SIMCLR_LOCK_TOKEN"
HEARTBEAT_S = 30.0
STALE_S = 120.0


@dataclass(frozen=True)
class Holder:
    """Who holds a run directory."""

    host: str
    pid: int
    start_time: int | None
    token: str

    def alive(self, heartbeat_age_s: float) -> bool:
        if self.host == socket.gethostname():
            return process_alive(self.pid, self.start_time)
        return heartbeat_age_s < STALE_S


def read_holder(path: Path) -> tuple[Holder, float] | None:
    """The lock's holder and its heartbeat's age in seconds; None without a (readable) lock."""
    try:
        raw = json.loads(path.read_text())
        age = time.time() - path.stat().st_mtime
        return Holder(raw["host"], int(raw["pid"]), raw.get("start_time"), raw["token"]), age
    except (OSError, ValueError, KeyError, TypeError):
        return None


@contextmanager
def _serialised(folder: Path) -> Iterator[None]:
    """flock the folder while deciding who holds it (best effort: some file systems refuse)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)


class RunLock:
    """The lock this process holds on a run directory; `release()` (or the process's end) frees it."""

    def __init__(self, path: Path, holder: Holder) -> None:
        self.path, self.holder = path, holder
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @classmethod
    def acquire(cls, path: Path) -> RunLock:
        """Take the lock at `path` (creating its folder), or raise RunDirBusy naming the live holder."""
        path.parent.mkdir(parents=True, exist_ok=True)
        me = Holder(socket.gethostname(), os.getpid(), process_start_time(os.getpid()), secrets.token_hex(8))
        with _serialised(path.parent):
            found = read_holder(path)
            if found is not None:
                holder, age = found
                if holder.alive(age):
                    raise RunDirBusy(
                        f"another job holds this run directory: pid {holder.pid} on {holder.host}"
                        f" (heartbeat {age:.0f} s ago)",
                        where=str(path),
                        hint="wait for it to end or stop it; a lock whose holder is gone is taken over"
                        f" (on another host after {STALE_S:.0f} s without a heartbeat)",
                    )
                warn(f"taking over the run directory's lock from pid {holder.pid} on {holder.host}, which is gone")
            write_atomic(path, json.dumps(me.__dict__) + "\n")
        return cls(path, me)

    @property
    def token(self) -> str:
        return self.holder.token

    def start_heartbeat(self) -> None:
        """Touch the lock every HEARTBEAT_S in a daemon thread (start it after forking children)."""

        def beat() -> None:
            while not self._stop.wait(HEARTBEAT_S):
                try:
                    os.utime(self.path)
                except OSError:
                    pass

        self._beat = threading.Thread(target=beat, name="ds_simclr-runlock", daemon=True)
        self._beat.start()

    def release(self) -> None:
        """Remove the lock if it is still ours."""
        self._stop.set()
        found = read_holder(self.path)
        if found is not None and found[0].token == self.token:
            self.path.unlink(missing_ok=True)


def held_by(path: Path, token: str | None) -> bool:
    """True when the lock at `path` carries `token` (the ranks of the `launch` that holds it)."""
    found = read_holder(path)
    return token is not None and found is not None and found[0].token == token


def hold_run_dir(path: Path) -> RunLock | None:
    """In rank 0: None when the `launch` that started this job holds the lock, else take it."""
    if held_by(path, os.environ.get(LOCK_ENV)):
        return None
    lock = RunLock.acquire(path)
    lock.start_heartbeat()
    return lock
