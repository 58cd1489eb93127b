"""Running the launcher: forward stop signals to the ranks, watch them, explain how it ended."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Sequence

from ds_simclr.errors import LaunchError
from ds_simclr.hostlist import check_host
from ds_simclr.launch.launchers import DeepSpeedLauncher, Launcher, LaunchPlan
from ds_simclr.launch.prepare import deepspeed_env_file, latest_step, prepare_run_dir

EXIT_STOPPED = 75
"""`launch` exit status after a forwarded stop signal left a checkpoint of an unfinished run
(EX_TEMPFAIL: run the same command again, e.g. `scontrol requeue`)."""

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


def run_plan(launcher: Launcher, plan: LaunchPlan) -> int:
    """Write the run directory, start the launcher, forward stop signals, return its status."""
    cmd = launcher.build_cmd(plan)
    prepare_run_dir(launcher, plan, cmd)
    env = {**os.environ, **plan.env}
    if isinstance(launcher, DeepSpeedLauncher) and not plan.cluster.is_local:
        env["DS_ENV_FILE"] = str(deepspeed_env_file(plan))
    start_step = latest_step(plan.run_dir)
    log(f"{plan.cluster.world_size} ranks on {', '.join(plan.cluster.hosts)}; run dir {plan.run_dir}")
    log(f"command: {shlex.join(cmd)}")
    started = time.monotonic()
    try:
        proc = subprocess.Popen(cmd, env=env, start_new_session=True)
    except FileNotFoundError as exc:
        raise LaunchError(f"cannot start {cmd[0]}: {exc.strerror}", where=f"--launcher {launcher.name}") from None
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
    step = latest_step(plan.run_dir)
    total = plan.spec.train.total_steps
    if forwarder.received is not None and step is not None and step != start_step:
        if step < total:
            log(
                f"stopped on {signal.Signals(forwarder.received).name} after {elapsed:.0f} s with checkpoint step_{step}"
                f" of {total}; run the same command to resume (exit {EXIT_STOPPED})"
            )
            return EXIT_STOPPED
        return 0
    if rc != 0:
        resume = f"; checkpoint step_{step} is kept: run the same command to resume" if step is not None else ""
        first = watch.first_gone
        if first is None:
            who = "a rank failed or was killed (the launcher's output above names it)"
        elif "," in first[0]:
            who = f"ranks {first[1]} on {socket.gethostname()} (pids {first[0]}) ended first, together"
        else:
            who = f"rank {first[1]} on {socket.gethostname()} (pid {first[0]}) ended first"
        log(f"{launcher.name} exited with status {rc} after {elapsed:.0f} s: {who}{resume}")
        return rc if rc > 0 else 128 - rc
    return 0
