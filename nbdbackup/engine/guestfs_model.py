"""What `files` shows: a disk's layout, its filesystems, directory entries, extraction results;
the parsing of guestfish's output into them, and the checks of user-given paths and devices."""

from __future__ import annotations

import posixpath
import stat
from dataclasses import dataclass, field

from ..errors import NbdBackupError, UsageError

NOT_A_FILESYSTEM = ("unknown", "swap")


class GuestfsError(NbdBackupError):
    """A guestfish command failed; .text: libguestfs's message."""

    def __init__(self, command: str, text: str):
        super().__init__(f"libguestfs {command}: {text}")
        self.command = command
        self.text = text



@dataclass
class Filesystem:
    device: str          # libguestfs's name: /dev/sda1, /dev/VG/LV, /dev/sda
    type: str            # ext4, xfs, ntfs, ... or "unknown"
    size: int | None = None
    label: str | None = None
    uuid: str | None = None

    def to_json(self) -> dict:
        return {"device": self.device, "type": self.type, "size": self.size, "label": self.label,
                "uuid": self.uuid}


@dataclass
class DiskLayout:
    size: int
    partition_table: str | None          # "msdos", "gpt" or None (no partition table)
    partitions: list[str]
    filesystems: list[Filesystem]        # every one libguestfs found, "unknown" ones too

    @property
    def mountable(self) -> list[Filesystem]:
        return [f for f in self.filesystems if f.type not in NOT_A_FILESYSTEM]

    def to_json(self) -> dict:
        return {"size": self.size, "partition_table": self.partition_table, "partitions": self.partitions,
                "filesystems": [f.to_json() for f in self.filesystems]}


@dataclass
class Entry:
    name: str
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    target: str | None = None     # a symlink's target

    @property
    def mode_string(self) -> str:
        return stat.filemode(self.mode)

    @property
    def is_dir(self) -> bool:
        return stat.S_ISDIR(self.mode)

    def to_json(self) -> dict:
        return {"name": self.name, "mode": self.mode_string, "mode_octal": f"{stat.S_IMODE(self.mode):04o}",
                "type": type_name(self.mode), "nlink": self.nlink, "uid": self.uid, "gid": self.gid,
                "size": self.size, "mtime": self.mtime_ns / 1e9, "target": self.target}


@dataclass
class Extracted:
    path: str            # in the backup
    to: str              # on the host
    type: str
    files: int = 0       # regular files written
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)    # unsafe or special members, with why


def type_name(mode: int) -> str:
    for test, name in ((stat.S_ISREG, "file"), (stat.S_ISDIR, "directory"), (stat.S_ISLNK, "symlink"),
                       (stat.S_ISCHR, "char-device"), (stat.S_ISBLK, "block-device"),
                       (stat.S_ISFIFO, "fifo"), (stat.S_ISSOCK, "socket")):
        if test(mode):
            return name
    return "unknown"


def parse_structs(text: str) -> list[dict]:
    """guestfish's struct-list output ("[0] = {", "  key: value", "}") as dicts; a single
    struct (no brackets) gives one dict."""
    out: list[dict] = []
    cur: dict | None = None
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("[") and s.endswith("{"):
            cur = {}
            out.append(cur)
        elif s == "}":
            cur = None
        elif ": " in s or s.endswith(":"):
            k, _, v = s.partition(":")
            if cur is None:
                cur = {}
                out.append(cur)
            cur[k.strip()] = v.strip()
    return out


def entry_from(name: str, d: dict) -> Entry | None:
    if int(d.get("st_ino", -1)) == -1:
        return None         # lstatnslist's answer for a name that does not exist
    return Entry(name=name, mode=int(d["st_mode"]), nlink=int(d["st_nlink"]), uid=int(d["st_uid"]),
                 gid=int(d["st_gid"]), size=int(d["st_size"]),
                 mtime_ns=int(d["st_mtime_sec"]) * 10**9 + int(d["st_mtime_nsec"]))


def normalize_path(path: str) -> str:
    if not path or "\0" in path:
        raise UsageError(f"bad path {path!r}", hint="give a path inside the filesystem, e.g. /etc/hostname")
    return posixpath.normpath("/" + path.lstrip("/")) if path != "/" else "/"


def check_device(device: str) -> str:
    if not device.startswith("/dev/") or any(c.isspace() for c in device) or ".." in device.split("/"):
        raise UsageError(f"--fs {device!r} is not a device name",
                         hint="give one of the devices `nbdbackup files BACKUP` lists, e.g. /dev/sda1 "
                              "or /dev/VG/LV")
    return device
