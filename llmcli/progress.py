"""Progress on stderr: a rich bar on a terminal, nothing per step otherwise.

Log lines (validation results, summaries) are printed unless --quiet; the bar appears
only when stderr is a terminal. NO_COLOR is honoured by rich itself.
"""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def stderr_console() -> Console:
    return Console(stderr=True, highlight=False, soft_wrap=True)


class TrainReporter:
    def __init__(self, quiet: bool = False):
        self.quiet = quiet
        self.console = stderr_console()
        self.show_bar = not quiet and sys.stderr.isatty()
        self.bar: Progress | None = None
        self.task = None

    def start(self, total_steps: int, first_step: int) -> None:
        if not self.show_bar:
            return
        self.bar = Progress(
            TextColumn("[bold]train[/]"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[tps]} tok/s"),
            TimeElapsedColumn(),
            TextColumn("eta"),
            TimeRemainingColumn(),
            console=self.console,
            transient=False,
        )
        self.bar.start()
        self.task = self.bar.add_task("train", total=total_steps, completed=first_step, loss="-", lr="-", tps="-")

    def step(self, report) -> None:
        if self.bar is not None:
            self.bar.update(
                self.task,
                completed=report.step,
                total=report.max_steps,  # a time budget's horizon moves as the pace is measured
                loss=f"{report.loss:.3f}",
                lr=f"{report.lr:.2e}",
                tps=f"{report.tokens_per_second:,.0f}",
            )

    def log(self, message: str) -> None:
        if not self.quiet:
            self.console.print(message, markup=False)

    def stop(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


class LineProgress:
    """lines/s and tokens/s for the task commands, on a terminal only."""

    def __init__(self, quiet: bool = False, label: str = "lines"):
        self.enabled = not quiet and sys.stderr.isatty()
        self.label = label
        self.bar: Progress | None = None

    def __enter__(self) -> LineProgress:
        if self.enabled:
            self.bar = Progress(
                TextColumn(f"[bold]{self.label}[/]"),
                TextColumn("{task.completed} lines  {task.fields[rate]}"),
                TimeElapsedColumn(),
                console=stderr_console(),
                transient=True,
            )
            self.bar.start()
            self.task = self.bar.add_task(self.label, total=None, rate="")
        return self

    def update(self, lines: int, tokens: int, seconds: float) -> None:
        if self.bar is not None and seconds > 0:
            self.bar.update(self.task, completed=lines, rate=f"{lines / seconds:,.1f} lines/s  {tokens / seconds:,.0f} tok/s")

    def __exit__(self, *exc) -> None:
        if self.bar is not None:
            self.bar.stop()
