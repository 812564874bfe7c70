"""Forgetting backups: delete their index rows, whole sets at a time.

Only the backups and backup_segments rows go; map segments, chunks and packs
stay until gc. A backup pinned by a live lease (a reader reads it, a running
backup builds on it: repo/leases.py) is never forgotten: `forget` refuses it
(LockedError, exit 3, naming the holder), prune keeps it and says so. The rows
are locked (FOR UPDATE on PostgreSQL) before the pins are read, so a pin and a
forget of one backup are ordered. A forget never touches another backup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from sqlalchemy import delete, select

from ..errors import LockedError
from .index import write_txn
from .indexerrors import index_errors
from .info import BackupInfo
from .leases import LEASE_TTL_S, pinned_by
from .schema import backup_segments, backups

_IN_BATCH = 500


@dataclass
class ForgetResult:
    forgotten: list[BackupInfo] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)              # ids the refs resolved to
    set_members: dict[str, list[str]] = field(default_factory=dict)  # set_id -> ids added as members
    kept: dict[str, str] = field(default_factory=dict)          # id -> "in use by ..." (pinned by a lease)

    def set_notes(self) -> list[str]:
        return [f"backup(s) {', '.join(ids)} forgotten too: same set {sid} as a named backup "
                "(sets are forgotten whole, never half a VM)"
                for sid, ids in self.set_members.items() if ids]

    def to_json(self) -> dict:
        return {"forgotten": [b.to_json() for b in self.forgotten], "requested": self.asked,
                "set_members_added": self.set_members,
                "kept_in_use": self.kept}


def expand_sets(repo, infos: Iterable[BackupInfo]) -> tuple[list[BackupInfo], dict[str, list[str]]]:
    """*infos* plus every other member of their sets; (all, set_id -> added ids)."""
    chosen = {b.id: b for b in infos}
    added: dict[str, list[str]] = {}
    set_ids = {b.set_id for b in chosen.values() if b.set_id}
    if set_ids:
        members = {b.id: b for b in repo.list_backups() if b.set_id in set_ids}
        for b in members.values():
            if b.id not in chosen:
                chosen[b.id] = b
                added.setdefault(b.set_id, []).append(b.id)
    return sorted(chosen.values(), key=lambda b: (b.created, b.id)), added


def delete_backups(repo, ids: Iterable[str], *, pinned: str = "refuse",
                   set_of: dict[str, str | None] | None = None) -> dict[str, str]:
    """Delete the index rows of backups *ids* in one transaction, unless a live lease pins one
    (a reader reads it, a backup builds on it): *pinned* "refuse" raises LockedError naming the
    holder and deletes nothing; "skip" leaves the pinned ones and their set members (*set_of*:
    id -> set_id). Returns the backups left: id -> who holds it."""
    ids = list(dict.fromkeys(ids))
    with write_txn(repo.index_db) as conn:
        for i in range(0, len(ids), _IN_BATCH):     # lock the rows: a pin taken now waits for us
            q = select(backups.c.id).where(backups.c.id.in_(ids[i:i + _IN_BATCH]))
            conn.execute(q.with_for_update() if conn.dialect.name == "postgresql" else q).all()
        held = pinned_by(conn, ids)
        if held and pinned == "refuse":
            bid, who = next(iter(held.items()))
            raise LockedError(f"backup {bid} is in use by {who}; nothing was forgotten",
                              hint="wait for it to finish (a lease of a killed run expires within "
                                   f"{LEASE_TTL_S:.0f} s, or at once on its own host)")
        kept = dict(held)
        so = set_of or {}
        via = {so[b]: b for b in held if so.get(b)}       # set id -> a pinned member
        for b in ids:
            if b not in kept and so.get(b) in via:
                kept[b] = f"{held[via[so[b]]]} (through its set member {via[so[b]]})"
        gone = [b for b in ids if b not in kept]
        for i in range(0, len(gone), _IN_BATCH):
            part = gone[i:i + _IN_BATCH]
            pks = select(backups.c.pk).where(backups.c.id.in_(part)).scalar_subquery()
            conn.execute(delete(backup_segments).where(backup_segments.c.backup_pk.in_(pks)))
            conn.execute(delete(backups).where(backups.c.id.in_(part)))
    return kept


def forget(repo, refs: Iterable[str]) -> ForgetResult:
    """Resolve every ref first (NotFound before anything is deleted), add set members, delete."""
    asked = {}
    with index_errors("forget", repo):
        for ref in refs:
            info = repo.resolve(ref)
            asked[info.id] = info
        everything, added = expand_sets(repo, asked.values())
        delete_backups(repo, [b.id for b in everything])
    return ForgetResult(forgotten=everything, asked=list(asked), set_members=added)


def forget_ids(repo, ids: Iterable[str]) -> ForgetResult:
    """Forget backups by id (prune's path); sets are still made whole. Ids already gone
    (another forget ran meanwhile) are skipped: the goal is reached either way. Backups a live
    lease pins are kept (with their sets): ForgetResult.kept says by whom."""
    with index_errors("forget", repo):
        present = {b.id: b for b in repo.list_backups()}
        chosen, added = expand_sets(repo, [present[i] for i in dict.fromkeys(ids) if i in present])
        kept = delete_backups(repo, [b.id for b in chosen], pinned="skip", set_of={b.id: b.set_id for b in chosen})
    return ForgetResult(forgotten=[b for b in chosen if b.id not in kept], asked=[i for i in ids if i in present],
                        set_members=added, kept=kept)
