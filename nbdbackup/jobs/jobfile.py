"""Reading a job file: TOML, checked whole before anything runs.

Every error is a UsageError (exit 2) naming the file, the line and the key. tomllib gives
positions only for syntax errors, so KeyLines finds each key in the text itself, per table
and per [[source]] occurrence. Relative paths are relative to the job file's directory.
Secrets never go into a job file: a key that looks like one is refused.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable

from ..errors import UsageError

RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")   # == repo.prune.RULES
SOURCE_KINDS = ("libvirt", "image", "qmp", "nbd")
DEFAULT_CONNECT = "qemu:///system"
GLOB_CHARS = "*?["


class JobFileError(UsageError):
    pass


# --- where each key is written -------------------------------------------------------

_HEADER = re.compile(r"^\s*(\[\[?)\s*([^\]#]+?)\s*\]\]?\s*(#.*)?$")
_KEY = re.compile(r"""^\s*(?:"((?:[^"\\]|\\.)*)"|'([^']*)'|([A-Za-z0-9_-]+))\s*(?:[.=])""")


class KeyLines:
    """Line numbers of keys and table headers: (table, occurrence) -> {key: line}. The top
    level is ("", 0); [prune] is ("prune", 0); the n-th [[source]] is ("source", n)."""

    def __init__(self, text: str):
        self.keys: dict[tuple[str, int], dict[str, int]] = {("", 0): {}}
        self.headers: dict[tuple[str, int], int] = {("", 0): 1}
        counts: dict[str, int] = {}
        table = ("", 0)
        in_multiline = None        # the quote of a multi-line string being skipped
        for lineno, line in enumerate(text.splitlines(), 1):
            if in_multiline:
                if line.count(in_multiline) % 2:
                    in_multiline = None
                continue
            m = _HEADER.match(line)
            if m:
                name = m.group(2).strip().strip("\"'")
                if m.group(1) == "[[":
                    counts[name] = counts.get(name, -1) + 1
                    table = (name, counts[name])
                else:
                    table = (name, 0)
                self.headers.setdefault(table, lineno)
                self.keys.setdefault(table, {})
            else:
                k = _KEY.match(line)
                if k:
                    key = next(g for g in k.groups() if g is not None)
                    self.keys[table].setdefault(key, lineno)
            for quote in ('"""', "'''"):
                if line.count(quote) % 2:
                    in_multiline = quote
                    break

    def line(self, table: tuple[str, int], key: str | None = None) -> int:
        """The key's line, else its table's header line, else 1."""
        if key is not None and key in self.keys.get(table, {}):
            return self.keys[table][key]
        if table == ("", 0) and (key, 0) in self.headers:     # an unknown [table] at the top
            return self.headers[(key, 0)]
        return self.headers.get(table, 1)


# --- the parsed job ------------------------------------------------------------------

@dataclass(frozen=True)
class SourceSpec:
    number: int            # 1-based position among the [[source]] tables
    line: int              # its [[source]] header's line
    kind: str              # one of SOURCE_KINDS
    target: str            # domain (or glob), image path, QMP socket, NBD URI
    options: dict[str, Any] = field(default_factory=dict)   # checked per-source options, TOML names

    @property
    def label(self) -> str:
        return f"{self.kind}:{self.target}"

    @property
    def is_glob(self) -> bool:
        return self.kind == "libvirt" and any(c in self.target for c in GLOB_CHARS)


@dataclass(frozen=True)
class Job:
    path: str
    repository: str
    sources: list[SourceSpec]
    index_url: str | None = None
    s3_endpoint: str | None = None
    key_file: str | None = None
    passphrase_file: str | None = None
    concurrency: int = 1
    connect: str = DEFAULT_CONNECT
    metrics_file: str | None = None
    prune: dict[str, int] | None = None      # rule -> N, only the rules given


# --- value checkers: each returns the value to keep, or raises ValueError(what is wrong) ----

def _str(v):
    if not isinstance(v, str):
        raise ValueError(f"must be a string, not {_tname(v)}")
    if not v.strip():
        raise ValueError("must not be empty")
    if "\0" in v:
        raise ValueError("must not hold a NUL character")
    if v.startswith("-"):       # it goes onto a child's command line, where it would be an option
        raise ValueError(f"must not start with '-' ({v!r})")
    return v


def _disk_name(v):
    from ..repo.ids import check_disk_name

    try:
        return check_disk_name(_str(v))     # the same rule the repository applies
    except UsageError as e:
        raise ValueError(f"{e} ({e.hint})") from None


def _bool(v):
    if not isinstance(v, bool):
        raise ValueError(f"must be true or false, not {_tname(v)}")
    return v


def _int(lo: int, hi: int) -> Callable:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"must be a whole number, not {_tname(v)}")
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo} and {hi}, not {v}")
        return v
    return check


def _number(lo: float, hi: float) -> Callable:
    def check(v):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v != v:
            raise ValueError(f"must be a number, not {_tname(v)}")
        if not lo <= v <= hi:
            raise ValueError(f"must be between {lo:g} and {hi:g}, not {v:g}")
        return v
    return check


def _strlist(v):
    """A string or a list of strings; kept as a list."""
    items = [v] if isinstance(v, str) else v
    if not isinstance(items, list) or not items:
        raise ValueError(f"must be a string or a list of strings, not {_tname(v)}")
    return [_str(i) for i in items]


def _disk_map(v):
    """{ vda = "web1-root" }: the repository's disk name of each target."""
    if not isinstance(v, dict) or not v:
        raise ValueError(f'must be a table of target = "name", e.g. {{ vda = "web1-root" }}, not {_tname(v)}')
    return {_str(t): _disk_name(n) for t, n in v.items()}


def _choice(*allowed: str) -> Callable:
    def check(v):
        if v not in allowed:
            raise ValueError(f"must be one of {', '.join(map(repr, allowed))}, not {v!r}")
        return v
    return check


def _tname(v) -> str:
    return {str: "a string", bool: "a boolean", int: "a number", float: "a number", list: "a list",
            dict: "a table"}.get(type(v), type(v).__name__)


PATH = "path"       # a _str resolved against the job file's directory

TOP_KEYS: dict[str, Callable | str] = {
    "repository": _str, "index-url": _str, "s3-endpoint": _str, "key-file": PATH,
    "passphrase-file": PATH, "concurrency": _int(1, 64), "connect": _str, "metrics-file": PATH,
}
COMMON_SOURCE_KEYS: dict[str, Callable | str] = {
    "full": _bool, "no-fallback": _bool, "connections": _int(1, 64), "compress-all": _bool,
    "check-clean": _number(0, 100),
}
SOURCE_KEYS: dict[str, dict[str, Callable | str]] = {
    "libvirt": {"connect": _str, "disk": _disk_map, "exclude-disk": _strlist, "quiesce": _bool,
                "scratch-dir": PATH},
    "image": {"disk": _disk_name, "format": _choice("qcow2", "raw")},
    "qmp": {"node": _strlist, "disk": _strlist, "scratch-dir": PATH, "nbd-server": _str, "qga": PATH,
            "state-dir": PATH},
    "nbd": {"disk": _disk_name, "bitmap": _str},
}
PRUNE_KEYS = {f"keep-{r}": _int(0, 1_000_000) for r in RULES}

# Keys someone might use to write a secret inline; refused with where it belongs instead.
_SECRET_KEY = re.compile(r"pass(word|phrase)?$|secret|token|credential|^key$|access-key", re.I)
_URL_PASSWORD = re.compile(r"://[^/:@\s]*:[^@\s]*@|[?&]password=", re.I)


def load(path: str) -> Job:
    """The job file at *path*, checked whole; JobFileError (exit 2) at the first problem."""
    import tomllib

    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise JobFileError(f"cannot read job file {path}: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
        data = tomllib.loads(text)
    except UnicodeDecodeError as e:
        raise JobFileError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except tomllib.TOMLDecodeError as e:   # its message names the line and column
        raise JobFileError(f"{path}: TOML syntax error: {e}",
                           hint="the TOML format is described at https://toml.io") from None
    return _Checker(path, text).job(data)


class _Checker:
    def __init__(self, path: str, text: str):
        self.path = path
        self.lines = KeyLines(text)
        self.base = os.path.dirname(os.path.abspath(path))

    def fail(self, table: tuple[str, int], key: str | None, problem: str, hint: str | None = None):
        where = {"": "", "prune": "[prune] "}.get(table[0], f"[[{table[0]}]] #{table[1] + 1} ")
        what = f"{where}key {key!r}: " if key else where
        raise JobFileError(f"{self.path}, line {self.lines.line(table, key)}: {what}{problem}", hint=hint)

    def values(self, table: tuple[str, int], data: dict, schema: dict) -> dict:
        out = {}
        for key, value in data.items():
            if _SECRET_KEY.search(key) and key not in schema:
                self.fail(table, key, "looks like a secret written into the job file; secrets never go there",
                          hint="put it in a root-only file and name it with passphrase-file = PATH or key-file = "
                               "PATH (or pass $NBDBACKUP_PASSPHRASE); S3 keys come from AWS_* or ~/.aws, "
                               "database passwords from PGPASSWORD or ~/.pgpass")
            if key not in schema:
                self.fail(table, key, f"unknown key (known here: {', '.join(schema)})")
            check = schema[key]
            try:
                value = _str(value) if check is PATH else check(value)
            except ValueError as e:
                self.fail(table, key, str(e))
            if check is PATH:
                value = os.path.join(self.base, os.path.expanduser(value))
            out[key] = value
        return out

    def job(self, data: dict) -> Job:
        top_schema = {**TOP_KEYS, "source": None, "prune": None}
        top = self.values(("", 0), {k: v for k, v in data.items() if k not in ("source", "prune")}, top_schema)
        if "repository" not in top:
            self.fail(("", 0), None, "no repository = PATH (or s3://BUCKET/PREFIX) at the top of the file")
        repo = top["repository"]
        if "://" not in repo:
            repo = os.path.join(self.base, os.path.expanduser(repo))
        url = top.get("index-url")
        if url and _URL_PASSWORD.search(url):
            self.fail(("", 0), "index-url", "has a password in it; secrets never go into the job file",
                      hint="leave the password out of the URL: PGPASSWORD or ~/.pgpass give it")
        sources = data.get("source")
        if sources is None:
            self.fail(("", 0), None, "no [[source]] table: name at least one source to back up")
        if not isinstance(sources, list) or not all(isinstance(s, dict) for s in sources):
            self.fail(("", 0), "source", "must be written as [[source]] tables")
        specs = [self.source(i, s) for i, s in enumerate(sources)]
        prune = data.get("prune")
        if prune is not None:
            if not isinstance(prune, dict):
                self.fail(("", 0), "prune", "must be a [prune] table")
            prune = {k.removeprefix("keep-"): v for k, v in self.values(("prune", 0), prune, PRUNE_KEYS).items()}
            if not any(prune.values()):
                self.fail(("prune", 0), None, "keeps nothing: give at least one keep-RULE = N above 0 "
                          f"(rules: {', '.join('keep-' + r for r in RULES)})")
        return Job(path=self.path, repository=repo, sources=specs, index_url=url,
                   s3_endpoint=top.get("s3-endpoint"), key_file=top.get("key-file"),
                   passphrase_file=top.get("passphrase-file"), concurrency=top.get("concurrency", 1),
                   connect=top.get("connect", DEFAULT_CONNECT), metrics_file=top.get("metrics-file"),
                   prune=prune)

    def source(self, i: int, data: dict) -> SourceSpec:
        table = ("source", i)
        kinds = [k for k in SOURCE_KINDS if k in data]
        if len(kinds) != 1:
            named = " and ".join(kinds) if kinds else "none"
            key = kinds[1] if len(kinds) > 1 else None
            self.fail(table, key, f"give exactly one of {', '.join(k + ' =' for k in SOURCE_KINDS)} "
                      f"per [[source]] (this one has {named})")
        kind = kinds[0]
        schema = {kind: PATH if kind == "image" else _str, **COMMON_SOURCE_KEYS, **SOURCE_KEYS[kind]}
        opts = self.values(table, data, schema)
        target = opts.pop(kind)
        if kind == "libvirt":
            self.check_domain(table, target, opts)
        elif kind == "qmp":
            target = os.path.join(self.base, target)
            if "node" not in opts:
                self.fail(table, None, "qmp = SOCKET needs node = NAME (or a list: one per disk)")
            if "disk" in opts and len(opts["disk"]) != len(opts["node"]):
                self.fail(table, "disk", f"names {len(opts['disk'])} disk(s) for {len(opts['node'])} node(s): "
                          "give one disk name per node, in the same order")
        elif kind == "nbd":
            if "disk" not in opts:
                self.fail(table, None, "nbd = URI needs disk = NAME (the disk's name in the repository)")
            from ..nbd.uri import parse_uri

            try:
                parse_uri(target)
            except UsageError as e:
                self.fail(table, "nbd", str(e))
        if opts.get("full") and "no-fallback" in opts:
            self.fail(table, "no-fallback", "is for incrementals, and this source has full = true")
        if opts.get("full") and "check-clean" in opts:
            self.fail(table, "check-clean", "is for incrementals, and this source has full = true")
        if kind != "nbd" and "bitmap" in opts:   # unreachable through the schema; kept for clarity
            self.fail(table, "bitmap", "is for nbd sources")
        return SourceSpec(number=i + 1, line=self.lines.line(table), kind=kind, target=target, options=opts)

    def check_domain(self, table, pattern: str, opts: dict) -> None:
        if any(c.isspace() for c in pattern) or "/" in pattern:
            self.fail(table, "libvirt", f"{pattern!r} is not a domain name or glob (no spaces or '/')")
        if pattern.count("[") != pattern.count("]") or re.search(r"\[[^\]]*\[", pattern) or "[]" in pattern:
            self.fail(table, "libvirt", f"{pattern!r} is not a valid glob: every '[' needs its ']' "
                      "around at least one character")
        if any(c in pattern for c in GLOB_CHARS) and "disk" in opts:
            self.fail(table, "disk", f"renames one domain's disks, and libvirt = {pattern!r} is a glob "
                      "(every domain it matches would get the same names)")
