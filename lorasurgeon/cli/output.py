"""Rendering: results on stdout (rich tables, or JSON with --json), logs and progress on stderr."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from lorasurgeon._distributed import is_peer_failure, mark_reported, process_rank, reported, world_size
from lorasurgeon._finite import json_safe
from lorasurgeon._units import human_bytes  # noqa: F401 - the commands' renderers use it from here
from lorasurgeon.errors import EXIT_ERROR, LorasurgeonError, WriteError

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell reports for a tool killed by a closed pipe

ProgressFn = Callable[[int, int, str], None]
LOG_EVERY_S = 5.0


def _is_tty(stream: Any) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


def _tolerant(stream: Any) -> Any:
    """File names may hold bytes that are not UTF-8 (Python keeps them as surrogate escapes): print
    them backslash-escaped, as stderr does, instead of failing on a strict UTF-8 stdout."""
    if getattr(stream, "errors", None) == "strict":
        with contextlib.suppress(AttributeError, ValueError, OSError):
            stream.reconfigure(errors="backslashreplace")
    return stream


def secondary_process() -> bool:
    """A torchrun worker other than rank 0: it trains its shard but prints no result and no log
    (rank 0 speaks for the run, as it alone writes the output)."""
    return process_rank() != 0


class _StdoutGuard:
    """stdout for rich: a failed write (a full disk, an I/O error) is the command's one-line
    ``WriteError`` naming ``<stdout>``, not an internal error; a closed pipe stays a
    BrokenPipeError (a quiet 141)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        with _stdout_errors():
            return int(_open_stdout(self._stream).write(text))

    def flush(self) -> None:
        with _stdout_errors():
            _open_stdout(self._stream).flush()

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _open_stdout(stream: Any) -> Any:
    """stdout, or the command's one-line error when the process started with it closed (``>&-``:
    Python then has None there)."""
    if stream is None:
        raise WriteError("write failed: stdout is closed", "<stdout>")
    return stream


@contextlib.contextmanager
def _stdout_errors() -> Iterator[None]:
    try:
        yield
    except BrokenPipeError:
        raise
    except OSError as e:
        raise WriteError(f"write failed: {e.strerror or e}", "<stdout>") from None


def stdout_console() -> Console:
    tty = _is_tty(sys.stdout)
    return Console(file=_StdoutGuard(_tolerant(sys.stdout)), width=None if tty else 160, soft_wrap=False,
                   highlight=False, quiet=secondary_process())


def stderr_console() -> Console:
    tty = _is_tty(sys.stderr)
    return Console(file=sys.stderr, width=None if tty else 160, highlight=False, stderr=True)


def print_json(obj: Any, *, any_process: bool = False) -> None:
    """The --json object on stdout; under torchrun from rank 0 only, unless ``any_process`` (a
    worker's own failure, which rank 0 does not know of)."""
    if secondary_process() and not any_process:
        return
    _write_stdout(json.dumps(json_safe(obj), indent=2, sort_keys=False, default=str, allow_nan=False) + "\n")


def _write_stdout(text: str) -> None:
    """All of ``text`` on stdout, or an error: written to the file descriptor in 64 KiB pieces, so
    that a reader that leaves (``| head -c 1``) is a BrokenPipeError (a quiet 141) however large
    the output (a buffered write of a large string can stop short without one), and a full disk
    a ``WriteError``."""
    with _stdout_errors():
        _open_stdout(sys.stdout).flush()
        try:
            fd = sys.stdout.fileno()
        except (AttributeError, ValueError, OSError):  # a captured stdout (tests, notebooks)
            sys.stdout.write(text)
            sys.stdout.flush()
            return
        view = memoryview(text.encode(sys.stdout.encoding or "utf-8", errors="backslashreplace"))
        while view:
            view = view[os.write(fd, view[: 1 << 16]):]


def _write_stderr(text: str) -> None:
    """Logs and error lines: a stderr that cannot be written (``2>/dev/full``, closed) must not
    change the command's result or keep its --json object off stdout."""
    with contextlib.suppress(OSError, ValueError, AttributeError):  # (AttributeError: started with 2>&-, None)
        sys.stderr.write(text)
        sys.stderr.flush()


def log(message: str, quiet: bool = False) -> None:
    """One line on stderr, unless --quiet (or in a torchrun worker other than rank 0)."""
    if not quiet and not secondary_process():
        _write_stderr(message.rstrip() + "\n")


@contextlib.contextmanager
def progress(label: str, quiet: bool = False) -> Iterator[ProgressFn]:
    """A progress callback (done, total, item): a bar on a TTY; otherwise a plain log line
    every few seconds so CI logs show progress; nothing with --quiet or in a secondary process."""
    if quiet or secondary_process():
        yield lambda done, total, item: None
        return
    if _is_tty(sys.stderr):
        with Progress(
            TextColumn(f"[bold]{label}[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[item]}"),
            console=stderr_console(),
            transient=True,
        ) as bar:
            task = bar.add_task(label, total=None, item="")

            def update(done: int, total: int, item: str) -> None:
                bar.update(task, completed=done, total=total, item=item)

            yield update
        return
    state = {"last": 0.0, "start": time.monotonic()}

    def update_plain(done: int, total: int, item: str) -> None:
        now = time.monotonic()
        if done == 0 and state["last"] == 0.0:
            state["last"] = now
            return
        if now - state["last"] >= LOG_EVERY_S or (done == total and now - state["start"] >= LOG_EVERY_S):
            state["last"] = now
            log(f"{label}: {done}/{total} {item}".rstrip())

    yield update_plain


@contextlib.contextmanager
def handle_errors(json_mode: bool) -> Iterator[None]:
    """Turn a LorasurgeonError into one line on stderr (and the JSON error object on stdout
    with --json) and its exit code. Anything else becomes an internal error line, exit 1;
    LORASURGEON_DEBUG=1 shows the traceback."""
    debug = os.environ.get("LORASURGEON_DEBUG") == "1"
    try:
        yield
    except LorasurgeonError as e:
        if debug:
            traceback.print_exc()
        report_error(e.one_line(), e.to_json(), json_mode)
        raise typer.Exit(e.exit_code) from None
    except (typer.Exit, typer.Abort, KeyboardInterrupt, SystemExit):
        raise
    except BrokenPipeError:
        exit_broken_pipe()
    except Exception as e:  # noqa: BLE001 - the last line of defence: no traceback for users
        if debug:
            traceback.print_exc()
        msg = " ".join(str(e).split()) or type(e).__name__
        if is_peer_failure(e):  # torchrun: another worker stopped (its own error, a signal, a crash)
            report_error(f"another process of this torchrun run stopped ({msg[:200]})",
                         {"kind": "peer", "message": msg[:300], "path": None}, json_mode, secondary=True)
        else:
            report_error(f"internal error ({type(e).__name__}: {msg[:300]}); rerun with LORASURGEON_DEBUG=1 and report it",
                         {"kind": "internal", "message": msg[:300], "path": None}, json_mode)
        raise typer.Exit(EXIT_ERROR) from None


def report_error(line: str, obj: dict[str, Any], json_mode: bool, *, secondary: bool = False) -> None:
    """``error: <line>`` on stderr and, with --json, ``{"error": obj}`` on stdout: once per run.

    Under torchrun every worker meets most failures (bad options, an existing output): rank 0
    reports them at once, and each report is marked in torchrun's store. Another worker prints
    nothing if a report comes within a few seconds, and otherwise its own failure (a shard's bad
    data, rank 0 gone), with its rank; so does rank 0 for a ``secondary`` failure (its peer
    stopped). torchrun stops the other workers when one exits with an error, so a worker other
    than rank 0 must not exit before rank 0 has had its say."""
    r = process_rank() if world_size() > 1 else 0
    if world_size() > 1 and (r != 0 or secondary) and reported():
        return
    if r != 0:
        line, obj = f"rank {r}: {line}", {**obj, "rank": r}
    _write_stderr(f"error: {line}\n")
    if json_mode:
        with contextlib.suppress(OSError, LorasurgeonError):  # stdout is what failed, or its reader left
            print_json({"error": obj}, any_process=True)
    if world_size() > 1:
        mark_reported()


def exit_broken_pipe() -> None:
    """The reader of stdout went away (``| head``): stop quietly with 141 (128 + SIGPIPE), as Unix
    tools do. Outputs already written stay written; stdout goes to /dev/null so that Python's
    final flush does not fail again."""
    with contextlib.suppress(OSError):
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    raise typer.Exit(EXIT_BROKEN_PIPE)


def human_count(n: float) -> str:
    for unit in ("", "K", "M", "B"):
        if abs(n) < 1000 or unit == "B":
            return f"{n:.0f}" if unit == "" else f"{n:.2f}{unit}"
        n /= 1000
    return f"{n:.2f}B"
