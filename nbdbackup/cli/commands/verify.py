"""`nbdbackup verify`: re-read and re-hash the chunks behind backups."""

from __future__ import annotations

import argparse

from .. import numbers

NAME = "verify"
HELP = "check that backups are intact: every chunk present, readable and matching its hash"
DESCRIPTION = (
    "Re-reads, decompresses and re-hashes every chunk behind the named backups (all\n"
    "backups by default), once per distinct chunk, and checks that their packs and map\n"
    "segments exist. BACKUP is a backup id or a disk name (its latest backup).\n"
    "--sample PERCENT checks a random PERCENT of the distinct chunks instead.\n"
    "Exits 5 and names every damaged backup with the disk byte ranges affected when\n"
    "anything is damaged or missing."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("backups", nargs="*", metavar="BACKUP", help="backup id or disk name (default: all backups)")
    p.add_argument("--sample", type=numbers.real(0, 100, lo_open=True, noun="percentage", suffix="%"),
                   metavar="PERCENT",
                   help="check only a random PERCENT of the distinct chunks (e.g. 10)")


def run(args) -> int:
    from ...errors import VerifyFailed
    from ...repo.verify import verify
    from ..output import human_bytes, print_json, progress_bar, summary
    from ..repoargs import open_repo

    with open_repo(args) as repo:
        bar = None

        def progress(total_bytes: int):
            nonlocal bar
            bar = progress_bar(args, total_bytes, "verify")
            return bar

        try:
            report = verify(repo, args.backups or None, sample_percent=args.sample, progress=progress)
        finally:
            if bar is not None:
                bar.close()
    if args.json:
        print_json(report.to_json())
    elif not args.quiet:
        for line in report.problem_lines():
            print(line)
    summary(args, f"verified {report.backups_checked} backup(s): {report.chunks_checked} of "
                  f"{report.chunks_total} distinct chunks ({human_bytes(report.bytes_checked)}) checked"
                  + (f", sample {args.sample:g}%" if args.sample else "")
                  + (f"; {len(report.damaged)} backup(s) DAMAGED" if not report.ok else "; all intact"))
    if not report.ok:
        names = ", ".join(d.backup.id for d in report.damaged)
        raise VerifyFailed(f"{len(report.damaged)} damaged backup(s): {names}",
                           hint="the listed byte ranges cannot be restored; `nbdbackup verify --json` gives details")
    return 0
