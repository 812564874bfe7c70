"""`nbdbackup list`: the committed backups, oldest first."""

from __future__ import annotations

import argparse

NAME = "list"
HELP = "list backups (all disks, or one with --disk)"
DESCRIPTION = (
    "Shows committed backups oldest first: id, disk, kind, created (UTC), size,\n"
    "bytes stored by the backup, and set. Backups taken together (one VM, several\n"
    "disks) share a set id and are shown as a set. --json prints an array of\n"
    "objects with id, disk, kind, parent, created, size, read_bytes, stored_bytes,\n"
    "duration_s, bitmap, checkpoint, set_id."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--disk", metavar="NAME", help="only backups of this disk")


def run(args) -> int:
    import sys

    from ..output import human_bytes, print_json
    from ..repoargs import open_repo

    with open_repo(args) as repo:
        infos = repo.list_backups(args.disk)
        others = sorted(repo.disks()) if args.disk and not infos else []
        verified = repo.verified_times() if args.json else {}
    from ...repo.ids import from_ms, iso_ms

    if args.json:       # "verified": when a verify last found it clean (verify --since), else null
        print_json([dict(i.to_json(), verified=iso_ms(from_ms(verified[i.id])) if i.id in verified else None)
                    for i in infos])
        return 0

    shown: dict[int, str] = {}      # human_bytes of each byte count: a disk's size repeats

    def size(n: int) -> str:
        s = shown.get(n)
        if s is None:
            s = shown[n] = human_bytes(n)
        return s

    rows = [("ID", "DISK", "KIND", "CREATED (UTC)", "SIZE", "STORED", "SET")]
    seen_sets: dict[str, int] = {}
    for i in infos:
        mark = ""
        if i.set_id:
            n = seen_sets.setdefault(i.set_id, len(seen_sets) + 1)
            mark = f"set {n} ({i.set_id[:8]})"
        rows.append((i.id, i.disk, i.kind, iso_ms(i.created), size(i.size), size(i.stored_bytes), mark))
    # one format string for every row: 10,000 backups print in a few ms, not a few hundred
    fmt = "  ".join(f"{{:<{max(map(len, column))}}}" for column in zip(*rows))
    sys.stdout.write("".join(fmt.format(*r).rstrip() + "\n" for r in rows))
    if not infos:
        if not args.disk:
            print("(no backups)", file=sys.stderr)
        else:       # a typo in --disk should not look like "never backed up"
            known = f"; disks with backups: {', '.join(others)}" if others else ""
            print(f"(no backups of disk {args.disk}{known})", file=sys.stderr)
    return 0
