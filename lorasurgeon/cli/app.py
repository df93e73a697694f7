"""The root Typer app. Commands register themselves here; ``main()`` is the console script."""

from __future__ import annotations

import contextlib
import os
import sys
import traceback

import typer

from lorasurgeon._distributed import world_size
from lorasurgeon._version import __version__
from lorasurgeon.cli.output import EXIT_BROKEN_PIPE, exit_broken_pipe, handle_errors
from lorasurgeon.errors import EXIT_ERROR, InvalidOptionError
from lorasurgeon.io.writer import install_cli_sigterm

app = typer.Typer(
    name="lorasurgeon",
    help="Low-rank surgery on model checkpoints and LoRA adapters.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lorasurgeon {__version__}")
        raise typer.Exit(0)


TRAINING_COMMANDS = ("attach", "distill")  # the commands that train across torchrun workers


@app.callback()
def root(
    ctx: typer.Context,
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    """lorasurgeon: low-rank surgery on model checkpoints."""
    n = world_size()
    if n > 1 and ctx.invoked_subcommand is not None and ctx.invoked_subcommand not in TRAINING_COMMANDS:
        # every worker would run the whole command and write the same output
        with handle_errors("--json" in sys.argv[1:]):
            raise InvalidOptionError(f"{ctx.invoked_subcommand} runs as one process; run it without torchrun "
                                     f"(WORLD_SIZE={n}): only {' and '.join(TRAINING_COMMANDS)} train across processes")


def _register() -> None:
    from lorasurgeon.cli import convert_cmd, factorize_cmd, inspect_cmd, merge_cmd, resize_cmd, train_cmd

    inspect_cmd.register(app)
    factorize_cmd.register(app)
    resize_cmd.register(app)
    from lorasurgeon.cli import compose_cmd

    compose_cmd.register(app)
    merge_cmd.register(app)
    convert_cmd.register(app)
    train_cmd.register(app)
    from lorasurgeon.cli import export_cmd

    export_cmd.register(app)


_register()


def main() -> None:
    """Console entry point. Commands map their own errors to exit codes; this is the net for
    anything that escapes, so users never see a traceback unless LORASURGEON_DEBUG=1."""
    from lorasurgeon._malloc import limit_heap_retention

    limit_heap_retention()  # bounded memory when streaming large checkpoints (see _malloc)
    install_cli_sigterm()  # SIGTERM: clean up, exit 143 silently, whenever it comes
    # rich (our tables, and typer's --help) answers a closed stdout with exit 1 and no message;
    # the contract is a quiet 141, as with --json (docs/recipes.md, exit codes)
    from rich.console import Console

    Console.on_broken_pipe = lambda self: exit_broken_pipe()  # type: ignore[method-assign]
    try:
        app(prog_name="lorasurgeon")
    except SystemExit as e:
        # click's own answer to a closed stdout (e.g. --help | true) is exit 1, after wrapping stdout
        # in its PacifyFlushWrapper (typer vendors click: match the class by name)
        if e.code == 1 and type(sys.stdout).__name__ == "PacifyFlushWrapper":
            sys.exit(EXIT_BROKEN_PIPE)
        raise
    except KeyboardInterrupt:  # outside a command's own handling (typer's exit path): silent, as inside
        sys.exit(130)
    except BrokenPipeError:  # stdout closed outside a command's own handler (e.g. --help | head)
        try:
            exit_broken_pipe()
        except typer.Exit as e:
            sys.exit(e.exit_code)
    except Exception as e:  # noqa: BLE001
        if os.environ.get("LORASURGEON_DEBUG") == "1":
            traceback.print_exc()
        with contextlib.suppress(OSError, ValueError, AttributeError):
            sys.stderr.write(f"error: internal error ({type(e).__name__}: {' '.join(str(e).split())[:300]})\n")
        sys.exit(EXIT_ERROR)
