"""Repositories in object storage, and the services a repository's index decides.

An S3 repository holds the same objects as a local directory (location.py);
this module creates and opens one, and picks the lock service: flock files
for a local repository with a SQLite index (one host), the index's own
PostgreSQL advisory locks whenever the index is PostgreSQL (any number of
hosts that share the database).
"""

from __future__ import annotations

import hashlib
import os

from ..errors import UsageError
from ..fsutil import default_state_dir
from .config import CONFIG_NAME, RepoConfig, config_bytes, read_config_object
from .index import (
    check_revision,
    current_revision,
    is_postgresql_url,
    make_engine,
    shown_url,
    upgrade,
    url_without_password,
)
from .location import RepoLocation

INDEX_URL_NAME = "index-url"


def _check_bucket(backend) -> None:
    """The bucket exists and takes our credentials (NoSuchBucket, CredentialsError...), where the
    backend can tell (S3)."""
    check = getattr(backend, "check_bucket", None)
    if check is not None:
        check()


def create_index(url: str, where: str) -> None:
    """An empty index at the head revision at *url* (UsageError if it already holds one)."""
    eng = make_engine(url)
    try:
        with eng.connect() as conn:
            if current_revision(conn) is not None:
                raise UsageError(f"the index at {shown_url(url)} already holds an nbdbackup index; "
                                 "use an empty database")
        upgrade(eng, "head")
        check_revision(eng, where)
    finally:
        eng.dispose()


def check_s3_target(loc: RepoLocation, index_url: str | None, backend) -> None:
    """UsageError (or the bucket's own error) unless repository *loc* can be created there with
    its index at *index_url*: an existing, empty bucket prefix and a PostgreSQL URL."""
    if not index_url:
        raise UsageError(f"{loc.display}: an S3 repository keeps its index in PostgreSQL",
                         hint="pass --index-url postgresql+psycopg://USER@HOST/DB (or set NBDBACKUP_INDEX_URL); "
                              "the password may come from PGPASSWORD or ~/.pgpass")
    if not is_postgresql_url(index_url):
        raise UsageError(f"{loc.display}: the index of an S3 repository must be PostgreSQL, not "
                         f"{index_url.split(':', 1)[0]}", hint="many hosts share it; pass a postgresql+psycopg:// URL")
    _check_bucket(backend)
    if backend.exists(CONFIG_NAME):
        raise UsageError(f"{loc.display} is already a repository; refusing to initialise over it")
    if next(iter(backend.list("")), None) is not None:
        raise UsageError(f"{loc.display} is not empty; refusing to initialise over it",
                         hint="choose an empty bucket or another prefix: s3://BUCKET/PREFIX")


def init_s3(loc: RepoLocation, cfg: RepoConfig, index_url: str | None, backend,
            objects: list[tuple[str, bytes]] = ()) -> None:
    """Create repository *loc* in its (existing, empty) bucket prefix, with its index at *index_url*;
    *objects* (name, bytes: an encrypted repository's key object) are stored before config.json."""
    check_s3_target(loc, index_url, backend)
    create_index(index_url, loc.display)
    made = []
    try:
        backend.put(INDEX_URL_NAME, [(url_without_password(index_url) + "\n").encode()])
        made.append(INDEX_URL_NAME)
        for name, data in objects:
            backend.put(name, [data])
            made.append(name)
        backend.put(CONFIG_NAME, [config_bytes(cfg)])   # last, create-only: a second init loses here
    except FileExistsError:
        for name in made[1:]:       # our key objects (random names); the index-url was left as before
            backend.delete(name)
        raise UsageError(f"{loc.display} was initialised by another run meanwhile") from None
    except BaseException:
        for name in made:
            backend.delete(name)
        raise


def open_s3(loc: RepoLocation, backend, index_url: str | None) -> tuple[RepoConfig, str]:
    """config.json and the index URL of the S3 repository *loc* (--index-url, else the stored one)."""
    _check_bucket(backend)
    cfg = read_config_object(backend, loc.display)
    if not index_url:
        try:
            index_url = backend.get(INDEX_URL_NAME).decode().strip()
        except FileNotFoundError:
            index_url = ""
        if not index_url:
            raise UsageError(f"{loc.display} names no index database",
                             hint="pass --index-url postgresql+psycopg://... (or set NBDBACKUP_INDEX_URL)")
    return cfg, index_url


def host_lock_dir(repo_id: str) -> str:
    """This host's lock directory for repository *repo_id* (locks of local things: --image files)."""
    d = os.path.join(default_state_dir(), "locks", hashlib.sha256(repo_id.encode()).hexdigest()[:16])
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


def lock_service(loc: RepoLocation, dialect: str, index_url: str, repo_id: str):
    """Flock files for a local repository on SQLite; the index's advisory locks on PostgreSQL
    (*dialect*: the index's, "sqlite" or "postgresql")."""
    if not loc.is_local and dialect != "postgresql":
        raise UsageError(f"{loc.display}: an S3 repository needs a PostgreSQL index, not {dialect}")
    from .pglocks import lock_service as for_index

    return for_index(index_url, repo_id, os.path.join(loc.path, "locks") if loc.is_local else "")
