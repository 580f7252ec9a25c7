"""`llmcli average`: average the weights of a run's last checkpoints. Parse, call `llmcli.average`, print."""

from __future__ import annotations

import typer


def average_command(
    checkpoints: list[str] = typer.Argument(
        ..., metavar="CKPT", help="Model directories of one run, e.g. RUN/checkpoints/step-*.", show_default=False
    ),
    out: str = typer.Option(..., "--out", "-o", help="Model directory to write.", show_default=False),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="No log line on stderr (errors still appear)."),
) -> None:
    """Average the weights of several checkpoints of one run (the last 5 or so: a standard gain
    for translation). Train with --keep-checkpoints N to have them.

    Example: llmcli average en-de/checkpoints/step-* --out en-de-avg
    """
    from llmcli.average import average_checkpoints
    from llmcli.io import info, settings

    settings.quiet = quiet
    path = average_checkpoints(checkpoints, out)
    info(f"averaged {len(checkpoints)} checkpoints into {path}")
