"""A transient progress bar on stderr for the commands that can take more than a few seconds.

It draws only on an interactive terminal (as the trainer's bar and the live canvas do), so stdout stays clean for
the result, a pipe or a log file gets nothing, and `--json` turns it off. It disappears when the work is done.
A `Bar` is also a callback: call it (with anything: a StepEvent, a forward hook's arguments) to advance by one.

    with Bar("eval", total=len(batches), enabled=not args.json) as bar:
        for b in batches: ...; bar.advance()
"""

from __future__ import annotations

from typing import Any


class Bar:
    """A rich progress bar (label, bar, done/total, elapsed, remaining) that is a no-op when disabled."""

    def __init__(self, label: str, total: int | None, enabled: bool = True, console: Any = None) -> None:
        from rich import progress as rp
        from rich.console import Console

        console = console if console is not None else Console(stderr=True)
        interactive = console.is_terminal and not console.is_dumb_terminal
        self.progress = rp.Progress(rp.TextColumn(f"[bold]{label}[/]"), rp.BarColumn(), rp.MofNCompleteColumn(),
                                    rp.TimeElapsedColumn(), rp.TextColumn("eta"), rp.TimeRemainingColumn(),
                                    console=console, transient=True, disable=not (enabled and interactive))
        self.task = self.progress.add_task(label, total=total)

    def __enter__(self) -> Bar:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    @property
    def shown(self) -> bool:
        """Does it draw (enabled, on an interactive terminal)? Callers may skip the work of feeding it otherwise."""
        return not self.progress.disable

    @property
    def completed(self) -> float:
        return self.progress.tasks[0].completed

    def advance(self, n: float = 1) -> None:
        self.progress.advance(self.task, n)

    def __call__(self, *_: Any) -> None:
        self.advance()
