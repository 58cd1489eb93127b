"""Fault campaign: a short 2-rank run is interrupted in the ways clusters interrupt runs; after each
fault the same `ds_simclr launch` command must finish the run with nothing lost.

Faults (kinds): a rank SIGKILLed at a random step or while a checkpoint is being written, the whole
launcher killed (`kill -9` of its process group: its ranks must die with it, and a second job
started meanwhile must be refused), SIGTERM and SIGUSR1 to `launch`, and, on a run stopped with a
checkpoint, the newest checkpoint deleted, a file of it truncated or overwritten with garbage of the
same size, garbage written into `checkpoints/latest`, half a line appended to `metrics.jsonl`.

A trial survives with nothing lost when the relaunch exits 0, resumed from the newest complete
checkpoint (its first step is that checkpoint's + 1), `metrics.jsonl` holds exactly one row per step
1..N, and every row's loss and LR equal those of the uninterrupted run bit for bit (CPU).

    python benchmarks/faults.py [--trials 33] [--seed 0] [--steps 12] [--every 3] [--keep DIR]

prints one line per trial and a table of faults injected and survived per kind. The test suite
(`tests/test_faults.py`) runs a fixed subset of 12 trials.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ds_simclr.launch import rank_pids  # noqa: E402

QUICKSTART = REPO / "ds_configs" / "quickstart.yaml"
RUNNING_KINDS = ("kill_rank", "kill_rank_in_checkpoint", "kill_launcher", "sigterm", "sigusr1")
ON_DISK_KINDS = ("delete_newest", "truncate_newest", "garbage_newest", "garbage_latest", "torn_metrics")
KINDS = RUNNING_KINDS + ON_DISK_KINDS
TIMEOUT_S = 300.0


def kill_group(proc: subprocess.Popen, alive: Callable[[], list[int]], wait_s: float) -> list[int]:
    """`kill -9` of `proc`'s process group; wait up to `wait_s` for `alive()` to be empty, then kill
    and return the pids that outlived it (empty when everything died with the group)."""
    os.killpg(proc.pid, signal.SIGKILL)
    deadline = time.monotonic() + wait_s
    while alive() and time.monotonic() < deadline:
        time.sleep(0.1)
    left = alive()
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    return left


@dataclass
class Trial:
    """One injected fault and what came of it."""

    kind: str
    survived: bool = False
    detail: str = ""
    relaunches: int = 0


@dataclass
class Campaign:
    """A quickstart run of `steps` steps on 2 ranks, checkpoint every `every`, in `root`."""

    root: Path
    cache: Path
    steps: int = 12
    every: int = 3
    rng: random.Random = field(default_factory=random.Random)
    baseline: list[dict] = field(default_factory=list)
    _snapshot: Path | None = None
    _count: int = 0

    def command(self, out: Path) -> list[str]:
        sets = [
            f"output_dir={out}", f"data.cache_dir={self.cache}", "logging.wandb_mode=disabled",
            f"train.max_steps={self.steps}", f"checkpoint.every_steps={self.every}", "checkpoint.keep_last=2",
            "logging.log_every=1", "logging.image_every=0", "distributed.launcher=torchrun",
            "model.head_hidden=1024",  # ~12 MB of optimizer state: a checkpoint write lasts long enough to hit
        ]
        return [sys.executable, "-m", "ds_simclr.cli", "launch", str(QUICKSTART), *[a for s in sets for a in ("--set", s)]]

    def start(self, out: Path, log: Path) -> subprocess.Popen:
        """`launch` in its own process group (so the whole launcher can be killed as a group)."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        return subprocess.Popen(self.command(out), stdout=log.open("w"), stderr=subprocess.STDOUT, cwd=REPO,
                                env=env, start_new_session=True)

    def finish(self, proc: subprocess.Popen) -> int:
        try:
            return proc.wait(timeout=TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            return -9

    def launch(self, out: Path, log: Path) -> int:
        return self.finish(self.start(out, log))

    # ------------------------------------------------------------------ checks

    def run_baseline(self) -> None:
        out = self.root / "baseline"
        rc = self.launch(out, self.root / "baseline.log")
        if rc != 0:
            raise RuntimeError(f"the uninterrupted run failed ({rc}):\n{(self.root / 'baseline.log').read_text()[-3000:]}")
        self.baseline = rows(out / "quickstart")

    def expected_resume(self, run: Path, damaged: set[str]) -> int:
        """Step of the newest checkpoint that is complete (marker present) and that we did not damage."""
        steps = [0]
        for folder in (run / "checkpoints").glob("step_*"):
            if folder.name.removeprefix("step_").isdigit() and (folder / "complete.json").is_file() and folder.name not in damaged:
                steps.append(int(folder.name.removeprefix("step_")))
        return max(steps)

    def relaunch_and_check(self, trial: Trial, out: Path, damaged: set[str] = frozenset()) -> None:
        run = out / "quickstart"
        expected = self.expected_resume(run, set(damaged))
        log = out / f"relaunch{trial.relaunches}.log"
        trial.relaunches += 1
        rc = self.launch(out, log)
        text = log.read_text()
        first = next((line for line in text.splitlines() if line.startswith("step ") and "/" in line), None)
        got = int(first.split()[1].split("/")[0]) - 1 if first else None
        problems = []
        if rc != 0:
            problems.append(f"relaunch exit {rc}: {tail(text)}")
        if got != expected:
            problems.append(f"resumed from step {got}, the newest complete checkpoint is step_{expected}")
        found = rows(run)
        if [r["step"] for r in found] != list(range(1, self.steps + 1)):
            problems.append(f"metrics steps {[r['step'] for r in found]}")
        elif any((a["loss"], a["lr"]) != (b["loss"], b["lr"]) for a, b in zip(found, self.baseline)):
            bad = next(a["step"] for a, b in zip(found, self.baseline) if (a["loss"], a["lr"]) != (b["loss"], b["lr"]))
            problems.append(f"loss/LR differ from the uninterrupted run from step {bad}")
        if "Traceback" in text:
            problems.append("a traceback in the relaunch's output")
        trial.survived = not problems
        trial.detail += (" | " if trial.detail else "") + ("; ".join(problems) or f"resumed from step_{expected}, all {self.steps} rows equal")

    # ------------------------------------------------------------------ faults while running

    def wait_rows(self, proc: subprocess.Popen, run: Path, count: int) -> bool:
        while proc.poll() is None:
            if (run / "metrics.jsonl").is_file() and len(rows(run)) >= count:
                return True
            time.sleep(0.05)
        return False

    def running_fault(self, kind: str) -> Trial:
        trial = Trial(kind)
        out = self.fresh_dir(kind)
        run, log = out / "quickstart", out / "first.log"
        proc = self.start(out, log)
        second = self.second_job(proc, out) if kind == "kill_launcher" else None
        # SIGUSR1 after the second checkpoint: the stopped run is then also the one the faults on disk
        # start from (they need a checkpoint to fall back to)
        at = self.rng.randint(2 * self.every + 1 if kind == "sigusr1" else 1, self.steps - 3)
        writing: list[str] = []
        if kind == "kill_rank_in_checkpoint":
            writing = self.kill_in_checkpoint(proc, run)
            trial.detail = f"SIGKILL to a rank while it wrote {','.join(writing)}"
        elif self.wait_rows(proc, run, at):
            time.sleep(self.rng.uniform(0.0, 0.3))  # somewhere inside the next step
            step = len(rows(run))
            if kind == "kill_rank":
                trial.detail = f"SIGKILL to a rank after step {step}"
                self.kill_a_rank(run)
            elif kind == "kill_launcher":
                tied, trial.detail = self.kill_launcher(proc, run, second)
                if not tied:
                    return trial
            else:
                sig = signal.SIGTERM if kind == "sigterm" else signal.SIGUSR1
                trial.detail = f"{sig.name} to launch after step {step}"
                proc.send_signal(sig)
        rc = self.finish(proc)
        if second is not None and second.returncode is None:
            second.communicate(timeout=TIMEOUT_S)
        if writing:
            done = all((run / "checkpoints" / tag / "complete.json").is_file() for tag in writing)
            trial.detail += " (it completed nonetheless)" if done else " (left incomplete)"
        if rc == 0:
            trial.detail += "; the run had finished before the fault: not counted"
            trial.kind = "none"
            return trial
        if kind in ("sigterm", "sigusr1") and rc != 75:
            trial.detail += f"; launch exited {rc}, not 75"
            return trial
        if kind == "sigusr1" and self._snapshot is None:
            self._snapshot = self.root / "snapshot"
            shutil.copytree(out, self._snapshot)
        self.relaunch_and_check(trial, out)
        return trial

    def kill_in_checkpoint(self, proc: subprocess.Popen, run: Path) -> list[str]:
        """SIGKILL a rank (chosen beforehand) as soon as the staging folder of a random checkpoint
        (not the last) appears."""
        pids: list[int] = []
        while proc.poll() is None and len(pids) < 2:
            pids = rank_pids(run)
            time.sleep(0.1)
        tag = f"step_{self.every * self.rng.randint(1, max(1, (self.steps - 1) // self.every))}"
        staging = run / "checkpoints" / ".staging"
        while proc.poll() is None and not (staging / tag).exists():
            time.sleep(0.002)
        if pids:
            os.kill(self.rng.choice(pids), signal.SIGKILL)
        return [tag]

    def kill_a_rank(self, run: Path) -> None:
        pids = rank_pids(run)
        if pids:
            os.kill(self.rng.choice(pids), signal.SIGKILL)

    def second_job(self, first: subprocess.Popen, out: Path) -> subprocess.Popen:
        """The same command again, started once the first job holds the run directory."""
        lock = out / "quickstart" / "lock"
        while first.poll() is None and not lock.is_file():
            time.sleep(0.05)
        return subprocess.Popen(self.command(out), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                cwd=REPO)

    def kill_launcher(self, proc: subprocess.Popen, run: Path, second: subprocess.Popen) -> tuple[bool, str]:
        """The second job must have been refused; `kill -9` of the first's process group must take
        its launcher and ranks with it."""
        output = second.communicate(timeout=TIMEOUT_S)[0]
        refused = second.returncode == 2 and "another job holds this run directory" in output
        step = len(rows(run))
        left = kill_group(proc, lambda: rank_pids(run), wait_s=15)
        detail = (
            f"kill -9 of launch's process group after step {step}; a second job meanwhile: "
            + ("refused" if refused else f"NOT refused ({second.returncode}: {tail(output)})")
            + ("; its ranks died with it" if not left else f"; ranks {left} outlived it")
        )
        return refused and not left, detail

    # ------------------------------------------------------------------ faults on disk

    def stopped_run(self) -> Path:
        """A run stopped by SIGUSR1 after its second checkpoint (that of the first sigusr1 trial, or
        made here once), copied for each fault on disk."""
        if self._snapshot is None:
            out = self.root / "snapshot"
            run, log = out / "quickstart", out / "first.log"
            out.mkdir(parents=True)
            proc = self.start(out, log)
            self.wait_rows(proc, run, 2 * self.every + 1)
            proc.send_signal(signal.SIGUSR1)
            if self.finish(proc) != 75:
                raise RuntimeError(f"the snapshot run did not stop with 75:\n{tail(log.read_text())}")
            self._snapshot = out
        return self._snapshot

    def on_disk_fault(self, kind: str) -> Trial:
        trial = Trial(kind)
        out = self.fresh_dir(kind)
        shutil.rmtree(out)
        shutil.copytree(self.stopped_run(), out)
        run = out / "quickstart"
        checkpoints = run / "checkpoints"
        newest = max((p for p in checkpoints.glob("step_*") if p.name[5:].isdigit()), key=lambda p: int(p.name[5:]))
        damaged: set[str] = set()
        files = sorted(p for p in newest.iterdir() if p.name.endswith(".pt"))
        victim = self.rng.choice(files)
        if kind == "delete_newest":
            shutil.rmtree(newest)
            damaged.add(newest.name)
            trial.detail = f"deleted {newest.name} (latest names it)"
        elif kind == "truncate_newest":
            size = victim.stat().st_size
            with victim.open("r+b") as f:
                f.truncate(self.rng.randint(0, size - 1))
            damaged.add(newest.name)
            trial.detail = f"truncated {newest.name}/{victim.name}"
        elif kind == "garbage_newest":
            data = bytearray(victim.read_bytes())
            start = self.rng.randint(0, len(data) - 1024)
            data[start : start + 1024] = os.urandom(1024)
            victim.write_bytes(bytes(data))
            damaged.add(newest.name)
            trial.detail = f"1 KiB of garbage inside {newest.name}/{victim.name} (same size)"
        elif kind == "garbage_latest":
            (checkpoints / "latest").write_bytes(os.urandom(self.rng.randint(1, 64)))
            trial.detail = "garbage in checkpoints/latest"
        elif kind == "torn_metrics":
            line = json.dumps(rows(run)[-1])
            with (run / "metrics.jsonl").open("a") as f:
                f.write(line[: self.rng.randint(1, len(line) - 2)])
            trial.detail = "half a line appended to metrics.jsonl"
        self.relaunch_and_check(trial, out, damaged)
        return trial

    # ------------------------------------------------------------------ the campaign

    def fresh_dir(self, kind: str) -> Path:
        self._count += 1
        out = self.root / f"{self._count:02d}-{kind}"
        out.mkdir(parents=True)
        return out

    def trial(self, kind: str) -> Trial:
        return self.running_fault(kind) if kind in RUNNING_KINDS else self.on_disk_fault(kind)


def safe_listdir(folder: Path) -> list[Path]:
    try:
        return list(folder.iterdir())
    except OSError:
        return []


def rows(run: Path) -> list[dict]:
    """metrics.jsonl rows (a torn last line ignored, as the trainer does)."""
    out = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return out


def tail(text: str, lines: int = 6) -> str:
    return " / ".join(text.strip().splitlines()[-lines:])


def summary(trials: list[Trial]) -> str:
    counted = [t for t in trials if t.kind != "none"]
    injected, survived = Counter(t.kind for t in counted), Counter(t.kind for t in counted if t.survived)
    lines = [f"{'fault':<26}{'injected':>9}{'survived':>9}"]
    lines += [f"{kind:<26}{injected[kind]:>9}{survived[kind]:>9}" for kind in KINDS if injected[kind]]
    lines.append(f"{'all':<26}{len(counted):>9}{sum(survived.values()):>9}")
    return "\n".join(lines)


def schedule(trials: int, rng: random.Random, kinds: tuple[str, ...] = KINDS) -> list[str]:
    """Every kind in turn (so each is tried), in a shuffled order."""
    drawn = [kinds[i % len(kinds)] for i in range(trials)]
    rng.shuffle(drawn)
    return drawn


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=33)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3)
    parser.add_argument("--cache", type=Path, default=Path("~/.cache/ds_simclr").expanduser())
    parser.add_argument("--keep", type=Path, default=None, help="keep the run folders here")
    parser.add_argument("--kinds", nargs="+", choices=KINDS, default=list(KINDS), help="faults to draw from")
    args = parser.parse_args()
    root = args.keep or Path(tempfile.mkdtemp(prefix="ds_simclr_faults_"))
    root.mkdir(parents=True, exist_ok=True)
    campaign = Campaign(root, args.cache, args.steps, args.every, random.Random(args.seed))
    t0 = time.monotonic()
    campaign.run_baseline()
    print(f"uninterrupted run: {args.steps} steps, final loss {campaign.baseline[-1]['loss']!r}", flush=True)
    trials = []
    for i, kind in enumerate(schedule(args.trials, campaign.rng, tuple(args.kinds)), 1):
        trial = campaign.trial(kind)
        trials.append(trial)
        print(f"{i:3d} {trial.kind:<24} {'survived' if trial.survived else 'LOST':<9} {trial.detail}", flush=True)
    print(summary(trials))
    print(f"{time.monotonic() - t0:.0f} s")
    if args.keep is None:
        shutil.rmtree(root, ignore_errors=True)
    return 0 if all(t.survived for t in trials if t.kind != "none") else 1


if __name__ == "__main__":
    sys.exit(main())
