"""torchrun as `launch` runs it: `python -m ds_simclr.launch.torchrun ARGS` is `torchrun ARGS`, except
that a failed rank ends it with that rank's exit status and without torchrun's own traceback.

The rank has already said why it stopped (one line, or its traceback); `launch` then explains how
the job ended. torchrun itself reports a failed rank by raising `ChildFailedError` out of its main
(a traceback and a box, exit status 1), and a signal by raising `SignalException`.
"""

from __future__ import annotations

import sys

from torch.distributed.elastic.multiprocessing.api import SignalException
from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
from torch.distributed.run import parse_args, run


def main(argv: list[str]) -> int:
    """Run torchrun with `argv`; the first failed rank's exit status (128 + N for signal N)."""
    try:
        run(parse_args(argv))
    except ChildFailedError as exc:
        _, failure = exc.get_first_failure()
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    except SignalException as exc:
        return 128 + int(exc.sigval)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
