"""Usage errors at every level of the command tree: the usage line, one error line, exit 2, no traceback.

The tree is walked from the app itself, so commands and groups added later are covered without
listing them here.
"""

from __future__ import annotations

import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
import typer.main

from ds_simclr.cli import app, main


def _walk(command, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], object]]:
    nodes = [(path, command)]
    for name, sub in sorted(getattr(command, "commands", {}).items()):
        nodes += _walk(sub, (*path, name))
    return nodes


NODES = _walk(typer.main.get_command(app))
GROUPS = [(path, node) for path, node in NODES if hasattr(node, "commands")]
COMMANDS = [(path, node) for path, node in NODES if not hasattr(node, "commands")]


def _ids(nodes: list) -> list[str]:
    return [" ".join(path) or "ds_simclr" for path, _ in nodes]


def _usage_error(path: tuple[str, ...], args: list[str], capsys) -> str:
    """Run `ds_simclr PATH ARGS`; check status 2, PATH's usage line and one error line; return the latter."""
    assert main([*path, *args]) == 2
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert "Traceback" not in captured.err and not captured.out
    assert len(lines) == 2, captured.err
    assert lines[0].startswith(" ".join(["Usage: ds_simclr", *path, "[OPTIONS]"]))
    assert lines[1].startswith("error: ")
    return lines[1]


def _required_arguments(command) -> list[str]:
    return ["x" for param in command.params if param.param_type_name == "argument" and param.required]


def test_the_walk_sees_every_level() -> None:
    assert {("data",), ("bench",)} <= {path for path, _ in GROUPS}
    assert {("validate",), ("launch",), ("data", "preprocess"), ("bench", "views")} <= {path for path, _ in COMMANDS}


@pytest.mark.parametrize(("path", "group"), GROUPS, ids=_ids(GROUPS))
def test_group_unknown_command_suggests_the_near_one(path: tuple[str, ...], group, capsys) -> None:
    error = _usage_error(path, ["no-such-command"], capsys)
    assert "No such command 'no-such-command'" in error
    name = sorted(group.commands)[0]
    typo = name[:-1] + ("x" if name[-1] != "x" else "y")
    assert f"Did you mean '{name}'" in _usage_error(path, [typo], capsys)


@pytest.mark.parametrize(("path", "group"), GROUPS, ids=_ids(GROUPS))
def test_group_unknown_option(path: tuple[str, ...], group, capsys) -> None:
    assert "No such option: --no-such-option" in _usage_error(path, ["--no-such-option"], capsys)


@pytest.mark.parametrize(("path", "group"), GROUPS, ids=_ids(GROUPS))
def test_bare_group_shows_its_help(path: tuple[str, ...], group, capsys) -> None:
    assert main(list(path)) == 2
    captured = capsys.readouterr()
    shown = captured.out + captured.err
    assert "Usage:" in shown and "Traceback" not in shown and not captured.err.strip()
    assert all(name in shown for name in group.commands)


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=_ids(COMMANDS))
def test_command_unknown_option(path: tuple[str, ...], command, capsys) -> None:
    assert "No such option: --no-such-option" in _usage_error(path, [*_required_arguments(command), "--no-such-option"], capsys)


@pytest.mark.parametrize(("path", "command"), COMMANDS, ids=_ids(COMMANDS))
def test_command_missing_argument_or_extra_argument(path: tuple[str, ...], command, capsys) -> None:
    required = [p for p in command.params if p.required or getattr(p, "nargs", 1) == -1]  # variadic: one at least
    if required:
        error = _usage_error(path, [], capsys)
        assert error.startswith("error: Missing ")
    else:  # nothing is required: an extra word is the usage error
        assert "unexpected extra argument" in _usage_error(path, ["extra-word"], capsys)


def _takes_a_number(param) -> bool:
    annotation = param.type_descriptor.annotation
    return bool({annotation, *typing.get_args(annotation)} & {int, float})


NUMBER_OPTIONS = [
    (path, command, param)
    for path, command in COMMANDS
    for param in command.params
    if param.param_type_name == "option" and _takes_a_number(param)
]


@pytest.mark.parametrize(
    ("path", "command", "param"), NUMBER_OPTIONS, ids=[f"{' '.join(p)} {o.opts[0]}" for p, _, o in NUMBER_OPTIONS]
)
def test_command_bad_option_value(path: tuple[str, ...], command, param, capsys) -> None:
    args = _required_arguments(command)
    for other in command.params:  # required options other than the one under test get a valid value
        if other.param_type_name == "option" and other.required and other is not param:
            args += [other.opts[0], "1"]
    error = _usage_error(path, [*args, param.opts[0], "not-a-number"], capsys)
    assert error.startswith("error: Invalid value for") and param.opts[0] in error


def test_the_installed_entry_point(tmp_path: Path) -> None:
    """The console script as a user runs it, with the issue's example typo."""
    exe = Path(sys.executable).with_name("ds_simclr")
    result = subprocess.run([str(exe), "lanch", "spec.yaml"], capture_output=True, text=True, env=os.environ, cwd=tmp_path)
    assert result.returncode == 2 and not result.stdout
    assert result.stderr.splitlines() == [
        "Usage: ds_simclr [OPTIONS] COMMAND [ARGS]...",
        "error: No such command 'lanch'. Did you mean 'launch', 'plan', 'bench'? (see 'ds_simclr --help')",
    ]
