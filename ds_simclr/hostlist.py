"""Host names and ports for the launchers: SLURM node lists, DeepSpeed hostfiles, validation.

Every host name that reaches pdsh, ssh, srun or mpirun passes `check_host` first: letters,
digits, '.', '_' and '-' only, not starting with '-' (so nothing a shell or an option parser would
interpret gets through). Compressed SLURM lists (`gpu[01-03,07],cpu5`) are expanded by
python-hostlist, the same rules `scontrol show hostnames` applies.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass
from pathlib import Path

from ds_simclr.errors import LaunchError

HOST_PATTERN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,252}")
NODELIST_PATTERN = re.compile(r"[A-Za-z0-9._,\[\]-]+")
HOSTFILE_LINE = re.compile(r"(?P<host>\S+)(?:\s+slots\s*=\s*(?P<slots>\d+))?")


@dataclass(frozen=True)
class HostSlots:
    """One line of a DeepSpeed hostfile: a host and how many ranks it runs."""

    host: str
    slots: int


def check_host(name: str, where: str = "host") -> str:
    """Return `name` if it is a safe host name, else raise a LaunchError naming it."""
    if not HOST_PATTERN.fullmatch(name):
        raise LaunchError(
            f"invalid host name {name!r}",
            where=where,
            hint="host names may hold letters, digits, '.', '_' and '-' only",
        )
    return name


def expand_nodelist(nodelist: str, where: str = "SLURM_JOB_NODELIST") -> list[str]:
    """Expand a SLURM node list (`gpu[01-03,07],cpu5`) into validated host names, in order."""
    import hostlist

    text = nodelist.strip()
    if not text or not NODELIST_PATTERN.fullmatch(text):
        raise LaunchError(
            f"invalid node list {nodelist!r}",
            where=where,
            hint="expected a SLURM host list such as gpu[01-03,07],cpu5",
        )
    try:
        hosts = hostlist.expand_hostlist(text)
    except hostlist.BadHostlist as exc:
        raise LaunchError(f"invalid node list {nodelist!r}: {exc}", where=where) from None
    if len(set(hosts)) != len(hosts):
        raise LaunchError(f"node list {nodelist!r} names a host twice", where=where)
    return [check_host(host, where) for host in hosts]


def read_hostfile(path: Path) -> list[HostSlots]:
    """Parse a DeepSpeed hostfile (`host slots=N` per line, `#` comments)."""
    try:
        lines = Path(path).read_text().splitlines()
    except OSError as exc:
        raise LaunchError(f"cannot read hostfile: {exc.strerror}", where=str(path)) from None
    entries: list[HostSlots] = []
    for number, line in enumerate(lines, start=1):
        text = line.split("#", 1)[0].strip()
        if not text:
            continue
        match = HOSTFILE_LINE.fullmatch(text)
        where = f"{path}:{number}"
        if match is None:
            raise LaunchError(f"cannot parse {line.strip()!r}", where=where, hint="write `host slots=N`")
        host = check_host(match["host"], where)
        slots = int(match["slots"]) if match["slots"] is not None else 1
        if slots < 1:
            raise LaunchError("slots must be at least 1", where=where)
        if any(entry.host == host for entry in entries):
            raise LaunchError(f"host {host} is listed twice", where=where)
        entries.append(HostSlots(host, slots))
    if not entries:
        raise LaunchError("hostfile lists no hosts", where=str(path))
    return entries


def format_hostfile(entries: list[HostSlots]) -> str:
    """The DeepSpeed hostfile text for `entries`."""
    return "".join(f"{check_host(entry.host)} slots={entry.slots}\n" for entry in entries)


def free_port() -> int:
    """A TCP port that was free a moment ago on this host (for a rendezvous)."""
    with socket.socket() as sock:
        sock.bind(("", 0))
        return sock.getsockname()[1]
