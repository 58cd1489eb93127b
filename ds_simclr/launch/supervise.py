"""Running the launcher: hold the run directory, forward stop signals to the ranks, watch them,
explain how the job ended (a rank's one-line error, a stop, a crash) with the right exit status."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Sequence

from ds_simclr.errors import EXIT_STOPPED, LaunchError, Stopped, UserError
from ds_simclr.hostlist import check_host
from ds_simclr.launch.launchers import DeepSpeedLauncher, Launcher, LaunchPlan
from ds_simclr.launch.prepare import deepspeed_env_file, newest_step, prepare_run_dir, storage_errors
from ds_simclr.lifeline import LAUNCH_ENV, die_with_parent, launch_identity
from ds_simclr.rank_report import read_reports
from ds_simclr.runlock import LOCK_ENV, RunLock

STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


def is_rank_cmdline(argv: Sequence[str], run_dir: str) -> bool:
    """True for a rank, not a launcher: `python [-u] -m ds_simclr.cli train ... --run-dir RUN_DIR`,
    or the same through `RANK_ENTRY` (`python [-u] .../rank_entry.py train ...`)."""
    head = list(argv[1:3])
    if "-m" in head:
        i = argv.index("-m")
        if list(argv[i + 1 : i + 2]) != ["ds_simclr.cli"]:
            return False
        rest = list(argv[i + 2 :])
    else:
        scripts = [i for i, arg in enumerate(argv[:3]) if arg.endswith("/ds_simclr/launch/rank_entry.py")]
        if not scripts:
            return False
        rest = list(argv[scripts[0] + 1 :])
    if rest[:1] != ["train"] or "--run-dir" not in rest:
        return False
    return rest[rest.index("--run-dir") + 1 : rest.index("--run-dir") + 2] == [run_dir]


def _proc_table() -> dict[int, tuple[int, list[str]]]:
    """pid -> (parent pid, argv) for every readable process."""
    table = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        table[int(entry.name)] = (ppid, [a.decode(errors="replace") for a in argv if a])
    return table


def rank_pids(run_dir: Path, ancestor: int | None = None) -> list[int]:
    """Rank processes of this run on this host (under `ancestor` when given).

    A process a rank forks keeps the rank's command line (until it execs, if ever); it is not a rank
    itself, so a process whose parent matches is left out.
    """
    table = _proc_table()
    matching = {pid for pid, (_, argv) in table.items() if is_rank_cmdline(argv, str(run_dir))}
    found = []
    for pid in matching:
        if table[pid][0] in matching:
            continue
        if ancestor is not None:
            parent, seen = pid, 0
            while parent not in (0, 1, ancestor) and parent in table and seen < 64:
                parent, seen = table[parent][0], seen + 1
            if parent != ancestor:
                continue
        found.append(pid)
    return sorted(found)


def signal_ranks(run_dir: Path, signum: int, ancestor: int | None = None) -> list[int]:
    """Send `signum` to this run's ranks on this host; the pids signalled."""
    sent = []
    for pid in rank_pids(run_dir, ancestor):
        try:
            os.kill(pid, signum)
            sent.append(pid)
        except ProcessLookupError:
            pass
    return sent


def remote_signal_cmd(plan: LaunchPlan, signum: int) -> list[str] | None:
    """The command that signals the ranks on the other hosts (None on one local node)."""
    c = plan.cluster
    if c.is_local:
        return None
    here = [plan.python, "-m", "ds_simclr.launch", "--signal-ranks", str(plan.run_dir), str(int(signum))]
    if c.slurm_job is not None:
        return [
            "srun", "--overlap", f"--nodes={c.nodes}", f"--ntasks={c.nodes}", "--ntasks-per-node=1",
            f"--nodelist={','.join(c.hosts)}", "--export=ALL", *here,
        ]
    return ["pdsh", "-S", "-R", "ssh", "-w", ",".join(check_host(h) for h in c.hosts), shlex.join(here)]


class _Forwarder:
    """Turns SIGTERM/SIGUSR1/SIGINT to `launch` into a stop request for every rank."""

    def __init__(self, plan: LaunchPlan, proc: subprocess.Popen) -> None:
        self.plan, self.proc = plan, proc
        self.received: int | None = None
        self.previous: dict[int, object] = {}

    def install(self) -> None:
        for sig in STOP_SIGNALS:
            self.previous[sig] = signal.signal(sig, self._handle)

    def restore(self) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum: int, _frame: object) -> None:
        name = signal.Signals(signum).name
        if self.received is not None:
            log(f"second {name}: terminating the launcher")
            self.proc.terminate()
            return
        self.received = signum
        local = signal_ranks(self.plan.run_dir, signal.SIGTERM, ancestor=self.proc.pid)
        log(f"{name}: asked {len(local)} local rank(s) to checkpoint and stop")
        remote = remote_signal_cmd(self.plan, signal.SIGTERM)
        if remote is not None:
            log(f"signalling the other hosts: {shlex.join(remote)}")
            subprocess.Popen(remote, stdin=subprocess.DEVNULL, env={**os.environ, **self.plan.env})
        elif not local:
            self.proc.send_signal(signal.SIGTERM)


def log(message: str) -> None:
    print(f"launch: {message}", file=sys.stderr, flush=True)


class _RankWatch:
    """Remembers this host's ranks (pid -> RANK) and which one ended first while the job ran."""

    def __init__(self, run_dir: Path, ancestor: int) -> None:
        self.run_dir, self.ancestor = run_dir, ancestor
        self.ranks: dict[int, str] = {}
        self.first_gone: tuple[str, str] | None = None
        """(pids, ranks) of the first rank(s) seen gone, polled every 0.1 s."""

    def poll(self) -> None:
        alive = set(rank_pids(self.run_dir, self.ancestor))
        for pid in alive - set(self.ranks):
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                continue
            values = dict(item.decode(errors="replace").split("=", 1) for item in environ if b"=" in item)
            self.ranks[pid] = values.get("RANK") or values.get("OMPI_COMM_WORLD_RANK") or "?"
        gone = sorted(set(self.ranks) - alive)
        if self.first_gone is None and gone:
            self.first_gone = (
                ", ".join(str(pid) for pid in gone),
                ", ".join(self.ranks[pid] for pid in gone),
            )


def run_plan(launcher: Launcher, plan: LaunchPlan, store: Path | None = None) -> int:
    """Hold the run directory, check and write it, start the launcher, forward stop signals, and
    say how the job ended: the exit status (see `errors.py`), or a rank's `UserError` raised here.

    `store`: the ready store the ranks will train from (checked against the checkpoint's)."""
    with storage_errors("creating the run directory"):
        lock = RunLock.acquire(plan.paths.lock)  # a live job's directory is refused before anything is written
    try:
        plan.env.update({LOCK_ENV: lock.token, LAUNCH_ENV: launch_identity()})  # for the ranks on every host
        cmd = launcher.build_cmd(plan)
        prepare_run_dir(launcher, plan, cmd, store)
        return _supervise(launcher, plan, cmd, lock)
    finally:
        lock.release()


def _supervise(launcher: Launcher, plan: LaunchPlan, cmd: list[str], lock: RunLock) -> int:
    env = {**os.environ, **plan.env}
    if isinstance(launcher, DeepSpeedLauncher) and not plan.cluster.is_local:
        env["DS_ENV_FILE"] = str(deepspeed_env_file(plan))
    log(f"{plan.cluster.world_size} ranks on {', '.join(plan.cluster.hosts)}; run dir {plan.run_dir}")
    log(f"command: {shlex.join(cmd)}")
    started = time.monotonic()
    try:
        # Its own session (Ctrl-C reaches only us, we ask the ranks to checkpoint); it dies with us.
        proc = subprocess.Popen(cmd, env=env, start_new_session=True, preexec_fn=die_with_parent)
    except FileNotFoundError as exc:
        raise LaunchError(f"cannot start {cmd[0]}: {exc.strerror}", where=f"--launcher {launcher.name}") from None
    lock.start_heartbeat()
    forwarder = _Forwarder(plan, proc)
    forwarder.install()
    watch = _RankWatch(plan.run_dir, proc.pid)
    try:
        while True:
            try:
                rc = proc.wait(timeout=0.1)
                break
            except subprocess.TimeoutExpired:
                watch.poll()
    finally:
        forwarder.restore()
    elapsed = time.monotonic() - started
    step = newest_step(plan.run_dir)
    total = plan.spec.train.total_steps
    reports = read_reports(plan.paths.errors)
    if reports:
        first = reports[0]
        line = first.line if first.rank == 0 else f"rank {first.rank} on {first.host}: {first.line}"
        raise RankError(line, first.exit_code)
    if forwarder.received is not None and (step or 0) < total:
        kept = f"with checkpoint step_{step}" if step is not None else "before its first checkpoint"
        log(
            f"stopped on {signal.Signals(forwarder.received).name} after {elapsed:.0f} s {kept}"
            f" of {total} steps; run the same command to resume (exit {EXIT_STOPPED})"
        )
        return EXIT_STOPPED
    if rc != 0 and forwarder.received is None:
        resume = f"; checkpoint step_{step} is kept: run the same command to resume" if step is not None else (
            "; no checkpoint yet: run the same command to start again")
        first_gone = watch.first_gone
        if first_gone is None:
            who = "a rank failed or was killed (the launcher's output above names it)"
        elif "," in first_gone[0]:
            who = f"ranks {first_gone[1]} on {socket.gethostname()} (pids {first_gone[0]}) ended first, together"
        else:
            who = f"rank {first_gone[1]} on {socket.gethostname()} (pid {first_gone[0]}) ended first"
        log(f"{launcher.name} exited with status {rc} after {elapsed:.0f} s: {who}{resume}")
        return rc if rc > 0 else 128 - rc
    return 0


class RankError(UserError):
    """A rank stopped on a user error; its one line and exit status become `launch`'s."""

    def __init__(self, line: str, exit_code: int) -> None:
        super().__init__(line)
        self.exit_code = exit_code


@contextmanager
def startup_signals_stop() -> Iterator[None]:
    """Until the launcher runs (and after it exited), a stop signal ends `launch` with `Stopped`
    (exit 75, one line): a job preempted while it prepares loses nothing and is requeued."""

    def stop(signum: int, _frame: object) -> None:
        raise Stopped(
            f"stopped by {signal.Signals(signum).name} before training started",
            hint="run the same command to start or resume",
        )

    previous = {sig: signal.signal(sig, stop) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
