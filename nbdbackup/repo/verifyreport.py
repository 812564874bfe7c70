"""What verify found: per damaged backup, and for the whole run (text lines and --json)."""

from __future__ import annotations

from dataclasses import dataclass, field

from . import damage
from .ids import from_ms, iso_ms
from .info import BackupInfo


@dataclass
class DamagedBackup:
    backup: BackupInfo
    ranges: list[tuple[int, int]] = field(default_factory=list)   # (offset, length) disk bytes
    problems: list[str] = field(default_factory=list)
    index_rows_bad: bool = False      # its index rows cannot be trusted (rebuild-index remakes them)

    @property
    def damaged_bytes(self) -> int:
        return sum(n for _, n in self.ranges)

    def to_json(self) -> dict:
        return {"id": self.backup.id, "disk": self.backup.disk, "damaged_bytes": self.damaged_bytes,
                "ranges": [{"offset": o, "length": n} for o, n in self.ranges], "problems": self.problems,
                "index_rows_bad": self.index_rows_bad}


@dataclass
class VerifyReport:
    backups_checked: int = 0
    chunks_total: int = 0          # distinct non-zero chunks the backups reference
    chunks_checked: int = 0        # read and hashed (all, or the sample)
    bytes_checked: int = 0         # stored bytes read
    segments_checked: int = 0
    manifests_checked: int = 0
    vm_definitions_checked: int = 0
    sample_percent: float | None = None
    damaged: list[DamagedBackup] = field(default_factory=list)
    vanished: list[BackupInfo] = field(default_factory=list)   # forgotten while verify ran: not checked
    index_check: str = "not run"      # "ok", "damaged", or "skipped (<dialect>)"
    index_problems: list[str] = field(default_factory=list)
    healed: list[damage.Mark] = field(default_factory=list)      # marked damaged before, read fine now
    damage_marks: list[damage.Mark] = field(default_factory=list)   # found damaged now (marked for healing)
    since_days: float | None = None
    skipped_recent: int = 0          # --since: verified clean within the window, not checked
    notes: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.damaged and not self.index_problems

    def heal_lines(self) -> list[str]:
        """What was healed and what remains (printed whether or not anything is damaged)."""
        out = []
        for m in self.healed:
            out.append(f"HEALED {m.kind} {m.hash.hex()[:16]}: damaged since {iso_ms(from_ms(m.found_ms))} "
                       f"({m.reason}); reads fine now, every backup naming it is whole again")
        for m in self.damage_marks[:50]:
            out.append(f"REMAINS {m.kind} {m.hash.hex()[:16]}: damaged since {iso_ms(from_ms(m.found_ms))}; "
                       "the next backup that reads the same bytes stores a fresh copy")
        if len(self.damage_marks) > 50:
            out.append(f"  ... {len(self.damage_marks) - 50} more damaged record(s) (see --json)")
        out += [f"note: {n}" for n in self.notes]
        return out

    def problem_lines(self) -> list[str]:
        out = [f"INDEX DAMAGED: {p}" for p in self.index_problems[:20]]
        if len(self.index_problems) > 20:
            out.append(f"  ... {len(self.index_problems) - 20} more index problem(s) (see --json)")
        out += [f"NOT CHECKED {b.id} (disk {b.disk}): forgotten while verify ran" for b in self.vanished]
        for d in self.damaged:
            out.append(f"DAMAGED {d.backup.id} (disk {d.backup.disk}): {d.damaged_bytes} bytes in "
                       f"{len(d.ranges)} range(s)")
            for o, n in d.ranges[:50]:
                out.append(f"  bytes {o}-{o + n - 1} (offset {o}, length {n})")
            if len(d.ranges) > 50:
                out.append(f"  ... {len(d.ranges) - 50} more range(s) (see --json)")
            for p in d.problems[:10]:
                out.append(f"  cause: {p}")
        return out

    def to_json(self) -> dict:
        return {"ok": self.ok, "backups_checked": self.backups_checked, "chunks_total": self.chunks_total,
                "chunks_checked": self.chunks_checked, "bytes_checked": self.bytes_checked,
                "segments_checked": self.segments_checked, "manifests_checked": self.manifests_checked,
                "vm_definitions_checked": self.vm_definitions_checked,
                "sample_percent": self.sample_percent, "index_check": self.index_check,
                "index_problems": self.index_problems,
                "damaged": [d.to_json() for d in self.damaged],
                "vanished": [{"id": b.id, "disk": b.disk} for b in self.vanished],
                "healed": [m.to_json() for m in self.healed],
                "damage_remaining": [m.to_json() for m in self.damage_marks],
                "since_days": self.since_days, "skipped_recent": self.skipped_recent, "notes": self.notes}
