"""Which preprocessed store a spec trains from, and the checks `launch` makes before starting.

`demo: true` builds the demo collection once into the cache; `store` alone must be a finished
store; `manifest` is preprocessed once (into `store`, or into the cache when no store is given) and
reused afterwards. Paths are checked here, where data is used, not when a spec is validated.
"""

from __future__ import annotations

import fcntl
import hashlib
from pathlib import Path

from ds_simclr.data.options import DataSpec
from ds_simclr.data.store import INDEX_NAME
from ds_simclr.errors import DataError


def _target(data: DataSpec) -> Path:
    if data.store is not None:
        return Path(data.store)
    digest = hashlib.sha1(str(Path(data.manifest).resolve()).encode()).hexdigest()[:12]
    return Path(data.cache_dir).expanduser() / "stores" / f"{Path(data.manifest).parent.name}-{digest}"


def check_data_paths(data: DataSpec, where: str = "data") -> None:
    """Raise a one-line DataError naming the field when the data a run needs is not there."""
    if data.demo:
        return
    if data.manifest is not None and not Path(data.manifest).is_file():
        raise DataError("manifest not found", where=f"{where}.manifest: {data.manifest}")
    if data.manifest is None and not (Path(data.store) / INDEX_NAME).is_file():
        raise DataError(
            "not a preprocessed store (no store.json)",
            where=f"{where}.store: {data.store}",
            hint="run `ds_simclr data preprocess MANIFEST OUT` first, or give data.manifest",
        )


def resolve_store(data: DataSpec, *, build: bool = True) -> Path:
    """The store folder to train from; builds it first when `build` and it is not finished.

    Call with build=True on one rank, then with build=False on the others after a barrier.
    """
    if data.demo:
        from ds_simclr.data.demo import ensure_demo_store

        if build:
            return ensure_demo_store(Path(data.cache_dir))
        return Path(data.cache_dir).expanduser() / "demo" / "store"
    check_data_paths(data)
    store = _target(data)
    if build and data.manifest is not None and not (store / INDEX_NAME).is_file():
        from ds_simclr.data.preprocess import preprocess

        store.mkdir(parents=True, exist_ok=True)
        with open(store.parent / f".{store.name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            if not (store / INDEX_NAME).is_file():
                preprocess(Path(data.manifest), store, jobs=1, progress=False)
    return store
