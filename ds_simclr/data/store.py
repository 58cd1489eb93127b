"""The preprocessed store (format 2): float16 `.npy` volumes in hashed subfolders and a compact index.

A store folder:

    store.json             head of the index: format, image count, modality names, index file;
                           written last, so a store is complete exactly when it exists
    index-<build>.npz      per image: id (ASCII bytes), shape (int32 x 3, z y x), padding value
                           (float32), modality code (int16 into store.json's list)
    images/<bb>/<id>.npy   one volume, C order, float16; <bb> = the first 2 hex digits of sha1(id),
    images/<bb>/<id>.json  so 256 folders share the images (~900 entries each at 114k images)
    plan.json, fingerprint.json, report.json, pretrain_data.json (written by preprocessing)

Random patches are sliced from memory maps, so a 160^3 patch touches only its own pages (see
`benchmarks/store.py` for the comparison with blosc2 `.b2nd`). A `PatchStore` holds at most
`max_open` file descriptors and memory maps at once, shared by the reader threads: an LRU of mapped
volumes (one map and one descriptor each; opening one holds a second descriptor for a moment, which
counts) in which a map a thread is slicing is never dropped. Patches that reach past the
volume are padded with the volume's background value. Format 1 (every entry in store.json, one flat
`images/` folder) is refused with the command that rebuilds the store.
"""

from __future__ import annotations

import fcntl
import hashlib
import io
import json
import mmap
import os
import threading
import uuid
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from ds_simclr.atomic import write_atomic
from ds_simclr.errors import DataError

FORMAT = 2
FORMAT_NAME = f"ds_simclr-store/{FORMAT}"
INDEX_NAME = "store.json"
IMAGES_DIR = "images"
STORE_DTYPE = np.float16
"""z-scored intensities fit float16's range and precision; it halves disk and page-cache bytes."""


def _bucket(uid: str) -> str:
    return hashlib.sha1(uid.encode()).hexdigest()[:2]


def volume_file(uid: str) -> str:
    """Path of a volume's `.npy`, relative to the store folder."""
    return f"{IMAGES_DIR}/{_bucket(uid)}/{uid}.npy"


def sidecar_file(uid: str, suffix: str = ".json") -> str:
    """Path of a volume's sidecar (`.json`: preprocessed; `.skip.json`: skipped), relative to the store."""
    return f"{IMAGES_DIR}/{_bucket(uid)}/{uid}{suffix}"


def write_volume(store_dir: Path, uid: str, volume: np.ndarray) -> Path:
    """Write one volume as float16 `.npy` (atomically) where the index expects it; returns its path."""

    buffer = io.BytesIO()
    np.save(buffer, np.ascontiguousarray(volume, dtype=STORE_DTYPE))
    path = Path(store_dir) / volume_file(uid)
    write_atomic(path, buffer.getbuffer())  # no copy of the volume's bytes
    return path


def write_index(
    store_dir: Path,
    ids: Sequence[str],
    shapes: Sequence[Sequence[int]],
    pad_values: Sequence[float],
    modalities: Sequence[str],
    *,
    manifest: Path | None = None,
) -> Path:
    """Write the index arrays, then `store.json` (the completion mark); returns store.json's path.

    The arrays go to a new `index-<build>.npz` that store.json names, so a reader sees either the old
    or the new index, never a mix; older index files are removed afterwards. `manifest` (recorded)
    lets a later version name the exact command that rebuilds the store.
    """

    store_dir = Path(store_dir)
    names = sorted(set(modalities))
    code = {name: i for i, name in enumerate(names)}
    arrays = {
        "ids": np.array([uid.encode("ascii") for uid in ids], dtype="S"),
        "shapes": np.asarray(shapes, dtype=np.int32).reshape(-1, 3),
        "pad_values": np.asarray(pad_values, dtype=np.float32),
        "modality_codes": np.array([code[m] for m in modalities], dtype=np.int16),
    }
    if not len(arrays["ids"]) == len(arrays["shapes"]) == len(arrays["pad_values"]) == len(arrays["modality_codes"]):
        raise ValueError("ids, shapes, pad_values and modalities differ in length")
    index_name = f"index-{uuid.uuid4().hex[:12]}.npz"
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    write_atomic(store_dir / index_name, buffer.getvalue())
    head = {
        "format": FORMAT_NAME,
        "images": len(arrays["ids"]),
        "index": index_name,
        "modalities": names,
        "manifest": str(Path(manifest).resolve()) if manifest is not None else None,
    }
    path = store_dir / INDEX_NAME
    write_atomic(path, json.dumps(head, indent=1) + "\n")
    for old in store_dir.glob("index-*.npz"):
        if old.name != index_name:
            old.unlink(missing_ok=True)
    return path


def read_head(store_dir: Path) -> dict[str, Any]:
    """store.json of a complete store of this format; a DataError (one line) otherwise."""
    store_dir = Path(store_dir)
    path = store_dir / INDEX_NAME
    if not path.is_file():
        raise DataError(
            "not a complete preprocessed store (no store.json)",
            where=str(store_dir),
            hint="run `ds_simclr data preprocess MANIFEST OUT` first; it writes store.json last",
        )
    try:
        head = json.loads(path.read_text())
        found = str(head["format"])
    except (ValueError, KeyError, TypeError) as exc:
        raise DataError(f"unreadable store index: {exc}", where=str(path), hint="preprocess again") from exc
    if found != FORMAT_NAME:
        name, _, version = found.rpartition("/")
        older = name == "ds_simclr-store" and version.isdigit() and int(version) < FORMAT
        manifest = head.get("manifest") or "MANIFEST"
        raise DataError(
            f"store format {found} is {'older than' if older else 'not'} the format this version reads ({FORMAT_NAME})",
            where=str(path),
            hint=f"rebuild it: ds_simclr data preprocess {manifest} {store_dir} --overwrite"
            if older
            else "use the ds_simclr version that wrote it",
        )
    return head


def store_ready(store_dir: Path) -> bool:
    """True when `store_dir` holds a complete store of this format."""
    try:
        read_head(store_dir)
    except DataError:
        return False
    return True


def read_index(store_dir: Path) -> tuple[dict[str, Any], tuple[np.ndarray, ...]]:
    """store.json and the index arrays (ids, shapes, pad_values, modality_codes) of a complete store."""
    head = read_head(store_dir)
    index_path = Path(store_dir) / str(head["index"])
    try:
        with np.load(index_path) as arrays:
            columns = tuple(arrays[name] for name in ("ids", "shapes", "pad_values", "modality_codes"))
    except (OSError, ValueError, KeyError) as exc:
        raise DataError(f"unreadable store index: {exc}", where=str(index_path), hint="preprocess again") from exc
    if len(columns[0]) != head["images"]:
        raise DataError(f"index holds {len(columns[0])} images, store.json says {head['images']}", where=str(index_path))
    return head, columns


def index_digest(store_dir: Path) -> str:
    """SHA-256 (hex) of what the index says of every image, in order: id, shape, padding value and
    modality name. Equal for the same preprocessed images, whichever build wrote the index file."""
    head, columns = read_index(store_dir)
    digest = hashlib.sha256(json.dumps([FORMAT_NAME, head["modalities"]]).encode())
    for column in columns:
        digest.update(f"{column.dtype.str}{column.shape}".encode())
        digest.update(np.ascontiguousarray(column).tobytes())
    return digest.hexdigest()


T = TypeVar("T")


def build_once(store_dir: Path, build: Callable[[], T], ready: Callable[[Path], bool] = store_ready) -> T | None:
    """Run `build` (which completes `store_dir`) unless `ready(store_dir)` (default: a complete
    store); returns what it returned.

    A file lock beside the store serialises callers on a host (two launches on one cache): one
    builds, the others wait and then find the store ready (and return None). An interrupted build
    leaves no store.json, so the next call builds again (reusing the finished images).
    """
    store_dir = Path(store_dir)
    if ready(store_dir):
        return None
    store_dir.parent.mkdir(parents=True, exist_ok=True)
    with open(store_dir.parent / f".{store_dir.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        return None if ready(store_dir) else build()


def map_npy(path: Path) -> np.ndarray:
    """A read-only memory map of an `.npy` file that holds one file descriptor (two while opening).

    (`np.load(mmap_mode="r")` holds up to three while opening.) Python's mmap keeps a duplicate of
    the descriptor until the map is unmapped, which happens when the last array using it goes.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        with open(fd, "rb", closefd=False) as header:
            version = np.lib.format.read_magic(header)
            if version not in ((1, 0), (2, 0)):
                raise ValueError(f"unsupported .npy format version {version}")
            read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            shape, fortran, dtype = read(header)
            offset = header.tell()
        mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_READ)
    finally:
        os.close(fd)
    return np.ndarray(shape, dtype=dtype, buffer=mapped, offset=offset, order="F" if fortran else "C")


class OpenVolumes:
    """At most `capacity` file descriptors (and maps) held by open volumes, shared by threads.

    An open volume holds one descriptor; one being opened holds a second for a moment, and admission
    counts it, so the bound holds at every instant (at most `capacity` - 1 volumes stay open). `use(key)`
    lends a volume for a `with` block: a lent volume is never dropped; the least recently used idle one
    is dropped to make room, and when none is idle the caller waits for one to come back. A dropped map
    is unmapped (its descriptor closed) when its last reference goes, which is at once: the pool holds
    the only reference outside a `with` block. Opening runs outside the lock, several at a time;
    threads asking for a volume being opened wait for that one opening.
    """

    class _Slot:
        def __init__(self) -> None:
            self.array: np.ndarray | None = None
            self.error: BaseException | None = None
            self.users = 1
            self.ready = threading.Event()

    def __init__(self, capacity: int, opener: Callable[[int], np.ndarray]) -> None:
        if capacity < 2:
            raise ValueError(f"capacity must be >= 2 (one open volume + one being opened), got {capacity}")
        self.capacity = capacity
        self._open = opener
        self._cond = threading.Condition()
        self._slots: OrderedDict[int, OpenVolumes._Slot] = OrderedDict()
        self._opening = 0

    def __len__(self) -> int:
        return len(self._slots)

    @contextmanager
    def use(self, key: int) -> Iterator[np.ndarray]:
        slot = self._acquire(key)
        try:
            slot.ready.wait()
            if slot.error is not None:
                raise slot.error
            yield slot.array  # type: ignore[misc]
        finally:
            with self._cond:
                slot.users -= 1
                self._cond.notify_all()

    def _acquire(self, key: int) -> _Slot:
        with self._cond:
            while True:
                slot = self._slots.get(key)
                if slot is not None:
                    slot.users += 1
                    self._slots.move_to_end(key)
                    return slot
                if len(self._slots) + self._opening + 2 <= self.capacity:  # its descriptor + the moment's second
                    break
                if not self._drop_idle():
                    self._cond.wait()
            slot = self._slots[key] = OpenVolumes._Slot()
            self._opening += 1
        try:
            slot.array = self._open(key)
        except BaseException as exc:  # handed to every thread waiting for this volume; a later call retries
            slot.error = exc
        with self._cond:
            self._opening -= 1
            if slot.error is not None and self._slots.get(key) is slot:
                del self._slots[key]
            self._cond.notify_all()
        slot.ready.set()
        return slot

    def _drop_idle(self) -> bool:
        for key, slot in self._slots.items():
            if slot.users == 0:
                del self._slots[key]
                slot.array = None
                return True
        return False

    def clear(self) -> None:
        """Drop every idle volume (lent ones stay until they come back)."""
        with self._cond:
            while self._drop_idle():
                pass


class PatchStore:
    """Read-only view of a complete store; cheap to open (compact index), safe to share between threads."""

    def __init__(self, store_dir: Path, modalities: list[str] | None = None, *, max_open: int = 64) -> None:
        self.root = Path(store_dir)
        head, (ids, shapes, pad_values, codes) = read_index(self.root)
        names: list[str] = list(head["modalities"])
        if modalities is not None:
            keep = np.flatnonzero(np.isin(codes, [names.index(m) for m in modalities if m in names]))
            ids, shapes, pad_values, codes = ids[keep], shapes[keep], pad_values[keep], codes[keep]
        if len(ids) == 0:
            raise DataError(
                "the store holds no images" + (f" of modalities {modalities}" if modalities else ""),
                where=str(self.root / INDEX_NAME),
                hint="check data.modalities or the preprocessing report",
            )
        self._ids, self._shapes, self._pad_values, self._codes = ids, shapes, pad_values, codes
        self._modalities = names
        self._volumes = OpenVolumes(max_open, self._open_volume)

    def __len__(self) -> int:
        return len(self._ids)

    def id(self, index: int) -> str:
        return self._ids[index].decode("ascii")

    def shape(self, index: int) -> tuple[int, int, int]:
        """(z, y, x) voxels of volume `index`."""
        return tuple(int(n) for n in self._shapes[index])  # type: ignore[return-value]

    def pad_value(self, index: int) -> float:
        """The background value (z-scored zero) that pads patches reaching past the volume."""
        return float(self._pad_values[index])

    def modality(self, index: int) -> str:
        return self._modalities[int(self._codes[index])]

    def path(self, index: int) -> Path:
        return self.root / volume_file(self.id(index))

    @property
    def open_volumes(self) -> int:
        """Volumes mapped right now (at most `max_open`)."""
        return len(self._volumes)

    def _open_volume(self, index: int) -> np.ndarray:
        vol = map_npy(self.path(index))
        if vol.shape != self.shape(index) or vol.dtype != STORE_DTYPE:
            raise DataError(
                f"volume is {vol.dtype} {list(vol.shape)}, the index says {np.dtype(STORE_DTYPE)} {list(self.shape(index))}",
                where=str(self.path(index)),
                hint="the store changed after indexing: preprocess again",
            )
        return vol

    @contextmanager
    def volume(self, index: int) -> Iterator[np.ndarray]:
        """The memory map of volume `index`, lent for a `with` block (do not keep it beyond)."""
        with self._volumes.use(index) as vol:
            yield vol

    def read_patch(self, index: int, start: tuple[int, int, int], size: int) -> np.ndarray:
        """A (size,size,size) patch in the store's dtype (float16) with corner `start` (may be negative).

        Outside the volume is padded. Converting to float32 is left to torch, which does it ~10x
        faster than numpy (and on the GPU after a half-size host-to-device copy)."""
        with self._volumes.use(index) as vol:
            patch = cut_patch(vol, start, size, self.pad_value(index))
            del vol  # the pool's reference is then the only one: a dropped map is unmapped at once
        return patch

    def close(self) -> None:
        """Unmap every volume no thread is reading."""
        self._volumes.clear()


def cut_patch(vol: np.ndarray, start: tuple[int, ...], size: int, pad_value: float) -> np.ndarray:
    """Copy only the overlapping part of `vol` into a padded cube of its dtype (reads no other voxels)."""
    src, dst = [], []
    for s, d in zip(start, vol.shape):
        lo, hi = max(s, 0), min(s + size, d)
        src.append(slice(lo, max(lo, hi)))
        dst.append(slice(lo - s, lo - s + max(0, hi - lo)))
    inside = all(d.stop - d.start == size for d in dst)
    out = np.empty((size,) * 3, dtype=vol.dtype) if inside else np.full((size,) * 3, pad_value, dtype=vol.dtype)
    out[tuple(dst)] = vol[tuple(src)]
    return out
