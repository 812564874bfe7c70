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
from .writer import BackupWriter

__all__ = ["Repository", "BackupInfo", "BackupWriter", "BackupImage", "PreparedChunk",
           "DEFAULT_CHUNK_SIZE", "DEFAULT_LEVEL"]
