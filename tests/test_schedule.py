"""The LR schedule at its boundaries: DeepSpeed's own WarmupCosineLR, the plan's milestones, the warning."""

from __future__ import annotations

import itertools

import pytest
from helpers import CONFIGS

from ds_simclr.cli import main
from ds_simclr.dsconfig import optimizer_params, scheduler_params
from ds_simclr.planning import lr_milestones, plan_report
from ds_simclr.schedule import highest_step, lr_ratio, planned_lrs, schedule_warning, warmup_span
from ds_simclr.specload import load_spec

QUICKSTART = CONFIGS / "quickstart.yaml"
SSL3D = CONFIGS / "ssl3d_resencl_3x4.yaml"


def _spec(total: int, warmup: int, start: float = 0.0, floor: float = 0.05):
    return load_spec(
        QUICKSTART,
        [
            f"train.max_steps={total}",
            f"schedule.warmup_steps={warmup}",
            f"schedule.warmup_start_ratio={start}",
            f"schedule.min_lr_ratio={floor}",
        ],
    )


GRID = list(itertools.product([1, 2, 3, 11], [0, 1, 2, 5], [0.0, 0.3], [0.1]))


def test_torch_free_formula_is_deepspeeds_scheduler() -> None:
    """`lr_ratio` (what `validate` uses without torch) equals DeepSpeed's class at every step."""
    import torch
    from deepspeed.runtime.lr_schedules import WarmupCosineLR

    for total, warmup, start, floor in GRID:
        spec = _spec(total, warmup, start, floor)
        lrs = planned_lrs(spec)
        assert [lr_ratio(spec, k) * spec.peak_lr for k in range(1, total + 1)] == pytest.approx(lrs, rel=1e-12, abs=1e-15)
        assert highest_step(spec) == lrs.index(max(lrs)) + 1
        optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=optimizer_params(spec)["lr"])
        assert warmup_span(spec) == WarmupCosineLR(optimizer, **scheduler_params(spec)).warmup_num_steps


def _lr_line(spec) -> str:
    return next(line for line in plan_report(spec, 1).text.splitlines() if line.startswith("  lr "))


def test_milestones_are_labelled_by_what_they_are() -> None:
    # warm-up 5 of 3 steps: every step is a warm-up step; the last one is the highest, far from the peak
    spec = _spec(3, 5)
    assert _lr_line(spec).endswith("warm-up 5 steps (the run ends inside it: no cosine step); highest = last step (step 3) 0.0004")
    # warm-up 2 of 3 steps: the only cosine step is the last and runs at the floor
    spec = _spec(3, 2)
    lrs = planned_lrs(spec)
    assert lrs[2] == pytest.approx(0.05 * spec.peak_lr)
    assert _lr_line(spec).endswith("highest (step 2) 0.0005; first cosine step = last step (step 3) 5e-05")
    # the quickstart: warm-up 10 steps, the first cosine step is the highest, one cosine step below the peak
    spec = load_spec(QUICKSTART)
    lrs = planned_lrs(spec)
    assert lr_milestones(lrs, spec.peak_lr, warmup_span(spec)) == [("highest = first cosine step", 11), ("last step", 200)]
    assert max(lrs) < spec.peak_lr and lrs[10] == pytest.approx(spec.peak_lr, rel=1e-3)
    # no warm-up: DeepSpeed's two flat warm-up steps run exactly at the peak
    spec = load_spec(SSL3D, ["train.max_steps=50"])
    assert lr_milestones(planned_lrs(spec), spec.peak_lr, warmup_span(spec)) == [
        ("peak", 1),
        ("first cosine step", 3),
        ("last step", 50),
    ]


@pytest.mark.parametrize(
    ("total", "warmup", "warned"),
    [(3, 5, True), (3, 3, True), (3, 2, True), (5, 2, True), (20, 4, False), (100, 10, False), (1, 0, False)],
)
def test_warning_when_the_peak_is_never_near(total: int, warmup: int, warned: bool) -> None:
    spec = _spec(total, warmup)
    lrs = planned_lrs(spec)
    assert (max(lrs) < 0.9 * spec.peak_lr) == warned  # the rule, on DeepSpeed's own curve
    assert (schedule_warning(spec) is not None) == warned


@pytest.mark.parametrize("command", [["validate"], ["plan"], ["launch", "--dry-run"]])
def test_one_warning_line_from_validate_plan_and_launch(command: list[str], capsys) -> None:
    argv = [command[0], str(QUICKSTART), *command[1:]]
    assert main(argv) == 0
    assert "warning" not in capsys.readouterr().err
    assert main([*argv, "--set", "train.max_steps=3"]) == 0  # a warning, not a refusal
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [
        f"warning: {QUICKSTART}: schedule.warmup_steps: the LR never comes near its peak 0.001: the run (3 steps)"
        " ends inside the warm-up (10 steps), so the highest is 0.0002 (20% of the peak) at step 3 (shorten the"
        " warm-up or lengthen the run)"
    ]
