"""Evaluation: the embedded volume (store-like, never a demo volume), the online probe and health in the
metrics rows, a warm-started run, and `ds_simclr evaluate` with its table, eval.json, PNG and W&B log."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ds_simclr.cli import main
from ds_simclr.errors import DataError
from ds_simclr.evaluation.atlas import LEFT, REGIONS, RIGHT, STRUCTURES, build_eval_set, load_eval_set
from ds_simclr.telemetry import read_metrics

PNG = b"\x89PNG\r\n\x1a\n"


def test_the_volume_is_preprocessed_like_the_store(eval_cache: Path, tmp_path: Path) -> None:
    """The store's own per-image step applied to the template gives the evaluation image."""
    from ds_simclr.data.manifest import ManifestImage
    from ds_simclr.data.preprocess import Plan, process_image
    from ds_simclr.data.store import volume_file
    from ds_simclr.evaluation.atlas import TEMPLATE_FILE, _package_data

    ev = load_eval_set(eval_cache)
    item = ManifestImage("mni", "d", "s", "ses", _package_data() / TEMPLATE_FILE, "T1w", None, "f")
    record = process_image(item, Plan(), tmp_path)
    stored = np.load(tmp_path / volume_file(record["id"]))
    assert stored.shape == ev.image.shape
    np.testing.assert_allclose(stored.astype(np.float32), ev.image.astype(np.float32), atol=2e-2)
    assert record["pad_value"] == pytest.approx(ev.pad_value)


def test_labels_lie_in_their_hemisphere(eval_cache: Path) -> None:
    ev = load_eval_set(eval_cache)
    lr = [np.unravel_index(np.flatnonzero(ev.side == side), ev.side.shape)[ev.lr_axis].mean() for side in (LEFT, RIGHT)]
    assert abs(lr[0] - lr[1]) > 40  # the hemispheres' centres are ~60 mm apart along the left-right axis
    for k in range(1, len(REGIONS) + 1):
        assert min(len(ev.voxels("region", k, s)) for s in (LEFT, RIGHT)) > 10_000
    for k in range(1, len(STRUCTURES) + 1):
        assert min(len(ev.voxels("structure", k, s)) for s in (LEFT, RIGHT)) > 2_000
    assert ev.meta["not_in_demo_collection"][:3] == ["mni152_2009", "mni152_2009_gm", "mni152_2009_wm"]
    assert "FSL MNI152" in ev.describe() and "Harvard-Oxford" in ev.describe()


def test_a_demo_volume_is_refused_as_evaluation_volume(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import nibabel as nib

    from ds_simclr.data import demo
    from ds_simclr.evaluation.atlas import TEMPLATE_FILE, _package_data

    template = np.asarray(nib.load(str(_package_data() / TEMPLATE_FILE)).dataobj, dtype=np.float32)
    monkeypatch.setattr(demo, "demo_arrays", lambda: iter([("robex_atlas", np.zeros((4, 4, 4))), ("sneaky", template)]))
    with pytest.raises(DataError, match="is the demo \\(pretraining\\) volume sneaky"):
        build_eval_set(tmp_path / "eval")
    assert not (tmp_path / "eval").exists()


@pytest.mark.slow
@pytest.mark.distributed
def test_metrics_rows_carry_health_and_the_online_probe(short_run: dict) -> None:
    rows = read_metrics(short_run["run"] / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for row in rows:
        assert 1.0 <= row["rankme"] <= 7.0 + 1e-6  # 8 embeddings (4 pairs), centred
        assert {"alignment", "uniformity"} <= row.keys()
    probed = [r["step"] for r in rows if "probe_logreg_mirrored" in r]
    assert probed == [2, 4]
    for row in rows[1::2]:
        assert 0.0 <= row["probe_logreg_mirrored"] <= 1.0 and 0.0 <= row["probe_knn_mirrored"] <= 1.0
        assert row["time_eval_s"] > 0


@pytest.mark.slow
@pytest.mark.distributed
def test_the_run_started_from_its_init_from(short_run: dict) -> None:
    for key, value in short_run["source"].items():  # DeepSpeed bf16 holds the export's weights rounded
        assert torch.equal(short_run["initial"][key], value.bfloat16().float()), key


@pytest.fixture(scope="module")
def evaluated(short_run: dict) -> dict:
    run = short_run["run"]
    cmd = [sys.executable, "-m", "ds_simclr.cli", "evaluate", str(run), "--patches-per-class", "2", "--resamples", "2"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"stdout": done.stdout, "report": json.loads((run / "eval" / "step_4" / "eval.json").read_text()), **short_run}


@pytest.mark.slow
@pytest.mark.distributed
def test_evaluate_writes_a_paired_table_json_and_png(evaluated: dict) -> None:
    report, out = evaluated["report"], evaluated["stdout"]
    probe = report["region_probe"]
    assert set(probe["scores"]) == {"pretrained", "own_init", "random", "raw"}
    for row, tests in probe["scores"].items():
        per_row = 3 * 2 if row == "random" else 2  # 3 seeds x 2 resamplings
        assert all(len(s["values"]) == per_row and all(0 <= v <= 1 for v in s["values"]) for s in tests.values()), row
    for test, gain in probe["paired_gain"].items():
        pairs = zip(probe["scores"]["pretrained"][test]["values"], probe["scores"]["own_init"][test]["values"])
        assert gain["values"] == pytest.approx([a - b for a, b in pairs])
    seg = report["segmentation_probe"]["mean_dice"]
    assert set(seg) == {"pretrained", "own_init", "random", "raw"} and all(0 <= s["mean"] <= 1 for s in seg.values())
    assert report["own_init"].startswith("encoder and projection head from") and report["seeds"] == [3, 4, 5]
    assert report["learning_shown"] == (probe["paired_gain"]["logreg_mirrored"]["mean"]
                                        > 2 * probe["paired_gain"]["logreg_mirrored"]["std"])
    for words in ("FSL MNI152", "Harvard-Oxford", "paired gain vs own init", "raw intensities", "intensity alone",
                  "random init (seeds 3, 4, 5)", "logreg mirrored", "knn mirrored", "learning "):
        assert words in out, words
    assert (evaluated["run"] / "eval" / "step_4" / "eval.png").read_bytes()[:8] == PNG


@pytest.mark.slow
@pytest.mark.distributed
def test_evaluate_continues_the_runs_wandb_run(evaluated: dict) -> None:
    run = evaluated["run"]
    run_id = (run / "wandb" / "run_id").read_text().strip()
    folders = sorted((run / "wandb").glob("offline-run-*"))
    assert len(folders) == 2 and all(f.name.endswith(run_id) for f in folders)
    wandb = Path(sys.executable).with_name("wandb")
    records = subprocess.run([str(wandb), "leet", "inspect", "--json", str(folders[-1])], capture_output=True,
                             text=True, timeout=120).stdout
    # Run-level values (the summary): the run's history already runs past the evaluated step.
    summary = [json.loads(line)["summary"]["update"] for line in records.splitlines() if '"type":"summary"' in line]
    (values,) = [u for u in summary if "evaluate/step" in u]
    assert values["evaluate/step"] == 4
    assert values["evaluate/region_logreg_mirrored/pretrained"] == evaluated["report"]["region_probe"]["scores"][
        "pretrained"]["logreg_mirrored"]["mean"]


def test_evaluate_a_folder_without_checkpoint_exits_2(tmp_path: Path, capsys) -> None:
    (tmp_path / "spec.yaml").write_text("{}")
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "no checkpoint" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize(("size", "words"), [(20, "does not fit encoder 'resenc_tiny'"), (4, "does not fit"),
                                             (600, "larger than the evaluation volume")])
def test_evaluate_refuses_a_patch_size_in_one_line(short_run: dict, size: int, words: str, capsys) -> None:
    assert main(["evaluate", str(short_run["run"]), "--patch-size", str(size)]) == 2
    err = capsys.readouterr().err.strip()
    assert f"--patch-size {size}: " in err and words in err and "\n" not in err


def test_an_online_probe_larger_than_the_volume_names_the_field(eval_cache: Path, tmp_path: Path) -> None:
    from helpers import tiny_spec_mapping

    from ds_simclr.evaluation.online import OnlineProbe
    from ds_simclr.specload import spec_from_mapping

    mapping = tiny_spec_mapping(eval_cache, tmp_path)
    mapping["eval"] = {"every_steps": 1, "patch_size": 256}
    with pytest.raises(DataError) as info:
        OnlineProbe(spec_from_mapping(mapping), torch.device("cpu"))
    assert "eval.patch_size: 256^3 patches are larger than the evaluation volume" in info.value.one_line()
