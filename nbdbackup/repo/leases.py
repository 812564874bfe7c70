"""Leases: what lets gc run beside backups and readers (docs/design.md "gc beside everything").

A running backup writer (kind "backup") or reader (kind "read": restore, serve,
verify) holds a row in `leases` while it runs. The row is inserted in the same
transaction that reads gc_state.epoch (row-locked FOR SHARE on PostgreSQL; SQLite
serialises write transactions), so a lease and a gc's epoch bump are ordered:
the lease's start_epoch S is the epoch of every gc that can still see it live.
A daemon thread renews heartbeat_ms every LEASE_RENEW_S; a lease whose heartbeat
is older than LEASE_TTL_S, or whose process on this host is gone, is dead, and
the next gc deletes it (its pins go with it). Time is the database's clock on
PostgreSQL (hosts' clocks do not matter), time.time() on SQLite (one host).

A lease pins backups (lease_pins): a reader its backup, a writer its parent.
forget refuses a backup pinned by a live lease, prune keeps it.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections import namedtuple
from typing import Iterable

from ..errors import LockedError, NotFound
from .indexsql import EngineIndex, IndexSql, SqlConn, in_list, index_sql, sql_conn
from .locks import pid_alive

log = logging.getLogger(__name__)

LEASE_RENEW_S = 10.0     # heartbeat period
LEASE_TTL_S = 60.0       # a lease without a heartbeat for this long is dead
CLOCK_SKEW_S = 300.0     # margin between the clocks of the database, hosts and object storage
HOST = socket.gethostname()

LEASE_COLUMNS = "id, kind, host, pid, command, started_ms, heartbeat_ms, start_epoch"
LeaseRow = namedtuple("LeaseRow", LEASE_COLUMNS.replace(",", ""))
_INSERT_LEASE = (f"INSERT INTO leases ({LEASE_COLUMNS}) "
                 "VALUES (:id, :kind, :host, :pid, :command, :now, :now, :epoch)")


def db_now_ms(conn) -> int:
    """Now, in ms since the epoch, by the database's clock (PostgreSQL) or this host's (SQLite)."""
    conn = sql_conn(conn)
    if conn.dialect == "postgresql":
        return int(conn.scalar("SELECT (extract(epoch FROM clock_timestamp()) * 1000)::bigint"))
    return int(time.time() * 1000)


def is_dead(row, now: int) -> bool:
    """Is lease *row* (host, pid, heartbeat_ms) dead at *now* (db_now_ms)?"""
    if now - row.heartbeat_ms > LEASE_TTL_S * 1000:
        return True
    return row.host == HOST and not pid_alive(row.pid)


def describe(row) -> str:
    since = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(row.started_ms / 1000))
    return f"{row.kind} pid {row.pid} on {row.host} since {since}: {row.command}"


def _for_share(sql: str, conn: SqlConn) -> str:
    return sql + " FOR SHARE" if conn.dialect == "postgresql" else sql


def _epoch(conn: SqlConn, *, share: bool = True) -> int:
    sql = "SELECT epoch FROM gc_state WHERE id = 1"
    return int(conn.scalar(_for_share(sql, conn) if share else sql))


def _pin(conn: SqlConn, lease_id: str, backup_ids: Iterable[str], *, missing_ok: bool) -> list[str]:
    pinned = []
    for bid in dict.fromkeys(backup_ids):
        found = conn.rows(_for_share("SELECT id FROM backups WHERE id = :id", conn), {"id": bid})
        if not found:
            if missing_ok:
                continue
            raise NotFound(f"backup {bid} was forgotten meanwhile", hint="see `nbdbackup list`")
        conn.run("INSERT INTO lease_pins (lease_id, backup_id) VALUES (:lease, :backup)",
                 {"lease": lease_id, "backup": bid})
        pinned.append(bid)
    return pinned


class Lease:
    """A held lease; release() deletes it (and its pins). A context manager too. *index*: an
    IndexSql or a SQLAlchemy engine (the statements are the same text on either)."""

    def __init__(self, index: IndexSql, kind: str, *, pins: Iterable[str] = (), missing_ok: bool = False,
                 renew_s: float | None = None):
        self.index, self.kind = index_sql(index), kind
        self.id = uuid.uuid4().hex
        self.command = " ".join(sys.argv)[:2000]
        self.lost = False          # the row vanished (a gc judged it dead): a writer must not commit
        self._stop = threading.Event()
        with self.index.write() as conn:
            self.start_epoch = _epoch(conn)
            self.started_ms = self._insert(conn, self.start_epoch)
            self.pins = _pin(conn, self.id, pins, missing_ok=missing_ok)
        self._thread = threading.Thread(target=self._renew_loop, args=(renew_s or LEASE_RENEW_S,),
                                        name=f"nbdbackup-lease-{kind}", daemon=True)
        self._thread.start()

    def _insert(self, conn: SqlConn, epoch: int) -> int:
        now = db_now_ms(conn)
        conn.run(_INSERT_LEASE, {"id": self.id, "kind": self.kind, "host": HOST, "pid": os.getpid(),
                                 "command": self.command, "now": now, "epoch": epoch})
        return now

    def pin(self, backup_ids: Iterable[str], *, missing_ok: bool = False) -> list[str]:
        with self.index.write() as conn:
            got = _pin(conn, self.id, [b for b in backup_ids if b not in self.pins], missing_ok=missing_ok)
        self.pins.extend(got)
        return got

    def unpin(self, backup_ids: Iterable[str]) -> None:
        ids = [b for b in backup_ids if b in self.pins]
        if not ids:
            return
        marks, params = in_list("b", ids)
        with self.index.write() as conn:
            conn.run(f"DELETE FROM lease_pins WHERE lease_id = :lease AND backup_id IN ({marks})",
                     {"lease": self.id, **params})
        self.pins = [b for b in self.pins if b not in ids]

    def renew(self) -> bool:
        """One heartbeat; False (and .lost) when the row is gone."""
        with self.index.write() as conn:
            n = conn.run("UPDATE leases SET heartbeat_ms = :now WHERE id = :id",
                         {"now": db_now_ms(conn), "id": self.id})
        if n == 0 and not self._stop.is_set():
            self.lost = True
        return n > 0

    def _renew_loop(self, period: float) -> None:
        while not self._stop.wait(period):
            try:
                if self.renew():
                    continue
                if self.kind != "read":     # a writer cannot get back what gc may have reclaimed: fencing
                    log.warning("the backup lease %s was dropped by a gc (no heartbeat for %ss); this "
                                "backup will not commit", self.id[:8], LEASE_TTL_S)
                    return
                self._reinstate()
            except Exception as e:    # the database is away: try again next period
                log.warning("lease heartbeat failed: %s", e)

    def _reinstate(self) -> None:
        """A reader whose lease a gc dropped (the index was out of reach past the TTL) takes it
        again, with the pins of the backups that still exist (a long serve goes on)."""
        with self.index.write() as conn:
            self._insert(conn, _epoch(conn))
            pins = _pin(conn, self.id, self.pins, missing_ok=True)
        lost, self.pins, self.lost = [b for b in self.pins if b not in pins], pins, False
        log.warning("the read lease %s had been dropped by a gc and was taken again%s", self.id[:8],
                    f"; backup(s) {', '.join(lost)} were forgotten meanwhile" if lost else "")

    def check_held(self, conn) -> None:
        """Inside the commit's transaction: LockedError unless the lease row still exists
        (locked FOR UPDATE on PostgreSQL, so a gc cannot delete it before we commit)."""
        conn = sql_conn(conn)
        sql = "SELECT id FROM leases WHERE id = :id" + (" FOR UPDATE" if conn.dialect == "postgresql" else "")
        if self.lost or not conn.rows(sql, {"id": self.id}):
            raise LockedError(
                f"this backup's lease on the repository expired (no heartbeat for over {LEASE_TTL_S:.0f} s: "
                "the process was paused or cut off from the index) and a gc may have reclaimed data it "
                "relied on; nothing was committed",
                hint="run the backup again")

    def release(self) -> None:
        if self._stop.is_set():
            return
        self._stop.set()
        try:
            with self.index.write() as conn:
                conn.run("DELETE FROM lease_pins WHERE lease_id = :id", {"id": self.id})
                conn.run("DELETE FROM leases WHERE id = :id", {"id": self.id})
        except Exception as e:      # the row expires by itself
            log.warning("could not release lease %s: %s", self.id[:8], e)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.release()


def reader_lease(index, pins: Iterable[str], *, missing_ok: bool = False) -> "Lease | None":
    """A read lease pinning *pins* on *index* (an IndexSql or an engine); None where this process
    cannot write the index (a read-only SQLite file: then no gc of ours can run either,
    docs/design.md)."""
    index = index_sql(index)
    if index.read_only:
        return None
    if isinstance(index, EngineIndex) and index.dialect == "sqlite":
        from .index import read_only_mode

        if read_only_mode(index.engine.url.render_as_string(hide_password=False)):
            return None
    return Lease(index, "read", pins=pins, missing_ok=missing_ok)


class Holds:
    """Several holds (locks, leases) released together, last first."""

    def __init__(self, *holds):
        self._holds = [h for h in holds if h is not None]

    def release(self) -> None:
        while self._holds:
            self._holds.pop().release()


def pinned_by(conn, backup_ids: Iterable[str]) -> dict[str, str]:
    """backup id -> who holds it (describe()), for those of *backup_ids* pinned by a live lease."""
    conn = sql_conn(conn)
    ids = list(dict.fromkeys(backup_ids))
    out: dict[str, str] = {}
    if not ids:
        return out
    now = db_now_ms(conn)
    cols = ", ".join(f"l.{c.strip()}" for c in LEASE_COLUMNS.split(","))
    for i in range(0, len(ids), 500):
        marks, params = in_list("b", ids[i:i + 500])
        for backup_id, *lease in conn.rows(f"SELECT p.backup_id, {cols} FROM lease_pins p JOIN leases l "
                                           f"ON l.id = p.lease_id WHERE p.backup_id IN ({marks})", params):
            row = LeaseRow(*lease)
            if not is_dead(row, now):
                out.setdefault(backup_id, describe(row))
    return out


def begin_gc(index, *, dry_run: bool = False) -> dict:
    """A gc's first step, one transaction: bump the epoch to G, delete dead leases (and their pins),
    compute the cutoff C = min(G, start epoch of every live backup lease) and the time before which
    an unindexed object cannot belong to a live backup (the oldest live backup lease's start).
    *dry_run*: the same figures, nothing changed."""
    with index_sql(index).write() as conn:
        if not dry_run:
            conn.run("UPDATE gc_state SET epoch = epoch + 1 WHERE id = 1")
        g = _epoch(conn, share=False) + dry_run
        now = db_now_ms(conn)
        rows = [LeaseRow(*r) for r in conn.rows(f"SELECT {LEASE_COLUMNS} FROM leases")]
        dead = [r.id for r in rows if is_dead(r, now)]
        for i in range(0, len(dead) * (not dry_run), 500):
            marks, params = in_list("l", dead[i:i + 500])
            conn.run(f"DELETE FROM lease_pins WHERE lease_id IN ({marks})", params)
            conn.run(f"DELETE FROM leases WHERE id IN ({marks})", params)
        live = [r for r in rows if r.id not in set(dead)]
        writers = [r for r in live if r.kind == "backup"]
    return {"epoch": g, "cutoff": min([g] + [r.start_epoch for r in writers]), "now_ms": now,
            "oldest_writer_ms": min((r.started_ms for r in writers), default=None),
            "dead_leases": len(dead), "live_leases": [describe(r) for r in live]}
