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
    if args.json:
        print_json([i.to_json() for i in infos])
        return 0
    rows = []
    seen_sets: dict[str, int] = {}
    for i in infos:
        mark = ""
        if i.set_id:
            n = seen_sets.setdefault(i.set_id, len(seen_sets) + 1)
            mark = f"set {n} ({i.set_id[:8]})"
        rows.append((i.id, i.disk, i.kind, i.to_json()["created"], human_bytes(i.size),
                     human_bytes(i.stored_bytes), mark))
    head = ("ID", "DISK", "KIND", "CREATED (UTC)", "SIZE", "STORED", "SET")
    widths = [max(len(str(r[k])) for r in [head, *rows]) for k in range(len(head))]
    out = [("  ".join(str(c).ljust(w) for c, w in zip(r, widths))).rstrip() for r in [head, *rows]]
    sys.stdout.write("\n".join(out) + "\n")
    if not infos:
        if not args.disk:
            print("(no backups)", file=sys.stderr)
        else:       # a typo in --disk should not look like "never backed up"
            known = f"; disks with backups: {', '.join(others)}" if others else ""
            print(f"(no backups of disk {args.disk}{known})", file=sys.stderr)
    return 0
