"""Shared output helpers for commands: JSON, human tables, progress bars."""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from ..progress import NoBar

FILE_ONLY = {"file_only": True}   # logging extra: for --log-file, not stderr (printed there already, or quiet)
log = logging.getLogger("nbdbackup")


_json_printed = False


_LONG_LIST = 64     # a longer top-level list is printed one compact item per line


def print_json(obj: Any) -> None:
    global _json_printed
    _json_printed = True
    if isinstance(obj, list) and len(obj) > _LONG_LIST:
        # `list --json` of 10,000 backups: json's indenting encoder is pure Python (1 s there);
        # one item per line goes through the C encoder, and a line per backup greps well
        enc = json.JSONEncoder(default=str, separators=(", ", ": "))
        sys.stdout.write("[\n" + ",\n".join("  " + enc.encode(item) for item in obj) + "\n]")
    else:
        json.dump(obj, sys.stdout, indent=2, sort_keys=False, default=str)
    sys.stdout.write("\n")
    sys.stdout.flush()


def json_printed() -> bool:
    """Whether this run has printed a JSON document already (one per run on stdout)."""
    return _json_printed


def progress_enabled(args) -> bool:
    """Bars only for a person watching: a TTY on stderr, and not --quiet/--json."""
    return not getattr(args, "quiet", False) and not getattr(args, "json", False) and sys.stderr.isatty()


def progress_bar(args, total: int | None, desc: str, unit: str = "B"):
    """A tqdm bar for bytes (rate and ETA), or a no-op when disabled."""
    if not progress_enabled(args):
        return NoBar()
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, unit_scale=True, unit_divisor=1024,
                file=sys.stderr, dynamic_ncols=True, leave=False)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def summary(args, line: str) -> None:
    """The one-line summary at the end of long work: stderr (not with --quiet/--json),
    and always --log-file, the record a cron job keeps."""
    if not getattr(args, "quiet", False) and not getattr(args, "json", False):
        print(line, file=sys.stderr)
    log.info("%s", line, extra=FILE_ONLY)
