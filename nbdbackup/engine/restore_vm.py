"""`restore --libvirt`: bring a backed-up libvirt domain back from one set.

Order, so that a refusal costs nothing and a failure leaves nothing half-made behind:
1. find the set and its stored definition (no definition: NotFound, not a libvirt backup);
2. rewrite the XML (vm_xml.py) for the files it will restore;
3. with --define: ask libvirt whether the name (or the UUID) is taken, refuse before any data
   is written (a running domain of that name always; an existing one without --force);
4. refuse existing files without --force, for every file at once;
5. restore each disk through the restore engine (atomic files), the NVRAM (0600), the XML;
6. define, then start.
"""

from __future__ import annotations

import logging
import os
import re
import time
import uuid as uuidlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable

from ..errors import NbdBackupError, NotFound, UsageError
from ..fsutil import write_atomically
from ..repo.ids import DISK_NAME_RE
from .restore import RestoreResult, restore
from .vm_xml import DomainXmlError, RestoredDisk, RewrittenXml, domain_uuid, rewrite_domain_xml

if TYPE_CHECKING:
    from ..repo.info import BackupInfo
    from ..repo.repository import Repository
    from ..repo.vmdef import VmDefinition
    from .options import ProgressBar

log = logging.getLogger(__name__)

# A domain name that is safe as the start of a file name (and the disk names' own rule).
DOMAIN_NAME_RE = DISK_NAME_RE      # a name that also starts file names in --to-dir: the same rule
_SET_ID_RE = re.compile(r"^[0-9a-f]{8,32}$")
_BACKUP_ID_RE = re.compile(r"^\d{8}T\d{9}Z-[0-9a-f]{4}$")
FORMATS = ("qcow2", "raw")


@dataclass
class RestoredVmDisk:
    target: str
    path: str
    result: RestoreResult


@dataclass
class VmRestoreResult:
    domain: str                      # the restored domain's name
    source_domain: str               # its name when it was backed up
    set_id: str | None
    uuid: str | None
    xml_path: str
    nvram_path: str | None
    disks: list[RestoredVmDisk] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)          # disks that keep their sources
    macs_removed: int = 0
    replaced: bool = False           # an existing (shut-off) domain's definition was replaced
    checkpoints_dropped: list[str] = field(default_factory=list)   # this repository's, of the replaced domain
    defined: bool = False
    started: bool = False
    duration_s: float = 0.0


def find_set(repo: Repository, ref: str) -> list[BackupInfo]:
    """The members of the set *ref* names: a backup id (its set), a set id (or a unique prefix
    of at least 8 digits), a libvirt domain name (its newest set), or a disk name (the set of
    that disk's latest backup)."""
    if _BACKUP_ID_RE.match(ref):
        return repo.set_members(repo.get_backup(ref))
    exact = _set_by_id(repo, ref, prefix=False) if _SET_ID_RE.match(ref) else []
    if exact:
        return exact
    members = repo.latest_domain_set(ref)
    if members:
        return members
    if _SET_ID_RE.match(ref):
        found = _set_by_id(repo, ref, prefix=True)
        if found:
            return found
    latest = repo.latest(ref) if DOMAIN_NAME_RE.match(ref) else None
    if latest is not None:
        return repo.set_members(latest)
    raise NotFound(f"no backup id, set id or libvirt domain {ref!r} in this repository",
                   hint="`nbdbackup list` shows backup ids and sets; a domain is found by the name it "
                        "had when `full|incremental --libvirt` backed it up")


def _set_by_id(repo: Repository, ref: str, *, prefix: bool) -> list[BackupInfo]:
    hits = [b for b in repo.list_backups() if b.set_id and (b.set_id.startswith(ref) if prefix else b.set_id == ref)]
    sets = sorted({b.set_id for b in hits})
    if len(sets) > 1:
        raise UsageError(f"set id prefix {ref!r} matches {len(sets)} sets: {', '.join(sets)}",
                         hint="give more digits of the set id")
    return repo.set_members(hits[0]) if hits else []


def disk_target(info: BackupInfo, domain: str) -> str:
    """The target dev ("vda") a backup of the set was taken from."""
    src = info.source or ""
    if src.startswith("libvirt:") and "/" in src:
        return src.rsplit("/", 1)[1]
    if info.disk.startswith(domain + "-"):          # the default disk name DOMAIN-TARGET
        return info.disk[len(domain) + 1:]
    raise NbdBackupError(f"backup {info.id} ({info.disk}) does not say which disk of domain {domain} it holds "
                         f"(source {info.source!r})", hint="restore it with `nbdbackup restore BACKUP TARGET`")


def restore_vm(repo: Repository, ref: str, to_dir: str, *, new_name: str | None = None, fmt: str = "qcow2",
               force: bool = False, define: bool = False, start: bool = False,
               connect_uri: str = "qemu:///system", connections: int = 4,
               progress: Callable[[int, str], ProgressBar] | None = None, salvage: bool = False) -> VmRestoreResult:
    """*salvage*: each disk as restore(salvage=True) writes it (its damaged ranges as zeros, listed
    in its result); the domain is still written, defined and started as asked."""
    started_at = time.monotonic()
    if fmt not in FORMATS:
        raise UsageError(f"unknown --format {fmt!r}: use qcow2 or raw")
    define = define or start
    members = find_set(repo, ref)
    vm = repo.vm_definition(members[0])
    if vm is None:
        raise NotFound(f"{ref!r} names backups without a VM definition ({', '.join(b.disk for b in members)}): "
                       "they were not taken with --libvirt",
                       hint="restore such a disk with `nbdbackup restore BACKUP TARGET`")
    if new_name is not None and not DOMAIN_NAME_RE.match(new_name):
        raise UsageError(f"invalid --name {new_name!r}",
                         hint="use 1-64 characters from A-Z a-z 0-9 . _ + -, starting with a letter or digit")
    name = new_name or vm.domain
    if not DOMAIN_NAME_RE.match(name):
        raise UsageError(f"the domain's name {name!r} cannot start a file name here",
                         hint="give the restored domain another name with --name")
    to_dir = os.path.abspath(to_dir)
    if os.path.lexists(to_dir) and not os.path.isdir(to_dir):
        raise UsageError(f"--to-dir {to_dir} is not a directory")
    targets = {disk_target(b, vm.domain): b for b in members}
    paths = {t: os.path.join(to_dir, f"{name}-{t}.{fmt}") for t in targets}
    nvram_path = os.path.join(to_dir, f"{name}_VARS.fd") if vm.nvram is not None else None
    xml_path = os.path.join(to_dir, f"{name}.xml")

    conn = replace = None
    uuid = str(uuidlib.uuid4()) if new_name is not None else None
    if define:
        from ..sources.libvirt_domain import open_connection

        conn = open_connection(connect_uri)
    try:
        if conn is not None:
            replace = check_free(conn, name, connect_uri, force=force, want_uuid=uuid or stored_uuid(vm))
            if replace is not None:
                uuid = replace          # redefine the existing domain instead of clashing with it
        rewritten = rewrite(vm, {t: RestoredDisk(p, fmt) for t, p in paths.items()},
                             new_name=new_name, uuid=uuid, nvram_path=nvram_path)
        if rewritten.shared_writable and define and not force:
            shared = ", ".join(rewritten.shared_writable)
            raise UsageError(f"disk {shared} of {vm.domain} was not in the backup and keeps its source, so "
                             f"the new domain {name} would write the same image as {vm.domain}",
                             hint="restore without --define/--start and edit the written XML, or pass --force "
                                  "to define it anyway")
        for t in rewritten.shared_writable:
            log.warning("disk %s of %s was not in the backup and keeps its source: the new domain %s "
                        "would use the same image as the original", t, vm.domain, name)
        refuse_existing([*paths.values(), *([nvram_path] if nvram_path else []), xml_path], force=force)
        os.makedirs(to_dir, exist_ok=True)
        result = VmRestoreResult(domain=name, source_domain=vm.domain, set_id=members[0].set_id,
                                 uuid=rewritten.uuid, xml_path=xml_path, nvram_path=nvram_path,
                                 kept=rewritten.kept, macs_removed=rewritten.macs_removed,
                                 replaced=replace is not None)
        for t, info in targets.items():
            r = restore(repo, info, paths[t], fmt=fmt, force=force, connections=connections, progress=progress,
                        salvage=salvage)
            result.disks.append(RestoredVmDisk(t, paths[t], r))
        if nvram_path is not None:
            write_atomically(nvram_path, vm.nvram, 0o600)
        write_atomically(xml_path, rewritten.xml.encode(), 0o644 & ~_umask())
        if conn is not None:
            dom = define_domain(conn, rewritten.xml, xml_path, connect_uri)
            result.defined = True
            if replace is not None:
                result.checkpoints_dropped = _drop_our_checkpoints(dom, repo.repo_id)
            if start:
                _start(dom, name, connect_uri)
                result.started = True
    finally:
        if conn is not None:
            _close_quietly(conn)
    result.duration_s = time.monotonic() - started_at
    return result


def stored_uuid(vm: VmDefinition) -> str | None:
    try:
        return domain_uuid(vm.xml)
    except DomainXmlError:
        return None             # _rewrite reports it


def rewrite(vm: VmDefinition, disks: dict[str, RestoredDisk], **kw) -> RewrittenXml:
    try:
        return rewrite_domain_xml(vm.xml, disks, **kw)
    except DomainXmlError as e:
        # authenticated with the set (not damage): XML this code cannot rewrite, or a set whose
        # disks the definition does not have
        raise NbdBackupError(f"the stored definition of domain {vm.domain} cannot be rewritten: {e}",
                             hint="restore the disks one by one with `nbdbackup restore BACKUP TARGET`") from None


def check_free(conn, name: str, uri: str, *, force: bool, want_uuid: str | None) -> str | None:
    """Refuse a name (or UUID) another domain holds; with --force a shut-off domain of that name
    may be replaced: its UUID is returned, so that the definition replaces it."""
    dom = lookup_or_none(conn.lookupByName, name)
    if dom is not None:
        if dom.isActive():
            raise UsageError(f"domain {name} is running on {uri}: a restore never replaces a running domain",
                             hint=f"stop it first (`virsh -c {uri} shutdown {name}`), or restore beside it "
                                  "with --name NEW")
        if not force:
            raise UsageError(f"domain {name} exists on {uri}",
                             hint="pass --force to replace its definition (its disks are left alone), or "
                                  "restore beside it with --name NEW")
        if not dom.isPersistent():
            raise UsageError(f"domain {name} on {uri} is transient", hint="restore it with --name NEW")
        return dom.UUIDString()
    if want_uuid:
        other = lookup_or_none(conn.lookupByUUIDString, want_uuid)
        if other is not None:
            raise UsageError(f"domain {other.name()} on {uri} has the UUID {want_uuid} of the backed-up domain",
                             hint="restore it with --name NEW (it gets a new UUID)")
    return None


def lookup_or_none(fn, key):
    import libvirt

    try:
        return fn(key)
    except libvirt.libvirtError as e:
        if e.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return None
        raise NbdBackupError(f"libvirt: {e.get_error_message()}") from None


def define_domain(conn, xml: str, xml_path: str, uri: str):
    import libvirt

    try:
        return conn.defineXMLFlags(xml, libvirt.VIR_DOMAIN_DEFINE_VALIDATE)
    except libvirt.libvirtError as e:
        raise NbdBackupError(f"libvirt refused the restored definition on {uri}: {e.get_error_message()}",
                             hint=f"the disks and {xml_path} are restored; fix the XML and "
                                  f"`virsh -c {uri} define {xml_path}`") from None


def _drop_our_checkpoints(dom, repo_id: str) -> list[str]:
    """The replaced domain runs on restored images, which hold no dirty bitmaps: this
    repository's checkpoints of it now describe nothing, and a backup job from one would be
    refused ("missing or broken bitmap"). Their metadata goes, so that the next backup is a
    full (with the source's warning). Other repositories' and tools' checkpoints are never ours
    to touch."""
    import libvirt

    from ..sources.libvirt_domain import checkpoint_prefix
    from ..sources.libvirt_job import delete_checkpoint

    prefix = checkpoint_prefix(repo_id)
    dropped = []
    try:
        checkpoints = dom.listAllCheckpoints()
    except libvirt.libvirtError as e:
        log.warning("could not list the checkpoints of %s: %s", dom.name(), e.get_error_message())
        return dropped
    for c in checkpoints:
        if not c.getName().startswith(prefix):
            continue
        if delete_checkpoint(c, with_bitmaps=False):
            dropped.append(c.getName())
    if dropped:
        log.info("dropped %d checkpoint(s) of this repository from %s: the restored images have no bitmaps",
                 len(dropped), dom.name())
    return dropped


def _start(dom, name: str, uri: str) -> None:
    import libvirt

    try:
        dom.create()
    except libvirt.libvirtError as e:
        raise NbdBackupError(f"domain {name} is defined on {uri} but did not start: {e.get_error_message()}",
                             hint=f"qemu runs as its own user: every directory above the restored files must "
                                  f"let it in; then `virsh -c {uri} start {name}`") from None


def _close_quietly(conn) -> None:
    try:
        conn.close()
    except Exception as e:              # noqa: BLE001 - nothing depends on it any more
        log.debug("closing the libvirt connection: %s", e)


def refuse_existing(paths: list[str], *, force: bool) -> None:
    existing = [p for p in paths if os.path.lexists(p)]
    if existing and not force:
        raise UsageError(f"{', '.join(existing)} exist{'s' if len(existing) == 1 else ''}; "
                         "pass --force to overwrite")
    dirs = [p for p in existing if os.path.isdir(p)]
    if dirs:
        raise UsageError(f"{', '.join(dirs)} {'is a directory' if len(dirs) == 1 else 'are directories'}")


def _umask() -> int:
    m = os.umask(0)
    os.umask(m)
    return m
