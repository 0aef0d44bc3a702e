"""A content hash of a model's weights: ties saved reward predictors to the world model they read."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def model_fingerprint(model: nn.Module, leave_out: str | None = None) -> str:
    """sha256 over parameter/buffer names, shapes, dtypes and bytes (device independent); ``leave_out``: a
    submodule name whose tensors are not hashed (``"dynamics"``: the perception alone)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if leave_out is not None and name.startswith(f"{leave_out}."):
            continue
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
