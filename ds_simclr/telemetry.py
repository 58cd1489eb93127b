"""What a run reports: `metrics.jsonl` always, one W&B run per job, a progress line on rank 0.

Only rank 0 writes; the loss it logs is the global loss, the same on every rank. The W&B run id is
kept in the run directory so a resumed job continues the same run. W&B failures (no key, no
network) downgrade to offline with a warning; they never stop training.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from ds_simclr.atomic import write_atomic
from ds_simclr.errors import storage_error, warn
from ds_simclr.rundir import RunPaths


class MetricsLog:
    """Append-only JSON lines, one object per logged optimizer step, kept across resumes.

    On open, rows up to `resume_step` stay exactly as written; later rows (steps the resumed run
    will redo) are dropped, and so is a line that is not a whole JSON row (a writer killed mid-line),
    with a warning.
    """

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        self._keep_rows_through(resume_step)
        try:
            self._file = path.open("a", encoding="utf-8")
        except OSError as exc:
            raise storage_error(exc, "opening the metrics file") or exc from None

    def _keep_rows_through(self, step: int) -> None:
        if not self.path.is_file():
            return
        lines = self.path.read_bytes().decode(errors="replace").split("\n")
        kept, torn = [], []
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                row_step = int(json.loads(line)["step"])
            except (ValueError, KeyError, TypeError):
                torn.append(number)
                continue
            if row_step <= step:
                kept.append(line)
        if torn:
            warn(f"{self.path}: dropped line {', '.join(map(str, torn))}, not a whole JSON row (a writer killed mid-line)")
        if torn or len(kept) != sum(1 for line in lines if line.strip()):
            write_atomic(self.path, [line + "\n" for line in kept])

    def rows_after(self, step: int) -> list[dict[str, Any]]:
        """The rows of steps after `step` (a resumed job catching W&B up)."""
        self._file.flush()
        return [row for row in read_metrics(self.path) if row["step"] > step]

    def write(self, row: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(row) + "\n")
            self._file.flush()
        except OSError as exc:
            raise storage_error(exc, f"writing step {row.get('step')} to the metrics file", str(self.path)) or exc from None

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a metrics file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class WandbRun:
    """One W&B run per run directory, continued by every job that resumes it; `disabled` imports nothing.

    The id is kept in `wandb/run_id`. A later job resumes that run (`resume="allow"`, recorded as
    resumed, also offline) and logs on W&B's own step axis (`_step` = our optimizer step). It starts
    after `logged_through`, the last step W&B holds (the server's, or the newest in the earlier
    offline folders, read with W&B's own reader): steps a killed job logged after its checkpoint are
    not logged twice, and steps W&B lost in a kill (its writer buffers) are caught up from
    `metrics.jsonl` (`catch_up`). Syncing the offline folders in order gives one continuous curve.
    """

    def __init__(self, paths: RunPaths, project: str, entity: str | None, mode: str, name: str, config: dict) -> None:
        self._run = None
        self.logged_through = 0
        if mode == "disabled":
            return
        import wandb

        id_file = paths.wandb / "run_id"
        resumed = id_file.is_file()
        run_id = id_file.read_text().strip() if resumed else secrets.token_hex(4)
        write_atomic(id_file, run_id + "\n")
        os.environ.setdefault("WANDB_SILENT", "true")
        kwargs = dict(
            project=project, entity=entity, name=name, id=run_id, resume="allow" if resumed else None,
            dir=str(paths.root), config=config,
            settings=wandb.Settings(init_timeout=60),  # an unreachable server must not hold up training long
        )
        try:
            self._run = wandb.init(mode=mode, **kwargs)
        except Exception as exc:  # no key or no network: keep a local run rather than stop training
            if mode != "online":
                raise
            warnings.warn(f"W&B online start failed ({exc}); logging offline instead", stacklevel=2)
            self._run = wandb.init(mode="offline", **kwargs)
        self._run.define_metric("*", step_metric="step")
        if resumed:
            offline = [folder for folder in paths.wandb.glob(f"offline-run-*-{run_id}")]
            self.logged_through = max([self._run.step - 1, *(_last_history_step(folder) for folder in offline)])

    @property
    def run_id(self) -> str | None:
        return self._run.id if self._run is not None else None

    def catch_up(self, rows: list[dict[str, Any]]) -> None:
        """Log the kept metrics rows that W&B does not hold (after `logged_through`)."""
        for row in rows:
            self.log(row)

    def log(self, row: dict[str, Any], images: dict[str, Any] | None = None) -> None:
        if self._run is None or row["step"] <= self.logged_through:
            return
        payload = dict(row)
        if images:
            import wandb

            payload.update({key: wandb.Image(value) for key, value in images.items()})
        self._run.log(payload, step=row["step"])
        self.logged_through = row["step"]

    def summarize(self, values: dict[str, Any], images: dict[str, Any] | None = None) -> None:
        """Set run-level values that belong to no training step (W&B's run summary), e.g. what
        `ds_simclr evaluate` measured on a checkpoint after later steps were logged."""
        if self._run is None:
            return
        payload = dict(values)
        if images:
            import wandb

            payload.update({key: wandb.Image(value) for key, value in images.items()})
        self._run.summary.update(payload)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def _last_history_step(folder: Path) -> int:
    """The highest `step` an offline run folder holds, read with W&B's own reader (0 if unreadable)."""
    try:
        out = subprocess.run([sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(folder)],
                             capture_output=True, text=True, timeout=300).stdout
    except (OSError, subprocess.SubprocessError):
        return 0
    last = 0
    for line in out.splitlines():
        if '"history"' in line:
            try:
                last = max(last, int(json.loads(line)["history"]["item"]["step"]))
            except (ValueError, KeyError, TypeError):
                continue
    return last


BAR_WIDTH = 24


class Progress:
    """Rank 0's progress: a live line in a terminal, plain log lines in batch jobs."""

    def __init__(self, total_steps: int, start_step: int) -> None:
        self.total = total_steps
        self.start_step = start_step
        self.started = time.perf_counter()
        self.tty = sys.stderr.isatty()

    def update(self, row: dict[str, Any]) -> None:
        done = row["step"] - self.start_step
        elapsed = time.perf_counter() - self.started
        eta = elapsed / max(done, 1) * (self.total - row["step"])
        text = (
            f"step {row['step']}/{self.total} epoch {row['epoch']} loss {row['loss']:.4f} lr {row['lr']:.3g}"
            f" {row.get('pairs_per_s', 0):.1f} pairs/s eta {_duration(eta)}"
        )
        if self.tty:
            filled = round(BAR_WIDTH * row["step"] / max(self.total, 1))
            bar = "#" * filled + "-" * (BAR_WIDTH - filled)
            end = "\n" if row["step"] >= self.total else ""
            print(f"\r[{bar}] {100 * row['step'] // max(self.total, 1):3d}% {text}\033[K", end=end, file=sys.stderr, flush=True)
        else:
            print(text, file=sys.stderr, flush=True)


    def note(self, line: str) -> None:
        """A line of its own (a warning), above the live bar in a terminal."""
        print(f"\r\033[K{line}" if self.tty else line, file=sys.stderr, flush=True)


def _duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"
