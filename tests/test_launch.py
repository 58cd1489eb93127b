"""`ds_simclr launch` / `hostfile` without starting processes: discovery, argv, validation."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from helpers import CONFIGS, REPO

from ds_simclr.cli import main
from ds_simclr.errors import BatchArithmeticError, LaunchError
from ds_simclr.hostlist import (
    HostSlots,
    expand_nodelist,
    format_hostfile,
    read_hostfile,
)
from ds_simclr.launch import (
    DeepSpeedLauncher,
    MpirunLauncher,
    TorchrunLauncher,
    discover_cluster,
    is_rank_cmdline,
    make_plan,
    rank_pids,
    remote_signal_cmd,
)
from ds_simclr.specload import load_spec

QUICKSTART = CONFIGS / "quickstart.yaml"
SLURM_VARS = ("SLURM_JOB_NODELIST", "SLURM_NNODES", "SLURM_GPUS_ON_NODE", "SLURM_GPUS_PER_NODE", "SLURM_JOB_ID",
              "SLURM_CPUS_ON_NODE", "SLURM_NTASKS_PER_NODE", "CUDA_VISIBLE_DEVICES")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SLURM_VARS:
        monkeypatch.delenv(name, raising=False)


def spec(tmp_path: Path, *overrides: str):
    return load_spec(QUICKSTART, [f"output_dir={tmp_path / 'runs'}", *overrides])


def slurm(monkeypatch: pytest.MonkeyPatch, nodelist: str = "gpu[01-03]", gpus: str | None = "4", cpus: str = "32") -> None:
    monkeypatch.setenv("SLURM_JOB_NODELIST", nodelist)
    monkeypatch.setenv("SLURM_NNODES", str(len(expand_nodelist(nodelist))))
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.setenv("SLURM_CPUS_ON_NODE", cpus)
    if gpus is not None:
        monkeypatch.setenv("SLURM_GPUS_ON_NODE", gpus)


AUTO = ("distributed.nodes=auto", "distributed.procs_per_node=auto")


# ------------------------------------------------------------------ host lists


def test_nodelist_expansion() -> None:
    assert expand_nodelist("gpu[01-03,07],cpu5") == ["gpu01", "gpu02", "gpu03", "gpu07", "cpu5"]
    assert expand_nodelist("n[8-10]") == ["n8", "n9", "n10"]


@pytest.mark.parametrize("bad", ["gpu[01-", "a;rm -rf /", "$(id)", "-oProxyCommand=x", "a b", ""])
def test_bad_nodelist_is_a_launch_error(bad: str) -> None:
    with pytest.raises(LaunchError):
        expand_nodelist(bad)


def test_bad_nodelist_exits_2(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setenv("SLURM_JOB_NODELIST", "gpu[01-02];reboot")
    assert main(["hostfile"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: SLURM_JOB_NODELIST: invalid node list") and "\n" == err[-1] and err.count("\n") == 1


def test_hostfile_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    slurm(monkeypatch, "gpu[01-02],cpu5", gpus=None)
    monkeypatch.setenv("SLURM_GPUS_PER_NODE", "h100:4")
    assert main(["hostfile", "-o", "-"]) == 0
    assert capsys.readouterr().out == "gpu01 slots=4\ngpu02 slots=4\ncpu5 slots=4\n"
    out = tmp_path / "hf"
    assert main(["hostfile", "-o", str(out), "--slots", "2"]) == 0
    assert read_hostfile(out) == [HostSlots("gpu01", 2), HostSlots("gpu02", 2), HostSlots("cpu5", 2)]


def test_hostfile_needs_an_allocation(capsys: pytest.CaptureFixture) -> None:
    assert main(["hostfile"]) == 2
    assert "no SLURM allocation" in capsys.readouterr().err


def test_read_hostfile_errors_name_the_line(tmp_path: Path) -> None:
    path = tmp_path / "hf"
    path.write_text("# comment\nnode1 slots=2\nnode2;ls slots=2\n")
    with pytest.raises(LaunchError, match=r"hf:3"):
        read_hostfile(path)
    path.write_text("node1 slots=2  # trailing\n\nnode2\n")
    assert read_hostfile(path) == [HostSlots("node1", 2), HostSlots("node2", 1)]
    assert format_hostfile(read_hostfile(path)) == "node1 slots=2\nnode2 slots=1\n"


def test_example_hostfiles_parse() -> None:
    for path in sorted((REPO / "hostfiles").glob("*")):
        assert read_hostfile(path)


# ------------------------------------------------------------------ discovery


def test_local_discovery_uses_spec_then_cpu_default(tmp_path: Path) -> None:
    cluster = discover_cluster(spec(tmp_path), env={})
    assert (cluster.nodes, cluster.procs_per_node, cluster.source, cluster.is_local) == (1, 2, "local", True)
    cluster = discover_cluster(spec(tmp_path, *AUTO), env={"CUDA_VISIBLE_DEVICES": "0,1,2,3"})
    assert cluster.procs_per_node == 4
    cluster = discover_cluster(spec(tmp_path, *AUTO), env={"CUDA_VISIBLE_DEVICES": ""})
    assert cluster.procs_per_node == 2


def test_slurm_discovery(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    slurm(monkeypatch)
    cluster = discover_cluster(spec(tmp_path, *AUTO))
    assert cluster.hosts == ("gpu01", "gpu02", "gpu03") and cluster.procs_per_node == 4
    assert cluster.world_size == 12 and cluster.source == "SLURM job 4242" and cluster.master_addr == "gpu01"
    monkeypatch.delenv("SLURM_GPUS_ON_NODE")
    monkeypatch.setenv("SLURM_GPUS_PER_NODE", "gpu:8")
    assert discover_cluster(spec(tmp_path, *AUTO)).procs_per_node == 8
    # an explicit spec count wins over the allocation
    assert discover_cluster(spec(tmp_path, "distributed.nodes=2", "distributed.procs_per_node=1")).world_size == 2


def test_hostfile_beats_slurm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    slurm(monkeypatch)
    hf = tmp_path / "hf"
    hf.write_text("a1 slots=2\na2 slots=2\n")
    cluster = discover_cluster(spec(tmp_path, *AUTO), hostfile=hf)
    assert cluster.hosts == ("a1", "a2") and cluster.procs_per_node == 2 and cluster.source == f"hostfile {hf}"
    cluster = discover_cluster(spec(tmp_path, *AUTO, f"distributed.hostfile={hf}"))
    assert cluster.hosts == ("a1", "a2")


def test_too_many_nodes_requested(tmp_path: Path) -> None:
    with pytest.raises(LaunchError, match="distributed.nodes"):
        discover_cluster(spec(tmp_path, "distributed.nodes=3"), env={})


def test_bad_batch_arithmetic_names_working_sizes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path,
                                                  capsys: pytest.CaptureFixture) -> None:
    slurm(monkeypatch)
    with pytest.raises(BatchArithmeticError):
        make_plan(spec(tmp_path, *AUTO))
    assert main(["launch", str(QUICKSTART), "--dry-run", "--set", f"output_dir={tmp_path}", *sum((["--set", a] for a in AUTO), [])]) == 2
    assert "world sizes that work: 1, 2, 4, 8" in capsys.readouterr().err


# ------------------------------------------------------------------ argv


def test_torchrun_argv_local(tmp_path: Path) -> None:
    launcher, plan = make_plan(spec(tmp_path), env={})
    cmd = launcher.build_cmd(plan)
    run = str(plan.run_dir)
    assert isinstance(launcher, TorchrunLauncher)
    assert cmd == [sys.executable, "-m", "ds_simclr.launch.torchrun", "--nproc_per_node=2", "--standalone", "--nnodes=1",
                   "-m", "ds_simclr.cli", "train", f"{run}/spec.yaml", "--run-dir", run]
    assert plan.env["OMP_NUM_THREADS"] == str(max(1, len(os.sched_getaffinity(0)) // 2))


def test_torchrun_argv_slurm(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    slurm(monkeypatch)
    monkeypatch.delenv("DS_ACCELERATOR", raising=False)  # GPUs from SLURM: no CPU accelerator forced
    launcher, plan = make_plan(spec(tmp_path, *AUTO, "train.global_batch=24", "distributed.master_port=29400"))
    cmd = launcher.build_cmd(plan)
    assert cmd[:8] == ["srun", "--nodes=3", "--ntasks=3", "--ntasks-per-node=1", "--nodelist=gpu01,gpu02,gpu03",
                       "--cpus-per-task=32", "--kill-on-bad-exit=1", "--export=ALL"]
    i = cmd.index("ds_simclr.launch.torchrun")
    assert cmd[i + 1 : i + 7] == ["--nproc_per_node=4", "--nnodes=3", "--rdzv_backend=c10d",
                                  "--rdzv_endpoint=gpu01:29400", "--rdzv_id=4242", "--max_restarts=0"]
    assert plan.env["OMP_NUM_THREADS"] == "8" and "DS_ACCELERATOR" not in plan.env


def test_torchrun_several_nodes_needs_slurm(tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    hf.write_text("a1 slots=2\na2 slots=2\n")
    launcher, plan = make_plan(spec(tmp_path, *AUTO), hostfile=hf, env={})
    with pytest.raises(LaunchError, match="SLURM"):
        launcher.build_cmd(plan)


def test_deepspeed_argv_local_and_hostfile(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    launcher, plan = make_plan(spec(tmp_path, "distributed.master_port=29555"), launcher="deepspeed", env={})
    assert isinstance(launcher, DeepSpeedLauncher) and not launcher.uses_hostfile(plan)
    cmd = launcher.build_cmd(plan)
    assert cmd[1:] == ["-m", "deepspeed.launcher.runner", "--num_nodes=1", "--num_gpus=2", "--master_addr=127.0.0.1",
                       "--master_port=29555", "--no_local_rank", "--module", "ds_simclr.cli", "train",
                       f"{plan.run_dir}/spec.yaml", "--run-dir", str(plan.run_dir)]
    slurm(monkeypatch, "h[1-2]", gpus="2")
    launcher, plan = make_plan(spec(tmp_path, *AUTO, "distributed.deepspeed_backend=slurm"), launcher="deepspeed")
    cmd = launcher.build_cmd(plan)
    assert f"--hostfile={plan.run_dir}/hostfile" in cmd and "--launcher=slurm" in cmd and "--master_addr=h1" in cmd
    assert launcher.uses_hostfile(plan)


def test_mpirun_argv(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("WANDB_PROJECT", "p1")
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")
    launcher, plan = make_plan(spec(tmp_path, "distributed.master_port=29777"), launcher="mpirun")
    cmd = launcher.build_cmd(plan)
    assert isinstance(launcher, MpirunLauncher)
    assert cmd[0] == str(Path(sys.executable).parent / "mpirun") and cmd[1:3] == ["-np", "2"]
    assert ("--allow-run-as-root" in cmd) == (os.geteuid() == 0) and "--oversubscribe" in cmd
    for var in ("MASTER_ADDR=127.0.0.1", "MASTER_PORT=29777", "WANDB_PROJECT=p1", "NCCL_SOCKET_IFNAME=ib0",
                "OMP_NUM_THREADS=1" if len(os.sched_getaffinity(0)) <= 3 else "OMP_NUM_THREADS"):
        assert any(arg.startswith(var) for arg in cmd), var
    assert cmd[-7:-4] == [sys.executable, "-m", "ds_simclr.cli"]
    slurm(monkeypatch, "h[1-2]", gpus="2")
    _, plan = make_plan(spec(tmp_path, *AUTO), launcher="mpirun")
    assert "h1:2,h2:2" in launcher.build_cmd(plan)


def test_remote_stop_command(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    _, plan = make_plan(spec(tmp_path), env={})
    assert remote_signal_cmd(plan, signal.SIGTERM) is None
    slurm(monkeypatch, "h[1-2]", gpus="2")
    _, plan = make_plan(spec(tmp_path, *AUTO), launcher="deepspeed")
    cmd = remote_signal_cmd(plan, signal.SIGTERM)
    assert cmd[:2] == ["srun", "--overlap"] and cmd[-3:] == ["--signal-ranks", str(plan.run_dir), "15"]


def test_rank_cmdline_matching() -> None:
    run = "/r/x"
    rank = ["/v/python", "-u", "-m", "ds_simclr.cli", "train", "/r/x/spec.yaml", "--run-dir", run]
    assert is_rank_cmdline(rank, run) and is_rank_cmdline([rank[0], *rank[2:]], run)
    assert not is_rank_cmdline(rank, "/r/y")
    assert not is_rank_cmdline(["/v/python", "-m", "torch.distributed.run", "--standalone", *rank[2:]], run)
    assert not is_rank_cmdline(["/v/python", "-u", "-m", "deepspeed.launcher.launch", "--module", *rank[3:]], run)
    by_file = ["/v/python", "-u", "/src/ds_simclr/launch/rank_entry.py", "train", "/r/x/spec.yaml", "--run-dir", run]
    assert is_rank_cmdline(by_file, run) and not is_rank_cmdline(by_file, "/r/y")


def test_rank_pids_finds_descendants(tmp_path: Path) -> None:
    run = str(tmp_path / "run")
    script = "import time; time.sleep(30)"
    child = subprocess.Popen(["bash", "-c", f"exec -a python {sys.executable} -c '{script}' -m ds_simclr.cli train s --run-dir {run}"])
    try:
        # `-c` scripts are not ranks; only `python -m ds_simclr.cli train` is
        assert rank_pids(Path(run), child.pid) == []
    finally:
        child.kill()
        child.wait()


def test_rank_pids_leaves_out_what_a_rank_forks(tmp_path: Path) -> None:
    """A forked child keeps its rank's command line; it must not be taken for (or signalled as) a rank."""
    run = str(tmp_path / "run")
    entry = tmp_path / "ds_simclr" / "launch" / "rank_entry.py"
    entry.parent.mkdir(parents=True)
    entry.write_text("import os, time\nif os.fork() == 0:\n    time.sleep(30)\nelse:\n    time.sleep(30)\n")
    rank = subprocess.Popen([sys.executable, str(entry), "train", "s", "--run-dir", run], start_new_session=True)
    try:
        deadline = time.monotonic() + 10
        while len([p for p in Path("/proc").iterdir() if p.name.isdigit() and _cmdline(p).endswith(run)]) < 2:
            assert time.monotonic() < deadline, "the rank did not fork"
            time.sleep(0.05)
        assert rank_pids(Path(run)) == [rank.pid]
        assert rank_pids(Path(run), rank.pid) == [rank.pid]
    finally:
        os.killpg(rank.pid, signal.SIGKILL)
        rank.wait()


def _cmdline(proc: Path) -> str:
    try:
        return (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


# ------------------------------------------------------------------ the command


def test_dry_run_creates_nothing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "runs"
    for launcher in ("torchrun", "deepspeed", "mpirun"):
        assert main(["launch", str(QUICKSTART), "--dry-run", "--launcher", launcher, "--set", f"output_dir={out}"]) == 0
        text = capsys.readouterr().out
        assert "world size 2" in text and "micro 8 x accum 1" in text and "command      " in text
    assert not out.exists()


def test_missing_data_exits_2_also_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "runs"
    args = ["launch", str(QUICKSTART), "--set", f"output_dir={out}", "--set", "data.demo=false",
            "--set", f"data.store={tmp_path / 'nope'}"]
    for extra in (["--dry-run"], []):
        assert main(args + extra) == 2
        err = capsys.readouterr().err
        assert err.startswith(f"error: {QUICKSTART}: data.store") and err.count("\n") == 1
    assert not out.exists()


def test_unknown_launcher_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["launch", str(QUICKSTART), "--dry-run", "--launcher", "slurm", "--set", f"output_dir={tmp_path}"]) == 2
    assert "unknown launcher" in capsys.readouterr().err


def test_changed_spec_is_refused_before_writing(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from ds_simclr.launch import prepare_run_dir

    launcher, plan = make_plan(spec(tmp_path), env={})
    prepare_run_dir(launcher, plan, ["x"])
    ckpt = plan.run_dir / "checkpoints" / "step_2"
    ckpt.mkdir(parents=True)
    (plan.run_dir / "checkpoints" / "latest").write_text("step_2")
    saved = (plan.run_dir / "spec.yaml").read_text()
    assert main(["launch", str(QUICKSTART), "--set", f"output_dir={tmp_path / 'runs'}", "--set", "optimizer.lr=0.5"]) == 2
    assert "optimizer.lr" in capsys.readouterr().err
    assert (plan.run_dir / "spec.yaml").read_text() == saved
    written = yaml.safe_load(saved)
    assert written["distributed"]["procs_per_node"] == 2
