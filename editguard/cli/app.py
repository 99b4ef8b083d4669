"""The `editguard` command: global options, the error handler, and the command registry."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sys
import threading
import traceback
import warnings

import click
import typer

from .. import __version__
from ..errors import EXIT_ERROR, EditguardError, EditguardWarning
from ..report.sarif import answer_sarif
from . import state
from .output import FORMATS

app = typer.Typer(
    name="editguard",
    help="Find, reverse and block knowledge edits (ROME, MEMIT) in transformer checkpoints.\n\n"
    "Exit codes: 0 clean, 1 findings, 2 error or bad input, 3 unsupported model, 130 interrupted, 143 terminated.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _print_version(format: str) -> None:
    if format == "json":
        print(json.dumps({"version": __version__}))
    elif format == "sarif":
        print(json.dumps(answer_sarif("--version", {"version": __version__})))
    else:
        print(f"editguard {__version__}")
    raise typer.Exit()


# --version answers in the chosen --format, whichever comes first on the command line: both options are
# eager (click runs eager callbacks in command-line order, then the ones not given), so the later of the
# two callbacks prints.
def _version(ctx: typer.Context, value: bool) -> None:
    if value:
        if "format" in ctx.params:
            _print_version(ctx.params["format"])
        ctx.meta["editguard_version"] = True


def _format(ctx: typer.Context, value: str) -> str:
    if value not in FORMATS:
        raise EditguardError(f"unknown --format {value!r}; choose one of {', '.join(FORMATS)}")
    if ctx.meta.get("editguard_version"):
        _print_version(value)
    return value


@app.callback()
def _global(
    ctx: typer.Context,
    format: str = typer.Option("human", "--format", "-f", callback=_format, is_eager=True,
                               help="human (text on stderr) | json | sarif (on stdout)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only results and errors; no progress."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="More detail; tracebacks for internal errors."),
    version: bool = typer.Option(False, "--version", callback=_version, is_eager=True, help="Print the version."),
) -> None:
    state.configure(format=format, quiet=quiet, verbose=verbose, command=ctx.invoked_subcommand)


def _register() -> None:
    # Each command lives in its own module and adds itself to `app` on import.
    from . import demo_cmd, edit_cmd, fetch_cmd, harden_cmd, inspect_cmd, scan_cmd, train_cmd  # noqa: F401


_register()


# Typer >= 0.29 raises its own bundled copy of click's exceptions; older Typer raises click's.
_USAGE_ERRORS = (click.ClickException, getattr(typer, "TyperException", click.ClickException))
_EXITS = (click.exceptions.Exit, typer.Exit)
_ABORTS = (click.Abort, typer.Abort, KeyboardInterrupt)
INTERRUPTED = 130


class _Terminated(BaseException):
    """SIGTERM as an exception, so the atomic writers' clean-up runs as it does for Ctrl-C."""


def _on_sigterm(signum, frame):
    raise _Terminated()


def _usage_message(exc: Exception) -> str:
    ctx = getattr(exc, "ctx", None)
    hint = f" (see '{ctx.command_path} --help')" if ctx is not None else ""
    return f"{exc.format_message()}{hint}"


def _early_format(args: list[str]) -> str:
    """The -f/--format value among the global options (those before the command name), if valid."""
    value = "human"
    args = iter(args)
    for arg in args:
        if arg in ("-f", "--format"):
            value = next(args, value)
        elif arg.startswith("--format="):
            value = arg.partition("=")[2]
        elif arg.startswith("-f") and len(arg) > 2:
            value = arg[2:]
        elif not arg.startswith("-"):
            break  # the command name: its own options are not global ones
    return value if value in FORMATS else "human"


def main(argv: list[str] | None = None) -> int:
    """Entry point: every expected failure becomes one line on stderr and an exit code."""
    command = typer.main.get_command(app)
    # errors raised before the global options are parsed (an unknown command, a bad global option) still
    # follow -f: read it off the command line first; and never a previous call's format
    state.configure(format=_early_format(sys.argv[1:] if argv is None else argv))
    # SIGTERM gets Ctrl-C's clean-up, unless someone chose a handler (or to ignore it) already
    catch_term = _main_thread() and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL
    if catch_term:
        signal.signal(signal.SIGTERM, _on_sigterm)
    try:
        with _warnings_as_lines():
            code = command.main(args=argv, prog_name="editguard", standalone_mode=False)
        # without standalone mode click returns typer.Exit's code instead of raising it; Typer turns
        # Ctrl-C into Exit(130) itself, before this handler sees it
        code = code if isinstance(code, int) else 0
        if code == INTERRUPTED:
            state.out().error("interrupted", INTERRUPTED)
        return code
    except EditguardError as exc:
        state.out().error(exc.message, exc.exit_code)
        return exc.exit_code
    except _EXITS as exc:
        return exc.exit_code
    except _USAGE_ERRORS as exc:  # usage errors: bad option, missing argument
        if exc.__class__.__name__ == "NoArgsIsHelpError":  # the help is already printed
            return EXIT_ERROR
        state.out().error(_usage_message(exc), EXIT_ERROR)
        return EXIT_ERROR
    except _ABORTS:
        state.out().error("interrupted", INTERRUPTED)
        return INTERRUPTED
    except _Terminated:
        state.out().error("terminated", 128 + signal.SIGTERM)
        return 128 + signal.SIGTERM
    except OSError as exc:  # the environment, not a bug: no permission, disk full, read-only file system
        where = f": {exc.filename}" if exc.filename else ""
        state.out().error(f"{exc.strerror or exc}{where}", EXIT_ERROR)
        return EXIT_ERROR
    except Exception as exc:  # a bug: still one line unless asked for the traceback
        verbose = state.out().verbose or os.environ.get("EDITGUARD_DEBUG")
        if verbose:
            traceback.print_exc()
        hint = "" if verbose else " (rerun with --verbose for a traceback)"
        state.out().error(f"internal error: {exc.__class__.__name__}: {exc}{hint}", EXIT_ERROR)
        return EXIT_ERROR
    finally:
        if catch_term:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


@contextlib.contextmanager
def _warnings_as_lines():
    """editguard's own warnings become one 'warning:' line each (once per message), not Python's
    two-line file:line format; other libraries' warnings are left as they are."""
    with warnings.catch_warnings():
        warnings.simplefilter("default", EditguardWarning)
        shown = warnings.showwarning

        def show(message, category, filename, lineno, file=None, line=None):
            if issubclass(category, EditguardWarning):
                state.out().warning(str(message))
            else:
                shown(message, category, filename, lineno, file, line)

        warnings.showwarning = show
        yield


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()

