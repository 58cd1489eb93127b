"""The `ds_simclr` command line: thin wrappers over library functions.

`main` is the one place that turns a `UserError` into a single line on stderr and exit status 2;
tracebacks only with `--debug`. Heavy modules (torch, DeepSpeed, MONAI) are imported inside the
commands that need them, so `validate` and `config` start fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Optional

import click
import typer

from ds_simclr.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="DeepSpeed-backed, large-batch SimCLR pretraining for 3D MRI.",
)

SpecArg = Annotated[Path, typer.Argument(help="Run spec (YAML).", show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a spec field: --set train.max_steps=20 (repeatable)."),
]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for user errors.")] = False,
) -> None:
    """DeepSpeed-backed, large-batch SimCLR pretraining for 3D MRI."""


@app.command()
def validate(spec_path: SpecArg, overrides: SetOpt = None) -> None:
    """Validate the spec and print a one-screen summary."""
    from ds_simclr.spec import load_spec
    from ds_simclr.summary import spec_summary

    spec = load_spec(spec_path, overrides)
    typer.echo(spec_summary(spec, spec_path))


@app.command()
def config(
    spec_path: SpecArg,
    world_size: Annotated[int, typer.Option("--world-size", "-w", help="Ranks the job gets.")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Write here instead of stdout.")] = None,
    overrides: SetOpt = None,
) -> None:
    """Print or write the DeepSpeed JSON for N ranks."""
    from ds_simclr.dsconfig import deepspeed_config
    from ds_simclr.spec import load_spec

    text = json.dumps(deepspeed_config(load_spec(spec_path, overrides), world_size), indent=2) + "\n"
    if output is None:
        typer.echo(text, nl=False)
    else:
        output.write_text(text)


@app.command()
def plan(
    spec_path: SpecArg,
    world_size: Annotated[Optional[int], typer.Option("--world-size", "-w", help="Ranks (default: from the spec).")] = None,
    plot: Annotated[Optional[Path], typer.Option("--plot", help="Write a PNG of the LR curve.")] = None,
    overrides: SetOpt = None,
) -> None:
    """Dry run: batch split, negatives, steps, LR milestones, memory per rank."""
    from ds_simclr.planning import plan_report, plot_lr_curve
    from ds_simclr.spec import load_spec

    spec = load_spec(spec_path, overrides)
    report = plan_report(spec, world_size)
    typer.echo(report.text)
    if plot is not None:
        plot_lr_curve(report.lrs, plot, title=f"{spec.name}: LR per optimizer step")
        typer.echo(f"LR curve written to {plot}")


@app.command()
def train(
    spec_path: SpecArg,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Run directory (default: output_dir/name).")] = None,
    stop_at: Annotated[Optional[int], typer.Option("--stop-at", help="Stop after this step, keeping the schedule.")] = None,
    overrides: SetOpt = None,
) -> int:
    """The worker each launcher starts on every rank (users rarely call it)."""
    from ds_simclr.engine import train as run_training
    from ds_simclr.spec import load_spec

    result = run_training(load_spec(spec_path, overrides), run_dir=run_dir, stop_at=stop_at)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app; user errors become one line and exit status 2."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        result = app(args=args, prog_name="ds_simclr", standalone_mode=False)
    except UserError as exc:
        if debug:
            raise
        typer.echo(f"error: {exc.one_line()}", err=True)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return 2
    except click.exceptions.Abort:
        typer.echo("aborted", err=True)
        return 130
    return result if isinstance(result, int) else 0


if __name__ == "__main__":
    sys.exit(main())
