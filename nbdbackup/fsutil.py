"""Small file-system helpers shared by the repository and restore."""

from __future__ import annotations

import os


def fsync_path(path: str, *, directory: bool = False) -> None:
    """fsync a file, or a directory (so that a rename or unlink in it is durable)."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if directory else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
