"""Typed errors. Each maps to one stable exit code; ``main()`` renders them as one line.

Exit codes (GUIDE §2): 0 success, 1 bad input or failed operation, 2 usage error
(Typer's own), 3 a verification or fidelity gate failed.
"""

from __future__ import annotations

from pathlib import Path

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_VERIFICATION = 3


def _escape_controls(text: str) -> str:
    """A file name with a newline (or another control character) would break the one-line error:
    write those characters as Python escapes (``\\n``)."""
    return "".join(c.encode("unicode_escape").decode("ascii") if ord(c) < 32 or ord(c) == 127 else c for c in text)


class LorasurgeonError(Exception):
    """Base class. ``kind`` is a stable machine-readable name, ``path`` the file concerned."""

    kind: str = "error"
    exit_code: int = EXIT_ERROR

    def __init__(self, message: str, path: str | Path | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.path = str(path) if path is not None else None

    def one_line(self) -> str:
        """The message as a single line, prefixed with the path when there is one."""
        msg = " ".join(self.message.split())
        line = f"{_escape_controls(self.path)}: {msg}" if self.path else msg
        # "error: " + this stays within 400 characters (long lists of names); --json keeps it whole
        return line if len(line) <= 393 else line[:392] + "…"

    def to_json(self) -> dict[str, str | None]:
        return {"kind": self.kind, "message": " ".join(self.message.split()), "path": self.path}


class InputNotFoundError(LorasurgeonError):
    kind = "not_found"


class FormatError(LorasurgeonError):
    """A file exists but is not a valid checkpoint/adapter of the kind it claims to be."""

    kind = "format"


class UnsafeFileError(FormatError):
    """Loading the file would run code or reach outside its folder."""

    kind = "unsafe"


class UnsupportedError(LorasurgeonError):
    """A valid input this tool refuses on purpose (e.g. LoHa, unmerging DoRA)."""

    kind = "unsupported"


class InvalidOptionError(LorasurgeonError):
    """An option value that Typer accepted but that makes no sense for this input."""

    kind = "invalid_option"


class MatchError(LorasurgeonError):
    """A pattern or adapter target matched nothing or the wrong shape."""

    kind = "unmatched"


class OutputExistsError(LorasurgeonError):
    kind = "output_exists"


class WriteError(LorasurgeonError):
    kind = "write_failed"


class VerificationError(LorasurgeonError):
    """A verification or fidelity gate failed (exit 3)."""

    kind = "verification_failed"
    exit_code = EXIT_VERIFICATION
