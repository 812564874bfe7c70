"""`nbdbackup init`: create a repository and its index."""

from __future__ import annotations

import argparse

from .. import numbers

NAME = "init"
HELP = "create a new repository (directory, config.json and index)"
DESCRIPTION = (
    "Creates the repository at --repo (or $NBDBACKUP_REPO): config.json, packs/,\n"
    "locks/, tmp/ and the index at its newest schema revision (SQLite file inside\n"
    "the repository, or the database at --index-url). Refuses a non-empty directory.\n"
    "With --repo s3://BUCKET[/PREFIX] the objects go to an existing bucket and the\n"
    "index must be PostgreSQL (--index-url postgresql+psycopg://USER@HOST/DB), shared\n"
    "by every host that backs up into the repository. The index URL is stored in the\n"
    "repository without its password (give it with PGPASSWORD, ~/.pgpass or\n"
    "$NBDBACKUP_INDEX_URL on later runs).\n"
    "Chunk size and compression level are fixed for the repository's life."
)


def _config():
    from ...repo import config  # when a value is checked: the repo package is heavy for --help

    return config


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--chunk-size", metavar="SIZE", default=None,
                   type=numbers.size(lambda: _config().MIN_CHUNK, lambda: _config().MAX_CHUNK, power_of_two=True,
                                     noun="chunk size"),
                   help="chunk size, a power of two from 64K to 16M, e.g. 1M, 256K, 1048576 (default 256K)")
    p.add_argument("--compression-level", metavar="N", default=None,
                   type=numbers.integer(lambda: _config().MIN_LEVEL, lambda: _config().MAX_LEVEL, noun="zstd level"),
                   help="zstd level; negative levels are faster (default -3)")


def run(args) -> int:
    from ...repo import DEFAULT_CHUNK_SIZE, DEFAULT_LEVEL, Repository
    from ...repo.index import shown_url
    from ..output import human_bytes, print_json, summary
    from ..repoargs import repo_path, storage_options

    path = repo_path(args)
    cs = args.chunk_size if args.chunk_size is not None else DEFAULT_CHUNK_SIZE
    level = args.compression_level if args.compression_level is not None else DEFAULT_LEVEL
    with Repository.init(path, chunk_size=cs, index_url=args.index_url, compression_level=level,
                         **storage_options(args)) as repo:
        out = {"path": repo.path, "repo_id": repo.repo_id, "chunk_size": repo.chunk_size,
               "compression_level": repo.compression_level, "index_url": shown_url(repo.index_url)}
    if args.json:
        print_json(out)
    else:
        summary(args, f"initialised repository {out['path']} (id {out['repo_id']}, "
                      f"chunk size {human_bytes(cs)}, zstd level {level})")
    return 0
