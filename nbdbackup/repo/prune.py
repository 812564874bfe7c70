"""Retention policy: which backups `prune` keeps, and why.

Pure logic over objects with .id, .disk, .created (aware datetime) and
.set_id; no repository access. Semantics are Proxmox Backup Server's (see
docs/maintenance.md for a worked example):

* backups are grouped per disk and walked newest first;
* the rules run in the order last, hourly, daily, weekly, monthly, yearly;
* a rule keeps the newest backup of each period (hour, day, ISO week, month,
  year in local time), skipping periods that already hold a backup kept by an
  earlier rule, until it has kept N; periods without backups do not count;
  the older backups of a period it selected are removed and no later rule
  considers them;
* whatever no rule keeps is removed.

Sets (backups of several disks of one VM with the same set_id) are a unit: a
set is kept whole when any member is kept by its disk's rules; when prune is
limited to some disks, a set with members on other disks is kept whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, tzinfo
from typing import Any, Iterable

from ..errors import UsageError

RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")

# strftime patterns naming each rule's period; %G/%V is the ISO year/week.
_PERIOD_FORMAT = {
    "hourly": "%Y-%m-%d %H:00",
    "daily": "%Y-%m-%d",
    "weekly": "%G-W%V",
    "monthly": "%Y-%m",
    "yearly": "%Y",
}


@dataclass(frozen=True)
class KeepPolicy:
    last: int = 0
    hourly: int = 0
    daily: int = 0
    weekly: int = 0
    monthly: int = 0
    yearly: int = 0

    def __post_init__(self):
        for rule in RULES:
            n = getattr(self, rule)
            if not isinstance(n, int) or n < 0:
                raise UsageError(f"--keep-{rule} must be a whole number >= 0, not {n!r}")

    def is_empty(self) -> bool:
        return not any(getattr(self, r) for r in RULES)

    def to_json(self) -> dict:
        return {f"keep_{r}": getattr(self, r) for r in RULES}


@dataclass
class Decision:
    backup: Any
    keep: bool
    reasons: list[str] = field(default_factory=list)   # e.g. "daily 2026-11-25"

    @property
    def reason(self) -> str:
        return "; ".join(self.reasons) if self.reasons else "no rule keeps it"

    def to_json(self) -> dict:
        b = self.backup
        created = b.created
        return {"id": b.id, "disk": b.disk, "created": _iso(created), "set_id": getattr(b, "set_id", None),
                "action": "keep" if self.keep else "remove", "reasons": list(self.reasons)}


def _iso(dt: datetime) -> str:
    from datetime import timezone

    return dt.astimezone(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def period(rule: str, created: datetime, tz: tzinfo | None = None) -> str:
    """The period a backup falls in for *rule*, in *tz* (None: local time)."""
    if rule == "last":
        raise ValueError("keep-last has no period")
    return created.astimezone(tz).strftime(_PERIOD_FORMAT[rule])


def plan_disk(backups: Iterable[Any], policy: KeepPolicy, tz: tzinfo | None = None) -> dict[str, Decision]:
    """Apply *policy* to the backups of ONE disk; returns id -> Decision."""
    newest_first = sorted(backups, key=lambda b: (b.created, b.id), reverse=True)
    decided: dict[str, Decision] = {}
    for rule in RULES:
        n = getattr(policy, rule)
        if n <= 0:
            continue
        key = (lambda b: b.id) if rule == "last" else (lambda b, r=rule: period(r, b.created, tz))
        covered = {key(b) for b in newest_first if b.id in decided and decided[b.id].keep}
        selected: set[str] = set()
        for b in newest_first:
            if b.id in decided:
                continue
            p = key(b)
            if p in covered:
                continue
            if p in selected:
                decided[b.id] = Decision(b, False, [f"older backup in {rule} period {p}"])
                continue
            if len(selected) >= n:
                break
            selected.add(p)
            label = f"last {len(selected)}/{n}" if rule == "last" else f"{rule} {p}"
            decided[b.id] = Decision(b, True, [label])
    for b in newest_first:
        decided.setdefault(b.id, Decision(b, False, []))
    return decided


def plan(backups: Iterable[Any], policy: KeepPolicy, *, disks: Iterable[str] | None = None,
         tz: tzinfo | None = None) -> list[Decision]:
    """Apply *policy* per disk, then make sets whole. Only backups of *disks*
    (all when None) get decisions; the result is sorted oldest first."""
    if policy.is_empty():
        raise UsageError("prune needs at least one --keep-* option (e.g. --keep-daily 7)",
                         hint="to delete particular backups use `nbdbackup forget BACKUP`")
    all_backups = list(backups)
    wanted = None if disks is None else set(disks)
    in_scope = [b for b in all_backups if wanted is None or b.disk in wanted]
    by_disk: dict[str, list] = {}
    for b in in_scope:
        by_disk.setdefault(b.disk, []).append(b)
    decided: dict[str, Decision] = {}
    for disk_backups in by_disk.values():
        decided.update(plan_disk(disk_backups, policy, tz))
    _make_sets_whole(all_backups, decided)
    return sorted(decided.values(), key=lambda d: (d.backup.created, d.backup.id))


def _make_sets_whole(all_backups: list, decided: dict[str, Decision]) -> None:
    members: dict[str, list] = {}
    for b in all_backups:
        if getattr(b, "set_id", None):
            members.setdefault(b.set_id, []).append(b)
    for set_id, group in members.items():
        if len(group) < 2:
            continue
        outside = [b for b in group if b.id not in decided]
        kept = [b for b in group if b.id in decided and decided[b.id].keep]
        for b in group:
            d = decided.get(b.id)
            if d is None or d.keep:
                continue
            if kept:
                k = kept[0]
                d.keep = True
                d.reasons = [f"set {set_id}: {k.disk} member {k.id} kept ({decided[k.id].reason})"]
            elif outside:
                d.keep = True
                d.reasons = [f"set {set_id}: has members on disks not being pruned "
                             f"({', '.join(sorted({o.disk for o in outside}))})"]
