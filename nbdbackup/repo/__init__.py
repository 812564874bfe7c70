"""The repository: packs of deduplicated chunks, backup maps, and the index.

Public API (see docs/design.md "Repository"):
    Repository, BackupInfo, BackupWriter, BackupImage, PreparedChunk,
    DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL
"""

from .chunks import PreparedChunk
from .config import DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL
from .image import BackupImage
from .info import BackupInfo
from .repository import Repository

__all__ = ["Repository", "BackupInfo", "BackupWriter", "BackupImage", "PreparedChunk",
           "DEFAULT_CHUNK_SIZE", "DEFAULT_LEVEL"]


def __getattr__(name):
    # the writer imports SQLAlchemy; a restore from a local SQLite index never needs it
    if name == "BackupWriter":
        from .writer import BackupWriter

        return BackupWriter
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
