"""Which torch device a command-line or keyword ``device`` names: one rule for the trainer, the envs and the scripts."""

from __future__ import annotations

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
