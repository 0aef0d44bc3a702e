"""worldmodel.options: options as a record, and what changed since one was written (known answers)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from worldmodel.options import changed_options, plain_options


@dataclass(frozen=True)
class Options:
    out: Path = Path("runs/x")
    steps: int = 3
    share: float = 0.0


def test_plain_options_are_json_ready() -> None:
    assert plain_options(Options()) == {"out": "runs/x", "steps": 3, "share": 0.0}


def test_changed_options_by_hand() -> None:
    defaults = plain_options(Options())
    current = plain_options(Options(steps=4))
    assert changed_options({"out": "runs/x", "steps": 4, "share": 0.0}, current, defaults) == []
    # A record written before `share` existed: its default stands in, so only a changed share differs.
    assert changed_options({"out": "runs/x", "steps": 4}, current, defaults) == []
    assert changed_options({"out": "runs/x", "steps": 4}, {**current, "share": 0.5}, defaults) == ["share"]
    assert changed_options({"out": "runs/y", "steps": 3}, current, defaults) == ["out", "steps"]
    assert changed_options({"out": "runs/y", "steps": 3}, current, defaults, free={"out"}) == ["steps"]
    # An option the package dropped since the record: it differs (the record asked for something not done now).
    assert changed_options({"out": "runs/x", "steps": 4, "share": 0.0, "old": 1}, current, defaults) == ["old"]
