"""The console script's first and last step: quiet signal handling while the (heavy) imports
run and while the interpreter tears down.

``lorasurgeon`` and ``python -m lorasurgeon`` start here, not in ``cli/app.py``: importing the
app loads torch and the commands (about a second), and a Ctrl-C in that window, or in the
teardown after the command, must end the process like any other interruption (exit 130; SIGTERM
143), without a traceback.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from types import FrameType


def _interrupted_while_starting(signum: int, frame: FrameType | None) -> None:
    os._exit(128 + signum)  # before the command runs, or after it is done: no clean-up to do


def main() -> None:
    """Console entry point: ``cli.app.main`` once the imports are done."""
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s, handler in previous.items():
        if handler is not signal.SIG_IGN:  # ignored by the parent (a background job): leave it so
            signal.signal(s, _interrupted_while_starting)
    try:
        from lorasurgeon.cli.app import main as run
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    try:
        run()
        code: object = 0
    except SystemExit as e:
        code = e.code
    try:
        sys.stdout.flush()
    except BrokenPipeError:  # the reader left after the command's last write: a quiet 141
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        from lorasurgeon.cli.output import EXIT_BROKEN_PIPE  # (loaded with the app already)

        code = EXIT_BROKEN_PIPE if code in (0, None) else code
    except (OSError, ValueError, AttributeError):  # (AttributeError: started with stdout closed, None)
        pass
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stderr.flush()
    if isinstance(code, str):  # sys.exit("message"): print it, exit 1, as Python would
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sys.stderr.write(code + "\n")
            sys.stderr.flush()
        code = 1
    # Every output is committed (fsynced, renamed) and every worker thread joined before a
    # command returns, so the interpreter's teardown has nothing left to do for us: skip it.
    # It is a noticeable pause with torch loaded, and Python restores the default signal actions
    # early in it, so a Ctrl-C there killed the process by the signal (-2 to a harness).
    os._exit(code if isinstance(code, int) else 0)
