"""The README's first command, end to end (shortened with --set): real MRI demo data, 2 CPU ranks.

The loss falls, metrics.jsonl has every field on every row, the realised LR equals the plan's curve,
an offline W&B run exists and is continued (same id) by a resumed job, the plots are valid PNGs.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import CONFIGS, REPO

from ds_simclr.cli import main
from ds_simclr.schedule import planned_lrs
from ds_simclr.specload import load_spec

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

QUICKSTART = CONFIGS / "quickstart.yaml"
FIELDS = {
    "step", "epoch", "loss", "lr", "skipped", "skipped_steps", "grad_norm", "positive_top1", "alignment",
    "uniformity", "rankme", "pairs_per_s", "views_per_s", "time_data_s", "time_fwd_bwd_s", "time_optimizer_s",
    "time_step_s",
}
PNG = b"\x89PNG\r\n\x1a\n"
PROBE_EVERY = 8
"""The online probe's cadence in the 16-step test run (the quickstart's own, 10 % of 200 steps, is 20)."""


def launch(out: Path, cache: Path, *overrides: str) -> subprocess.CompletedProcess:
    sets = [f"output_dir={out}", f"data.cache_dir={cache}", *overrides]
    cmd = [sys.executable, "-m", "ds_simclr.cli", "launch", str(QUICKSTART), *[a for s in sets for a in ("--set", s)]]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, cwd=REPO)


def rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def offline_runs(run: Path) -> list[Path]:
    return sorted((run / "wandb").glob("offline-run-*"))


def test_quickstart_end_to_end(tmp_path: Path, demo_cache: Path) -> None:
    steps = 16
    first = launch(tmp_path, demo_cache, f"train.max_steps={steps}", f"eval.every_steps={PROBE_EVERY}")
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "quickstart"
    assert f"finished at step {steps}/{steps}" in first.stdout

    metrics = rows(run)
    assert [r["step"] for r in metrics] == list(range(1, steps + 1))
    for row in metrics:
        assert FIELDS <= row.keys(), FIELDS - row.keys()
    losses = [r["loss"] for r in metrics]
    assert min(losses[-4:]) < losses[0] - 0.1, losses  # it learns

    spec = load_spec(run / "spec.yaml")
    assert [r["lr"] for r in metrics] == pytest.approx(planned_lrs(spec), rel=1e-9, abs=1e-12)

    # The quickstart probes every 10 % of its run; one probe costs < 5 % of the steps between two.
    every = load_spec(QUICKSTART).eval.every_steps
    assert every == spec.train.epochs * spec.train.steps_per_epoch // 10
    probed = [r for r in metrics if "probe_logreg_mirrored" in r]
    assert [r["step"] for r in probed] == [PROBE_EVERY, 2 * PROBE_EVERY]
    step_time = statistics.median(r["time_step_s"] for r in metrics)
    assert all(r["time_eval_s"] < 0.05 * every * step_time for r in probed), (probed, step_time)

    (wandb_run,) = offline_runs(run)
    assert list(wandb_run.glob("run-*.wandb")), "no offline W&B run file"
    run_id = (run / "wandb" / "run_id").read_text().strip()
    assert wandb_run.name.endswith(run_id)

    for name in ("loss.png", "lr.png", "views.png"):
        assert (run / "plots" / name).read_bytes()[:8] == PNG

    # A resumed job (longer run: a change resuming allows) continues the same W&B run and metrics.
    second = launch(tmp_path, demo_cache, f"train.max_steps={steps + 2}", f"eval.every_steps={PROBE_EVERY}")
    assert second.returncode == 0, second.stderr[-3000:]
    assert [r["step"] for r in rows(run)] == list(range(1, steps + 3))
    assert {p.name.rsplit("-", 1)[1] for p in offline_runs(run)} == {run_id}


def test_plot_command_rewrites_the_pictures(tmp_path: Path, demo_cache: Path, capsys) -> None:
    result = launch(tmp_path, demo_cache, "train.max_steps=2", "logging.wandb_mode=disabled")
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "quickstart"
    for png in (run / "plots").glob("*.png"):
        png.unlink()
    assert main(["plot", str(run)]) == 0
    assert {p.name for p in (run / "plots").glob("*.png")} == {"loss.png", "lr.png", "views.png"}
    assert not (run / "wandb").exists()


def test_plot_of_a_folder_that_is_no_run(tmp_path: Path, capsys) -> None:
    assert main(["plot", str(tmp_path)]) == 2
    assert "not a run directory" in capsys.readouterr().err
