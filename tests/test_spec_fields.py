"""The field walk: every RunSpec field either changes something observable or is refused by validate.

The registry and the effects live in field_effects.py; this module walks the schema, builds the
session's assets (two real stores, manifests, caches, a hostfile) and runs the checks.
"""

from __future__ import annotations

from pathlib import Path

import nibabel as nib
import pytest
import yaml
from data_helpers import NIBABEL_DATA, real_volume, write_manifest
from field_effects import BASE, CHECKS, GPU, REFUSED, TIMEOUT, Check, Context, Effect, Refused, RunEffect, observe, run_all
from multiproc import run_ranks

from ds_simclr.cli import main
from ds_simclr.spec import RunSpec
from ds_simclr.specbase import StrictModel


def leaf_fields(model: type[StrictModel], prefix: str = "") -> list[str]:
    """Dotted names of every field that is not itself a section, at any depth."""
    leaves = []
    for name, info in model.model_fields.items():
        annotation = info.annotation
        if isinstance(annotation, type) and issubclass(annotation, StrictModel):
            leaves += leaf_fields(annotation, f"{prefix}{name}.")
        else:
            leaves.append(f"{prefix}{name}")
    return leaves


def test_every_field_has_a_checked_effect_or_a_refusal() -> None:
    registered = [check.field for check in CHECKS] + list(REFUSED)
    leaves = leaf_fields(RunSpec)
    missing = sorted(set(leaves) - set(registered))
    assert not missing, f"fields with neither a check of their effect nor a refusal (add them to tests/field_effects.py): {missing}"
    assert sorted(set(registered) - set(leaves)) == [], "registry entries for fields RunSpec does not have"
    assert len(registered) == len(set(registered)), "a field registered twice"


def _dotted(spec: RunSpec, field: str) -> object:
    value: object = spec
    for part in field.split("."):
        value = getattr(value, part)
    return value


@pytest.fixture(scope="module")
def ctx(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest) -> Context:
    """Two real stores (T1 + EPI, T1 only) built from manifests in a cache, a second cache, a hostfile,
    an export of the base model's shape (other seed)."""
    import torch

    from ds_simclr.data.options import DataSpec
    from ds_simclr.data.source import prepare_store
    from ds_simclr.model import build_model

    root = tmp_path_factory.mktemp("walk")
    rows = []
    for name, modality in (("anatomical.nii", "T1w"), ("example4d.nii.gz", "T2star")):
        out = root / "raw" / f"{name.split('.')[0]}.nii.gz"
        out.parent.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(real_volume(name), nib.load(str(NIBABEL_DATA / name)).affine), str(out))
        rows.append((out.name, str(out), modality))
    for name in ("both", "t1"):
        (root / name).mkdir()
    assets = {
        "manifest_both": write_manifest(root / "both" / "pretrain_data.json", rows),
        "manifest_t1": write_manifest(root / "t1" / "pretrain_data.json", rows[:1]),
        "cache": root / "cache",
        "cache2": root / "cache2",
        "runs": root / "runs",
        "elsewhere": root / "elsewhere",
        "hostfile": root / "hostfile",
        "export": root / "export.pth",
    }
    assets["hostfile"].write_text("node-a slots=2\nnode-b slots=2\n")
    torch.manual_seed(99)
    model = build_model(**BASE["model"])
    torch.save({"network_weights": model.state_dict(), "nnssl_adaptation_plan": {}}, assets["export"])
    for name in ("both", "t1"):
        data = DataSpec(manifest=assets[f"manifest_{name}"], cache_dir=assets["cache"])
        assets[f"store_{name}"] = prepare_store(data, jobs=1, nodes=1, echo=lambda line: None)
    return Context(assets, demo_cache=lambda: request.getfixturevalue("demo_cache"))


STATIC = [check for check in CHECKS if isinstance(check.effect, Effect)]
RUNS = [check for check in CHECKS if isinstance(check.effect, RunEffect)]


def _variant(check: Check) -> dict:
    return {**check.base, **check.also, check.field: check.value}


@pytest.mark.parametrize("check", STATIC, ids=[f"{c.field} ({c.effect.name})" for c in STATIC])
def test_changing_the_field_changes_its_effect(check: Check, ctx: Context) -> None:
    base, variant = ctx.spec(check.base), ctx.spec(_variant(check))
    assert _dotted(variant, check.field) != _dotted(base, check.field)
    before, after = observe(check.effect, base, ctx), observe(check.effect, variant, ctx)
    assert not isinstance(before, Refused), f"the base spec is refused when used: {before}"
    assert isinstance(after, Refused) == check.refused_at_use, f"{check.field}={check.value!r}: {after}"
    assert before != after, f"{check.field}: {check.value!r} changes nothing in the {check.effect.name}"


@pytest.mark.parametrize("effect", sorted({c.effect for c in STATIC}, key=lambda e: e.name), ids=lambda e: e.name)
def test_effects_are_repeatable(effect: Effect, ctx: Context) -> None:
    """A difference must come from the field, not from an observable that changes by itself."""
    assert observe(effect, ctx.spec({}), ctx) == observe(effect, ctx.spec({}), ctx)


@pytest.fixture(scope="module")
def run_outcomes(ctx: Context) -> dict[str, dict]:
    """Group `a` (first: it starts the process group), the base, then the other groups, each with all
    of its fields changed: short runs one after the other on one rank, in one process."""
    groups: dict[str, dict] = {}
    for check in RUNS:
        assert not check.base and not check.also, "run checks share the base run: put settings in BASE"
        changes = groups.setdefault(check.group, {})
        assert check.field not in changes
        changes[check.field] = check.value
    assert {c.group for c in RUNS if c.effect is TIMEOUT} == {"a"}, "only group a starts the process group"
    order = {"a": groups["a"], "base": {}, **{key: groups[key] for key in sorted(groups) if key != "a"}}
    mappings = {key: ctx.mapping({**changes, "output_dir": str(ctx.assets["runs"] / key)}) for key, changes in order.items()}
    return run_ranks(run_all, 1, mappings)[0]


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(GPU, reason="the walk's runs are CPU runs (gloo; nccl is what a CPU rank refuses)")
@pytest.mark.parametrize("check", RUNS, ids=[f"{c.field} ({c.effect.name})" for c in RUNS])
def test_changing_the_field_changes_the_run(check: Check, run_outcomes: dict[str, dict]) -> None:
    base, variant = run_outcomes["base"], run_outcomes[check.group]
    assert base["refused"] is None and "rows" in base
    assert (variant["refused"] is not None) == check.refused_at_use, variant["refused"]
    before, after = check.effect.read(base), check.effect.read(variant)
    if check.effect.expect is not None:
        assert after == check.effect.expect(check.value), f"{check.field}: {check.value!r} does not show in the {check.effect.name}"
    else:
        assert before != after, f"{check.field}: {check.value!r} changes nothing in the {check.effect.name} ({before!r})"


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.skipif(GPU, reason="the walk's runs are CPU runs")
def test_runs_in_one_process_repeat(run_outcomes: dict[str, dict]) -> None:
    """Group b changes only what keeps checkpoints: its training is the base's, bit for bit, although
    it ran later in the same process; so a difference in a run observable comes from the field."""
    assert [c.field for c in RUNS if c.group == "b"] == ["checkpoint.keep_last"]
    assert repr(run_outcomes["b"]["rows"]) == repr(run_outcomes["base"]["rows"])  # repr: the last loss is NaN
    assert run_outcomes["b"]["tags"] != run_outcomes["base"]["tags"]


@pytest.mark.parametrize(("field", "value"), sorted(REFUSED.items()))
def test_refused_values_exit_2_with_what_is_supported(field: str, value: object, ctx: Context, tmp_path: Path, capsys) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump(ctx.mapping({field: value})))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and f": {field}: " in err and "supported" in err
