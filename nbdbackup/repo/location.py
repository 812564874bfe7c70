"""Where a repository lives: a local directory, or s3://BUCKET[/PREFIX].

Both hold the same objects: config.json, index-url (the index's URL without
its password) and packs/<xx>/<name>.pack. A local directory also has locks/,
tmp/ and, by default, the SQLite index; an S3 repository keeps its index in
PostgreSQL (--index-url) and its locks there too (repo/pglocks.py).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import UsageError

S3_SCHEME = "s3://"
# S3's bucket naming rules (lowercase letters, digits, dots, hyphens; 3-63; starts and ends alnum)
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_PREFIX_PART = re.compile(r"[A-Za-z0-9._+=@,-]+")
_SCHEME = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://")


@dataclass(frozen=True)
class RepoLocation:
    display: str                 # what messages call it: the absolute path, or s3://bucket/prefix
    path: str | None = None      # a local directory
    bucket: str | None = None
    prefix: str = ""             # "" or "a/b" (no slashes at either end)

    @property
    def is_local(self) -> bool:
        return self.path is not None


def parse_location(spec: str) -> RepoLocation:
    """A repository's location from --repo / $NBDBACKUP_REPO (UsageError when malformed)."""
    spec = str(spec)
    if spec.startswith(S3_SCHEME):
        return _parse_s3(spec)
    if _SCHEME.match(spec):
        raise UsageError(f"unsupported repository URL {spec!r}",
                         hint="use a directory path or s3://BUCKET[/PREFIX]")
    path = os.path.abspath(spec)
    return RepoLocation(display=path, path=path)


def _parse_s3(spec: str) -> RepoLocation:
    rest = spec[len(S3_SCHEME):]
    bucket, _, prefix = rest.partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise UsageError(f"malformed S3 repository URL {spec!r}: {bucket!r} is not a valid bucket name",
                         hint="bucket names have 3-63 lowercase letters, digits, dots and hyphens: "
                              "s3://BUCKET[/PREFIX]")
    prefix = prefix.strip("/")
    parts = prefix.split("/") if prefix else []
    for p in parts:
        if p in (".", "..") or not _PREFIX_PART.fullmatch(p):
            raise UsageError(f"malformed S3 repository URL {spec!r}: bad prefix part {p!r}",
                             hint="a prefix is /-separated names of letters, digits and ._+=@,-")
    display = S3_SCHEME + bucket + (f"/{prefix}" if prefix else "")
    return RepoLocation(display=display, bucket=bucket, prefix=prefix)


def open_backend(loc: RepoLocation, *, s3_endpoint: str | None = None):
    """The storage backend holding *loc*'s objects."""
    if loc.is_local:
        from .backends import LocalBackend

        return LocalBackend(loc.path, os.path.join(loc.path, "tmp"))
    from .s3backend import S3Backend

    return S3Backend(loc.bucket, loc.prefix, endpoint_url=s3_endpoint)
