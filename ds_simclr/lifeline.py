"""A rank never outlives the job that started it.

`launch` starts the launcher in its own session (so Ctrl-C reaches `launch`, which asks the ranks to
checkpoint), so killing `launch` (`kill -9` of its process group, an OOM kill) would leave the
launcher and the ranks training on their own, in a directory the next job will use. Two ties:

- a parent-death signal (`prctl(PR_SET_PDEATHSIG, SIGKILL)`, Linux): `launch` sets it on the
  launcher, each rank on itself, so the death of the process that started a rank kills it;
- each rank on `launch`'s host watches `launch` itself (its pid and start time, from the
  environment `launch` sets), which also covers launchers with an intermediate process (the
  DeepSpeed launcher's per-node `launch.py`).
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path

PR_SET_PDEATHSIG = 1
LAUNCH_ENV = "DS_SIMCLR_LAUNCH"
"""`host:pid:start_time` of the `launch` process, set for every rank."""
POLL_S = 1.0


def process_start_time(pid: int) -> int | None:
    """Start time of a live process in clock ticks since boot (None when gone or a zombie); with
    the pid it names one process, even after the pid is reused."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def process_alive(pid: int, start_time: int | None) -> bool:
    """True while process `pid`, started at `start_time` (when known), runs on this host."""
    found = process_start_time(pid)
    return found is not None and (start_time is None or found == start_time)


def die_with_parent() -> None:
    """Ask the kernel to SIGKILL this process when its parent dies (Linux; elsewhere nothing)."""
    if not sys.platform.startswith("linux"):
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def launch_identity() -> str:
    """This process as `LAUNCH_ENV` names it."""
    return f"{socket.gethostname()}:{os.getpid()}:{process_start_time(os.getpid())}"


def tie_to_launcher() -> None:
    """In a rank: die with the parent, and with `launch` when it runs on this host."""
    parent = os.getppid()
    die_with_parent()
    if os.getppid() != parent:  # the parent died before the tie was made
        os.kill(os.getpid(), signal.SIGKILL)
    host, _, rest = os.environ.get(LAUNCH_ENV, "").partition(":")
    pid, _, start = rest.partition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return
    launch_pid, launch_start = int(pid), int(start) if start.isdigit() else None

    def watch() -> None:
        while process_alive(launch_pid, launch_start):
            time.sleep(POLL_S)
        os.kill(os.getpid(), signal.SIGKILL)

    threading.Thread(target=watch, name="ds_simclr-lifeline", daemon=True).start()
