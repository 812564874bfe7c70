"""`nbdbackup gc`: reclaim pack data no backup references (mark and sweep)."""

from __future__ import annotations

import argparse
import logging

from .. import numbers

log = logging.getLogger(__name__)

NAME = "gc"
HELP = "reclaim space: delete unreferenced chunks and packs, repack sparse packs"
DESCRIPTION = (
    "Mark and sweep, beside running backups, restores, serves and verifies (on any\n"
    "host): what a running backup added or reuses, and every backup being read or\n"
    "built upon, is kept (docs/design.md \"gc beside everything\"). One gc at a time:\n"
    "a second one fails with exit code 3, or waits up to --lock-wait SECONDS. Deletes\n"
    "index rows of unreferenced chunks and map segments, packs without live data, and\n"
    "pack files and unfinished uploads left behind by killed runs once older than\n"
    "--grace; rewrites packs whose live fraction is below --repack-threshold (the new\n"
    "pack is durable and the index switched to it before the old one is deleted)."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--repack-threshold", type=numbers.real(0, 1, noun="fraction"), default=0.5, metavar="FRACTION",
                   help="rewrite packs whose live fraction is below FRACTION (0..1, default 0.5; "
                        "0 = never, 1 = every pack with any dead record)")
    p.add_argument("--grace", type=numbers.seconds(10 ** 9), default=None, metavar="SECONDS",
                   help="leave pack files the index does not name and unfinished uploads younger than this "
                        "(default 3600; 0 reclaims them at once when nothing else runs)")
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
                             progress=progress, **({} if args.grace is None else {"grace": args.grace}))
        finally:
            for b in bars:
                b.close()
    if report.live_leases:
        log.info("gc ran beside %d running backup(s) or reader(s); kept %d row(s) and %d pack(s) a running "
                 "backup uses (reclaimed by a later gc once it is done)", len(report.live_leases),
                 report.kept_in_use, report.young_packs)
    if report.young_orphans:
        log.info("left %d unindexed pack file(s) younger than --grace or than a running backup",
                 report.young_orphans)
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
