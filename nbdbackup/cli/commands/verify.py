"""`nbdbackup verify`: re-read and re-hash the chunks behind backups."""

from __future__ import annotations

import argparse

from .. import numbers

NAME = "verify"
HELP = "check that backups are intact: every chunk present, readable and matching its hash"
DESCRIPTION = (
    "Re-reads, decompresses and re-hashes every chunk behind the named backups (all\n"
    "backups by default), once per distinct chunk, and checks that their packs and map\n"
    "segments exist. Each backup's index rows (size, chunk size, map segments, disk,\n"
    "parent...) are compared with its manifest record in the packs, and a SQLite index\n"
    "gets its own PRAGMA integrity_check. BACKUP is a backup id or a disk name (its\n"
    "latest backup). A backup forgotten while verify runs is named (NOT CHECKED).\n"
    "--sample PERCENT checks a random PERCENT of the distinct chunks instead.\n"
    "Exits 5 and names every damaged backup with the disk byte ranges affected (and the\n"
    "index fields that disagree with the manifest) when anything is damaged or missing.\n"
    "\n"
    "Self-healing: each damaged chunk or map segment found is recorded in the index; the\n"
    "next backup that reads the same bytes stores a fresh copy, and every backup naming\n"
    "it is whole again, without being rewritten. verify names what was healed since the\n"
    "last run (HEALED) and what remains (REMAINS). A full backup heals every chunk of\n"
    "the disk it reads; an incremental only the chunks it re-reads.\n"
    "\n"
    "--since DAYS checks only the backups that no verify found clean within the last\n"
    "DAYS days (a run without --sample records when each backup was found clean);\n"
    "a nightly `nbdbackup verify --since 7` checks each backup about once a week: the\n"
    "night's new backups and those last found clean more than 7 days ago. A damaged\n"
    "backup is checked every time."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("backups", nargs="*", metavar="BACKUP", help="backup id or disk name (default: all backups)")
    p.add_argument("--sample", type=numbers.real(0, 100, lo_open=True, noun="percentage", suffix="%"),
                   metavar="PERCENT",
                   help="check only a random PERCENT of the distinct chunks (e.g. 10)")
    # one name (not also --outdated-after): one spelling in help, docs and job files
    p.add_argument("--since", metavar="DAYS",
                   type=numbers.real(0, 36500, noun="number of days"),
                   help="check only backups not verified clean within the last DAYS days (e.g. 7)")


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
            report = verify(repo, args.backups or None, sample_percent=args.sample, progress=progress,
                            since_days=args.since)
        finally:
            if bar is not None:
                bar.close()
    if args.json:
        print_json(report.to_json())
    elif not args.quiet:
        for line in report.heal_lines() + report.problem_lines():
            print(line)
    summary(args, f"verified {report.backups_checked} backup(s) and {report.manifests_checked} manifest(s): "
                  f"{report.chunks_checked} of {report.chunks_total} distinct chunks "
                  f"({human_bytes(report.bytes_checked)}) checked"
                  + (f", sample {args.sample:g}%" if args.sample else "")
                  + (f"; {report.skipped_recent} backup(s) verified clean within {args.since:g} day(s) skipped"
                     if args.since is not None else "")
                  + (f"; {len(report.healed)} damaged record(s) HEALED" if report.healed else "")
                  + f"; index integrity_check {report.index_check}"
                  + (f"; {len(report.vanished)} backup(s) forgotten while verify ran, not checked: "
                     + ", ".join(b.id for b in report.vanished) if report.vanished else "")
                  + (f"; {len(report.damaged)} backup(s) DAMAGED" if report.damaged else "")
                  + ("; all intact" if report.ok else ""))
    if report.damaged:
        names = ", ".join(d.backup.id for d in report.damaged)
        rows_hint = ("; backups whose index rows are bad (the whole disk listed) come back with "
                     "`nbdbackup rebuild-index`" if any(d.index_rows_bad for d in report.damaged) else "")
        raise VerifyFailed(f"{len(report.damaged)} damaged backup(s): {names}"
                           + ("; the index is damaged too" if report.index_problems else ""),
                           hint="the listed byte ranges cannot be restored; `nbdbackup verify --json` gives details"
                                + rows_hint)
    if report.index_problems:
        raise VerifyFailed(f"the index is damaged: {report.index_problems[0]}",
                           hint="`nbdbackup rebuild-index` recreates the index from the packs")
    return 0
