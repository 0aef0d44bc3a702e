"""The options of an entry point as a record, and what changed since a record was written.

Entry points that continue interrupted work (downstream/rl.py, downstream/loop.py) write their options next to
the work and refuse to continue it with others. An option added to the package later is absent from an older
record; its default keeps the behaviour from before it existed, so the default stands in for it.
"""

from __future__ import annotations

from collections.abc import Mapping, Set
from dataclasses import asdict
from pathlib import Path
from typing import Any


def plain_options(args: Any) -> dict[str, Any]:
    """A dataclass of options as JSON-ready values (paths as strings)."""
    return {key: (str(value) if isinstance(value, Path) else value) for key, value in asdict(args).items()}


def changed_options(
    recorded: Mapping[str, Any], current: Mapping[str, Any], defaults: Mapping[str, Any], free: Set[str] = frozenset()
) -> list[str]:
    """Names of the options whose recorded value differs from the current one, ``free`` ones aside; an option
    the record predates counts as its value in ``defaults`` (plain form, as ``plain_options``)."""
    stored = {**{key: value for key, value in defaults.items() if key not in recorded}, **recorded}
    return sorted(key for key in (stored.keys() | current.keys()) - free if stored.get(key) != current.get(key))
