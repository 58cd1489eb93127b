"""`python -m ds_simclr.launch --signal-ranks RUN_DIR SIGNUM`: what a remote stop request runs on a host."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

from ds_simclr.launch.supervise import signal_ranks


def _main(argv: list[str]) -> int:
    """`python -m ds_simclr.launch --signal-ranks RUN_DIR SIGNUM` (what remote stop requests run)."""
    if len(argv) != 3 or argv[0] != "--signal-ranks":
        print("usage: python -m ds_simclr.launch --signal-ranks RUN_DIR SIGNUM", file=sys.stderr)
        return 2
    sent = signal_ranks(Path(argv[1]), int(argv[2]))
    print(f"{socket.gethostname()}: signalled {len(sent)} rank(s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
