"""Where a test's repository lives: one test body, several modes (borg's fixtures, restic's suite).

  local     a directory with its SQLite index (the default everywhere)
  local+pg  a directory whose index is a fresh PostgreSQL database
  s3+pg     a fresh bucket on the session's radosgw, the index on PostgreSQL

A RepoPlace gives the --repo value and the environment every command of the
test runs with (the conftest fixture puts it into os.environ, so the CLI and
in-process Repository.open() find the endpoint, keys and index alike).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

REPO_MODES = ("local", "local+pg", "s3+pg")


@dataclass
class RepoPlace:
    mode: str
    spec: str                       # --repo: a path or s3://bucket
    index_url: str | None = None    # None: the SQLite file inside the repository
    env: dict = field(default_factory=dict)

    @property
    def on_s3(self) -> bool:
        return self.spec.startswith("s3://")

    def init_options(self) -> dict:
        """Repository.init() keywords (new_repo) for this place."""
        return {"index_url": self.index_url} if self.index_url else {}

    def __str__(self) -> str:       # so a place can stand where a path did: nbdbackup("--repo", place)
        return self.spec


def make_place(request, mode: str, workdir) -> RepoPlace:
    """The place for *mode* (asks pytest for the server fixtures it needs); sets os.environ."""
    if mode == "local":
        place = RepoPlace(mode, str(workdir / "repo"))
    elif mode in ("local+pg", "s3+pg"):
        pg = request.getfixturevalue("pg_server")
        url = request.getfixturevalue("pg_url")
        env = {"NBDBACKUP_INDEX_URL": url, "PGPASSWORD": pg.env.get("PGPASSWORD", "")}
        if mode == "local+pg":
            place = RepoPlace(mode, str(workdir / "repo"), url, env)
        else:
            s3 = request.getfixturevalue("ceph_s3")
            bucket = request.getfixturevalue("s3_bucket")
            s3.set_env(request.getfixturevalue("monkeypatch"))     # endpoint and keys; no ~/.aws
            env.update({k: os.environ[k] for k in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                   "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")})
            place = RepoPlace(mode, f"s3://{bucket}", url, env)
    else:
        raise ValueError(f"unknown repository mode {mode!r}")
    os.environ.update(place.env)     # conftest restores os.environ after the test
    return place


def object_names(repo, prefix: str = "packs/") -> list[str]:
    """Sorted names of the objects under *prefix* of *repo* (any backend)."""
    return sorted(repo.backend.list(prefix))


# --- damage, the way a disk or a bucket suffers it (outside nbdbackup's create-only writes) ---------

def _s3_target(spec: str):
    import boto3
    from botocore.config import Config

    from nbdbackup.repo.location import parse_location

    loc = parse_location(spec)
    client = boto3.client("s3", config=Config(s3={"addressing_style": "path"},
                                              request_checksum_calculation="when_required",
                                              response_checksum_validation="when_required"))
    return client, loc.bucket, (loc.prefix + "/" if loc.prefix else "")


def read_object(spec, name: str) -> bytes:
    spec = str(spec)
    if not spec.startswith("s3://"):
        with open(os.path.join(spec, *name.split("/")), "rb") as f:
            return f.read()
    c, bucket, prefix = _s3_target(spec)
    return c.get_object(Bucket=bucket, Key=prefix + name)["Body"].read()


def write_object(spec, name: str, data: bytes) -> None:
    """Replace object *name* with *data* (damage: nbdbackup itself never overwrites)."""
    spec = str(spec)
    if not spec.startswith("s3://"):
        with open(os.path.join(spec, *name.split("/")), "wb") as f:
            f.write(data)
        return
    c, bucket, prefix = _s3_target(spec)
    c.put_object(Bucket=bucket, Key=prefix + name, Body=data)


def patch_object(spec, name: str, offset: int, data: bytes | None = None, *, xor: int | None = None) -> None:
    """Overwrite bytes at *offset* of object *name* with *data*, or flip one byte with *xor*."""
    raw = bytearray(read_object(spec, name))
    if xor is not None:
        raw[offset] ^= xor
    else:
        raw[offset:offset + len(data)] = data
    write_object(spec, name, bytes(raw))


def stored_names(spec, prefix: str = "") -> list[str]:
    """Sorted names of the objects under *prefix*, straight from the storage (no repository opened)."""
    spec = str(spec)
    if not spec.startswith("s3://"):
        out = []
        for root, _dirs, files in os.walk(spec):
            rel = os.path.relpath(root, spec)
            out += [f if rel == "." else f"{rel}/{f}" for f in files]
        return sorted(n for n in out if n.startswith(prefix))
    c, bucket, pre = _s3_target(spec)
    pages = c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=pre + prefix)
    return sorted(o["Key"][len(pre):] for page in pages for o in page.get("Contents", []))


def remove_object(spec, name: str) -> None:
    spec = str(spec)
    if not spec.startswith("s3://"):
        os.unlink(os.path.join(spec, *name.split("/")))
        return
    c, bucket, prefix = _s3_target(spec)
    c.delete_object(Bucket=bucket, Key=prefix + name)


def pack_objects(spec) -> list[str]:
    """Sorted names (packs/<xx>/<name>.pack) of the pack objects of repository *spec*."""
    from nbdbackup.repo import Repository

    with Repository.open(str(spec), check=False) as repo:
        return sorted(n for n in repo.backend.list("packs/") if n.endswith(".pack"))
