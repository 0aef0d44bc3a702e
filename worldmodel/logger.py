"""Run metrics to TensorBoard and to a JSON-lines file in the run directory (rank 0 only).

Each JSONL record is one object: ``{"kind": "train" | "eval" | "stage" | ..., "stage": ...,
"step": <step within the stage>, "global_step": <step over all stages>, "time": <unix s>, ...values}``.
The file is appended one line at a time and flushed, so a killed run leaves every completed record.
On ``--resume`` the records past the checkpoint's global step are dropped (the resumed run will write
them again), and TensorBoard's ``purge_step`` does the same for the event files.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Any

from worldmodel.atomic import atomic_write_text

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"


def _json_ready(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no inf/nan; keep the information as text
    return value


def truncate_records(path: Path, max_global_step: int) -> None:
    """Keep only the records at or before ``max_global_step`` (atomic rewrite)."""
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a line cut by a kill mid-write
        if int(record.get("global_step", 0)) <= max_global_step:
            kept.append(line)
    atomic_write_text(path, "".join(f"{line}\n" for line in kept))


class RunLogger:
    """Writes scalars to TensorBoard and records to ``metrics.jsonl``; inert on ranks other than 0."""

    def __init__(self, run_dir: Path, enabled: bool, resume_global_step: int | None = None) -> None:
        self.enabled = enabled
        self.path = run_dir / METRICS_FILE
        self._writer = None
        self._file = None
        if not enabled:
            return
        run_dir.mkdir(parents=True, exist_ok=True)
        if resume_global_step is not None:
            truncate_records(self.path, resume_global_step)
        from torch.utils.tensorboard import SummaryWriter  # slow import; only rank 0 pays it

        self._writer = SummaryWriter(
            log_dir=str(run_dir / TENSORBOARD_DIR), purge_step=resume_global_step
        )
        self._file = open(self.path, "a", encoding="utf-8")

    def log(
        self, kind: str, stage: str, step: int, global_step: int, values: dict[str, Any]
    ) -> None:
        """One record: numeric values also go to TensorBoard as ``<kind>/<stage>/<name>``."""
        if not self.enabled:
            return
        assert self._writer is not None and self._file is not None
        for name, value in values.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                self._writer.add_scalar(f"{kind}/{stage}/{name}", value, global_step)
        record = {"kind": kind, "stage": stage, "step": step, "global_step": global_step}
        record["time"] = round(time.time(), 3)
        record.update({name: _json_ready(value) for name, value in values.items()})
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def flush(self) -> None:
        if self.enabled and self._writer is not None and self._file is not None:
            self._writer.flush()
            self._file.flush()
            os.fsync(self._file.fileno())

    def close(self) -> None:
        if self.enabled and self._writer is not None and self._file is not None:
            self._writer.close()
            self._file.close()
            self._writer = self._file = None
