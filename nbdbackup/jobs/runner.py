"""A run of a job: the sources expanded (libvirt globs), one child process per source, then
the job's prune over the disks this run backed up, and the repository's listing for the
metrics. A failed source never stops the others."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

from ..errors import EXIT_CODE_HELP, NbdBackupError, NotFound
from .children import Child, base_argv, run_all
from .jobfile import RULES, Job, SourceSpec

log = logging.getLogger("nbdbackup")


@dataclass
class SourceRun:
    """One source of the run (a glob gives one per domain it matches)."""
    spec: SourceSpec
    target: str                   # the domain, after a glob's expansion; else spec.target
    kind: str                     # "full" | "incremental"
    child: Child | None = None    # None: it could not even start (error says why)
    error: str | None = None
    hint: str | None = None
    exit_code: int = 0
    backups: list[dict] = field(default_factory=list)    # the child's records of its committed backups

    @property
    def label(self) -> str:
        return f"{self.spec.kind}:{self.target}"

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and self.error is None

    @property
    def duration_s(self) -> float:
        return self.child.ended - self.child.started if self.child and self.child.ended else 0.0

    def static_disks(self) -> list[str] | None:
        """The disk names this source backs up, when the job file alone tells them."""
        o, kind = self.spec.options, self.spec.kind
        if kind == "nbd":
            return [o["disk"]]
        if kind == "image":
            import os

            return [o.get("disk") or os.path.splitext(os.path.basename(self.target))[0]]
        if kind == "qmp":
            return list(o.get("disk") or o["node"])
        return None       # libvirt: from the domain's XML, which the child reads

    def to_json(self) -> dict:
        return {"source": self.label, "job_source": self.spec.number, "kind": self.kind,
                "result": "ok" if self.ok else "failed", "exit_code": self.exit_code,
                "meaning": EXIT_CODE_HELP.get(self.exit_code, "?"), "error": self.error, "hint": self.hint,
                "started": self.child.started if self.child else None,
                "ended": self.child.ended if self.child else None,
                "duration_s": round(self.duration_s, 3), "backups": self.backups}


def expand(job: Job) -> list[tuple[SourceSpec, str, NbdBackupError | None]]:
    """(spec, target, error) per source to run: a libvirt glob becomes one per matching domain
    (sorted), or one failed entry when it matches none or libvirt cannot be asked. A domain
    that two sources name runs once, with the first source's options."""
    out, seen = [], set()
    for spec in job.sources:
        uri = spec.options.get("connect", job.connect) if spec.kind == "libvirt" else None
        targets = [spec.target]
        if spec.is_glob:
            try:
                targets = _domains(spec.target, uri)
            except NbdBackupError as e:
                out.append((spec, spec.target, e))
                continue
            if not targets:
                out.append((spec, spec.target, NotFound(f"no libvirt domain on {uri} matches {spec.target!r}")))
                continue
        for t in targets:
            if (spec.kind, t, uri) in seen:
                log.warning("%s:%s is named by more than one source; backed up once, with the options "
                            "of the first (source #%d's repeat skipped)", spec.kind, t, spec.number)
                continue
            seen.add((spec.kind, t, uri))
            out.append((spec, t, None))
    return out


def _domains(pattern: str, uri: str) -> list[str]:
    from ..sources.libvirt_domain import domain_names, open_connection

    conn = open_connection(uri)     # UsageError without the binding, SourceUnreachable without libvirtd
    try:
        return domain_names(conn, pattern)
    finally:
        conn.close()


def repo_argv(job: Job, args) -> list[str]:
    """The options every child gets: where the repository is and how to open it (secrets
    only by file name or environment), --json, and the run's own logging options."""
    a = [*base_argv(), "--repo", job.repository, "--json"]
    # the job's settings; the run's own options (or $NBDBACKUP_INDEX_URL) where the job has none
    # the index URL goes by the environment (repo_environment): /proc/PID/cmdline is world-readable
    for opt, value in (("--s3-endpoint", job.s3_endpoint or getattr(args, "s3_endpoint", None)),
                       ("--key-file", job.key_file or getattr(args, "key_file", None)),
                       ("--passphrase-file", job.passphrase_file or getattr(args, "passphrase_file", None)),
                       ("--log-file", getattr(args, "log_file", None))):
        if value:
            a += [opt, value]
    if getattr(args, "lock_wait", 0):
        a += ["--lock-wait", str(args.lock_wait)]
    a += ["-v"] * int(getattr(args, "verbose", 0) or 0)
    return a


def repo_environment(job: Job, args) -> dict[str, str]:
    """What every child gets in its environment besides os.environ: the index URL (which may
    carry a password from $NBDBACKUP_INDEX_URL or --index-url), never on a command line."""
    url = job.index_url or getattr(args, "index_url", None)
    return {"NBDBACKUP_INDEX_URL": url} if url else {}


def source_argv(spec: SourceSpec, target: str, kind: str, job: Job) -> list[str]:
    """The `full|incremental` command line of one source (cli/backupargs.py's options)."""
    o = spec.options
    a = [kind]
    if spec.kind == "libvirt":
        a += ["--libvirt", target, "--connect", o.get("connect", job.connect)]
        for t in o.get("exclude-disk", ()):
            a += ["--exclude-disk", t]
        for t, name in o.get("disk", {}).items():
            a += ["--disk", f"{t}={name}"]
        if o.get("quiesce"):
            a.append("--quiesce")
    elif spec.kind == "image":
        a += ["--image", target]
        if "disk" in o:
            a += ["--disk", o["disk"]]
        if "format" in o:
            a += ["--format", o["format"]]
    elif spec.kind == "qmp":
        a += ["--qmp", target]
        for n in o["node"]:
            a += ["--node", n]
        for d in o.get("disk", ()):
            a += ["--disk", d]
        for key in ("nbd-server", "qga", "state-dir"):
            if key in o:
                a += [f"--{key}", o[key]]
    else:
        a += ["--source", target, "--disk", o["disk"]]
        if kind == "incremental" and "bitmap" in o:
            a += ["--bitmap", o["bitmap"]]
    if "scratch-dir" in o:
        a += ["--scratch-dir", o["scratch-dir"]]
    if "connections" in o:
        a += ["--connections", str(o["connections"])]
    if o.get("compress-all"):
        a.append("--compress-all")
    if kind == "incremental":
        if o.get("no-fallback"):
            a.append("--no-fallback")
        if "check-clean" in o:
            a += ["--check-clean", f"{o['check-clean']:g}"]
    return a


@dataclass
class RunReport:
    started: float
    ended: float = 0.0
    sources: list[SourceRun] = field(default_factory=list)
    prune: dict | None = None          # {"result", "exit_code", "error", "disks", "removed"}
    listing: list[dict] | None = None  # the repository's backups after the run (for the metrics)
    listing_error: str | None = None
    libvirt_patterns: list[str] = field(default_factory=list)   # the job's libvirt names and globs

    @property
    def failed(self) -> list[SourceRun]:
        return [s for s in self.sources if not s.ok]

    @property
    def ok(self) -> bool:
        return not self.failed and (self.prune is None or self.prune["result"] == "ok")


def plan(job: Job, *, full: bool) -> list[SourceRun]:
    runs = []
    for spec, target, error in expand(job):
        # an NBD export without a bitmap has no record of changes: every run is a full
        no_bitmap = spec.kind == "nbd" and "bitmap" not in spec.options
        kind = "full" if full or spec.options.get("full") or no_bitmap else "incremental"
        r = SourceRun(spec=spec, target=target, kind=kind)
        if error is not None:
            r.error, r.hint, r.exit_code = str(error), error.hint, int(error.exit_code)
        runs.append(r)
    return runs


def commands(job: Job, runs: list[SourceRun], args) -> list[list[str]]:
    common = repo_argv(job, args)
    return [common + source_argv(r.spec, r.target, r.kind, job) for r in runs if r.error is None]


def run_job(job: Job, args, *, full: bool, list_repository: bool = True) -> RunReport:
    report = RunReport(started=time.time(),
                       libvirt_patterns=[s.target for s in job.sources if s.kind == "libvirt"])
    report.sources = plan(job, full=full)
    common = repo_argv(job, args)
    for r in report.sources:
        if r.error is None:
            r.child = Child(r.label, common + source_argv(r.spec, r.target, r.kind, job))
    run_all([r.child for r in report.sources if r.child], job.concurrency,
            extra_env=repo_environment(job, args))
    for r in report.sources:
        if r.child:
            _take_result(r)
    backed_up = sorted({b["disk"] for r in report.sources if r.ok for b in r.backups})
    if job.prune and backed_up:
        report.prune = _prune(job, args, backed_up)
    if list_repository:         # only the metrics need it: one more child process otherwise
        report.listing, report.listing_error = _listing(job, args)
    report.ended = time.time()
    return report


def _take_result(r: SourceRun) -> None:
    c = r.child
    doc = c.document()
    r.exit_code = c.exit_code
    if c.exit_code == 0:
        r.backups = [_backup_summary(d) for d in (doc if isinstance(doc, list) else [doc] if doc else [])]
        if not r.backups:
            r.error, r.exit_code = "the source's run printed no backup record", 1
        return
    if isinstance(doc, dict) and "error" in doc:
        r.error, r.hint = doc["error"], doc.get("hint")
    else:      # it crashed or was killed before it could say why
        last = next((ln for ln in reversed(c.stderr_tail) if ln.strip()), "")
        r.error = f"exited with {c.exit_code}" + (f": {last}" if last else "")


def _backup_summary(d: dict) -> dict:
    keep = ("id", "disk", "kind", "parent", "created", "size", "read_bytes", "stored_bytes", "duration_s",
            "set_id", "source")
    return {k: d.get(k) for k in keep}


def _child(job: Job, args, label: str, argv: list[str]) -> Child:
    c = Child(label, repo_argv(job, args) + argv)
    run_all([c], 1, extra_env=repo_environment(job, args))
    return c


def _prune(job: Job, args, disks: list[str]) -> dict:
    """The job's [prune] over the disks this run backed up (and only those: a disk whose
    backup failed keeps every backup it has, so failing runs never thin its history)."""
    argv = ["prune"]
    for rule in RULES:
        if job.prune.get(rule):
            argv += [f"--keep-{rule}", str(job.prune[rule])]
    for d in disks:
        argv += ["--disk", d]
    c = _child(job, args, "prune", argv)
    doc = c.document()
    out = {"result": "ok" if c.exit_code == 0 else "failed", "exit_code": c.exit_code, "disks": disks,
           "error": None, "removed": None, "kept": None}
    if c.exit_code == 0 and isinstance(doc, dict):
        out["removed"], out["kept"] = doc.get("removed"), doc.get("kept")
    elif isinstance(doc, dict):
        out["error"] = doc.get("error")
    else:
        out["error"] = f"exited with {c.exit_code}"
    return out


def _listing(job: Job, args) -> tuple[list[dict] | None, str | None]:
    c = _child(job, args, "list", ["list"])
    doc = c.document()
    if c.exit_code == 0 and isinstance(doc, list):
        return doc, None
    error = doc.get("error") if isinstance(doc, dict) else f"exited with {c.exit_code}"
    log.warning("cannot list the repository for the metrics: %s", error)
    return None, error
