"""`nbdbackup forget BACKUP...`: remove backups from the index."""

from __future__ import annotations

import argparse

NAME = "forget"
HELP = "remove backups from the index (chunk data is reclaimed by `gc`)"
DESCRIPTION = (
    "Removes backups from the index. BACKUP is a backup id (as `list` shows it) or a\n"
    "disk name, meaning that disk's latest backup. Backups of one multi-disk set are\n"
    "forgotten together: forgetting one member forgets the whole set. Chunk data is\n"
    "reclaimed by the next `nbdbackup gc`. Other backups are never affected: every\n"
    "backup is a complete map."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("backups", nargs="+", metavar="BACKUP", help="backup id or disk name (its latest backup)")


def run(args) -> int:
    from ...repo.forget import forget
    from ..output import print_json, summary
    from ..repoargs import open_repo

    with open_repo(args) as repo:
        result = forget(repo, args.backups)
    if args.json:
        print_json(result.to_json())
        return 0
    for note in result.set_notes():
        summary(args, note)
    for b in result.forgotten:
        if not args.quiet:
            print(f"forgot {b.id}  {b.disk}")
    summary(args, f"forgot {len(result.forgotten)} backup(s); run `nbdbackup gc` to reclaim their space")
    return 0
