"""Which torch device a command-line or keyword ``device`` names: one rule for the trainer, the envs and the scripts."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from worldmodel.errors import InputError


def resolve_device(name: str | torch.device, local_rank: int = 0) -> torch.device:
    """``auto`` -> cuda if available else cpu; ``cuda`` gets the process's local rank as index; a
    ``torch.device`` is checked the same way."""
    if isinstance(name, str) and name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError:
        raise InputError(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InputError(f"device {name!r} asked for, but CUDA is not available here; use --device cpu (or auto)")
        if device.index is None:
            device = torch.device("cuda", local_rank)
    return device


@contextlib.contextmanager
def cpu_threads(count: int | None, device: torch.device) -> Iterator[None]:
    """Run torch's CPU ops with ``count`` threads (restored after); None or a CUDA device: leave it.

    The envs' per-step tensors are small, so one thread is the default: more threads spin-wait on each
    other when other processes hold the cores (docs/DECISIONS.md). On an idle machine with more cores,
    more may pay off for large batches: pass ``threads=None`` (torch's setting) or a count.
    """
    if count is None or device.type != "cpu" or torch.get_num_threads() == count:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
