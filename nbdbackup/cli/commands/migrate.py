"""`nbdbackup migrate`: upgrade an older index to this tool's schema."""

from __future__ import annotations

import argparse

NAME = "migrate"
HELP = "upgrade the repository's index to the current schema revision"
DESCRIPTION = (
    "Runs the Alembic migrations that take the index from its revision to the one\n"
    "this nbdbackup uses, and says from which revision to which. Takes the\n"
    "repository's writer, reader and gc locks exclusively while it runs."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args) -> int:
    from ...errors import RepoDamaged, RepoFormatError
    from ...repo.index import KNOWN_REVISIONS, current_revision, upgrade
    from ...repo.schema import INDEX_REVISION
    from ..output import print_json, summary
    from ..repoargs import open_repo

    with open_repo(args, check=False) as repo:
        if repo.index_file_missing():
            raise RepoDamaged(f"the index of {repo.path} is missing; there is nothing to migrate",
                              hint="`nbdbackup rebuild-index` recreates it from the packs")
        with repo.index_db.connect() as conn:
            before = current_revision(conn)
        if before is None:
            raise RepoDamaged(f"the index of {repo.path} has no schema version (empty or not an nbdbackup index)",
                              hint="`nbdbackup rebuild-index` recreates it from the packs")
        if before is not None and before not in KNOWN_REVISIONS:
            raise RepoFormatError(f"the index is at revision {before!r}, newer than this tool understands "
                                  f"({INDEX_REVISION})", hint="upgrade nbdbackup")
        if before == INDEX_REVISION:
            after = before
        else:
            with repo.lock("writers", exclusive=True, purpose="the writer lock (migrate needs it exclusively)"), \
                    repo.lock("readers", exclusive=True, purpose="the reader lock (migrate needs it exclusively)"), \
                    repo.lock("gc", exclusive=True, purpose="the gc lock (migrate needs it exclusively)"):
                before, after = upgrade(repo.index_db, "head")
    out = {"from": before, "to": after, "changed": before != after}
    if args.json:
        print_json(out)
    elif before == after:
        summary(args, f"index already at revision {after}; nothing to do")
    else:
        summary(args, f"index upgraded from revision {before or '(empty)'} to {after}")
    return 0
