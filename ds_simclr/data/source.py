"""Which preprocessed store a spec trains from; `launch` makes it ready, the ranks only open it.

`demo: true` uses the demo store in the cache; `store` alone must be a complete store; `manifest` is
preprocessed once (into `store`, or into a cache folder keyed by the manifest's path and the store
format) and then used as it is (a resumed run must see the data it started with). `prepare_store`
runs in `launch` before any rank starts and builds what is missing with every core of the node;
`resolve_store` (ranks, plots) never builds: an incomplete store is a one-line error naming the
command that completes it. Paths are checked here, where data is used, not when a spec is validated.
"""

from __future__ import annotations

import hashlib
import os
import re
from collections.abc import Callable
from pathlib import Path

from ds_simclr.data.options import DataSpec
from ds_simclr.data.store import FORMAT, read_head, store_ready
from ds_simclr.errors import DataError


def store_path(data: DataSpec) -> Path:
    """Where the spec's store is (or will be once prepared)."""
    if data.demo:
        from ds_simclr.data.demo import demo_store_path

        return demo_store_path(Path(data.cache_dir))
    if data.store is not None:
        return Path(data.store)
    digest = hashlib.sha1(str(Path(data.manifest).resolve()).encode()).hexdigest()[:12]
    return Path(data.cache_dir).expanduser() / "stores" / f"{Path(data.manifest).parent.name}-{digest}-v{FORMAT}"


def check_data_paths(data: DataSpec, where: str = "data") -> None:
    """Raise a one-line DataError naming the field when the data a run needs is not there."""
    if data.demo:
        return
    for field, path in (("manifest", data.manifest), ("store", data.store)):
        unset = re.findall(r"\$\{?(\w+)", str(path)) if path is not None else []
        if unset:
            raise DataError(
                f"environment variable ${unset[0]} is not set", where=f"{where}.{field}: {path}",
                hint=f"export {unset[0]}=... before launching",
            )
    if data.manifest is not None and not Path(data.manifest).is_file():
        raise DataError("manifest not found", where=f"{where}.manifest: {data.manifest}")
    if data.manifest is None:
        try:
            read_head(Path(data.store))
        except DataError as exc:
            raise DataError(exc.message, where=f"{where}.store: {data.store}", hint=exc.hint) from exc


def preprocess_command(data: DataSpec, jobs: str = "N") -> str:
    """The command that completes the spec's store from its manifest."""
    return f"ds_simclr data preprocess {data.manifest} {store_path(data)} -j {jobs}"


def resolve_store(data: DataSpec, where: str = "data") -> Path:
    """The complete store to train from; never builds one (see `prepare_store`).

    Raises a one-line DataError naming the command to run when the store is not complete (`where`:
    how errors name the data section, e.g. `spec.yaml: data`).
    """
    check_data_paths(data, where)
    store = store_path(data)
    try:
        read_head(store)
    except DataError as exc:
        if data.demo:
            hint = "`ds_simclr launch SPEC` builds the demo store before it starts the ranks"
        elif data.manifest is not None:
            hint = f"run `{preprocess_command(data)}` first, or `ds_simclr launch SPEC` on one node, which does it"
        else:
            hint = exc.hint
        raise DataError(exc.message, where=exc.where, hint=hint) from exc
    return store


def prepare_store(data: DataSpec, *, jobs: int, nodes: int, echo: Callable[[str], object] = print) -> Path:
    """Make the store ready before any rank starts (`launch`); returns its folder.

    Builds the demo store, or preprocesses the manifest with `jobs` processes (progress bar, then the
    same report as `data preprocess`), unless the store is complete. A manifest still to preprocess
    on a job of several nodes is refused (the other nodes would idle; their caches may differ).
    """
    check_data_paths(data)
    store = store_path(data)
    if store_ready(store):
        return store
    from ds_simclr.data.store import build_once

    if data.demo:
        from ds_simclr.data.demo import build_demo_store

        echo(f"building the demo store in {store} ({jobs} processes)")
        report = build_once(store, lambda: build_demo_store(Path(data.cache_dir), jobs=jobs, progress=True))
    else:
        if data.manifest is None:
            read_head(store)  # raises the reason
        if nodes > 1:
            raise DataError(
                f"the store {store} is not preprocessed yet and this job has {nodes} nodes",
                where="data.manifest",
                hint=f"run `{preprocess_command(data)}` first (one node is enough), then launch",
            )
        from ds_simclr.data.preprocess import preprocess

        echo(f"preprocessing {data.manifest} into {store} ({jobs} processes)")
        report = build_once(store, lambda: preprocess(Path(data.manifest), store, jobs=jobs, progress=True))
    if report is not None:
        echo(report.summary())
        for line in report.skipped_lines():
            echo(line)
    return store


def cores() -> int:
    """CPU cores this process may use (its affinity mask, which SLURM and cgroups set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
