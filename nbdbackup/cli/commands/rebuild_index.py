"""`nbdbackup rebuild-index`: rebuild a lost or damaged index from the packs."""

from __future__ import annotations

import argparse

NAME = "rebuild-index"
HELP = "rebuild a lost or damaged index from the self-describing packs"
DESCRIPTION = (
    "Reads every pack's footer (or, when a footer is damaged, its record headers),\n"
    "and rebuilds the index: chunks, map segments and the backups whose manifests\n"
    "are found. An existing index file is moved aside first (never deleted).\n"
    "See docs/maintenance.md for what cannot be recovered."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    pass


def run(args) -> int:
    from ...repo.rebuild import rebuild_index
    from ..output import print_json, progress_bar, summary
    from ..repoargs import repo_path

    bars = []

    def progress(total: int):
        bars.append(progress_bar(args, total, "rebuild-index", unit="pack"))
        return bars[-1]

    try:
        report = rebuild_index(repo_path(args), index_url=args.index_url, lock_wait=args.lock_wait,
                               progress=progress)
    finally:
        for b in bars:
            b.close()
    if args.json:
        print_json(report.to_json())
        return 0
    for line in report.problem_lines():
        print(line)
    summary(args, report.summary_line())
    return 0
