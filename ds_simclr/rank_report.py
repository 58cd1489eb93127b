"""How a rank's user error reaches `launch`: one line per rank in `<run>/errors/rank_<R>.json`.

A rank that stops on a `UserError` (bad data selection, a refused resume, too many non-finite steps)
writes its one line, exit status and host there and exits with that status quietly; `launch`, once
the launcher has exited, prints the line once and exits with the status, instead of the launcher's
traceback. A rank started without `launch`, or one that cannot write the file (full disk), prints
its line itself.
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


@dataclass(frozen=True)
class RankReport:
    """What one rank said when it stopped."""

    rank: int
    host: str
    line: str
    exit_code: int
    follow_on: bool
    """It stopped because another rank failed (that rank's report says why)."""


def _rank() -> int:
    from ds_simclr import dist

    return dist.rank() if dist.is_distributed() else int(os.environ.get("RANK", "0"))


def report_rank_error(errors_dir: Path | None, exc: UserError) -> bool:
    """Under `launch`: write this rank's report; True when written (then the rank stays quiet)."""
    if errors_dir is None or not os.environ.get(LAUNCH_ENV):
        return False
    report = RankReport(_rank(), socket.gethostname(), exc.one_line(), exc.exit_code, isinstance(exc, FollowOnError))
    try:
        write_atomic(errors_dir / f"rank_{report.rank}.json", json.dumps(report.__dict__) + "\n")
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
            continue
    return sorted(reports, key=lambda r: (r.follow_on, r.rank))


def clear_reports(errors_dir: Path) -> None:
    """Forget the reports of an earlier job (before a new one starts)."""
    shutil.rmtree(errors_dir, ignore_errors=True)
