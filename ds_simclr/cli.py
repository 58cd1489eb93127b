"""The `ds_simclr` command line: thin wrappers over library functions.

`main` is the one place that turns errors into messages: a `UserError` becomes a single line on
stderr and exit status 2 (tracebacks only with `--debug`); a usage error at any level of the command
tree (unknown command or option, missing argument, bad value) becomes the usage line plus one error
line, exit status 2. Heavy modules (torch, DeepSpeed, MONAI) are imported inside the commands that
need them, so `validate` and `config` start fast.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal, Optional

import typer

# Typer bundles its own copy of click; the standalone click's exceptions are other classes.
from typer._click.exceptions import ClickException, NoArgsIsHelpError, UsageError

from ds_simclr.errors import UserError

if TYPE_CHECKING:
    from ds_simclr.spec import RunSpec

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="DeepSpeed-backed, large-batch SimCLR pretraining for 3D MRI.",
)

SpecArg = Annotated[Path, typer.Argument(metavar="SPEC", help="Run spec (YAML).", show_default=False)]
SetOpt = Annotated[
    Optional[list[str]],
    typer.Option("--set", help="Override a spec field: --set train.max_steps=20 (repeatable)."),
]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for user errors.")] = False,
) -> None:
    """DeepSpeed-backed, large-batch SimCLR pretraining for 3D MRI."""


def _warn(spec: RunSpec) -> None:
    """Warnings about a valid spec that will not do what it seems to say, one line each on stderr."""
    from ds_simclr.schedule import schedule_warning

    warning = schedule_warning(spec)
    if warning:
        typer.echo(f"warning: {warning}", err=True)


@app.command()
def validate(spec_path: SpecArg, overrides: SetOpt = None) -> None:
    """Validate the spec and print a one-screen summary."""
    from ds_simclr.specload import load_spec
    from ds_simclr.summary import spec_summary

    spec = load_spec(spec_path, overrides)
    typer.echo(spec_summary(spec, spec_path))
    _warn(spec)


@app.command()
def config(
    spec_path: SpecArg,
    world_size: Annotated[int, typer.Option("--world-size", "-w", help="Ranks the job gets.")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Write here instead of stdout.")] = None,
    overrides: SetOpt = None,
) -> None:
    """Print or write the DeepSpeed JSON for N ranks."""
    from ds_simclr.dsconfig import deepspeed_config
    from ds_simclr.specload import load_spec

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
    from ds_simclr.specload import load_spec

    spec = load_spec(spec_path, overrides)
    report = plan_report(spec, world_size)
    typer.echo(report.text)
    _warn(spec)
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
    from ds_simclr.errors import FollowOnError
    from ds_simclr.rank_report import another_rank_failed, report_rank_error, reserve_report
    from ds_simclr.rundir import RunPaths
    from ds_simclr.specload import load_spec

    errors = RunPaths(run_dir).errors if run_dir else None
    reserve_report(errors)
    try:
        run_training(load_spec(spec_path, overrides), run_dir=run_dir, stop_at=stop_at)
    except UserError as exc:  # under `launch`, which prints it once for the whole job
        if report_rank_error(errors, exc):
            raise typer.Exit(exc.exit_code) from None
        raise
    except Exception:  # e.g. a collective broken because that rank left: its report says why
        if another_rank_failed(errors) and report_rank_error(errors, FollowOnError("another rank failed")):
            raise typer.Exit(1) from None
        raise
    return 0


@app.command()
def launch(
    spec_path: SpecArg,
    overrides: SetOpt = None,
    launcher: Annotated[
        Optional[str],
        typer.Option("--launcher", help="torchrun, deepspeed or mpirun (default: distributed.launcher)."),
    ] = None,
    hostfile: Annotated[
        Optional[Path], typer.Option("--hostfile", help="DeepSpeed hostfile (`host slots=N` lines).")
    ] = None,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the plan and the exact command; create nothing.")] = False,
) -> int:
    """Resolve the cluster (local, hostfile or SLURM), write the run directory, start the launcher.

    Exit status: 0 finished; 2 a user error (also one a rank found); 3 too many non-finite steps;
    73/74 the run directory is not writable / out of space; 75 a SIGTERM/SIGUSR1/SIGINT stopped the
    run before its end (run the same command again to resume, e.g. after `scontrol requeue`);
    otherwise the launcher's (a crashed rank: run the same command to resume).
    """
    from ds_simclr.launch import launch as run_launch
    from ds_simclr.specload import load_spec

    spec = load_spec(spec_path, overrides)
    _warn(spec)
    return run_launch(spec, launcher, hostfile, dry_run, echo=typer.echo)


@app.command()
def hostfile(
    output: Annotated[str, typer.Option("-o", "--output", help="Write here; `-` = stdout.")] = "-",
    slots: Annotated[
        Optional[int], typer.Option("--slots", min=1, help="Ranks per host (default: GPUs per node, else tasks per node).")
    ] = None,
) -> None:
    """Write a DeepSpeed hostfile from the SLURM allocation (`host slots=N` lines)."""
    from ds_simclr.hostlist import format_hostfile
    from ds_simclr.launch import slurm_hostfile

    text = format_hostfile(slurm_hostfile(slots=slots))
    if output == "-":
        typer.echo(text, nl=False)
    else:
        from ds_simclr.atomic import write_atomic

        write_atomic(Path(output), text)


data_app = typer.Typer(no_args_is_help=True, help="Manifests, demo data and preprocessing.")
bench_app = typer.Typer(no_args_is_help=True, help="Throughput benchmarks on this machine.")
app.add_typer(data_app, name="data")
app.add_typer(bench_app, name="bench")


@data_app.command("demo")
def data_demo(out: Annotated[Path, typer.Argument(metavar="OUT", help="Folder for pretrain_data.json and the volumes.")]) -> None:
    """Build a small real-MRI collection (pretrain_data.json + volumes) from installed packages."""
    from ds_simclr.data.demo import build_demo

    typer.echo(f"demo collection written: {build_demo(out)}")


@data_app.command("manifest")
def data_manifest(
    ctx: typer.Context,
    roots: Annotated[Optional[list[Path]], typer.Argument(metavar="ROOT", help="BIDS datasets or plain folders, one dataset each.", show_default=False)] = None,
    output: Annotated[Path, typer.Option("-o", "--output", help="Manifest to write (a folder: FOLDER/pretrain_data.json).")] = Path("pretrain_data.json"),
    suffix: Annotated[Optional[str], typer.Option("--suffix", help="BIDS: suffixes to take, e.g. T1w,T2w (default: anatomical).")] = None,
    pattern: Annotated[Optional[str], typer.Option("--pattern", help="Folder: glob under each ROOT, e.g. '**/*.nii.gz'.")] = None,
    regex: Annotated[Optional[str], typer.Option("--regex", help="Folder: regex searched in each relative path; named groups subject (required), session, modality.")] = None,
    modality: Annotated[Optional[str], typer.Option("--modality", help="Folder/table: modality of every image without one.")] = None,
    table: Annotated[Optional[Path], typer.Option("--table", help="CSV/TSV, one image a row: columns path, subject, modality; optional session, dataset.")] = None,
    column: Annotated[Optional[list[str]], typer.Option("--column", help="Table: ROLE=NAME for a column named otherwise (repeatable).")] = None,
    root_var: Annotated[Optional[str], typer.Option("--root-var", help="Write paths as $NAME/... below that environment variable's folder.")] = None,
    name: Annotated[Optional[str], typer.Option("--name", help="Collection name (default: the manifest folder's name).")] = None,
) -> None:
    """Write nnSSL's pretrain_data.json from BIDS datasets, plain folders or a table; skipped files are reported."""
    from ds_simclr.data.manifest_build import make_manifest

    if not roots and table is None:
        raise UsageError("Missing argument 'ROOT...' (or give --table FILE).", ctx=ctx)

    report = make_manifest(
        roots or [], output, suffixes=suffix.split(",") if suffix else None, pattern=pattern, regex=regex,
        modality=modality, table=table, columns=column or [], root_var=root_var, name=name,
    )
    for dataset in report.datasets:
        typer.echo(dataset.summary())
    for skipped in report.skipped:
        typer.echo(f"  skipped {skipped.path}: {skipped.reason}", err=True)
    typer.echo(f"manifest written: {report.path}")


@data_app.command("preprocess")
def data_preprocess(
    manifest: Annotated[Path, typer.Argument(metavar="MANIFEST", help="nnSSL pretrain_data.json.")],
    out: Annotated[Path, typer.Argument(metavar="OUT", help="Store folder to create or complete.")],
    jobs: Annotated[int, typer.Option("-j", "--jobs", help="Parallel processes.")] = 1,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Redo finished images.")] = False,
    foreground: Annotated[
        str,
        typer.Option(
            "--foreground",
            help="Voxels to crop to and z-score over: nonzero (nnSSL's rule; skull-stripped or masked images) or otsu"
            " (a head mask for raw heads with a noisy background). Recorded in plan.json.",
        ),
    ] = "nonzero",
    shard: Annotated[
        str | None,
        typer.Option(
            "--shard",
            metavar="K/N",
            help="Only images K, K+N, K+2N, ... (0 <= K < N) and no index: shards run anywhere into one shared OUT;"
            " a run without --shard afterwards reuses their images and writes the index and report.json.",
        ),
    ] = None,
) -> int:
    """Fingerprint, plan and preprocess into the patch store; skipped files are reported.

    Exit status: 0 when every image was preprocessed (or reused), 1 when some were skipped, 2 on a user error.
    """
    from ds_simclr.data.preprocess import parse_shard, preprocess

    share = parse_shard(shard) if shard is not None else None
    report = preprocess(manifest, out, jobs=jobs, overwrite=overwrite, progress=True, foreground=foreground, shard=share)
    typer.echo(report.summary())
    for line in report.skipped_lines():
        typer.echo(line, err=True)
    return 1 if report.skipped else 0


@bench_app.command("views")
def bench_views(
    spec_path: SpecArg,
    seconds: Annotated[float, typer.Option("--seconds", help="Time per pipeline.")] = 20.0,
    overrides: SetOpt = None,
) -> None:
    """Views/s on this machine's device against the old MONAI recipe (same volumes, one run)."""
    from ds_simclr.data.bench import bench_views as run_bench
    from ds_simclr.specload import load_spec

    spec = load_spec(spec_path, overrides)
    result = run_bench(spec.views, patch_size=spec.data.patch_size, seconds=seconds)
    monai = f"{result.monai_views_per_s:.2f}" if result.monai_views_per_s else "n/a"
    ratio = f"{result.ratio:.2f}x" if result.ratio else "n/a"
    typer.echo(
        f"views at {result.output_size}^3 from {result.patch_size}^3 patches on {result.device}"
        f" ({result.threads} threads, batch {result.batch}): ours {result.ours_views_per_s:.2f} views/s,"
        f" old MONAI recipe {monai} views/s, ratio {ratio}"
    )


@app.command()
def export(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run directory.")],
    output: Annotated[Optional[Path], typer.Option("-o", "--output", help="Default: RUN_DIR/export/nnssl_<tag>.pth")] = None,
    tag: Annotated[Optional[str], typer.Option("--tag", help="Checkpoint tag (default: latest).")] = None,
) -> None:
    """Write an nnSSL adaptation checkpoint (network_weights + nnssl_adaptation_plan) for fine-tuning."""
    from ds_simclr.export import export_checkpoint

    typer.echo(f"wrote {export_checkpoint(run_dir, output, tag)}")


@app.command()
def evaluate(
    run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run directory.")],
    tag: Annotated[Optional[str], typer.Option("--tag", help="Checkpoint tag (default: latest).")] = None,
    patches_per_class: Annotated[
        int, typer.Option("--patches-per-class", min=2, help="Region-probe patches per region and hemisphere, per resampling.")
    ] = 16,
    resamples: Annotated[int, typer.Option("--resamples", min=2, help="Independent patch draws (for mean +- std).")] = 3,
    patch_size: Annotated[
        Optional[int], typer.Option("--patch-size", help="Probe patch edge in voxels (default: views.output_size).")
    ] = None,
    device: Annotated[
        Literal["auto", "cpu", "cuda"], typer.Option("--device", help="auto (a GPU when there is one), cpu or cuda.")
    ] = "auto",
) -> None:
    """Frozen-encoder probes on labelled MRI: the checkpoint against its own initial weights, random
    seeds and raw intensities; writes RUN_DIR/eval/<tag>/eval.json and eval.png, logs to W&B."""
    from ds_simclr.evaluation.evaluate import EvalOptions, evaluate_run

    options = EvalOptions(patch_size=patch_size, patches_per_class=patches_per_class, resamples=resamples, device=device)
    evaluate_run(run_dir, tag, options, echo=typer.echo, progress=lambda line: typer.echo(line, err=True))


@app.command()
def plot(run_dir: Annotated[Path, typer.Argument(metavar="RUN_DIR", help="A run directory.")]) -> None:
    """PNGs of loss and learning rate (planned and realised) and of one sample's two views."""
    from ds_simclr.plots import plot_run

    for path in plot_run(run_dir):
        typer.echo(f"wrote {path}")


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
    except typer.Exit as exc:
        return exc.exit_code
    except NoArgsIsHelpError as exc:  # a bare group (`ds_simclr data`): its help (rich prints it itself)
        if exc.format_message().strip():
            typer.echo(exc.format_message(), err=True)
        return exc.exit_code
    except UsageError as exc:
        typer.echo(usage_message(exc), err=True)
        return exc.exit_code
    except ClickException as exc:
        typer.echo(f"error: {exc.format_message()}", err=True)
        return exc.exit_code
    except typer.Abort:
        typer.echo("aborted", err=True)
        return 130
    return result if isinstance(result, int) else 0


def usage_message(exc: UsageError) -> str:
    """The command's usage line and one error line (click's did-you-mean included)."""
    error = f"error: {' '.join(exc.format_message().split())}"
    if exc.ctx is None:
        return error
    return f"{exc.ctx.get_usage()}\n{error} (see '{exc.ctx.command_path} --help')"


if __name__ == "__main__":
    sys.exit(main())
