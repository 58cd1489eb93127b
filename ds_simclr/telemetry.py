"""What a run reports: `metrics.jsonl` always, one W&B run per job, a progress line on rank 0.

Only rank 0 writes; the loss it logs is the global loss, the same on every rank. The W&B run id is
kept in the run directory so a resumed job continues the same run. W&B failures (no key, no
network) downgrade to offline with a warning; they never stop training.
"""

from __future__ import annotations

import json
import os
import secrets
import sys
import time
import warnings
from pathlib import Path
from typing import Any

from ds_simclr.rundir import RunPaths


class MetricsLog:
    """Append-only JSON lines, one object per logged optimizer step."""

    def __init__(self, path: Path, resume_step: int) -> None:
        self.path = path
        self._drop_rows_after(resume_step)
        self._file = path.open("a", encoding="utf-8")

    def _drop_rows_after(self, step: int) -> None:
        """A resumed run rewrites steps after its checkpoint; keep one row per step."""
        if not self.path.is_file():
            return
        rows = [line for line in self.path.read_text().splitlines() if line.strip()]
        kept = [row for row in rows if json.loads(row)["step"] <= step]
        if len(kept) != len(rows):
            self.path.write_text("".join(row + "\n" for row in kept))

    def write(self, row: dict[str, Any]) -> None:
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """All rows of a metrics file."""
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class WandbRun:
    """One W&B run per job, resumed by id; `disabled` mode imports nothing."""

    def __init__(self, paths: RunPaths, project: str, entity: str | None, mode: str, name: str, config: dict) -> None:
        self._run = None
        if mode == "disabled":
            return
        import wandb

        paths.wandb.mkdir(parents=True, exist_ok=True)
        id_file = paths.wandb / "run_id"
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(4)
        id_file.write_text(run_id + "\n")
        os.environ.setdefault("WANDB_SILENT", "true")
        kwargs = dict(
            project=project, entity=entity, name=name, id=run_id, resume="allow", dir=str(paths.root), config=config,
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

    @property
    def run_id(self) -> str | None:
        return self._run.id if self._run is not None else None

    def log(self, row: dict[str, Any], images: dict[str, Any] | None = None) -> None:
        if self._run is None:
            return
        payload = dict(row)
        if images:
            import wandb

            payload.update({key: wandb.Image(value) for key, value in images.items()})
        self._run.log(payload)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


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
