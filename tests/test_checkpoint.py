"""Checkpoints that count only when complete, without an engine: markers, verification, the choice
of where to resume (with its one warning, or a refusal naming the folders), pruning, universal
conversions removed with their checkpoint; atomic writes; metrics kept across resumes with torn
lines dropped; the run-directory lock; the ranks' error reports; storage errors as one line."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ds_simclr.atomic import atomic_path, write_atomic
from ds_simclr.checkpoint import (
    MARKER,
    Incomplete,
    ResumePoint,
    check_store,
    commit,
    find_resume_point,
    needs_universal,
    prune,
    staging_folder,
    store_identity,
    verify,
    write_latest,
    write_marker,
)
from ds_simclr.data.store import write_index
from ds_simclr.errors import (
    EXIT_CANTCREAT,
    EXIT_IOERR,
    CheckpointError,
    FollowOnError,
    RunDirBusy,
    UserError,
    storage_error,
)
from ds_simclr.rank_report import another_rank_failed, clear_reports, read_reports, report_rank_error, reserve_report
from ds_simclr.runlock import RunLock, held_by
from ds_simclr.telemetry import MetricsLog


def fake_checkpoint(checkpoints: Path, step: int, world_size: int = 2, store: str | None = "abc") -> Path:
    """A checkpoint as the engine writes one: files in staging, marker, moved into place, latest."""
    staged = staging_folder(checkpoints) / f"step_{step}"
    staged.mkdir(parents=True)
    for rank in range(world_size):
        torch.save({"rank": rank, "x": torch.arange(1000.0) * step}, staged / f"optim_{rank}.pt")
    torch.save({"module": {"w": torch.ones(10) * step}}, staged / "model.pt")
    write_marker(staged, step, world_size, True, store)
    commit(staged, checkpoints)
    write_latest(checkpoints, f"step_{step}")
    return checkpoints / f"step_{step}"


@pytest.fixture
def checkpoints(tmp_path: Path) -> Path:
    folder = tmp_path / "checkpoints"
    for step in (3, 6, 9):
        fake_checkpoint(folder, step)
    return folder


# ------------------------------------------------------------------ atomic writes


def test_write_atomic_replaces_whole_files_and_leaves_nothing_on_failure(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "a.json"
    write_atomic(target, "old")
    write_atomic(target, ["n", "ew"])
    assert target.read_text() == "new"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert target.read_text() == "new" and sorted(p.name for p in target.parent.iterdir()) == ["a.json"]
    with atomic_path(tmp_path / "v.npy") as tmp:  # writers that insist on a suffix keep it
        assert tmp.suffix == ".npy"
        tmp.write_bytes(b"x")
    assert (tmp_path / "v.npy").read_bytes() == b"x"


# ------------------------------------------------------------------ markers and verification


def test_marker_vouches_for_every_file(checkpoints: Path) -> None:
    marker = verify(checkpoints / "step_9", deep=True)
    assert marker.step == 9 and marker.world_size == 2 and marker.store == "abc"
    assert set(marker.files) == {"optim_0.pt", "optim_1.pt", "model.pt"}
    assert all(is_zip for _, is_zip in marker.files.values())
    assert not staging_folder(checkpoints).exists() or not any(staging_folder(checkpoints).iterdir())


@pytest.mark.parametrize(
    ("damage", "reason"),
    [
        (lambda f: (f / MARKER).unlink(), "no completion marker"),
        (lambda f: (f / "optim_1.pt").unlink(), "optim_1.pt is missing"),
        (lambda f: os.truncate(f / "model.pt", 100), "model.pt has 100 bytes"),
        (lambda f: (f / MARKER).write_text("{half"), "unreadable completion marker"),
    ],
)
def test_damaged_checkpoints_do_not_verify(checkpoints: Path, damage, reason: str) -> None:
    damage(checkpoints / "step_9")
    with pytest.raises(Incomplete, match=reason):
        verify(checkpoints / "step_9", deep=False)


def test_garbage_of_the_same_size_is_caught_by_the_zip_crcs(checkpoints: Path) -> None:
    path = checkpoints / "step_9" / "optim_0.pt"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + 64] = bytes(64)  # inside the tensor data: the sizes still match
    path.write_bytes(bytes(data))
    verify(checkpoints / "step_9", deep=False)
    with pytest.raises(Incomplete, match="optim_0.pt is damaged"):
        verify(checkpoints / "step_9", deep=True)


def test_a_format_this_version_cannot_read_is_refused(checkpoints: Path) -> None:
    marker = checkpoints / "step_9" / MARKER
    marker.write_text(json.dumps({**json.loads(marker.read_text()), "format": "ds_simclr-checkpoint/99"}))
    with pytest.raises(CheckpointError, match="ds_simclr-checkpoint/99.*cannot read"):
        find_resume_point(checkpoints)


# ------------------------------------------------------------------ where to resume


def test_latest_and_newest_complete_agree_without_a_warning(checkpoints: Path) -> None:
    point = find_resume_point(checkpoints)
    assert point is not None and point.tag == "step_9" and point.warning is None


@pytest.mark.parametrize(
    ("damage", "warning"),
    [
        (lambda c: subprocess.run(["rm", "-r", str(c / "step_9")], check=True), "latest names step_9 (missing)"),
        (lambda c: (c / "latest").write_bytes(b"\x00\xffgarbage"), "not a checkpoint tag"),
        (lambda c: os.truncate(c / "step_9" / "optim_1.pt", 10), "step_9 is incomplete (optim_1.pt has 10 bytes"),
        (lambda c: (c / "latest").unlink(), None),
    ],
)
def test_fallback_to_the_newest_complete_checkpoint_with_one_warning(checkpoints: Path, damage, warning: str | None) -> None:
    damage(checkpoints)
    point = find_resume_point(checkpoints)
    assert point is not None
    if warning is None:  # no latest at all (killed before writing it): the newest complete one
        assert point.tag == "step_9" and "latest is missing: resuming from step_9" in point.warning
        return
    expected = "step_6" if "step_9" in warning else "step_9"
    assert point.tag == expected and warning in point.warning and f"resuming from {expected}" in point.warning
    assert "\n" not in point.warning


def test_latest_naming_an_older_checkpoint_resumes_the_newer_complete_one(checkpoints: Path) -> None:
    write_latest(checkpoints, "step_6")  # killed between moving step_9 into place and updating latest
    point = find_resume_point(checkpoints)
    assert point.tag == "step_9" and "step_9 is complete and newer" in point.warning


def test_no_complete_checkpoint_is_refused_naming_the_folders(checkpoints: Path) -> None:
    for step in (3, 6, 9):
        (checkpoints / f"step_{step}" / MARKER).unlink()
    with pytest.raises(CheckpointError) as info:
        find_resume_point(checkpoints)
    line = info.value.one_line()
    assert "no complete checkpoint" in line and all(f"step_{s} is incomplete" in line for s in (3, 6, 9))
    assert "\n" not in line and "move checkpoints/ aside" in line


def test_latest_alone_without_folders_is_refused(tmp_path: Path) -> None:
    write_latest(tmp_path, "step_100")
    with pytest.raises(CheckpointError, match="latest names step_100 .missing."):
        find_resume_point(tmp_path)


def test_a_fresh_run_and_staging_debris_start_at_step_0(tmp_path: Path) -> None:
    assert find_resume_point(tmp_path / "none") is None
    debris = staging_folder(tmp_path) / "step_5"  # the first checkpoint's writer was killed
    debris.mkdir(parents=True)
    (debris / "half.pt").write_bytes(b"PK")
    assert find_resume_point(tmp_path) is None


def test_another_store_is_refused(checkpoints: Path) -> None:
    point = find_resume_point(checkpoints)
    check_store(point, "abc", Path("/store"))
    with pytest.raises(CheckpointError, match="trained on a store with identity abc"):
        check_store(point, "def", Path("/other"))


def test_store_identity_follows_the_images_not_the_index_file(tmp_path: Path) -> None:
    """A rebuild of the same images (a new index file) keeps the identity; another image set, order,
    padding value or modality changes it."""
    ids, shapes, pads, modalities = ["a", "b", "c"], [(4, 5, 6), (5, 5, 5), (6, 5, 4)], [-1.0, -2.0, -3.0], ["T1w", "T2w", "T1w"]
    write_index(tmp_path, ids, shapes, pads, modalities)
    first = store_identity(tmp_path)
    write_index(tmp_path, ids, shapes, pads, modalities)
    assert store_identity(tmp_path) == first
    for changed in (
        (ids[:2], shapes[:2], pads[:2], modalities[:2]),
        (["a", "c", "b"], shapes, pads, modalities),
        (ids, shapes, [-1.0, -2.0, -3.5], modalities),
        (ids, shapes, pads, ["T1w", "T1w", "T1w"]),
    ):
        write_index(tmp_path, *changed)
        assert store_identity(tmp_path) != first


def test_universal_conversion_is_needed_only_for_sharded_state_on_another_world_size(checkpoints: Path) -> None:
    marker = find_resume_point(checkpoints).marker
    assert needs_universal(marker, 1) and needs_universal(marker, 4) and not needs_universal(marker, 2)
    unsharded = ResumePoint("step_9", marker.__class__(**{**marker.__dict__, "partitioned_optimizer": False}), None)
    assert not needs_universal(unsharded.marker, 1)


# ------------------------------------------------------------------ pruning


def test_pruning_keeps_the_newest_by_step_and_removes_conversions(checkpoints: Path) -> None:
    fake_checkpoint(checkpoints, 12)
    (checkpoints / "step_6_universal").mkdir()
    (checkpoints / "step_12_universal").mkdir()
    assert prune(checkpoints, keep_last=2, just_written="step_12") == ["step_3", "step_6"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_12", "step_12_universal", "step_9"]


def test_pruning_never_deletes_the_checkpoint_just_written(checkpoints: Path) -> None:
    """Resumed from step_3 because step_6 and step_9 were damaged: stale higher-numbered folders go,
    the new step_4 stays (sorting by name or keeping the "newest" would delete it)."""
    for step in (6, 9):
        (checkpoints / f"step_{step}" / MARKER).unlink()
    fake_checkpoint(checkpoints, 4)
    removed = prune(checkpoints, keep_last=2, just_written="step_4")
    assert sorted(removed) == ["step_6", "step_9"]
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_3", "step_4"]
    assert find_resume_point(checkpoints).tag == "step_4"


def test_keep_last_1_keeps_only_the_new_one(checkpoints: Path) -> None:
    prune(checkpoints, keep_last=1, just_written="step_9")
    assert sorted(p.name for p in checkpoints.iterdir()) == ["latest", "step_9"]


def test_commit_replaces_a_damaged_folder_of_the_same_step(checkpoints: Path) -> None:
    os.truncate(checkpoints / "step_9" / "model.pt", 5)
    (checkpoints / "step_9" / "stale.pt").write_bytes(b"old")
    fake_checkpoint_again = staging_folder(checkpoints) / "step_9"
    fake_checkpoint_again.mkdir(parents=True)
    torch.save({"w": 1}, fake_checkpoint_again / "model.pt")
    write_marker(fake_checkpoint_again, 9, 1, False, None)
    commit(fake_checkpoint_again, checkpoints)
    assert sorted(p.name for p in (checkpoints / "step_9").iterdir()) == [MARKER, "model.pt"]
    assert verify(checkpoints / "step_9", deep=True).world_size == 1


# ------------------------------------------------------------------ metrics across resumes


def _rows(steps) -> str:
    return "".join(json.dumps({"step": s, "loss": 1.0 / s, "lr": 0.1}) + "\n" for s in steps)


def test_metrics_keep_rows_up_to_the_resumed_step_exactly(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(_rows(range(1, 9)))
    original = path.read_text().splitlines(keepends=True)
    log = MetricsLog(path, resume_step=6)
    log.write({"step": 7, "loss": 0.5, "lr": 0.1})
    log.close()
    lines = path.read_text().splitlines(keepends=True)
    assert lines[:6] == original[:6] and [json.loads(x)["step"] for x in lines] == list(range(1, 8))


def test_a_torn_last_line_is_dropped_with_a_warning(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(_rows(range(1, 5)) + '{"step": 5, "lo')
    MetricsLog(path, resume_step=4).close()
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4]
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "warning:" in err and "dropped line 5" in err


def test_a_fresh_start_keeps_no_rows(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    path.write_text(_rows(range(1, 4)))
    MetricsLog(path, resume_step=0).close()
    assert path.read_text() == ""


# ------------------------------------------------------------------ the run-directory lock


def test_a_live_holder_is_refused_and_a_dead_one_taken_over(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    path = tmp_path / "run" / "lock"
    child = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from pathlib import Path; from ds_simclr.runlock import RunLock;"
        f"lock = RunLock.acquire(Path({str(path)!r})); print(lock.token, flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True)
    try:
        token = child.stdout.readline().strip()
        assert held_by(path, token) and not held_by(path, "other")
        with pytest.raises(RunDirBusy, match=f"pid {child.pid} on {socket.gethostname()}"):
            RunLock.acquire(path)
    finally:
        child.kill()
        child.wait()
    lock = RunLock.acquire(path)  # its holder is gone
    assert "taking over the run directory's lock from pid" in capsys.readouterr().err
    assert held_by(path, lock.token)
    lock.release()
    assert not path.exists()


def test_a_holder_on_another_host_is_alive_while_its_heartbeat_is(tmp_path: Path) -> None:
    path = tmp_path / "lock"
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "start_time": 5, "token": "t"}))
    with pytest.raises(RunDirBusy, match="pid 1 on elsewhere"):
        RunLock.acquire(path)
    old = time.time() - 600
    os.utime(path, (old, old))
    RunLock.acquire(path).release()


# ------------------------------------------------------------------ rank reports and storage errors


def test_rank_reports_reach_launch_and_the_real_error_comes_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    errors = tmp_path / "errors"
    assert not report_rank_error(errors, UserError("x"))  # not under launch: the rank prints it
    monkeypatch.setenv("DS_SIMCLR_LAUNCH", "host:1:2")
    monkeypatch.setenv("RANK", "0")
    assert report_rank_error(errors, FollowOnError("rank 1 failed"))
    monkeypatch.setenv("RANK", "1")
    reserve_report(errors)
    assert read_reports(errors)[0].rank == 0  # a reserved file is no report
    assert report_rank_error(errors, UserError("no image matches", where="spec.yaml: data.modalities"))
    first, second = read_reports(errors)
    assert (first.rank, first.line, first.exit_code) == (1, "spec.yaml: data.modalities: no image matches", 2)
    assert second.follow_on and another_rank_failed(errors)
    clear_reports(errors)
    assert read_reports(errors) == []


def test_storage_errors_are_one_line_with_their_status() -> None:
    full = storage_error(OSError(errno.ENOSPC, "No space left on device", "/x/f"), "writing checkpoint step_4")
    assert full.exit_code == EXIT_IOERR and full.one_line().startswith("/x/f: no space left on device while writing")
    ro = storage_error(OSError(errno.EROFS, "Read-only file system"), "writing the run directory", "/runs/a")
    assert ro.exit_code == EXIT_CANTCREAT and "read-only file system" in ro.one_line()
    assert storage_error(OSError(errno.ENOENT, "No such file"), "x") is None
    assert storage_error(RuntimeError("boom"), "x") is None
