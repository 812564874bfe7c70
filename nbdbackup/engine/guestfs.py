"""Files out of a backup, without root: our own NBD server + libguestfs's appliance.

served_backup() exports one backup, read-only, from an in-process NbdServer on a unix
socket in a private 0700 directory. GuestfsSession drives one `guestfish --listen`
(Debian's libguestfs-tools; python3-guestfs imports only in Debian's own python) with
one `guestfish --remote` call per command, so each command's stdout and stderr are its
own. The appliance (a small VM) reads the disk over NBD: no kernel nbd module, no loop
device, nothing mounted on the host. One appliance launch per session: it is slow
(about 25 s under TCG here).

guestfish's remote commands are prefixed with "-" so that an error does not make the
server exit; an error is then recognised by "libguestfs: error:" on stderr.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import posixpath
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass

from ..errors import ApplianceFailed, NbdBackupError, NoFilesystem, PathNotFound, UsageError
from .guestfs_model import (  # noqa: F401 - GuestfsError is part of this module's API
    NOT_A_FILESYSTEM,
    DiskLayout,
    Entry,
    Extracted,
    Filesystem,
    GuestfsError,
    check_device,
    entry_from,
    normalize_path,
    parse_structs,
)
from .guestfs_watchdog import Watchdog

GUESTFISH = "guestfish"
LAUNCH_S = 900          # the appliance's boot, at most (TCG on a busy machine: minutes)
# With KVM it boots in seconds; where nested KVM hangs at boot (seen in a Firecracker VM: stuck
# after SeaBIOS's "Booting from ROM", qemu never aborts) waiting LAUNCH_S would look like a hang.
KVM_LAUNCH_S = 60
TCG_ENV = {"LIBGUESTFS_BACKEND": "direct", "LIBGUESTFS_BACKEND_SETTINGS": "force_tcg"}
APPLIANCE_HINT = ("check the appliance with `libguestfs-test-tool`; on a machine without working KVM set "
                  "LIBGUESTFS_BACKEND=direct LIBGUESTFS_BACKEND_SETTINGS=force_tcg (slower)")
CHILD_SECRETS = ("PGPASSWORD", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
STAT_BATCH = 256        # names per lstatnslist call


class GuestfsSession:
    """One libguestfs appliance on one disk: add_nbd(), launch(), then layout()/mount()/
    stat()/listdir()/extract() as often as needed; close() (or `with`) ends it."""

    def __init__(self, *, env: dict | None = None, warn=None):
        if shutil.which(GUESTFISH) is None:
            raise UsageError("guestfish not found: `files` needs libguestfs",
                             hint="apt install libguestfs-tools")
        # guestfish and its qemu need none of the repository's secrets.
        self.base_env = {k: v for k, v in (os.environ if env is None else env).items() if k not in CHILD_SECRETS}
        self.warn = warn or (lambda msg: None)
        self.pid: int | None = None
        self.env: dict = {}
        self.drive: tuple | None = None
        self.launch_s: float | None = None
        self.tcg_fallback = False
        self.mounted: str | None = None
        self.errors = None
        self.errors_seen = 0
        self.watchdog: Watchdog | None = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # --- the guestfish server --------------------------------------------------------
    def _start(self, env: dict) -> None:
        self.env = env
        # The server it forks writes the errors of remote commands to ITS stderr, not the
        # client's: a file we keep, read after each call (and not a pipe: it would never
        # reach EOF).
        self.errors = tempfile.TemporaryFile()
        try:
            p = subprocess.run([GUESTFISH, "--listen", "--ro"], stdout=subprocess.PIPE, stderr=self.errors,
                               text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise ApplianceFailed("guestfish --listen did not start within 60 s", hint=APPLIANCE_HINT) from None
        p.stderr = self._new_errors()
        # "GUESTFISH_PID=1234; export GUESTFISH_PID"
        pid = None
        for part in p.stdout.replace("\n", ";").split(";"):
            k, _, v = part.strip().partition("=")
            if k == "GUESTFISH_PID" and v.strip().isdigit():
                pid = int(v)
        if p.returncode != 0 or pid is None:
            raise ApplianceFailed(f"guestfish --listen failed: {(p.stderr or p.stdout).strip()[:500]}",
                                  hint=APPLIANCE_HINT)
        self.pid = pid
        self.watchdog = Watchdog(pid)

    def _new_errors(self) -> str:
        """What the guestfish server wrote to stderr since the last look."""
        self.errors.seek(self.errors_seen)
        text = self.errors.read()
        self.errors_seen += len(text)
        return text.decode(errors="replace")

    def _stop(self) -> None:
        pid, self.pid = self.pid, None
        self.mounted = None
        if pid is None:
            if self.errors is not None:
                self.errors.close()
                self.errors, self.errors_seen = None, 0
            return
        with contextlib.suppress(subprocess.SubprocessError, OSError):
            subprocess.run([GUESTFISH, f"--remote={pid}", "exit"], env=self.env, capture_output=True,
                           timeout=60, stdin=subprocess.DEVNULL)
        # It exits by itself; make sure of it (it is our child's child, known only by pid).
        for _ in range(50):
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.1)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, 9)
        dog, self.watchdog = self.watchdog, None
        if dog is not None:
            dog.release()
        self._stop()        # closes the error file

    def close(self) -> None:
        self._stop()

    def call(self, command: str, *args: str, timeout: float = 3600) -> str:
        """Run one guestfish command in the appliance; its stdout, or GuestfsError."""
        if self.pid is None:
            raise ApplianceFailed("the libguestfs appliance is not running", hint=APPLIANCE_HINT)
        try:
            p = subprocess.run([GUESTFISH, f"--remote={self.pid}", "--", "-" + command, *args],
                               capture_output=True, env=self.env, timeout=timeout, stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            raise GuestfsError(command, f"no answer within {timeout:.0f} s") from None
        err = p.stderr.decode(errors="replace") + self._new_errors()
        if "libguestfs: error:" in err or p.returncode != 0:
            lines = [ln.split("libguestfs: error:", 1)[-1].strip() for ln in err.splitlines() if ln.strip()]
            text = lines[0] if lines else f"guestfish exited {p.returncode}"
            if "server is not running" in err:
                raise ApplianceFailed(f"the libguestfs appliance went away during {command}: {text}",
                                      hint=APPLIANCE_HINT)
            raise GuestfsError(command, text)
        return p.stdout.decode(errors="surrogateescape")

    # --- launch ------------------------------------------------------------------------
    def add_nbd(self, socket_path: str, export: str) -> None:
        self.drive = (socket_path, export)

    def launch(self) -> None:
        """Start the appliance on the drive. When the user chose no backend and KVM fails
        (here qemu aborts), try once more under TCG and say so."""
        user_chose = any(k in self.base_env for k in TCG_ENV)
        may_retry = not user_chose and os.path.exists("/dev/kvm")
        try:
            self._launch(self.base_env, run_timeout=KVM_LAUNCH_S if may_retry else LAUNCH_S)
            return
        except ApplianceFailed as e:
            first = e
        if not may_retry:
            raise first
        self.warn(f"the libguestfs appliance failed to start with KVM ({first}); retrying under TCG "
                  "(slower). To skip this attempt, set LIBGUESTFS_BACKEND=direct "
                  "LIBGUESTFS_BACKEND_SETTINGS=force_tcg in the environment")
        self.tcg_fallback = True
        self._launch({**self.base_env, **TCG_ENV})

    def _launch(self, env: dict, *, run_timeout: float = LAUNCH_S) -> None:
        socket_path, export = self.drive
        self._start(env)
        try:
            self.call("add", export, "protocol:nbd", f"server:unix:{socket_path}",
                      "format:raw", "readonly:true", timeout=60)
            t0 = time.monotonic()
            try:
                self.call("run", timeout=run_timeout)
            except GuestfsError as e:
                raise ApplianceFailed(f"the libguestfs appliance cannot start: {e.text}",
                                      hint=APPLIANCE_HINT) from None
            self.launch_s = time.monotonic() - t0
        except BaseException:
            self._stop()
            raise

    # --- what is on the disk -------------------------------------------------------
    def layout(self) -> DiskLayout:
        size = int(self.call("blockdev-getsize64", "/dev/sda").strip())
        try:
            table = self.call("part-get-parttype", "/dev/sda").strip() or None
        except GuestfsError:
            table = None        # no partition table: a filesystem on the whole disk, a PV, or nothing
        partitions = self.call("list-partitions").split()
        filesystems = []
        for line in self.call("list-filesystems").splitlines():
            dev, sep, fstype = line.rpartition(": ")
            if not sep:
                continue
            fs = Filesystem(dev, fstype.strip())
            with contextlib.suppress(GuestfsError, ValueError):
                fs.size = int(self.call("blockdev-getsize64", dev).strip())
            if fs.type not in NOT_A_FILESYSTEM:
                with contextlib.suppress(GuestfsError):
                    fs.label = self.call("vfs-label", dev).strip() or None
                with contextlib.suppress(GuestfsError):
                    fs.uuid = self.call("vfs-uuid", dev).strip() or None
            filesystems.append(fs)
        return DiskLayout(size, table, partitions, filesystems)

    def choose(self, layout: DiskLayout, device: str | None) -> Filesystem:
        """The filesystem PATH refers to: --fs DEVICE, or the disk's only one."""
        usable = layout.mountable
        choices = ", ".join(f"{f.device} ({f.type})" for f in usable)
        if not usable:
            found = ", ".join(f"{f.device} ({f.type})" for f in layout.filesystems) or "nothing"
            raise NoFilesystem(f"no filesystem found on the backup's disk (libguestfs found: {found}; "
                               f"partition table: {layout.partition_table or 'none'})",
                               hint="is this the right backup? `nbdbackup files BACKUP` lists what the disk holds")
        if device is None:
            if len(usable) > 1:
                raise UsageError(f"the disk holds {len(usable)} filesystems: {choices}",
                                 hint="pick one with --fs DEVICE")
            return usable[0]
        check_device(device)
        for f in layout.filesystems:
            if f.device == device:
                if f.type in NOT_A_FILESYSTEM:
                    raise NoFilesystem(f"{device} holds no filesystem ({f.type})",
                                       hint=f"the filesystems on this disk: {choices}")
                return f
        raise UsageError(f"--fs {device}: no such filesystem on this disk", hint=f"choose one of: {choices}")

    def mount(self, fs: Filesystem) -> None:
        if self.mounted == fs.device:
            return
        if self.mounted:
            self.call("umount-all")
            self.mounted = None
        try:
            self.call("mount-ro", fs.device, "/")
        except GuestfsError as e:
            raise NbdBackupError(f"cannot mount {fs.device} ({fs.type}) read-only in the appliance: {e.text}",
                                 hint="the appliance may lack support for this filesystem") from None
        self.mounted = fs.device

    # --- paths --------------------------------------------------------------------
    def _lstat_many(self, directory: str, names: list[str]) -> list[Entry | None]:
        # guestfish splits a string list on white space and takes quotes literally: names
        # with either go one `lstatns` call each (slower, exact), the others in batches.
        plain = [n for n in names if not any(c.isspace() or c in "\"'\\" for c in n)]
        found: dict[str, dict | None] = {}
        for i in range(0, len(plain), STAT_BATCH):
            batch = plain[i:i + STAT_BATCH]
            structs = parse_structs(self.call("lstatnslist", directory, " ".join(batch)))
            if len(structs) != len(batch):
                raise GuestfsError("lstatnslist", f"{len(structs)} answers for {len(batch)} names")
            found.update(zip(batch, structs))
        for n in names:
            if n not in found:
                found[n] = self._lstat_one(posixpath.join(directory, n))
        return [None if found[n] is None else entry_from(n, found[n]) for n in names]

    def _lstat_one(self, path: str) -> dict | None:
        try:
            return (parse_structs(self.call("lstatns", path)) or [None])[0]
        except GuestfsError as e:
            if "No such file or directory" in e.text or "Not a directory" in e.text:
                return None
            raise

    def stat(self, path: str) -> Entry:
        """lstat of *path* in the mounted filesystem; PathNotFound when it does not exist."""
        path = normalize_path(path)
        parent, name = posixpath.split(path)
        if path == "/":
            d = self._lstat_one("/")
            entry = entry_from("/", d) if d else None
        else:
            try:
                entry = self._lstat_many(parent, [name])[0]
            except GuestfsError as e:
                if "No such file or directory" not in e.text and "Not a directory" not in e.text:
                    raise
                entry = None
        if entry is None:
            raise PathNotFound(f"{path} does not exist in {self.mounted}",
                               hint=f"list its directory: nbdbackup files BACKUP {parent}")
        if stat.S_ISLNK(entry.mode):
            entry.target = self.call("readlink", path).rstrip("\n")
        return entry

    def listdir(self, path: str) -> list[Entry]:
        """The entries of directory *path* (or the one entry, when it is not a directory)."""
        path = normalize_path(path)
        top = self.stat(path)
        if not top.is_dir:
            top.name = path
            return [top]
        with tempfile.TemporaryDirectory(prefix="nbdbackup-ls-") as tmp:
            names_file = os.path.join(tmp, "names")
            self.call("ls0", path, names_file)
            with open(names_file, "rb") as f:
                names = [n.decode(errors="surrogateescape") for n in f.read().split(b"\0") if n]
        names.sort()
        entries = [e for e in self._lstat_many(path, names) if e is not None]
        for e in entries:
            if stat.S_ISLNK(e.mode):
                with contextlib.suppress(GuestfsError):
                    e.target = self.call("readlink", posixpath.join(path, e.name)).rstrip("\n")
        return entries

    # --- extract ------------------------------------------------------------------
    def extract(self, paths: list[str], to: str, *, force: bool = False) -> list[Extracted]:
        """Copy *paths* into directory *to* (see guestfs_extract.extract)."""
        from .guestfs_extract import extract
        return extract(self, paths, to, force=force)


@dataclass
class ServedBackup:
    socket: str
    export: str
    info: object        # BackupInfo


@contextlib.contextmanager
def served_backup(repo, ref: str, *, workers: int = 4, cache_bytes: int = 64 << 20):
    """Serve backup *ref* (an id or a disk name), read-only and alone, on a unix socket
    (mode 0600) in a private 0700 directory; yields a ServedBackup. The server runs on its
    own event loop thread, reading through *repo* (encrypted ones too)."""
    import logging

    from ..nbd.server import ListenAddress, NbdServer
    from .exports import ChunkCache, RepoCatalog

    info = repo.resolve(ref)
    logging.getLogger("nbdbackup.server").setLevel(logging.WARNING)
    # 0700. guestfish splits the server:unix:PATH list on spaces: keep them out of PATH.
    base = tempfile.gettempdir()
    private = tempfile.mkdtemp(prefix="nbdbackup-files-", dir=base if not any(c.isspace() for c in base) else "/tmp")
    sock = os.path.join(private, "nbd.sock")
    server = NbdServer(RepoCatalog(repo, ChunkCache(cache_bytes), only=frozenset({info.id})), workers=workers)
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="nbd-files-server", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(server.start(ListenAddress(unix=sock)), loop).result(30)
        yield ServedBackup(sock, info.id, info)
    finally:
        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(server.shutdown(), loop).result(60)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(30)
        if not thread.is_alive():
            loop.close()
        shutil.rmtree(private, ignore_errors=True)
