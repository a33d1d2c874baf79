"""The command line's side of ``train.time_budget``: the ``--time-budget`` option and the lines the
run summary prints about what the budget traded (from ``metrics.json``'s ``time_budget``)."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from recsys_metric.durations import parse_duration

if TYPE_CHECKING:
    from recsys_metric.config import Config  # annotations only: the CLI's query commands skip pydantic

TIME_BUDGET_HELP = (
    "wall-clock allowance for the whole run (train.time_budget): 15m, 90s, 1h30m, or none "
    "(train until early stopping); the run plans epochs, validation and the rate race from measured "
    "costs and stops with its best model so far (default: the config's, 30m)"
)


def time_budget_arg(text: str) -> str:
    """argparse ``type`` of ``--time-budget``: the text, once it parses as a duration."""
    try:
        parse_duration(text)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return text


def with_time_budget(config: Config, value: str | None) -> Config:
    """``config`` with ``train.time_budget`` set to ``value`` (unchanged when ``value`` is None)."""
    if value is None:
        return config
    return config.model_copy(update={"train": config.train.model_copy(update={"time_budget": value})})


def time_budget_lines(metrics: dict[str, Any]) -> list[str]:
    """What the run summary says about training's plan: the validation sample, the second phase
    after an early stop (``train.lr_drop``), and the budget's allowance and what it traded."""
    budget = metrics.get("time_budget") or {}
    lines: list[str] = []
    validation = budget.get("validation") or {}
    if validation.get("users") is not None:
        se = validation.get("standard_error")
        best = validation.get("best")
        text = f"validation: {validation['users']} of {validation['eligible_users']} users"
        if best is not None:
            text += f", best Recall {best:.4f}" + (f" (standard error {se:.4f})" if se is not None else "")
        lines.append(text)
    phase = budget.get("second_phase")
    if phase:
        # train.lr_drop after an early stop: what the second phase did, or why it did not run.
        where = (
            f" from epoch {phase['from_epoch']}, {phase['epochs_run']} epochs"
            if "epochs_run" in phase
            else ""
        )
        lines.append(f"second phase at lr {phase['lr']:g}{where}: {phase['outcome']}")
    if budget.get("seconds") is not None:
        head = f"time budget {budget['seconds']:.0f} s: training ended after {budget['elapsed_at_training_end']:.0f} s"
        traded = budget.get("traded") or []
        lines.append(head + ("; traded: " + "; ".join(traded) if traded else "; nothing traded"))
    return lines
