"""``python bench/profiled.py OUT serve ...``: ``gateway.cli`` with cProfile switched on by
SIGUSR1 and off (written to OUT) by SIGUSR2, so a bench profiles the window it measures, not
the start (``bench/fleet.py --profile``)."""

from __future__ import annotations

import cProfile
import runpy
import signal
import sys
import time
from typing import Any


def main() -> None:
    out = sys.argv[1]
    sys.argv = ["gateway.cli", *sys.argv[2:]]
    # CPU time of the loop's thread, not wall time: on a shared machine a write that lets
    # another process run would otherwise be charged the time the scheduler took away.
    profile = cProfile.Profile(time.thread_time)

    def start(*_: Any) -> None:
        profile.enable()

    def stop(*_: Any) -> None:
        profile.disable()
        profile.dump_stats(out)

    signal.signal(signal.SIGUSR1, start)
    signal.signal(signal.SIGUSR2, stop)
    runpy.run_module("gateway.cli", run_name="__main__")


if __name__ == "__main__":
    main()
