"""Atomic file writes: every file this project writes goes to a temporary name in the same directory first
and is moved into place with ``os.replace``, so a kill at any moment leaves either the old file or the new
one under the final name, never a half-written one.

Temporary names are ``.<final name>.<pid>.<random>.tmp``: hidden, unique per writer, and ending in ``.tmp``
rather than the final suffix, so that no glob for the final files (``*.h5``, ``*.pt``, not even a recursive
one) ever finds a half-written file. Writers that pick a format from the file name (numpy, matplotlib,
imageio, stable-baselines3) are given the format explicitly or write through ``atomic_write_stream``.
``stale_temporaries`` finds the temporaries a killed writer left behind.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import zipfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, BinaryIO

from worldmodel.errors import detail

TEMP_MARKER = ".tmp"  # every temporary name ends with this (older versions put the final suffix after it)


def temporary_path(final: Path) -> Path:
    """A fresh temporary name next to ``final`` (see the module docstring)."""
    return final.parent / f".{final.name}.{os.getpid()}.{secrets.token_hex(4)}{TEMP_MARKER}"


def stale_temporaries(final: Path) -> list[Path]:
    """Temporary files of ``final`` left by writers that were killed before moving them into place."""
    return sorted(final.parent.glob(f".{final.name}.*{TEMP_MARKER}*"))


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike[str]) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; when the block succeeds, it becomes ``path`` atomically.

    The parent directory is created if needed. The temporary file is flushed to disk before the rename, so
    a crash never leaves a partly written file under the final name; it is created like any new file
    (0o666 less the umask, unlike mkstemp's 0o600), and the mode survives ``os.replace``. On an exception
    the temporary file is removed and the error propagates.
    """
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    temp = temporary_path(final)
    os.close(os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    try:
        yield temp
        with open(temp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(temp, final)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def atomic_write(path: str | os.PathLike[str], write: Callable[[Path], None]) -> None:
    """Call ``write(temporary_path)``, then move the file into place at ``path`` (``atomic_output``)."""
    with atomic_output(path) as temp:
        write(temp)


def atomic_write_stream(path: str | os.PathLike[str], write: Callable[[BinaryIO], None]) -> None:
    """Call ``write(binary_file)`` on an open temporary file, then move it into place at ``path``. For writers
    that would otherwise add a suffix to a name that lacks one (``np.save``, ``np.savez``, SB3's ``save``)."""

    def write_to(temp: Path) -> None:
        with open(temp, "wb") as handle:
            write(handle)

    atomic_write(path, write_to)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> None:
    atomic_write(path, lambda temp: temp.write_text(text, encoding="utf-8"))


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    import torch  # here, so that the collector (no torch needed) can import this module cheaply

    atomic_write(path, lambda temp: torch.save(obj, temp))


class UnreadableTorchFile(ValueError):
    """A file ``torch.load`` cannot read: truncated (a killed copy), or not a torch file at all."""


def load_torch_file(path: str | os.PathLike[str], map_location: Any = "cpu") -> Any:
    """``torch.load(weights_only=True)`` of a file such as ``atomic_torch_save`` writes; UnreadableTorchFile,
    whose message is the one-line reason, where it cannot be read."""
    import torch  # here, as in atomic_torch_save

    if not zipfile.is_zipfile(path):  # torch.save writes a zip archive; a truncated one lacks its directory
        raise UnreadableTorchFile("truncated, or not a torch file")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as error:  # a foreign file
        raise UnreadableTorchFile(detail(error)) from None
