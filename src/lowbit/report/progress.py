"""Progress bars for long work, on stderr so --json output on stdout stays clean."""

from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

_console = Console(stderr=True)


@contextmanager
def progress(label: str, total: int) -> Iterator[Callable[..., None]]:
    """Yield `advance(*_)`; the bar is hidden when stderr is not a terminal."""
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), console=_console, transient=True, disable=not sys.stderr.isatty())
    with bar:
        task = bar.add_task(label, total=total)
        yield lambda *_: bar.advance(task)


def info(message: str) -> None:
    _console.print(message, highlight=False)
