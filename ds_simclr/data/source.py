"""Which preprocessed store a spec trains from, and the checks `launch` makes before starting.

`demo: true` builds the demo collection once into the cache; `store` alone must be a finished
store; `manifest` is preprocessed once (into `store`, or into the cache when no store is given) and
reused afterwards. Paths are checked here, where data is used, not when a spec is validated.
"""

from __future__ import annotations

import hashlib
import re
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
    for field, path in (("manifest", data.manifest), ("store", data.store)):
        unset = re.findall(r"\$\{?(\w+)", str(path)) if path is not None else []
        if unset:
            raise DataError(
                f"environment variable ${unset[0]} is not set", where=f"{where}.{field}: {path}",
                hint=f"export {unset[0]}=... before launching",
            )
    if data.manifest is not None and not Path(data.manifest).is_file():
        raise DataError("manifest not found", where=f"{where}.manifest: {data.manifest}")
    if data.manifest is None and not (Path(data.store) / INDEX_NAME).is_file():
        raise DataError(
            "not a preprocessed store (no store.json)",
            where=f"{where}.store: {data.store}",
            hint="run `ds_simclr data preprocess MANIFEST OUT` first, or give data.manifest",
        )


def resolve_store(data: DataSpec) -> Path:
    """The store folder to train from, built first when it is not finished.

    Ranks of one host may call this at once (a lock makes one build and the others wait); across
    hosts, call it on rank 0 before a barrier and on the others after it.
    """
    if data.demo:
        from ds_simclr.data.demo import ensure_demo_store

        return ensure_demo_store(Path(data.cache_dir))
    check_data_paths(data)
    store = _target(data)
    if data.manifest is None or (store / INDEX_NAME).is_file():
        return store
    from ds_simclr.data.demo import build_once
    from ds_simclr.data.preprocess import preprocess

    return build_once(store, lambda: preprocess(Path(data.manifest), store, jobs=1, progress=False))
