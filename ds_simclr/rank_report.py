"""How a rank's user error reaches `launch`: one line per rank in `<run>/errors/rank_<R>.json`.

A rank that stops on a `UserError` (bad data selection, a refused resume, too many non-finite steps)
writes its one line, exit status and host there and exits with that status quietly; `launch`, once
the launcher has exited, prints the line once and exits with the status, instead of the launcher's
traceback. A rank that then fails only because that rank left (a broken connection in a collective)
reports itself as a follow-on and stays quiet too. Each rank reserves its file when it starts, so
that a full disk can still be reported (the report is written into the reserved bytes). A rank
started without `launch`, or one that cannot write its report, prints its line itself.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
from dataclasses import dataclass
from pathlib import Path

from ds_simclr.atomic import write_atomic
from ds_simclr.errors import FollowOnError, UserError
from ds_simclr.lifeline import LAUNCH_ENV

RESERVED_BYTES = 2048


@dataclass(frozen=True)
class RankReport:
    """What one rank said when it stopped."""

    rank: int
    host: str
    line: str
    exit_code: int
    follow_on: bool
    """It stopped because another rank failed (that rank's report says why)."""


def _report_path(errors_dir: Path | None) -> Path | None:
    """This rank's report file, under `launch` only."""
    if errors_dir is None or not os.environ.get(LAUNCH_ENV):
        return None
    if "RANK" not in os.environ:
        from ds_simclr.runtime import export_rank_env

        export_rank_env()  # mpirun's and srun's own variables, before the process group exists
    return errors_dir / f"rank_{int(os.environ['RANK'])}.json"


def reserve_report(errors_dir: Path | None) -> None:
    """At a rank's start (under `launch`): reserve its report file (blank, not yet a report)."""
    path = _report_path(errors_dir)
    if path is not None:
        try:
            write_atomic(path, " " * (RESERVED_BYTES - 1) + "\n")
        except OSError:
            pass  # no room even now: the rank will print its line itself


def report_rank_error(errors_dir: Path | None, exc: UserError) -> bool:
    """Under `launch`: write this rank's report; True when written (the rank then stays quiet)."""
    path = _report_path(errors_dir)
    if path is None:
        return False
    report = RankReport(int(os.environ["RANK"]), socket.gethostname(), exc.one_line()[:1500], exc.exit_code,
                        isinstance(exc, FollowOnError))
    data = (json.dumps(report.__dict__) + "\n").encode()
    try:
        with path.open("r+b") as out:  # into the reserved bytes: works on a full disk
            out.write(data)
            out.truncate(len(data))
    except OSError:
        try:
            write_atomic(path, data)
        except OSError:
            return False
    return True


def read_reports(errors_dir: Path) -> list[RankReport]:
    """The ranks' reports, the one that says why first (not a follow-on, lowest rank)."""
    reports = []
    for path in errors_dir.glob("rank_*.json"):
        try:
            reports.append(RankReport(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue  # reserved, never written: that rank did not stop on an error
    return sorted(reports, key=lambda r: (r.follow_on, r.rank))


def another_rank_failed(errors_dir: Path | None) -> bool:
    """True when some rank already reported a user error (this rank's failure follows from it)."""
    return errors_dir is not None and any(not r.follow_on for r in read_reports(errors_dir))


def clear_reports(errors_dir: Path) -> None:
    """Forget the reports of an earlier job (before a new one starts)."""
    shutil.rmtree(errors_dir, ignore_errors=True)
