"""Does the quickstart learn? Train it (the README's first command), then probe it: pretrained vs its own
initial weights vs random initialisations vs raw intensities, on the embedded evaluation volume.

Prints the wall time of training and evaluation, each probe's numbers side by side, and whether the
paired gain on the mirrored region test (mean over the resamplings) exceeds twice its std.

    python benchmarks/representation.py [--out DIR] [--skip-train] [--patches-per-class 16] [--resamples 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from ds_simclr.evaluation.evaluate import EvalOptions, evaluate_run  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=None, help="output_dir of the run (default: a temporary folder)")
    parser.add_argument("--spec", type=Path, default=REPO / "ds_configs" / "quickstart.yaml")
    parser.add_argument("--skip-train", action="store_true", help="evaluate an existing run in --out")
    parser.add_argument("--patches-per-class", type=int, default=16)
    parser.add_argument("--resamples", type=int, default=3)
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="spec override for training")
    args = parser.parse_args()
    out = args.out or Path(tempfile.mkdtemp(prefix="ds_simclr_repr_"))
    run = out / args.spec.stem
    load = os.getloadavg()[0]
    if not args.skip_train:
        sets = [a for s in [f"output_dir={out}", *args.overrides] for a in ("--set", s)]
        started = time.perf_counter()
        cmd = [sys.executable, "-m", "ds_simclr.cli", "launch", str(args.spec), *sets]
        subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)})
        print(f"training: {time.perf_counter() - started:.0f} s (load average {load:.1f} on {os.cpu_count()} cores)")
    report = evaluate_run(run, options=EvalOptions(patches_per_class=args.patches_per_class, resamples=args.resamples),
                          echo=lambda _: None)
    probe, seg = report["region_probe"], report["segmentation_probe"]
    print(f"evaluation: {report['seconds']:.0f} s; {report['resamples']} resamplings x {report['patches_per_class']}"
          f" patches per region and hemisphere at {report['patch_size']}^3 ({report['precision']})")
    rows = ("pretrained", "own_init", "random", "raw")
    print(f"{'balanced accuracy':34}" + "".join(f"{r:>16}" for r in rows) + f"{'paired gain':>18}")
    for test in ("logreg", "logreg_mirrored", "knn", "knn_mirrored"):
        cells = "".join(f"{probe['scores'][r][test]['mean']:>9.3f}+-{probe['scores'][r][test]['std']:.3f}" for r in rows)
        gain = probe["paired_gain"][test]
        print(f"{'region ' + test:34}{cells}{gain['mean']:>+11.3f}+-{gain['std']:.3f}")
    cells = "".join(f"{seg['mean_dice'][r]['mean']:>9.3f}+-{seg['mean_dice'][r]['std']:.3f}" for r in rows)
    print(f"{'subcortical Dice (raw: intensity)':34}{cells}{seg['paired_gain']['mean']:>+11.3f}+-{seg['paired_gain']['std']:.3f}")
    gain = probe["paired_gain"]["logreg_mirrored"]
    print(f"learning {'shown' if report['learning_shown'] else 'NOT shown'}: mirrored gain {gain['mean']:+.3f}"
          f" vs 2 std {2 * gain['std']:.3f}; run directory {run}")


if __name__ == "__main__":
    main()
