"""Run spec validation: good specs load, every bad one is one clear line with exit status 2."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml
from helpers import CONFIGS

from ds_simclr.cli import main
from ds_simclr.errors import SpecError
from ds_simclr.spec import RunSpec
from ds_simclr.specload import load_spec

MINIMAL = {
    "data": {"demo": True, "patch_size": 48},
    "views": {"output_size": 32, "crop_min": 24},
    "model": {"encoder": "resenc_tiny"},
    "train": {"global_batch": 8, "steps_per_epoch": 4},
}


def write(tmp_path: Path, text: str, name: str = "spec.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def with_change(dotted: str, value: object) -> str:
    raw = yaml.safe_load(yaml.safe_dump(MINIMAL))
    *parents, leaf = dotted.split(".")
    target = raw
    for part in parents:
        target = target.setdefault(part, {})
    target[leaf] = value
    return yaml.safe_dump(raw)


def test_shipped_specs_are_valid() -> None:
    for path in sorted(CONFIGS.glob("*.yaml")):
        spec = load_spec(path)
        assert spec.name == path.stem


def test_defaults_and_name_from_stem(tmp_path: Path) -> None:
    spec = load_spec(write(tmp_path, yaml.safe_dump(MINIMAL), "my_run.yaml"))
    assert spec.name == "my_run"
    assert spec.train.total_steps == 4
    assert spec.train.zero_stage == 1 and spec.train.precision == "bf16"
    assert spec.run_dir == tmp_path / "runs" / "my_run"


def test_paths_resolve_against_spec_folder_and_expand_vars(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("MY_STORE", "/data/store")
    text = with_change("data", {"store": "$MY_STORE/x", "patch_size": 48})
    spec = load_spec(write(tmp_path, text.replace("output_dir: runs", "") + "output_dir: out\n"))
    assert spec.data.store == Path("/data/store/x")
    assert spec.output_dir == tmp_path / "out"


def test_set_overrides_are_validated(tmp_path: Path) -> None:
    path = write(tmp_path, yaml.safe_dump(MINIMAL))
    spec = load_spec(path, ["train.max_steps=3", "loss.temperature=0.1"])
    assert spec.train.total_steps == 3 and spec.loss.temperature == 0.1
    with pytest.raises(SpecError, match=r"--set train.max_steps"):
        load_spec(path, ["train.max_steps=zero"])
    with pytest.raises(SpecError, match="unknown key 'max_step'.*did you mean 'max_steps'"):
        load_spec(path, ["train.max_step=3"])


def test_lr_scaling_from_global_batch(tmp_path: Path) -> None:
    path = write(tmp_path, yaml.safe_dump(MINIMAL))
    linear = load_spec(path, ["optimizer.lr_scaling=linear", "optimizer.base_batch=4", "optimizer.lr=0.1"])
    sqrt = load_spec(path, ["optimizer.lr_scaling=sqrt", "optimizer.base_batch=2", "optimizer.lr=0.1"])
    assert linear.peak_lr == pytest.approx(0.2) and sqrt.peak_lr == pytest.approx(0.2)


def test_error_names_the_yaml_line(tmp_path: Path) -> None:
    text = yaml.safe_dump(MINIMAL, sort_keys=False).replace("steps_per_epoch: 4", "steps_per_epoch: -4")
    path = write(tmp_path, text)
    line = next(i for i, row in enumerate(text.splitlines(), 1) if "steps_per_epoch" in row)
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.one_line().startswith(f"{path}:{line}: train.steps_per_epoch:")


BAD_SPECS: dict[str, str] = {
    "empty file": "",
    "only a comment": "# nothing here\n",
    "top-level list": "- data\n- train\n",
    "top-level scalar": "42\n",
    "malformed yaml": "train: {global_batch: 8\n",
    "bad indentation": "train:\n  global_batch: 8\n   steps_per_epoch: 4\n",
    "python tag": "train: !!python/object/apply:os.system ['echo hi']\n",
    "unknown top-level key": with_change("trian", {"global_batch": 8}),
    "misspelled train key": with_change("train.global_bacth", 8),
    "misspelled nested model key": with_change("model.encodr", "resenc_l"),
    "unknown views key": with_change("views.rotation", 10),
    "unknown data key": with_change("data.paths", "/x"),
    "unknown logging key": with_change("logging.wandb", "x"),
    "missing train": yaml.safe_dump({k: v for k, v in MINIMAL.items() if k != "train"}),
    "missing global_batch": with_change("train", {"steps_per_epoch": 4}),
    "wrong type global_batch": with_change("train.global_batch", "eight"),
    "wrong type section": with_change("optimizer", "adam"),
    "zero global_batch": with_change("train.global_batch", 0),
    "negative lr": with_change("optimizer.lr", -0.1),
    "zero temperature": with_change("loss.temperature", 0),
    "negative epochs": with_change("train.epochs", -1),
    "zero micro_batch": with_change("train.micro_batch", 0),
    "micro_batch word": with_change("train.micro_batch", "automatic"),
    "unknown encoder": with_change("model.encoder", "resnet50"),
    "unknown precision": with_change("train.precision", "fp16"),
    "zero stage 4": with_change("train.zero_stage", 4),
    "impossible batch arithmetic": with_change("train", {"global_batch": 10, "micro_batch": 4, "steps_per_epoch": 4}),
    "impossible accumulation": with_change("train", {"global_batch": 9, "grad_accum": 2, "steps_per_epoch": 4}),
    "both warmups": with_change("schedule", {"warmup_steps": 2, "warmup_epochs": 1}),
    "beta out of range": with_change("optimizer.betas", [0.9, 1.0]),
    "bad launcher": with_change("distributed.launcher", "srun"),
    "bad port": with_change("distributed.master_port", 70000),
    "bad run name": with_change("name", "../escape"),
    "demo and store": with_change("data", {"demo": True, "store": "/x"}),
    "no data source": with_change("data", {"patch_size": 48}),
    "crop larger than patch": with_change("views.crop_min", 64),
    "view not divisible by stride": with_change("views.output_size", 36),
    "wandb mode": with_change("logging.wandb_mode", "cloud"),
    "key given twice": "optimizer:\n  lr: 0.001\n  weight_decay: 0.0\n  lr: 0.1\n" + with_change("seed", 1),
    "section given twice": with_change("seed", 1) + "train:\n  global_batch: 16\n",
    "key given twice in a flow mapping": with_change("seed", 1) + "loss: {temperature: 0.1, temperature: 0.2}\n",
    "key given twice inside a list": with_change("seed", 1) + "extra: [{a: 1, a: 2}]\n",
    "yaml 1.1 boolean in a list of text": with_change("data.modalities", ["T1w", "MODALITY"]).replace("MODALITY", "NO"),
    "yaml 1.1 boolean as text": with_change("logging.wandb_project", "PROJECT").replace("PROJECT", "off"),
    "yaml 1.1 boolean in an integer field": with_change("train.epochs", 2).replace("epochs: 2", "epochs: yes"),
    "yaml 1.1 boolean in a number pair": with_change("optimizer.betas", [0.9, 0.999]).replace("- 0.9\n", "- on\n"),
    "date as text": with_change("name", "NAME").replace("NAME", "2024-01-01"),
    "number as text": with_change("logging.wandb_project", "PROJECT").replace("PROJECT", "1e3"),
    "null in a list of text": with_change("data.modalities", ["T1w", None]),
    "fractional exponent in an integer field": with_change("train.max_steps", 3).replace("max_steps: 3", "max_steps: 2.5e0"),
    "stacked input channels": with_change("model.in_channels", 4),
}


@pytest.mark.parametrize("case", sorted(BAD_SPECS))
def test_bad_spec_exits_2_with_one_line(case: str, tmp_path: Path, capsys) -> None:
    path = write(tmp_path, BAD_SPECS[case])
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}") and "Traceback" not in err


BAD_SETS: dict[str, list[str]] = {
    "boolean in a list of text": ["data.modalities=[T1w, NO]"],
    "boolean in an integer field": ["train.epochs=on"],
    "date as text": ["name=2024-01-01"],
    "fractional exponent in an integer field": ["train.max_steps=2.5e0"],
    "key given twice in one value": ["train={global_batch: 8, steps_per_epoch: 4, global_batch: 16}"],
    "same key set twice": ["train.max_steps=3", "train.max_steps=5"],
    "stacked input channels": ["model.in_channels=2"],
    "not key=value": ["train.max_steps"],
    "not a section": ["seed.value=3"],
}


@pytest.mark.parametrize("case", sorted(BAD_SETS))
def test_bad_set_exits_2_with_one_line(case: str, tmp_path: Path, capsys) -> None:
    path = write(tmp_path, yaml.safe_dump(MINIMAL))
    argv = ["validate", str(path)]
    for override in BAD_SETS[case]:
        argv += ["--set", override]
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(f"error: {path}") and "Traceback" not in err


def test_duplicate_key_names_the_key_and_both_lines(tmp_path: Path) -> None:
    text = yaml.safe_dump(MINIMAL, sort_keys=False) + "optimizer:\n  lr: 0.001\n  betas: [0.9, 0.99]\n  lr: 0.1\n"
    path = write(tmp_path, text)
    first = text.splitlines().index("  lr: 0.001") + 1
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.one_line() == f"{path}:{first + 2}: optimizer.lr: given twice, on lines {first} and {first + 2}; keep one"
    whole = write(tmp_path, text.replace("optimizer:", "train:\n  global_batch: 4\noptimizer:"), "section.yaml")
    with pytest.raises(SpecError, match=r"section.yaml:\d+: train: given twice, on lines \d+ and \d+"):
        load_spec(whole)


def test_merge_keys_are_not_duplicates(tmp_path: Path) -> None:
    text = with_change("seed", 1).replace("train:\n", "train:\n  <<: {global_batch: 4, epochs: 3}\n")
    spec = load_spec(write(tmp_path, text))
    assert spec.train.global_batch == 8 and spec.train.epochs == 3  # the explicit key wins, as YAML says
    twice = write(tmp_path, text.replace("epochs: 3}", "epochs: 3, epochs: 4}"), "twice.yaml")
    with pytest.raises(SpecError, match=r"train.epochs: given twice"):
        load_spec(twice)


@pytest.mark.parametrize(
    ("written", "reading"),
    [("NO", "the boolean false"), ("off", "the boolean false"), ("Yes", "the boolean true"), ("~", "null (no value)")],
)
def test_type_errors_say_what_yaml_read(written: str, reading: str, tmp_path: Path) -> None:
    path = write(tmp_path, with_change("data.modalities", ["T1w", "X"]).replace("- X", f"- {written}"))
    with pytest.raises(SpecError) as info:
        load_spec(path)
    assert info.value.one_line().endswith(
        f"data.modalities.1: Input should be a valid string (YAML read `{written}` as {reading};"
        f" write '{written}' in quotes if you meant the text)"
    )
    quoted = write(tmp_path, with_change("data.modalities", ["T1w", written]), "quoted.yaml")
    assert load_spec(quoted).data.modalities == ["T1w", written]


def test_booleans_are_not_numbers(tmp_path: Path) -> None:
    path = write(tmp_path, yaml.safe_dump(MINIMAL))
    with pytest.raises(SpecError, match=r"--set train.epochs: expected a number, not the boolean true \(YAML read `yes`"):
        load_spec(path, ["train.epochs=yes"])
    with pytest.raises(SpecError, match=r"optimizer.betas: expected a number, not the boolean false"):
        load_spec(path, ["optimizer.betas=[0.9, off]"])
    assert load_spec(path, ["data.demo=yes"]).data.demo is True  # a boolean field takes YAML's booleans
    assert load_spec(path, ["data.modalities=[y, n]"]).data.modalities == ["y", "n"]  # PyYAML keeps y/n as text


def test_exponent_numbers_are_numbers(tmp_path: Path) -> None:
    text = yaml.safe_dump(MINIMAL, sort_keys=False).replace("steps_per_epoch: 4", "steps_per_epoch: 4\n  max_steps: 1e3")
    spec = load_spec(write(tmp_path, text + "optimizer: {lr: 3e-4, eps: 1.0e-6}\n"))
    assert spec.train.max_steps == 1000 and isinstance(spec.train.max_steps, int)
    assert spec.optimizer.lr == 3e-4 and spec.optimizer.eps == 1e-6
    spec = load_spec(write(tmp_path, yaml.safe_dump(MINIMAL), "set.yaml"), ["train.global_batch=1.6E1", "loss.temperature=5e-1"])
    assert spec.train.global_batch == 16 and spec.loss.temperature == 0.5


def test_dumped_spec_reads_back_equal(tmp_path: Path) -> None:
    """Text that looks like a number or a boolean is quoted when a run directory keeps the spec."""
    from ds_simclr.specload import dump_spec

    path = write(tmp_path, with_change("name", "NAME").replace("NAME", "'1e3'") + "logging: {wandb_project: 'off'}\n")
    spec = load_spec(path, ["data.modalities=['NO', '2024-01-01']"])
    assert (spec.name, spec.logging.wandb_project, spec.data.modalities) == ("1e3", "off", ["NO", "2024-01-01"])
    again = load_spec(write(tmp_path, dump_spec(spec), "dumped.yaml"))
    assert again.model_dump() == spec.model_dump()


def test_missing_spec_file(tmp_path: Path, capsys) -> None:
    assert main(["validate", str(tmp_path / "nope.yaml")]) == 2
    assert "spec file not found" in capsys.readouterr().err


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    path = write(tmp_path, BAD_SPECS["zero global_batch"])
    with pytest.raises(SpecError):
        main(["--debug", "validate", str(path)])


def test_console_script_exit_status(tmp_path: Path) -> None:
    """The installed entry point, as a user runs it: exit 2, one line, no traceback."""
    path = write(tmp_path, BAD_SPECS["misspelled train key"])
    exe = Path(sys.executable).with_name("ds_simclr")
    result = subprocess.run([str(exe), "validate", str(path)], capture_output=True, text=True, env=os.environ)
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "global_bacth" in result.stderr


def test_every_field_has_a_docstring() -> None:
    def walk(model: type) -> list[str]:
        missing = []
        for name, field in model.model_fields.items():
            if not field.description:
                missing.append(f"{model.__name__}.{name}")
            annotation = field.annotation
            if isinstance(annotation, type) and issubclass(annotation, RunSpec.__mro__[1]):
                missing += walk(annotation)
        return missing

    assert walk(RunSpec) == []


def test_encoder_choices_match_the_architecture_table() -> None:
    from typing import get_args

    from ds_simclr.architectures import ENCODERS
    from ds_simclr.spec import EncoderName

    assert get_args(EncoderName) == tuple(ENCODERS)


def test_readme_spec_reference_is_current() -> None:
    from helpers import REPO

    from ds_simclr.specdoc import END, START, spec_reference

    text = (REPO / "README.md").read_text()
    section = text.split(START, 1)[1].split(END, 1)[0]
    assert section == "\n" + spec_reference(), "README is stale: python -m ds_simclr.specdoc --write README.md"
