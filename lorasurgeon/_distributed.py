"""Which torchrun worker this is, and a flag in torchrun's own store that a worker has reported
a failure, so that a failure is reported once per run rather than once per process.

torchrun (``TORCHELASTIC_USE_AGENT_STORE=True``) serves a key-value store from its agent process
at ``MASTER_ADDR:MASTER_PORT``; it outlives the workers, so a worker can ask it whether another
has already printed an error, before or after the process group exists (``output exists`` is
found before training starts), and whether or not that worker is still alive.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import time
from typing import Any

_WAIT_S = 3.0  # how long a worker waits for another's report of a failure before giving its own


def world_size() -> int:
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def process_rank() -> int:
    try:
        return int(os.environ.get("RANK", "0") or 0)
    except ValueError:
        return 0


def _key() -> str:
    return (f"lorasurgeon/reported/{os.environ.get('TORCHELASTIC_RUN_ID', '')}/"
            f"{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}")


def _store() -> Any | None:
    """A client of torchrun's agent store, or None (not under torchrun, or no agent store)."""
    if world_size() <= 1 or os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    try:
        import torch.distributed as dist

        return dist.TCPStore(os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), is_master=False,
                             timeout=datetime.timedelta(seconds=2))
    except Exception:  # noqa: BLE001 - reporting must never fail because the store cannot be reached
        return None


def mark_reported() -> None:
    """This worker has printed its error line (and JSON object): the others stay quiet."""
    store = _store()
    if store is not None:
        with contextlib.suppress(Exception):
            store.set(_key(), "1")


def reported(wait_s: float = _WAIT_S) -> bool:
    """Whether a worker reports (has reported, or does within ``wait_s``) a failure of the run."""
    store = _store()
    if store is None:
        return False
    deadline = time.monotonic() + wait_s
    while True:
        try:
            if store.check([_key()]):
                return True
        except Exception:  # noqa: BLE001
            return False
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.05)


def is_peer_failure(e: BaseException) -> bool:
    """An error of the collective layer (gloo, NCCL) in a multi-process run: another worker
    stopped, so this one cannot go on. Not a bug of ours."""
    if world_size() <= 1:
        return False
    with contextlib.suppress(ImportError, AttributeError):
        import torch.distributed as dist

        if isinstance(e, dist.DistError):
            return True
    text = str(e)
    return any(s in text for s in ("gloo/transport", "Connection reset by peer", "Connection closed by peer",
                                   "NCCL error", "ProcessGroupNCCL", "ProcessGroupGloo"))
