"""Forgetting backups: delete their index rows, whole sets at a time.

Only the backups and backup_segments rows go; map segments, chunks and packs
stay until gc, which cannot run while a writer or reader holds its lock. So
forget is safe alongside running backups (a writer that loaded a forgotten
parent's map still finds its segments) and never touches another backup.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from sqlalchemy import delete, select

from .index import write_txn
from .indexerrors import index_errors
from .info import BackupInfo
from .schema import backup_segments, backups

_IN_BATCH = 500


@dataclass
class ForgetResult:
    forgotten: list[BackupInfo] = field(default_factory=list)
    asked: list[str] = field(default_factory=list)              # ids the refs resolved to
    set_members: dict[str, list[str]] = field(default_factory=dict)  # set_id -> ids added as members

    def set_notes(self) -> list[str]:
        return [f"backup(s) {', '.join(ids)} forgotten too: same set {sid} as a named backup "
                "(sets are forgotten whole, never half a VM)"
                for sid, ids in self.set_members.items() if ids]

    def to_json(self) -> dict:
        return {"forgotten": [b.to_json() for b in self.forgotten], "requested": self.asked,
                "set_members_added": self.set_members}


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


def delete_backups(repo, ids: Iterable[str]) -> int:
    """Delete the index rows of backups *ids* in one transaction; returns rows deleted."""
    ids = list(dict.fromkeys(ids))
    n = 0
    with write_txn(repo.index_db) as conn:
        for i in range(0, len(ids), _IN_BATCH):
            part = ids[i:i + _IN_BATCH]
            pks = select(backups.c.pk).where(backups.c.id.in_(part)).scalar_subquery()
            conn.execute(delete(backup_segments).where(backup_segments.c.backup_pk.in_(pks)))
            n += conn.execute(delete(backups).where(backups.c.id.in_(part))).rowcount
    return n


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
    (another forget ran meanwhile) are skipped: the goal is reached either way."""
    with index_errors("forget", repo):
        present = {b.id for b in repo.list_backups()}
    return forget(repo, [i for i in ids if i in present])
