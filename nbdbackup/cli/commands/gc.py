"""`nbdbackup gc`: reclaim pack data no backup references (mark and sweep)."""

from __future__ import annotations

import argparse
import logging

from .. import numbers

log = logging.getLogger(__name__)

NAME = "gc"
HELP = "reclaim space: delete unreferenced chunks and packs, repack sparse packs"
DESCRIPTION = (
    "Mark and sweep. Takes the writers and readers locks exclusively: fails with exit\n"
    "code 3 naming the holder while a backup, restore, serve or verify runs, or waits\n"
    "up to --lock-wait SECONDS. Deletes index rows of unreferenced chunks and map\n"
    "segments, pack files left behind by killed runs, and packs without live data;\n"
    "rewrites packs whose live fraction is below --repack-threshold (the new pack is\n"
    "durable and the index switched to it before the old one is deleted)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repack-threshold", type=numbers.real(0, 1, noun="fraction"), default=0.5, metavar="FRACTION",
                   help="rewrite packs whose live fraction is below FRACTION (0..1, default 0.5; "
                        "0 = never, 1 = every pack with any dead record)")
    p.add_argument("--dry-run", action="store_true", help="report what would be reclaimed; change nothing")


def run(args) -> int:
    from ...repo.gc import collect
    from ..output import human_bytes, print_json, progress_bar, summary
    from ..repoargs import open_repo

    bars = []

    def progress(total: int, desc: str, unit: str):
        bars.append(progress_bar(args, total, desc, unit=unit))
        return bars[-1]

    with open_repo(args) as repo:
        try:
            report = collect(repo, repack_threshold=args.repack_threshold, dry_run=args.dry_run,
                             progress=progress)
        finally:
            for b in bars:
                b.close()
    for problem in report.skipped_damaged:
        log.warning("gc left alone: %s (run `nbdbackup verify`)", problem)
    if args.json:
        print_json(report.to_json())
        return 0
    verb = "would reclaim" if args.dry_run else "reclaimed"
    summary(args, f"gc: {verb} {human_bytes(report.bytes_reclaimed)}: {report.packs_deleted} pack(s) deleted, "
                  f"{report.packs_repacked} repacked, {report.orphan_packs} orphan pack(s), "
                  f"{report.chunks_deleted} chunk and {report.segments_deleted} segment row(s) dropped")
    return 0
