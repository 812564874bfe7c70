"""Entry point: argument parsing, logging, and the error -> exit code mapping.

Each command lives in its own module under nbdbackup.cli.commands and exposes
NAME, HELP, add_arguments(parser) and run(args) -> int. Command modules keep
their top level light (no sqlalchemy/zstd imports) so start-up stays fast.
"""

from __future__ import annotations

import argparse
import gc
import importlib
import logging
import os
import pkgutil
import re
import shlex
import signal
import sys
import threading
from collections.abc import Sequence

from .. import __version__, collector
from ..envsecrets import hide_from_children
from ..errors import (
    EXIT_CODE_HELP,
    CommittedThenFailed,
    CommittedThenInterrupted,
    ExitCode,
    Interrupted,
    NbdBackupError,
    exit_code_table,
    storage_error,
)
from . import numbers
from .output import FILE_ONLY

log = logging.getLogger("nbdbackup")


def _add_common(parser: argparse.ArgumentParser, *, suppress: bool) -> None:
    """Options valid both before and after the subcommand.

    The copy on each subcommand uses SUPPRESS so that an option given before
    the subcommand is not reset by the subparser's default.
    """
    d = (lambda v: argparse.SUPPRESS) if suppress else (lambda v: v)
    g = parser.add_argument_group("common options")
    g.add_argument("--repo", default=d(os.environ.get("NBDBACKUP_REPO")), metavar="PATH|s3://BUCKET[/PREFIX]",
                   help="repository: a directory, or a bucket (and prefix) on S3 (default: $NBDBACKUP_REPO)")
    g.add_argument("--index-url", default=d(os.environ.get("NBDBACKUP_INDEX_URL")), metavar="URL",
                   help="SQLAlchemy URL of the index, e.g. postgresql+psycopg://USER@HOST/DB (default: "
                        "$NBDBACKUP_INDEX_URL, else the URL the repository names, else its SQLite file); "
                        "a password may come from PGPASSWORD or ~/.pgpass and is never stored")
    g.add_argument("--s3-endpoint", default=d(None), metavar="URL",
                   help="S3 endpoint, e.g. http://10.0.0.5:7480 (default: $AWS_ENDPOINT_URL, else AWS); "
                        "credentials come from AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or "
                        "~/.aws/credentials")
    g.add_argument("--json", action="store_true", default=d(False), help="machine-readable output on stdout")
    g.add_argument("-q", "--quiet", action="store_true", default=d(False), help="no progress bars or summaries")
    g.add_argument("-v", "--verbose", action="count", default=d(0), help="more log output (-vv for debug)")
    g.add_argument("--log-file", default=d(None), metavar="PATH", help="also append logs to PATH")
    g.add_argument("--lock-wait", type=LOCK_WAIT, default=d(0.0), metavar="SECONDS",
                   help="wait up to SECONDS for a repository lock (default: do not wait)")
    # $NBDBACKUP_KEY_FILE is read by KeySource.from_env only: init must tell the flag from the variable
    g.add_argument("--key-file", default=d(None), metavar="FILE",
                   help="an encrypted repository's key kept outside it (`init --encryption --key-file`, "
                        "`key export`; default: $NBDBACKUP_KEY_FILE)")
    g.add_argument("--passphrase-file", default=d(None), metavar="FILE",
                   help="read an encrypted repository's passphrase from FILE (else $NBDBACKUP_PASSPHRASE, "
                        "$NBDBACKUP_PASSPHRASE_COMMAND, or a prompt on a terminal)")


LOCK_WAIT = numbers.seconds(7 * numbers.DAY)

EPILOG = "exit codes:\n" + exit_code_table()


def command_modules(only: str | None = None):
    """Every command's module; *only*: just that one, when a module of that name exists."""
    from . import commands

    mods = []
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        if info.name.startswith("_") or only not in (None, info.name):
            continue
        mods.append(importlib.import_module(f"{commands.__name__}.{info.name}"))
    return mods


class _NotSure(Exception):
    pass


class _Peek(argparse.ArgumentParser):
    def error(self, message):
        raise _NotSure(message)


def command_named(argv: Sequence[str]) -> str | None:
    """The module name of the command *argv* runs, told without importing every command and
    building its parser (20 subparsers: 16 ms of each run's start, 3 ms for one): the first word after the
    common options. None when that is unsure (no command, help or version asked before it,
    a bad common option): then the whole parser does it, and says what is wrong."""
    peek = _Peek(add_help=False, exit_on_error=False)
    _add_common(peek, suppress=True)
    peek.add_argument("word", nargs="?")
    try:
        word = peek.parse_known_args(argv)[0].word
    except (_NotSure, argparse.ArgumentError):
        return None
    if not word or word.startswith("-") or "_" in word or word not in argv:
        return None     # ("_": a module's name typed, not a command's: the whole parser lists the choices)
    if any(_asks_help_or_version(a) for a in argv[:list(argv).index(word)]):
        return None
    return word.replace("-", "_")


def _asks_help_or_version(arg: str) -> bool:
    """*arg* (before the command word) may be -h/--help/--version, abbreviated or combined
    (`--he`, `-qh`), or the `--` that ends options: the whole parser must answer it."""
    if arg == "--":
        return True
    if arg.startswith("--"):
        name = arg.split("=", 1)[0]
        return len(name) > 2 and ("--help".startswith(name) or "--version".startswith(name))
    return arg.startswith("-") and "h" in arg[1:]


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The CLI's parser; *only* (a command's module name): with that command's subparser alone."""
    parser = argparse.ArgumentParser(
        prog="nbdbackup",
        description="Incremental, deduplicated backups of qemu/KVM disks over NBD.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"nbdbackup {__version__}")
    _add_common(parser, suppress=False)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    mods = [m for m in command_modules(only) if m.NAME.replace("-", "_") == only] if only else []
    for mod in mods or command_modules():       # no such command after all: all, to name the choices
        p = sub.add_parser(
            mod.NAME,
            help=mod.HELP,
            description=getattr(mod, "DESCRIPTION", mod.HELP),
            epilog=EPILOG,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        mod.add_arguments(p)
        # a command with its own subcommands lists their parsers, so `key export FILE --repo R` works too
        for q in (p, *getattr(p, "subcommand_parsers", ())):
            _add_common(q, suppress=True)
        p.set_defaults(command_run=mod.run)
    return parser


def setup_logging(verbose: int, log_file: str | None) -> None:
    level = logging.WARNING if verbose <= 0 else logging.INFO if verbose == 1 else logging.DEBUG
    root = logging.getLogger()
    root.handlers.clear()
    h = logging.StreamHandler(sys.stderr)
    h.setFormatter(logging.Formatter("nbdbackup: %(levelname)s: %(message)s"))
    h.setLevel(level)
    if verbose < 2:
        # qemu.qmp logs each failed connect at ERROR; our own error message
        # already carries the reason, so on stderr it is noise (kept for -vv and --log-file).
        h.addFilter(lambda r: not r.name.startswith("qemu.qmp"))
    h.addFilter(lambda r: not getattr(r, "file_only", False))
    root.addHandler(h)
    root.setLevel(level)
    if log_file:
        fh = logging.FileHandler(log_file)
        fh.setFormatter(logging.Formatter("%(asctime)s %(process)d %(name)s %(levelname)s: %(message)s"))
        fh.setLevel(logging.DEBUG if verbose >= 2 else logging.INFO)
        root.addHandler(fh)
        root.setLevel(min(level, fh.level))


def _on_sigterm(signum, frame):
    raise Interrupted()


def _wraps_interrupt(exc: BaseException) -> bool:
    """True when *exc* only wraps a SIGTERM/SIGINT (e.g. one that landed inside an
    import, where Python turns it into a RuntimeError)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, (KeyboardInterrupt, Interrupted)):
            return True
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return False


def main(argv: list[str] | None = None) -> int:
    words = sys.argv[1:] if argv is None else argv
    parser = build_parser(command_named(words))
    args = parser.parse_args(words)
    if not getattr(args, "command", None):
        parser.print_help(sys.stderr)
        return ExitCode.USAGE
    try:
        setup_logging(args.verbose, args.log_file)
    except OSError as e:
        print(f"nbdbackup: error: cannot open log file {args.log_file}: {e.strerror}\n"
              "  hint: --log-file needs a writable file path in an existing directory", file=sys.stderr)
        return ExitCode.USAGE
    hide_from_children()        # before the SIGTERM handler: nothing here can be half done
    signal.signal(signal.SIGTERM, _on_sigterm)
    # The log file records each run and its outcome (cron users read it, not stderr).
    cmdline = shlex.join(["nbdbackup", *(sys.argv[1:] if argv is None else argv)])
    log.info("run: %s", re.sub(r"(://[^/:@\s]*:)[^@\s]*@", r"\1***@", cmdline), extra=FILE_ONLY)  # no DB passwords
    rc, reported = _run_command(args)
    if rc and getattr(args, "json", False):
        _json_error(reported, rc)
    log.info("exit %d: %s", rc, EXIT_CODE_HELP.get(rc, "?"), extra=FILE_ONLY)
    return rc


Reported = tuple[str, str | None]     # (error, hint) as the user was told


def _say(error: str, hint: str | None = None, *, prefix: str = "error", committed: Sequence[str] = ()) -> Reported:
    """An error for the user: on stderr and in the log file; returned for main(), which
    with --json prints it on stdout too (a script parsing stdout learns it)."""
    if committed:   # the failure came after the commit (source bookkeeping): the backups are good
        error += f" (after backup {', '.join(committed)} was committed: it is complete and usable)"
    msg = f"nbdbackup: {prefix}: {error}" if prefix else f"nbdbackup: {error}"
    if hint:
        msg += f"\n  hint: {hint}"
    print(msg, file=sys.stderr)
    log.error("%s", msg, extra=FILE_ONLY)
    return error, hint


def _interrupted(args, exc: BaseException, committed: Sequence[str] = ()) -> Reported:
    if isinstance(exc, CommittedThenInterrupted):
        committed = exc.committed_backups
    if committed:     # _say names them
        return _say("interrupted", "the next backup checks and finishes the source's bitmap bookkeeping",
                    prefix="", committed=committed)
    hint = None
    if getattr(args, "command", None) in ("full", "incremental"):
        hint = "run it again; `nbdbackup gc` reclaims the space the interrupted run already wrote"
    elif getattr(args, "command", None) == "copy":
        hint = "run it again: it goes on without sending again what already arrived"
    return _say("interrupted; nothing half-done was committed", hint, prefix="")


def _run_command(args) -> tuple[int, Reported | None]:
    """The command's exit code, and the error the user was told (None on success)."""
    try:
        return int(args.command_run(args) or 0), None
    except CommittedThenFailed as e:
        return _failure(args, e.cause, e.committed_backups)
    except (Exception, KeyboardInterrupt, Interrupted) as e:
        return _failure(args, e)


def _failure(args, e: BaseException, committed: Sequence[str] = ()) -> tuple[int, Reported | None]:
    """The exit code of failure *e*, after telling the user."""
    if isinstance(e, NbdBackupError):
        log.debug("error details", exc_info=True)
        return int(e.exit_code), _say(str(e), e.hint, committed=committed)
    if isinstance(e, (KeyboardInterrupt, Interrupted)):
        return int(ExitCode.INTERRUPTED), _interrupted(args, e, committed)
    if isinstance(e, BrokenPipeError):
        return int(ExitCode.FAILURE), None
    if isinstance(e, OSError):
        log.debug("error details", exc_info=True)
        known = storage_error(e.errno, e.filename or "a file", f"nbdbackup {args.command}", repository=False)
        if known is not None:     # a full, read-only or forbidden file system, wherever it was met
            return int(known.exit_code), _say(str(known), known.hint, committed=committed)
        return int(ExitCode.FAILURE), _say(str(e), committed=committed)
    # a bug: say so briefly, details with -vv / --log-file
    if _wraps_interrupt(e):
        return int(ExitCode.INTERRUPTED), _interrupted(args, e, committed)
    log.debug("internal error", exc_info=True)
    log.error("internal error", exc_info=True, extra=FILE_ONLY)    # the traceback the hint promises
    return int(ExitCode.FAILURE), _say(f"{type(e).__name__}: {e}",
                                       "run again with -vv or --log-file for details, and report it",
                                       prefix="internal error", committed=committed)


def _json_error(reported: Reported | None, rc: int) -> None:
    """A failed command's error as the JSON document of the run, unless the command
    printed its own (verify with damage found reports, and exits 5)."""
    from .output import json_printed, print_json

    if json_printed() or reported is None:
        return
    error, hint = reported
    try:
        print_json({"error": error, "hint": hint, "exit_code": rc, "meaning": EXIT_CODE_HELP.get(rc, "?")})
    except (OSError, ValueError):      # stdout is gone: stderr already has it
        pass


START_UP_S = 2.0     # no cycle collection for this long after start (imports, opening the repository)


def run() -> None:
    # A short-lived CLI: collecting cycles every 700 allocations mostly re-walks
    # what start-up imported (SQLAlchemy builds many objects); collect less often,
    # and not at all during start-up: its imports make few cycles, and the collections
    # cost 50-80 ms of a `list` (0.85 -> 0.77 CPU-s median of 12). Long commands get
    # the collector back after START_UP_S, with start-up's objects frozen (collector.py).
    gc.set_threshold(20_000, 20, 20)
    collector.hold()
    timer = threading.Timer(START_UP_S, collector.start_up_done)
    timer.daemon = True
    timer.start()
    _exit(main())


def _exit(rc: int) -> None:
    """Exit without the interpreter's teardown, which spends tens of milliseconds freeing
    start-up objects one by one at the end of every run, once nothing is left to finish:
    files are flushed here, repositories and connections were closed by the command.
    With another non-daemon thread still running, exit normally (it gets joined)."""
    main_thread = threading.main_thread()
    if any(t is not main_thread and not t.daemon and t.is_alive() for t in threading.enumerate()):
        sys.exit(rc)
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except (OSError, ValueError):   # a closed pipe (`| head`): nothing more to say there
            pass
    os._exit(rc)


if __name__ == "__main__":
    run()
