"""The `editguard` command: global options, the error handler, and the command registry."""

from __future__ import annotations

import os
import sys
import traceback

import click
import typer

from .. import __version__
from ..errors import EXIT_ERROR, EditguardError
from . import state
from .output import FORMATS

app = typer.Typer(
    name="editguard",
    help="Find, reverse and block knowledge edits (ROME, MEMIT) in transformer checkpoints.\n\n"
    "Exit codes: 0 clean, 1 findings, 2 error or bad input, 3 unsupported model.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _version(value: bool) -> None:
    if value:
        print(f"editguard {__version__}")
        raise typer.Exit()


@app.callback()
def _global(
    format: str = typer.Option("human", "--format", "-f", help="human (text on stderr) | json | sarif (on stdout)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only results and errors; no progress."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail; tracebacks for internal errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    if format not in FORMATS:
        raise EditguardError(f"unknown --format {format!r}; choose one of {', '.join(FORMATS)}")
    state.configure(format=format, quiet=quiet, verbose=verbose)


def _register() -> None:
    # Each command lives in its own module and adds itself to `app` on import.
    from . import demo_cmd, edit_cmd, fetch_cmd, harden_cmd, inspect_cmd, scan_cmd, train_cmd  # noqa: F401


_register()


def main(argv: list[str] | None = None) -> int:
    """Entry point: every expected failure becomes one line on stderr and an exit code."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=argv, prog_name="editguard", standalone_mode=False)
        # without standalone mode click returns typer.Exit's code instead of raising it
        return code if isinstance(code, int) else 0
    except EditguardError as exc:
        state.out().error(exc.message, exc.exit_code)
        return exc.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:  # usage errors: bad option, missing argument
        exc.show()
        return EXIT_ERROR
    except (click.Abort, KeyboardInterrupt):
        state.out().error("interrupted", 130)
        return 130
    except Exception as exc:  # a bug: still one line unless asked for the traceback
        if state.out().verbose or os.environ.get("EDITGUARD_DEBUG"):
            traceback.print_exc()
        state.out().error(f"internal error: {exc.__class__.__name__}: {exc} (rerun with --verbose for a traceback)",
                          EXIT_ERROR)
        return EXIT_ERROR


def run() -> None:
    sys.exit(main())
