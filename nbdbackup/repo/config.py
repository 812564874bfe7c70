"""config.json: what a repository is (format version, id, chunk size, levels)."""

from __future__ import annotations

import errno
import json
import os
import re
import uuid
from dataclasses import asdict, dataclass
from fractions import Fraction

from ..errors import NotARepository, RepoDamaged, RepoFormatError, UsageError, storage_error

FORMAT = 2                       # newest repository layout version this code reads and writes
PLAIN_FORMAT = 1                 # a plaintext repository's: unchanged, older versions still open it
# An encrypted repository's config says 2, so a version before encryption (which ignores
# config fields it does not know) refuses it instead of writing plaintext records into it.
ENCRYPTED_FORMAT = 2
CONFIG_NAME = "config.json"
MIN_CHUNK = 64 * 1024
MAX_CHUNK = 16 * 1024 * 1024
# measured (CPU, read amplification): docs/design.md "Chunk size and compression level"
DEFAULT_CHUNK_SIZE = 256 * 1024
MIN_LEVEL, MAX_LEVEL = -100, 22   # zstd's range
DEFAULT_LEVEL = -3                # zstd level, measured: docs/design.md "Chunk size and compression level"
DEFAULT_SEGMENT_LEN = 1024        # map positions per map segment
DEFAULT_PACK_SIZE = 32 * 1024 * 1024
# In object storage a pack is one PUT held in memory until it is stored (4 in flight): 16 MiB
# (restic's choice too) keeps a backup's memory bounded while a request still carries megabytes.
DEFAULT_S3_PACK_SIZE = 16 * 1024 * 1024


@dataclass(frozen=True)
class RepoConfig:
    format: int
    repo_id: str
    chunk_size: int
    compression_level: int
    segment_len: int = DEFAULT_SEGMENT_LEN
    pack_size: int = DEFAULT_PACK_SIZE
    # None: plaintext. Set: how records are sealed (repo/codec.py codec_for; repo/keys.py fills it)
    encryption: dict | None = None

    @classmethod
    def new(cls, chunk_size: int, compression_level: int, *, segment_len: int = DEFAULT_SEGMENT_LEN,
            pack_size: int = DEFAULT_PACK_SIZE) -> "RepoConfig":
        check_chunk_size(chunk_size)
        check_level(compression_level)
        if not isinstance(segment_len, int) or not 1 <= segment_len <= 65536:
            raise UsageError(f"invalid map segment length {segment_len!r}")
        if not isinstance(pack_size, int) or pack_size < 1:
            raise UsageError(f"invalid pack size {pack_size!r}")
        return cls(PLAIN_FORMAT, uuid.uuid4().hex, chunk_size, compression_level, segment_len, pack_size)


def check_chunk_size(n: int) -> int:
    if not isinstance(n, int) or n < MIN_CHUNK or n > MAX_CHUNK or n & (n - 1):
        raise UsageError(f"invalid chunk size {n!r}: must be a power of two from 64K to 16M")
    return n


def check_level(level: int) -> int:
    if not isinstance(level, int) or not MIN_LEVEL <= level <= MAX_LEVEL:
        raise UsageError(f"invalid compression level {level!r}: zstd levels run from -100 (fastest) to 22")
    return level


MAX_SIZE = 1 << 62              # no size option means more; beyond it a value is a typo (or 1e400)
_SIZE = re.compile(r"(\d+)(?:\.(\d+))?([KMGT]?)")


def parse_size(text: str, *, allow_zero: bool = False) -> int:
    """'1M', '256K', '1.5G', '1048576', '1MiB' -> bytes (UsageError on nonsense, inf, nan, negatives)."""
    t = str(text).strip().upper().removesuffix("IB").removesuffix("B")
    m = _SIZE.fullmatch(t)
    if not m or len(t) > 30:
        raise UsageError(f"invalid size {text!r}: use e.g. 1M, 256K or 1048576")
    whole, frac, unit = m.groups()
    mult = 1024 ** ("KMGT".index(unit) + 1) if unit else 1
    n = Fraction(f"{whole}.{frac or 0}") * mult
    if n.denominator != 1:
        raise UsageError(f"invalid size {text!r}: not a whole number of bytes")
    if n > MAX_SIZE:
        raise UsageError(f"invalid size {text!r}: too large (at most {MAX_SIZE >> 40}T)")
    if n <= 0 and not (allow_zero and n == 0):
        raise UsageError(f"invalid size {text!r}: must be positive")
    return int(n)


def config_bytes(cfg: RepoConfig) -> bytes:
    d = asdict(cfg)
    if d["encryption"] is None:
        del d["encryption"]     # a plaintext repository's config.json is as it always was
    return (json.dumps(d, indent=2) + "\n").encode()


def write_config(path: str, cfg: RepoConfig) -> None:
    tmp = os.path.join(path, CONFIG_NAME + ".tmp")
    with open(tmp, "wb") as f:
        f.write(config_bytes(cfg))
        f.flush()
        os.fsync(f.fileno())
    os.rename(tmp, os.path.join(path, CONFIG_NAME))


def read_config_object(backend, where: str) -> RepoConfig:
    """config.json of a repository in object storage (*where*: its s3:// URL)."""
    try:
        data = backend.get(CONFIG_NAME)
    except FileNotFoundError:
        raise NotARepository(f"{where} holds no nbdbackup repository (no {CONFIG_NAME})",
                             hint=f"create one with `nbdbackup init --repo {where} --index-url URL`, "
                                  "or check the bucket, prefix and endpoint") from None
    return parse_config(data, f"{where}/{CONFIG_NAME}", where)


def read_config(path: str) -> RepoConfig:
    p = os.path.join(path, CONFIG_NAME)
    try:
        os.stat(path)
    except PermissionError:     # a directory on the way may not be searched by this user
        raise storage_error(errno.EACCES, path, "reading the repository") from None
    except OSError:
        pass
    if not os.path.isdir(path):
        why = "it is a file, not a directory" if os.path.exists(path) else "no such directory"
        raise NotARepository(f"{path} is not an nbdbackup repository ({why})",
                             hint="create one with `nbdbackup init --repo PATH`")
    if not os.access(path, os.R_OK | os.X_OK) or os.path.exists(p) and not os.access(p, os.R_OK):
        raise storage_error(errno.EACCES, path, "reading the repository")
    if not os.path.exists(p):
        raise NotARepository(f"{path} is not an nbdbackup repository (no {CONFIG_NAME})",
                             hint="create one with `nbdbackup init --repo PATH`")
    try:
        with open(p, "rb") as f:
            data = f.read()
    except OSError as e:
        raise RepoDamaged(f"{p} is unreadable: {e}") from None
    return parse_config(data, p, path)


def parse_config(data: bytes, p: str, path: str) -> RepoConfig:
    """The RepoConfig in *data* (the bytes of config.json *p* of repository *path*)."""
    try:
        d = json.loads(data)
        fmt = d["format"]
    except (ValueError, KeyError, TypeError) as e:
        raise RepoDamaged(f"{p} is unreadable: {e}") from None
    if isinstance(fmt, int) and fmt < ENCRYPTED_FORMAT and d.get("encryption"):
        raise RepoDamaged(f"{p} is invalid: an encrypted repository has format {ENCRYPTED_FORMAT}, not {fmt}")
    if not isinstance(fmt, int) or fmt > FORMAT:
        raise RepoFormatError(f"repository {path} has format {fmt!r}, newer than this tool understands "
                              f"(format {FORMAT})", hint="upgrade nbdbackup")
    try:
        known = RepoConfig.__dataclass_fields__
        cfg = RepoConfig(**{k: v for k, v in d.items() if k in known})
        check_chunk_size(cfg.chunk_size)
        check_level(cfg.compression_level)
        if cfg.encryption is not None and not isinstance(cfg.encryption, dict):
            raise TypeError(f"encryption must be an object, not {cfg.encryption!r}")
    except (TypeError, UsageError) as e:
        raise RepoDamaged(f"{p} is invalid: {e}") from None
    return cfg
