"""`nbdbackup run JOBFILE`: back up every source a job file names, prune, write metrics."""

from __future__ import annotations

import argparse

NAME = "run"
HELP = "back up every source of a TOML job file (a fleet of VMs), then prune; metrics for Prometheus"
DESCRIPTION = (
    "Reads JOBFILE (TOML: repository, [[source]] tables, [prune]; docs/jobs.md), refuses it\n"
    "with exit 2 naming the line and key when anything in it is wrong, then backs up each\n"
    "source in its own `nbdbackup incremental` (or `full`) process, at most `concurrency`\n"
    "at once. An incremental falls back to a full where it must. A failed source does not\n"
    "stop the others; the summary (or --json) names it, and the exit code is then 20.\n"
    "[prune] is applied afterwards to the disks whose backups succeeded in this run."
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("jobfile", metavar="JOBFILE", help="the TOML job file")
    p.add_argument("--full", action="store_true", help="a full backup of every source")
    p.add_argument("--metrics-file", metavar="PATH",
                   help="write Prometheus textfile-collector metrics to PATH after the run "
                        "(default: the job's metrics-file)")
    p.add_argument("--dry-run", action="store_true",
                   help="check the job file, expand its globs, print the commands; run nothing")


def run(args) -> int:
    import shlex
    import sys

    from ...errors import ExitCode
    from ...jobs import jobfile, runner
    from ..output import FILE_ONLY, log, print_json

    job = jobfile.load(args.jobfile)
    if args.dry_run:
        runs = runner.plan(job, full=args.full)
        cmds = runner.commands(job, runs, args)
        if args.json:
            print_json({"dry_run": True, "sources": [{"source": r.label, "kind": r.kind, "error": r.error}
                                                     for r in runs], "commands": cmds})
        else:
            for r in runs:
                if r.error:
                    print(f"# {r.label}: {r.error}")
            for c in cmds:
                print(shlex.join(c))
        return ExitCode.OK if all(r.error is None for r in runs) else ExitCode.SOME_SOURCES_FAILED
    metrics_file = args.metrics_file or job.metrics_file
    report = runner.run_job(job, args, full=args.full, list_repository=bool(metrics_file))
    if metrics_file:
        from ...jobs.metrics import render, write_metrics

        write_metrics(metrics_file, render(report))
    table = summary_table(report)
    if args.json:
        print_json(report_json(report))
    elif not args.quiet:
        print(table, file=sys.stderr)
    log.info("%s", table, extra=FILE_ONLY)     # the record a timer's --log-file keeps, even with --quiet
    return ExitCode.OK if report.ok else ExitCode.SOME_SOURCES_FAILED


def report_json(report) -> dict:
    return {"ok": report.ok, "started": report.started, "ended": report.ended,
            "sources_failed": len(report.failed), "sources": [s.to_json() for s in report.sources],
            "prune": report.prune}


def summary_table(report) -> str:
    from ..output import human_bytes as hb

    rows = [("SOURCE", "DISK", "KIND", "READ", "STORED", "DURATION", "RESULT")]
    for s in report.sources:
        if s.ok:
            for b in s.backups:
                rows.append((s.label, b["disk"], b["kind"], hb(b["read_bytes"]), hb(b["stored_bytes"]),
                             f"{b['duration_s']:.1f}s", "ok"))
        else:
            rows.append((s.label, "-", s.kind, "-", "-", f"{s.duration_s:.1f}s",
                         f"FAILED (exit {s.exit_code}): {s.error}"))
    fmt = "  ".join(f"{{:<{max(len(r[i]) for r in rows)}}}" for i in range(len(rows[0]) - 1)) + "  {}"
    lines = [fmt.format(*r) for r in rows]
    if report.prune:
        p = report.prune
        lines.append(f"prune of {len(p['disks'])} disk(s): " + (
            f"forgot {p['removed']}, kept {p['kept']}" if p["result"] == "ok" else f"FAILED: {p['error']}"))
    n = len(report.sources)
    lines.append(f"{n - len(report.failed)} of {n} source(s) succeeded in {report.ended - report.started:.1f}s")
    return "\n".join(lines)
