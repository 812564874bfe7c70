"""The run's metrics in Prometheus' text exposition format, for node_exporter's textfile
collector: written whole to a temporary file, fsynced, renamed over the old one (a scrape
never sees half a file). docs/jobs.md lists every metric."""

from __future__ import annotations

import fnmatch
from datetime import datetime

from ..fsutil import write_atomically
from .runner import RunReport

# (name, help) of each family; every one is a gauge (a textfile is rewritten each run, so
# nothing here only ever grows: no _total counters).
DISK_FAMILIES = (
    ("nbdbackup_last_success_timestamp_seconds",
     "Creation time of the disk's newest backup in the repository (Unix time)"),
    ("nbdbackup_last_run_success", "1 when the last run backed the disk up, 0 when its source failed"),
    ("nbdbackup_last_run_duration_seconds",
     "Duration of the last run's backup of the disk (of its source when it failed)"),
    ("nbdbackup_last_run_read_bytes", "Bytes the last run read from the disk"),
    ("nbdbackup_last_run_stored_bytes", "New bytes the last run's backup of the disk added to the repository"),
    ("nbdbackup_repository_backups", "Backups of the disk in the repository"),
)
SOURCE_FAMILY = ("nbdbackup_source_last_run_success",
                 "1 when the last run's source (a job file [[source]], a glob per domain) succeeded, else 0")
RUN_FAMILIES = (
    ("nbdbackup_run_start_timestamp_seconds", "When the last run started (Unix time)"),
    ("nbdbackup_run_end_timestamp_seconds", "When the last run ended (Unix time)"),
    ("nbdbackup_run_sources", "Sources the last run backed up or tried to"),
    ("nbdbackup_run_sources_failed", "Sources of the last run that failed"),
    ("nbdbackup_run_prune_success", "1 when the last run's prune succeeded or had nothing to do, else 0"),
    ("nbdbackup_run_listing_success",
     "1 when the last run could list the repository (the per-disk last success and backups), else 0"),
)


def escape_label(value: str) -> str:
    """A label value as the exposition format writes it: \\ \" and newline escaped."""
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(v: float) -> str:
    return repr(float(v)) if isinstance(v, float) else str(int(v))


def _created_s(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def disk_rows(report: RunReport) -> dict[str, dict[str, float]]:
    """Per disk this run was about: its values for DISK_FAMILIES (missing ones left out)."""
    listing = report.listing or []
    newest: dict[str, float] = {}
    counts: dict[str, int] = {}
    for b in listing:
        t = _created_s(b["created"])
        newest[b["disk"]] = max(newest.get(b["disk"], t), t)
        counts[b["disk"]] = counts.get(b["disk"], 0) + 1
    rows: dict[str, dict[str, float]] = {}
    for s in report.sources:
        if s.ok:
            for b in s.backups:
                rows[b["disk"]] = {"success": 1, "duration": b["duration_s"], "read": b["read_bytes"],
                                   "stored": b["stored_bytes"]}
            continue
        # a failed source: its disks as the job file names them, else as the repository knows them
        disks = s.static_disks()
        if disks is None:
            prefix = f"libvirt:{s.target}/"
            disks = sorted({b["disk"] for b in listing if (b.get("source") or "").startswith(prefix)})
        for d in disks:
            rows.setdefault(d, {"success": 0, "duration": s.duration_s, "read": 0, "stored": 0})
    # a disk the job's libvirt sources backed up before but not in this run (the domain gone or
    # renamed, a disk no longer backed up): its last success stays, so the stale alert fires
    # instead of the series vanishing
    for b in listing:
        source = b.get("source") or ""
        if source.startswith("libvirt:") and b["disk"] not in rows:
            domain = source[len("libvirt:"):].split("/", 1)[0]
            if any(fnmatch.fnmatchcase(domain, p) for p in report.libvirt_patterns):
                rows[b["disk"]] = {}
    for d, row in rows.items():
        if d in newest:
            row["last_success"] = newest[d]
        if report.listing is not None:
            row["backups"] = counts.get(d, 0)
    return rows


def render(report: RunReport) -> str:
    rows = disk_rows(report)
    keys = ("last_success", "success", "duration", "read", "stored", "backups")
    out: list[str] = []

    def family(name: str, help_text: str, samples: list[tuple[str, float]]) -> None:
        if not samples:
            return
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} gauge")
        out.extend(f"{name}{labels} {_number(v)}" for labels, v in samples)

    for (name, help_text), key in zip(DISK_FAMILIES, keys):
        family(name, help_text, [(f'{{disk="{escape_label(d)}"}}', row[key])
                                 for d, row in sorted(rows.items()) if key in row])
    family(*SOURCE_FAMILY, [(f'{{source="{escape_label(s.label)}"}}', 1 if s.ok else 0)
                            for s in report.sources])
    run_values = (report.started, report.ended, len(report.sources), len(report.failed),
                  1 if report.prune is None or report.prune["result"] == "ok" else 0,
                  1 if report.listing is not None else 0)
    for (name, help_text), v in zip(RUN_FAMILIES, run_values):
        family(name, help_text, [("", v)])
    return "\n".join(out) + "\n"


def write_metrics(path: str, text: str) -> None:
    """*text* at *path*, mode 0644 (node_exporter reads it), replacing the old file in one rename."""
    write_atomically(path, text.encode(), 0o644)
