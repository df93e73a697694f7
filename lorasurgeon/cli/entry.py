"""The console script's first step: quiet signal handling while the (heavy) imports run.

``lorasurgeon`` and ``python -m lorasurgeon`` start here, not in ``cli/app.py``: importing the
app loads torch and the commands (about a second), and a Ctrl-C or a closed pipe in that window
must end the process like any other interruption (exit 130, or 141), without a traceback.
"""

from __future__ import annotations

import os
import signal
import sys
from types import FrameType


def _interrupted_while_starting(signum: int, frame: FrameType | None) -> None:
    os._exit(128 + signum)  # nothing is written before the command runs: no clean-up to do


def main() -> None:
    """Console entry point: ``cli.app.main`` once the imports are done."""
    previous = signal.getsignal(signal.SIGINT)
    if previous is signal.SIG_IGN:  # ignored by the parent (a background job): leave it so
        from lorasurgeon.cli.app import main as run
    else:
        signal.signal(signal.SIGINT, _interrupted_while_starting)
        try:
            from lorasurgeon.cli.app import main as run
        finally:
            signal.signal(signal.SIGINT, previous)
    sys.exit(run())
