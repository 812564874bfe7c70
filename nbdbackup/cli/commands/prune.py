"""`nbdbackup prune --keep-...`: forget what a retention policy does not keep."""

from __future__ import annotations

import argparse

from .. import numbers

NAME = "prune"
HELP = "forget backups a retention policy does not keep (PBS semantics, per disk)"
DESCRIPTION = (
    "Applies a retention policy per disk, Proxmox Backup Server style: the rules run\n"
    "in the order last, hourly, daily, weekly (ISO weeks), monthly, yearly; each keeps\n"
    "the newest backup of each period not already covered by an earlier rule, going\n"
    "back until it has kept N. Periods are in local time (TZ). A multi-disk set is\n"
    "kept whole when any member is kept. A backup in use (read by a restore, serve or\n"
    "verify, or the parent of a running backup) is kept, and the report says by whom.\n"
    "Only the index changes; run `gc` afterwards\n"
    "to reclaim space. See docs/maintenance.md for a worked example."
)

RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")


def add_arguments(p: argparse.ArgumentParser) -> None:
    for rule in RULES:
        what = "backups" if rule == "last" else f"{rule} backups (newest of each period)"
        p.add_argument(f"--keep-{rule}", type=numbers.integer(0, 1_000_000, noun="count"), default=0, metavar="N",
                       help=f"keep the last N {what}")
    p.add_argument("--disk", action="append", metavar="NAME",
                   help="only prune this disk's backups (repeatable; default: every disk)")
    p.add_argument("--dry-run", action="store_true", help="show what would be forgotten and why; change nothing")


def run(args) -> int:
    from ...errors import NotFound
    from ...repo.forget import forget_ids
    from ...repo.prune import KeepPolicy, plan
    from ..output import print_json, summary
    from ..repoargs import open_repo

    policy = KeepPolicy(**{r: getattr(args, f"keep_{r}") for r in RULES})
    with open_repo(args) as repo:
        backups = repo.list_backups()
        for disk in args.disk or ():
            if not any(b.disk == disk for b in backups):
                raise NotFound(f"no backups of disk {disk!r} in this repository",
                               hint="`nbdbackup list` shows the disks")
        decisions = plan(backups, policy, disks=args.disk)   # UsageError without a --keep-* option
        remove = [d.backup.id for d in decisions if not d.keep]
        if not args.dry_run and remove:
            kept = forget_ids(repo, remove).kept      # pinned by a running reader or backup: left
            for d in decisions:
                if d.backup.id in kept:
                    d.keep, d.reasons = True, [f"kept, in use by {kept[d.backup.id]}"]
            remove = [d.backup.id for d in decisions if not d.keep]
    if args.json:
        print_json({"dry_run": bool(args.dry_run), "policy": policy.to_json(),
                    "kept": len(decisions) - len(remove), "removed": len(remove),
                    "decisions": [d.to_json() for d in decisions]})
        return 0
    if not args.quiet:
        for d in decisions:
            j = d.to_json()
            print(f"{j['action']:<6}  {j['id']:<24}  {j['disk']:<12}  {j['created']}  {d.reason}")
    verb = "would forget" if args.dry_run else "forgot"
    summary(args, f"{verb} {len(remove)} of {len(decisions)} backup(s), kept {len(decisions) - len(remove)}"
                  + ("" if args.dry_run or not remove else "; run `nbdbackup gc` to reclaim their space"))
    return 0
