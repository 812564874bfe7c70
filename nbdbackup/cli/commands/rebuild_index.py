"""`nbdbackup rebuild-index`: rebuild a lost or damaged index from the packs."""

from __future__ import annotations

import argparse
import logging

from .. import numbers

log = logging.getLogger(__name__)

NAME = "rebuild-index"
HELP = "rebuild a lost or damaged index from the self-describing packs"
DESCRIPTION = (
    "Reads every pack's footer (or, when a footer is damaged, its record headers),\n"
    "and rebuilds the index: chunks, map segments and the backups whose manifests\n"
    "are found. An existing index file is moved aside first, as\n"
    "index.sqlite.damaged-<UTC>; the newest --keep-damaged copies are kept and the\n"
    "output names the older ones it removed.\n"
    "See docs/maintenance.md for what cannot be recovered."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--keep-damaged", type=numbers.integer(1, 1000), default=None, metavar="N",
                   help="keep the newest N moved-aside index copies, this run's included (default 3)")


def run(args) -> int:
    from ...repo.rebuild import KEEP_DAMAGED, rebuild_index
    from ..output import print_json, progress_bar, summary
    from ..repoargs import key_source, repo_path, storage_options

    bars = []

    def progress(total: int):
        bars.append(progress_bar(args, total, "rebuild-index", unit="pack"))
        return bars[-1]

    listed_before = _listed_ids(args)
    try:
        report = rebuild_index(repo_path(args), index_url=args.index_url, lock_wait=args.lock_wait,
                               progress=progress, keep_damaged=args.keep_damaged or KEEP_DAMAGED,
                               key_source=key_source(args), **storage_options(args))
    finally:
        for b in bars:
            b.close()
    # Forgotten backups whose packs gc has not rewritten yet come back from their manifests.
    returned = sorted(set(_listed_ids(args) or ()) - set(listed_before)) if listed_before is not None else []
    if args.json:
        print_json({**report.to_json(), "returned_backups": returned})
        return 0
    for line in report.problem_lines():
        print(line)
    if returned:
        log.warning("%d backup(s) the old index did not list came back (forgotten since the last gc): %s; "
                    "`nbdbackup forget` them again if they are unwanted", len(returned), " ".join(returned))
    summary(args, report.summary_line())
    return 0


def _listed_ids(args) -> list[str] | None:
    """Backup ids the current index lists, or None when it cannot be read (lost or damaged)."""
    from ...errors import KeyRefused, UsageError
    from ...repo import Repository
    from ..repoargs import key_source, repo_path, storage_options

    try:
        with Repository.open(repo_path(args), index_url=args.index_url, key_source=key_source(args),
                             **storage_options(args)) as repo:
            return [b.id for b in repo.list_backups()]
    except (KeyRefused, UsageError):    # the key is wanted for the rebuild too: say so once
        raise
    except Exception:  # best effort: a damaged index is what rebuild-index is for
        return None
