"""Backup ids and disk names: safe in NBD export names and URIs.

A backup id is the UTC creation time with milliseconds plus 4 random hex
digits, e.g. 20261126T054001123Z-3fa9: sortable by time, no '/', '?', '#' or
spaces. A disk name must not look like a backup id, so a ref is unambiguous.
"""

from __future__ import annotations

import re
import secrets
from datetime import datetime, timedelta, timezone

from ..errors import UsageError

BACKUP_ID_RE = re.compile(r"^\d{8}T\d{9}Z-[0-9a-f]{4}$")
DISK_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._+-]{0,63}$")


def now_ms() -> datetime:
    """Current UTC time truncated to milliseconds."""
    t = datetime.now(timezone.utc)
    return t.replace(microsecond=t.microsecond // 1000 * 1000)


_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


def to_ms(t: datetime) -> int:
    """Milliseconds since the epoch (exact, no float rounding); naive means UTC."""
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return (t - _EPOCH) // timedelta(milliseconds=1)


def from_ms(ms: int) -> datetime:
    return _EPOCH + timedelta(milliseconds=ms)


def iso_ms(t: datetime) -> str:
    """ISO 8601 UTC with milliseconds: 2026-11-26T05:40:01.123Z."""
    # isoformat, its arguments positional: a third of strftime's time (`list` formats one per backup)
    return t.astimezone(timezone.utc).isoformat("T", "milliseconds").removesuffix("+00:00") + "Z"


def new_backup_id(created: datetime) -> str:
    t = created.astimezone(timezone.utc)
    return t.strftime("%Y%m%dT%H%M%S") + f"{t.microsecond // 1000:03d}Z-{secrets.token_hex(2)}"


def is_backup_id(s: str) -> bool:
    return bool(BACKUP_ID_RE.match(s))


def check_disk_name(name: str) -> str:
    if not isinstance(name, str) or not DISK_NAME_RE.match(name) or is_backup_id(name):
        raise UsageError(f"invalid disk name {name!r}",
                         hint="use 1-64 characters from A-Z a-z 0-9 . _ + -, starting with a letter or digit, "
                              "and not shaped like a backup id")
    return name
