"""Durations as users write them in configs and on the command line (``15m``, ``1h30m``, ``none``).

Free of heavy imports: the config reads it when it validates ``train.time_budget``.
"""

from __future__ import annotations

import math
import re

_UNITS = {"s": 1.0, "sec": 1.0, "m": 60.0, "min": 60.0, "h": 3600.0, "hr": 3600.0}


def parse_duration(value: str | float | int | None) -> float | None:
    """Seconds of a duration: ``15m``, ``90s``, ``1h30m``, ``1.5h``, a number of seconds, or
    ``none`` / None (no budget).

    Raises:
        ValueError: anything else, with the accepted forms.
    """
    if value is None:
        return None
    if isinstance(value, bool):
        raise ValueError(f"time budget {value!r}: use a duration such as 15m, 90s, 1h30m, or none")
    if isinstance(value, int | float):
        seconds = float(value)
    else:
        text = value.strip().lower().replace(" ", "")
        if text in ("none", "off", "null", ""):
            return None
        parts = re.findall(r"(\d+(?:\.\d+)?)(hr|h|min|m|sec|s)?", text)
        if not parts or "".join(n + u for n, u in parts) != text:
            raise ValueError(f"time budget {value!r}: use a duration such as 15m, 90s, 1h30m, or none")
        if len(parts) > 1 and any(not u for _, u in parts):
            raise ValueError(f"time budget {value!r}: give every number a unit (h, m, s), e.g. 1h30m")
        seconds = sum(float(n) * _UNITS[u or "s"] for n, u in parts)
    if not math.isfinite(seconds) or seconds <= 0:
        raise ValueError(f"time budget {value!r}: must be a positive duration, or none")
    return seconds
