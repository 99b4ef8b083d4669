"""One output switch for every command: human text on stderr, or one JSON (or SARIF) document on stdout."""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.markup import escape
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn

from ..outputs import finite_dumps
from ..report.sarif import answer_sarif, failure_sarif

FORMATS = ("human", "json", "sarif")


@dataclass
class Output:
    format: str = "human"
    quiet: bool = False
    verbose: bool = False
    command: str | None = None  # the command running, named in SARIF answers
    console: Console = field(default_factory=lambda: _stderr_console())
    emitted: bool = False  # one document on stdout: an error after the answer adds none

    @property
    def human(self) -> bool:
        return self.format == "human"

    def note(self, message: str) -> None:
        """A progress or status line: human mode only, silenced by --quiet."""
        if self.human and not self.quiet:
            self.console.print(message, style="dim", markup=False)  # messages carry names from the model

    def debug(self, message: str) -> None:
        if self.verbose and self.human:
            self.console.print(message, style="dim italic", markup=False)

    @contextlib.contextmanager
    def progress(self, description: str, total: int | None = None) -> Iterator[Callable[..., None]]:
        """A Rich progress bar (spinner when `total` is unknown); yields `advance(n=1, **fields)`.

        Off in json/sarif mode and with --quiet, so machine output stays clean.
        """
        if not self.human or self.quiet:
            yield lambda *a, **k: None
            return
        if not self.console.is_terminal:  # logs of background jobs: a plain line every half minute
            yield _LogProgress(self.console, description, total)
            return
        columns = [SpinnerColumn(), TextColumn("{task.description}")]
        if total is not None:
            columns += [BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn()]
        else:
            columns += [TimeElapsedColumn()]
        columns.append(TextColumn("{task.fields[info]}", style="cyan"))
        with Progress(*columns, console=self.console, transient=True) as bar:
            task = bar.add_task(description, total=total, info="")

            def advance(n: int = 1, info: str | None = None, description: str | None = None) -> None:
                kwargs: dict[str, Any] = {"advance": n}
                if info is not None:
                    kwargs["info"] = info
                if description is not None:
                    kwargs["description"] = description
                bar.update(task, **kwargs)

            yield advance

    def status_callback(self) -> Callable[[str], None]:
        return self.note

    def emit(self, data: Any, render: Callable[[Console, Any], None] | None = None, sarif: Any = None) -> None:
        """The command's result: JSON/SARIF on stdout, or `render` to stderr for people. A command without
        findings passes no `sarif`: its SARIF answer is an empty run that carries `data`."""
        if self.format == "json":
            self._write(data)
        elif self.format == "sarif":
            self._write(sarif if sarif is not None else answer_sarif(self.command, data))
        elif render is not None and not (self.quiet and data is None):
            render(self.console, data)

    def _write(self, document: Any) -> None:
        sys.stdout.write(finite_dumps(document, default=str) + "\n")
        self.emitted = True

    def warning(self, message: str) -> None:
        """Something to know that does not stop the work: on stderr in every format, silenced by --quiet."""
        if not self.quiet:
            self.console.print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False, soft_wrap=True)

    def error(self, message: str, exit_code: int) -> None:
        # the message may quote the command line or the model's config: never read it as markup, and a
        # line break inside what it quotes does not make it two lines
        line = message.replace("\r", "\\r").replace("\n", "\\n")
        self.console.print(f"[bold red]error:[/] {escape(line)}", highlight=False, soft_wrap=True)
        if self.emitted:
            return
        if self.format == "json":
            self._write({"error": message, "exit_code": exit_code})
        elif self.format == "sarif":  # a valid log that says the run failed, not an empty file
            self._write(failure_sarif(self.command, message, exit_code))


class _LogProgress:
    def __init__(self, console: Console, description: str, total: int | None, every: float = 30.0):
        self.console, self.description, self.total, self.every = console, description, total, every
        self.done, self.info, self.start = 0, "", time.time()
        self.last = self.start

    def __call__(self, n: int = 1, info: str | None = None, description: str | None = None) -> None:
        self.done += n
        self.info = info if info is not None else self.info
        self.description = description or self.description
        now = time.time()
        finished = self.total is not None and self.done >= self.total
        if now - self.last >= self.every or finished:
            self.last = now
            elapsed = now - self.start
            eta = ""
            if self.total and self.done:
                eta = f", eta {elapsed / self.done * (self.total - self.done):.0f} s"
            count = f"{self.done}/{self.total}" if self.total is not None else f"{self.done}"
            self.console.print(f"{self.description}: {count} ({elapsed:.0f} s{eta}) {self.info}", highlight=False)


def _stderr_console() -> Console:
    console = Console(stderr=True, highlight=False)
    if not console.is_terminal:  # logs and CI: do not squeeze tensor names into 80 columns
        console = Console(stderr=True, highlight=False, width=160)
    return console


def human_bytes(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} TB"
