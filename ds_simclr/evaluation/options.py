"""The `eval:` section of the run spec (pydantic only; nothing heavy is imported)."""

from __future__ import annotations

from pydantic import Field

from ds_simclr.specbase import StrictModel


class EvalSpec(StrictModel):
    """Online evaluation: the cheap version of `ds_simclr evaluate`'s region probe, run by rank 0
    during pretraining on the embedded evaluation volume (FSL MNI152 + Harvard-Oxford)."""

    every_steps: int = Field(0, ge=0)
    """Probe the encoder every this many optimizer steps (0 = never): balanced accuracies of a
    logistic regression and a kNN on the mirrored right hemisphere (`probe_logreg_mirrored`,
    `probe_knn_mirrored`) and the probe's cost (`time_eval_s`) go into that step's metrics row and
    to W&B. `launch` prepares the volume before the ranks start; rank 0 probes while the others
    wait, so keep it cheap with a small `patch_size` (the quickstart's probe, every 10 % of its run,
    costs under 5 % of its training time)."""

    patches_per_class: int = Field(8, ge=2, le=256)
    """Probe patches per region and hemisphere (7 regions; the left hemisphere trains, the right one
    tests). Cost and steadiness of the number grow with it."""

    patch_size: int | None = Field(None, ge=8, le=512)
    """Edge (voxels, 1 mm) of the probe patches; default `views.output_size`, the size the encoder
    sees. Smaller is cheaper (cost grows with its cube); it must fit the encoder."""
