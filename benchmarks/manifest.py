"""`data manifest` at scale: a generated BIDS tree of N files (header-only NIfTI, small sidecars).

Per subject: two sessions, each with anat T1w + T2w (+ a T2w sidecar) and a func bold (+ sidecar),
10 files; a root T1w.json that every T1w inherits. Times, in one process on the same tree: a bare
`os.walk` listing (the file system's floor), `make_manifest` on the BIDS dataset (anatomical images,
sidecars merged, manifest validated and written), `make_manifest` on the same tree as a plain folder
(glob + regex), and with `--pybids` pybids' BIDSLayout indexing (not a dependency: `pip install
pybids` first; it took 75 s for 100k files here without metadata indexing).

    python benchmarks/manifest.py [--files 100000] [--pybids] [--keep DIR]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ds_simclr.data.manifest_build import make_manifest  # noqa: E402

FILES_PER_SUBJECT = 10


def generate(root: Path, n_files: int) -> int:
    """Write the tree; returns the number of files."""
    import nibabel as nib
    import numpy as np

    header = nib.Nifti1Header()
    header.set_data_shape((1, 1, 1))
    header.set_data_dtype(np.uint8)
    blob = header.binaryblock + b"\0" * 4
    root.mkdir(parents=True, exist_ok=True)
    (root / "dataset_description.json").write_text(json.dumps({"Name": "Generated", "BIDSVersion": "1.9.0"}))
    (root / "T1w.json").write_text(json.dumps({"MagneticFieldStrength": 3}))
    count = 2
    for s in range(max(1, n_files // FILES_PER_SUBJECT)):
        sub = f"sub-{s:06d}"
        for ses in ("ses-01", "ses-02"):
            anat, func = root / sub / ses / "anat", root / sub / ses / "func"
            anat.mkdir(parents=True)
            func.mkdir(parents=True)
            (anat / f"{sub}_{ses}_T1w.nii.gz").write_bytes(blob)
            (anat / f"{sub}_{ses}_T2w.nii.gz").write_bytes(blob)
            (anat / f"{sub}_{ses}_T2w.json").write_text('{"EchoTime": 0.1}')
            (func / f"{sub}_{ses}_task-rest_bold.nii.gz").write_bytes(blob)
            (func / f"{sub}_{ses}_task-rest_bold.json").write_text('{"RepetitionTime": 2}')
            count += 5
    return count


def timed(label: str, fn: object) -> float:
    t0 = time.perf_counter()
    c0 = time.process_time()
    result = fn()  # type: ignore[operator]
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"{label:<44} {wall:7.2f} s wall {cpu:7.2f} s CPU   {result}")
    return wall


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--files", type=int, default=100_000)
    parser.add_argument("--pybids", action="store_true", help="also time pybids' BIDSLayout (slow)")
    parser.add_argument("--keep", type=Path, help="generate into this folder and keep it (reused if present)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        root = (args.keep or Path(tmp)) / "bench_bids"
        if not root.exists():
            t0 = time.perf_counter()
            n = generate(root, args.files)
            print(f"generated {n} files in {time.perf_counter() - t0:.1f} s under {root}")
        n = sum(len(files) for _, _, files in os.walk(root))
        walk = timed("os.walk listing (floor)", lambda: f"{sum(len(f) for _, _, f in os.walk(root))} files")

        def bids() -> str:
            report = make_manifest([root], Path(tmp) / "bids.json")
            return report.datasets[0].summary()

        def folder() -> str:
            regex = r"(?P<subject>sub-\d+)/(?P<session>ses-\d+)/anat/.*_(?P<modality>T1w|T2w)\.nii\.gz$"
            report = make_manifest([root], Path(tmp) / "folder.json", pattern="*/*/anat/*.nii.gz", regex=regex)
            return report.datasets[0].summary()

        ours = timed("data manifest, BIDS (ours)", bids)
        plain = timed("data manifest, plain folder (ours)", folder)
        print(f"{n} files: BIDS {n / ours:,.0f} files/s ({ours / walk:.1f}x the bare walk), folder {n / plain:,.0f} files/s")
        if args.pybids:
            from bids import BIDSLayout, BIDSLayoutIndexer

            ref = timed(
                "pybids BIDSLayout (validate=False, no metadata)",
                lambda: f"{len(BIDSLayout(root, validate=False, indexer=BIDSLayoutIndexer(validate=False, index_metadata=False)).get(suffix=['T1w', 'T2w'], extension=['.nii.gz']))} images",
            )
            print(f"ours / pybids: {ref / ours:.1f}x faster")
        print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MiB")


if __name__ == "__main__":
    main()
