"""The wall-clock deadline (``time.monotonic()``) of a checkpoint evaluation, checked inside
each part's loops so one slow part (passkey at 16x the context) cannot overrun
``--time-limit``. Every loop scores at least its first item, so a started part always has a
result; items not reached are ``None`` and the result says ``stopped_by_time_limit``."""
from __future__ import annotations

import time


def time_is_up(deadline: float | None) -> bool:
    return deadline is not None and time.monotonic() >= deadline
