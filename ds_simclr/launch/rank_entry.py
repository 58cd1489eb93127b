"""A rank's entry point as a file, for launchers that run `python FILE ARGS` and cannot say `-m`
(DeepSpeed's `slurm` back-end starts `srun ... python -u <script> <args>`)."""

import sys

if __name__ == "__main__":
    sys.path.pop(0)  # run as a file: this folder must not shadow installed modules
    from ds_simclr.cli import main

    sys.exit(main())
