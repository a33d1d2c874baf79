"""Early stopping's bookkeeping: which evaluation a best epoch was (the patience grows with it)."""

from __future__ import annotations

from typing import Any


def evaluation_number(history: list[dict[str, Any]], epoch: int | None) -> int:
    """1-based number of the evaluation made after ``epoch`` (0 when there is none, or for epoch 0:
    the starting point of a warm start). Epochs that were not evaluated (``metrics`` empty) do not
    count."""
    if epoch is None:
        return 0
    return sum(1 for record in history if record.get("metrics") and record["epoch"] <= epoch)
