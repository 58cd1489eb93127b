"""A real SLURM 22.05 on this machine for the cluster tests: 2 simulated hosts (h1, h2).

Each host is a network + UTS + mount namespace with its own IP (10.200.0.i), /etc/hosts, sshd and
slurmd; slurmctld and munged run in the root namespace (10.200.0.254). Every node has 2 fake GPUs
(GRES backed by /dev/null), so jobs see SLURM_GPUS_ON_NODE. Everything lives under one folder;
`stop()` stops only the processes this harness started (by their pid files) and removes the
namespaces, the bridge and the ssh client snippet it created. Needs root, slurm-wlm, munge,
openssh-server, pdsh and iproute2 (`missing()` says what is absent).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

HOSTS = ("h1", "h2")
BRIDGE = "br-dssim"
SUBNET = "10.200.0"
GPUS = 2
SSH_SNIPPET = Path("/etc/ssh/ssh_config.d/ds_simclr_sim.conf")
TOOLS = ("slurmctld", "slurmd", "munged", "sbatch", "scontrol", "sshd", "ssh", "pdsh", "ip", "nsenter", "unshare")


def missing() -> str | None:
    """Why the cluster cannot start here, or None."""
    if os.geteuid() != 0:
        return "needs root (network namespaces, slurmd)"
    absent = [t for t in TOOLS if shutil.which(t) is None and not Path(f"/usr/sbin/{t}").exists()]
    if absent:
        return f"missing {', '.join(absent)} (apt-get install slurm-wlm munge openssh-server openssh-client pdsh iproute2)"
    return None


def _run(*cmd: str, check: bool = True, timeout: float = 30, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=check, timeout=timeout, capture_output=True, text=True, **kw)


def _alive(pidfile: Path, comm: str) -> int | None:
    try:
        pid = int(pidfile.read_text())
        stat = Path(f"/proc/{pid}/stat").read_text()
        if Path(f"/proc/{pid}/comm").read_text().strip() == comm and stat.rsplit(")", 1)[1].split()[0] != "Z":
            return pid
    except (OSError, ValueError):
        pass
    return None


class SlurmSim:
    def __init__(self, base: Path) -> None:
        self.base = base
        self.conf = base / "etc" / "slurm.conf"
        self.env = {**os.environ, "SLURM_CONF": str(self.conf)}
        self.namespaces: list[str] = []

    # ------------------------------------------------------------------ helpers

    def ns(self, host: str, *cmd: str) -> list[str]:
        """argv running `cmd` "on" host: its netns, its hostname, its /etc/hosts (keeps /sys/fs/cgroup)."""
        script = 'mount --bind "/etc/netns/$0/hosts" /etc/hosts && hostname "$0" && exec "$@"'
        return ["nsenter", f"--net=/run/netns/{host}", "unshare", "--mount", "--uts", "--propagation", "private",
                "sh", "-c", script, host, *cmd]

    def scontrol(self, *args: str) -> str:
        return _run("scontrol", *args, env=self.env).stdout

    # ------------------------------------------------------------------ start

    def start(self) -> None:
        for sub in ("etc", "state", "spool", "log", "run", "dev", "munge", "ssh"):
            (self.base / sub).mkdir(parents=True, exist_ok=True)
        self._munge()
        self._network()
        self._ssh()
        self._config()
        subprocess.run(["slurmctld", "-i"], check=True, env=self.env, timeout=30)
        for host in HOSTS:
            (self.base / "spool" / host).mkdir(exist_ok=True)
            subprocess.run(self.ns(host, "slurmd", "-N", host), check=True, env=self.env, timeout=30)
        deadline = time.monotonic() + 40
        while time.monotonic() < deadline:
            states = _run("sinfo", "-h", "-o", "%t", check=False, env=self.env).stdout.split()
            if states and all(s in ("idle", "mix", "alloc") for s in states):
                return
            time.sleep(0.3)
        logs = "\n".join(p.read_text()[-1500:] for p in (self.base / "log").glob("slurm*.log"))
        raise RuntimeError(f"SLURM did not become ready in 40 s:\n{logs}")

    def _munge(self) -> None:
        d = self.base / "munge"
        d.chmod(0o755)
        key = d / "munge.key"
        if not key.exists():
            key.write_bytes(os.urandom(1024))
            key.chmod(0o400)
        sock = d / "munge.socket.2"
        subprocess.run(["munged", "--force", f"--key-file={key}", f"--socket={sock}", f"--pid-file={d / 'munged.pid'}",
                        f"--seed-file={d / 'munged.seed'}", f"--log-file={d / 'munged.log'}"], check=True, timeout=30)

    def _network(self) -> None:
        hosts = f"127.0.0.1 localhost\n{SUBNET}.254 {socket.gethostname()}-br\n"
        hosts += "".join(f"{SUBNET}.{i} {h}\n" for i, h in enumerate(HOSTS, 1))
        if _run("ip", "link", "show", BRIDGE, check=False).returncode != 0:
            _run("ip", "link", "add", BRIDGE, "type", "bridge")
            _run("ip", "addr", "add", f"{SUBNET}.254/24", "dev", BRIDGE)
        _run("ip", "link", "set", BRIDGE, "up")
        for i, h in enumerate(HOSTS, 1):
            if Path(f"/run/netns/{h}").exists():
                if _run("ip", "netns", "pids", h, check=False).stdout.strip():
                    raise RuntimeError(f"network namespace {h} already exists and runs processes (another cluster?)")
                # left by a killed test session: nothing runs in it, so it is ours to reclaim
                _run("ip", "link", "del", f"veth-{h}", check=False)
                _run("ip", "netns", "del", h)
            _run("ip", "netns", "add", h)
            self.namespaces.append(h)
            _run("ip", "link", "add", f"veth-{h}", "type", "veth", "peer", "name", "eth0", "netns", h)
            _run("ip", "link", "set", f"veth-{h}", "master", BRIDGE, "up")
            _run("ip", "-n", h, "addr", "add", f"{SUBNET}.{i}/24", "dev", "eth0")
            _run("ip", "-n", h, "link", "set", "lo", "up")
            _run("ip", "-n", h, "link", "set", "eth0", "up")
            Path(f"/etc/netns/{h}").mkdir(parents=True, exist_ok=True)
            Path(f"/etc/netns/{h}/hosts").write_text(hosts)

    def _ssh(self) -> None:
        d = self.base / "ssh"
        d.chmod(0o700)
        for name in ("host_ed25519", "id_ed25519"):
            if not (d / name).exists():
                _run("ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(d / name))
        shutil.copy(d / "id_ed25519.pub", d / "authorized_keys")
        (d / "sshd_config").write_text(
            f"Port 22\nHostKey {d / 'host_ed25519'}\nAuthorizedKeysFile {d / 'authorized_keys'}\n"
            "PermitRootLogin prohibit-password\nPasswordAuthentication no\nKbdInteractiveAuthentication no\n"
            "UsePAM no\nStrictModes no\nMaxStartups 200:30:400\nMaxSessions 200\nAcceptEnv *\n"
        )
        SSH_SNIPPET.parent.mkdir(parents=True, exist_ok=True)
        SSH_SNIPPET.write_text(
            "".join(f"Host {h}\n  HostName {SUBNET}.{i}\n" for i, h in enumerate(HOSTS, 1))
            + f"Host {' '.join(HOSTS)} {SUBNET}.*\n  User root\n  IdentityFile {d / 'id_ed25519'}\n"
            "  StrictHostKeyChecking no\n  UserKnownHostsFile /dev/null\n  LogLevel ERROR\n  BatchMode yes\n"
        )
        Path("/run/sshd").mkdir(mode=0o755, exist_ok=True)
        for i, h in enumerate(HOSTS, 1):
            subprocess.run(self.ns(h, "/usr/sbin/sshd", "-f", str(d / "sshd_config"), "-o",
                                   f"PidFile={self.base / 'run' / f'sshd-{h}.pid'}", "-o", f"ListenAddress={SUBNET}.{i}",
                                   "-E", str(self.base / "log" / f"sshd-{h}.log")), check=True, timeout=30)
        for h in HOSTS:
            for _ in range(50):
                if _run("ssh", h, "true", check=False).returncode == 0:
                    break
                time.sleep(0.1)
            else:
                raise RuntimeError(f"ssh {h} does not answer")

    def _config(self) -> None:
        b = self.base
        for i in range(GPUS):
            dev = b / "dev" / f"nvidia{i}"
            if not dev.exists():
                os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))
        (b / "etc" / "gres.conf").write_text(f"AutoDetect=off\nName=gpu File={b}/dev/nvidia[0-{GPUS - 1}]\n")
        cpus = len(os.sched_getaffinity(0))
        self.conf.write_text(f"""ClusterName=dssim
SlurmctldHost={socket.gethostname()}({SUBNET}.254)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={b}/munge/munge.socket.2
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation={b}/state
SlurmdSpoolDir={b}/spool/%n
SlurmctldPidFile={b}/run/slurmctld.pid
SlurmdPidFile={b}/run/slurmd-%n.pid
SlurmctldLogFile={b}/log/slurmctld.log
SlurmdLogFile={b}/log/slurmd-%n.log
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SwitchType=switch/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
SlurmctldTimeout=30
SlurmdTimeout=30
InactiveLimit=0
KillWait=10
MinJobAge=300
GresTypes=gpu
NodeName=h[1-{len(HOSTS)}] NodeAddr={SUBNET}.[1-{len(HOSTS)}] CPUs={cpus} RealMemory=2000 Gres=gpu:{GPUS} State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
""")

    # ------------------------------------------------------------------ jobs

    def sbatch(self, *args: str, cwd: Path, env: dict | None = None) -> str:
        out = _run("sbatch", "--parsable", *args, cwd=cwd, env={**self.env, **(env or {})})
        return out.stdout.strip().split(";")[0]

    def job_state(self, job: str) -> tuple[str, str]:
        """(state, exit code) of a job, e.g. ("COMPLETED", "0:0")."""
        out = _run("scontrol", "-o", "show", "job", job, check=False, env=self.env).stdout
        fields = dict(item.split("=", 1) for item in out.split() if "=" in item)
        return fields.get("JobState", "UNKNOWN"), fields.get("ExitCode", "?")

    def wait(self, job: str, timeout: float, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL",
                                                   "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED")) -> tuple[str, str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            state = self.job_state(job)
            if state[0] in states:
                return state
            time.sleep(0.5)
        _run("scancel", job, check=False, env=self.env)
        raise TimeoutError(f"job {job} still {self.job_state(job)} after {timeout} s")

    # ------------------------------------------------------------------ stop

    def stop(self) -> None:
        run = self.base / "run"
        if _alive(run / "slurmctld.pid", "slurmctld"):
            _run("scancel", "--full", "--quiet", "--user=root", check=False, env=self.env)
            for _ in range(30):
                if not _run("squeue", "-h", check=False, env=self.env).stdout.strip():
                    break
                time.sleep(0.2)
        pidfiles = [(p, "slurmd") for p in run.glob("slurmd-*.pid")] + [(run / "slurmctld.pid", "slurmctld")]
        pidfiles += [(p, "sshd") for p in run.glob("sshd-*.pid")] + [(self.base / "munge" / "munged.pid", "munged")]
        for pidfile, comm in pidfiles:
            pid = _alive(pidfile, comm)
            if pid is None:
                continue
            os.kill(pid, signal.SIGTERM)
            for _ in range(50):
                if _alive(pidfile, comm) is None:
                    break
                time.sleep(0.1)
            else:
                os.kill(pid, signal.SIGKILL)
        for h in self.namespaces:
            _run("ip", "link", "del", f"veth-{h}", check=False)
            _run("ip", "netns", "del", h, check=False)
            shutil.rmtree(f"/etc/netns/{h}", ignore_errors=True)
        self.namespaces.clear()
        _run("ip", "link", "del", BRIDGE, check=False)
        SSH_SNIPPET.unlink(missing_ok=True)
