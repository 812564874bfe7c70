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
