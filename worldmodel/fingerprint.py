"""A content hash of a model's weights: ties saved reward predictors to the world model they read."""

from __future__ import annotations

import hashlib

import torch
from torch import nn


def model_fingerprint(model: nn.Module) -> str:
    """sha256 over parameter/buffer names, shapes, dtypes and bytes (device independent)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(tensor.view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
