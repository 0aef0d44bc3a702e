"""Facts about the machine this process runs on (kept free of torch, so the collector can import it cheaply)."""

from __future__ import annotations

import os


def available_cores() -> int:
    """CPU cores this process may run on (the affinity mask, which containers often narrow)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
