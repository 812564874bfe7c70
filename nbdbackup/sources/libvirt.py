"""Whole libvirt domains by name (--libvirt DOMAIN): one set per run, one point in time.

A running domain is backed up with libvirt's own backup API in pull mode: one
backupBegin over all chosen disks with a new checkpoint, read through our NBD
client from libvirt's private NBD server, then the job is ended. The chain of
checkpoints belongs to the repository (names checkpoint_prefix(repo_id) + the
checkpoint the backups record); another tool's or repository's checkpoints are
never used or deleted. A shut-off domain is handed to OfflineDomainSource
(sources/libvirt_offline.py), which continues the same chain in the images'
persistent bitmaps. The exact call sequence and the chain rules are in
docs/libvirt.md.
"""

from __future__ import annotations

import glob
import hashlib
import logging
import os
import shutil
import tempfile
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import LockedError, SourceUnreachable, UsageError
from ..repo.ids import check_disk_name
from .base import DiskPlan, Source, raise_if_no_fallback
from .image import DIRTY_PREFIX, new_checkpoint
from .libvirt_domain import (
    DEFAULT_URI,
    DomainDisk,
    backup_disks,
    checkpoint_prefix,
    disk_name,
    lookup_domain,
    open_connection,
)

if TYPE_CHECKING:
    from ..repo.info import BackupInfo
    from ..repo.repository import Repository

log = logging.getLogger(__name__)

RAW_REASON = ("{target} is {fmt}, not qcow2: libvirt keeps checkpoints (dirty bitmaps) only in qcow2 "
              "images, so it is backed up in full every time")


def run_base() -> str:
    """Where private run directories go: /run when we may write there (root), else $TMPDIR."""
    return "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()


def run_dir_prefix(repo_id: str) -> str:
    """Every run directory of this repository starts with this: a backup job whose NBD socket
    is under it was started by us (and is stale when we hold the domain's lock)."""
    return os.path.join(run_base(), f"nbdbackup-libvirt-{repo_id}-")


def _libvirt():
    import libvirt

    return libvirt


def _error_code(e) -> int:
    return e.get_error_code() if hasattr(e, "get_error_code") else -1


class LibvirtSource(Source):
    def __init__(self, domain: str, connect_uri: str = DEFAULT_URI, exclude: Sequence[str] = (),
                 names: dict[str, str] | None = None, quiesce: bool = False, scratch_dir: str | None = None,
                 connections: int = 4):
        self.domain = domain
        self.connect_uri = connect_uri or DEFAULT_URI
        self.exclude = list(exclude)
        self.names_wanted = dict(names or {})
        self.quiesce = quiesce
        self.scratch_dir = scratch_dir
        self.connections = max(1, connections)
        if scratch_dir is not None and not os.path.isdir(scratch_dir):
            raise UsageError(f"--scratch-dir {scratch_dir} is not a directory")
        self.conn = None
        self.dom = None
        self.delegate: Source | None = None     # OfflineDomainSource for a shut-off domain
        self._lock = None
        self._prefix = ""
        self._repo_id = ""
        self._run_dir: str | None = None
        self._job = False                       # our backup job may be running
        self._new_checkpoint: str | None = None  # full libvirt name of the checkpoint this run made
        self._outcome: str | None = None

    # -- helpers -----------------------------------------------------------------------
    def _names(self, disks: list[DomainDisk]) -> dict[str, str]:
        targets = [d.target for d in disks]
        unknown = [t for t in self.names_wanted if t not in targets]
        if unknown:
            raise UsageError(f"--disk {', '.join(unknown)}=...: the domain has no such disk to back up",
                             hint="disks backed up: " + (", ".join(targets) or "none"))
        names = {t: self.names_wanted.get(t) or disk_name(self.domain, t) for t in targets}
        for t, n in names.items():
            try:
                check_disk_name(n)
            except UsageError as e:
                raise UsageError(f"{e} (the repository's name of {self.domain} disk {t})",
                                 hint=f"name it with --disk {t}=NAME") from None
        if len(set(names.values())) != len(names):
            raise UsageError("two disks would get the same name in the repository: " + ", ".join(
                f"{t}={n}" for t, n in names.items()))
        return names

    def _lock_domain(self, repo: Repository) -> None:
        """One run of this repository per domain on this host; the holder owns the domain's
        leftovers, so only a lock holder may clean them up."""
        key = hashlib.sha256(f"{self.connect_uri}\0{self.dom.UUIDString()}".encode()).hexdigest()[:16]
        try:
            self._lock = repo.host_locks.lock(f"libvirt-{key}", exclusive=True, wait=repo.lock_wait,
                                              purpose=f"the lock of libvirt domain {self.domain}")
        except LockedError:
            raise LockedError(f"another nbdbackup run of this repository is backing up domain {self.domain}",
                              hint="wait for it to finish, or pass --lock-wait SECONDS") from None

    def _job_socket(self) -> str | None:
        """The NBD socket of the domain's backup job; None when it runs none. ('' when the
        job has no unix socket: a push job or a TCP server.)"""
        libvirt = _libvirt()
        try:
            xml = self.dom.backupGetXMLDesc(0)
        except libvirt.libvirtError as e:
            if _error_code(e) == libvirt.VIR_ERR_NO_DOMAIN_BACKUP:
                return None
            raise SourceUnreachable(f"cannot ask libvirt about {self.domain}'s backup job: "
                                    f"{e.get_error_message()}") from None
        server = ET.fromstring(xml).find("server")
        return (server.get("socket") or "") if server is not None else ""

    def _end_job(self) -> None:
        """Stop our pull job (libvirt then removes its NBD export and scratch files)."""
        libvirt = _libvirt()
        self._job = False
        try:
            self.dom.abortJob()
        except libvirt.libvirtError as e:
            if self._job_socket() is not None:      # still there: say so; the next run ends it
                raise SourceUnreachable(f"could not end the backup job of {self.domain}: "
                                        f"{e.get_error_message()}") from None

    def _our_checkpoints(self) -> list:
        return [c for c in self.dom.listAllCheckpoints(0) if c.getName().startswith(self._prefix)]

    def _recorded(self, repo: Repository, checkpoint: str, names: Sequence[str]) -> bool:
        return any(repo.find_by_checkpoint(n, checkpoint) is not None for n in names)

    # -- leftovers of a killed run ---------------------------------------------------------
    def _clean_leftovers(self, repo: Repository, all_names: Sequence[str]) -> None:
        prefix = run_dir_prefix(repo.repo_id)
        socket = self._job_socket()
        if socket and socket.startswith(prefix):
            log.warning("ending backup job %s of domain %s left by an interrupted run of this repository",
                        socket, self.domain)
            self._end_job()
        uuid = self.dom.UUIDString()
        for d in glob.glob(glob.escape(prefix) + "*"):
            try:
                with open(os.path.join(d, "domain")) as f:
                    if f.read().strip() != uuid:
                        continue            # another domain's run: its own next run cleans it
            except OSError:
                continue
            if os.path.exists(os.path.join(d, "frozen")):
                log.warning("thawing the guest file systems of %s, frozen by an interrupted run", self.domain)
                self._thaw()
            shutil.rmtree(d, ignore_errors=True)
        for c in self._our_checkpoints():
            name = c.getName()
            if not self._recorded(repo, name[len(self._prefix):], all_names):
                # libvirt drops its bitmap; the parent checkpoint's bitmap still tracks every
                # change since the parent's backup, so nothing is lost
                log.warning("deleting checkpoint %s of domain %s: no committed backup of this repository "
                            "records it (left by an interrupted or failed run)", name, self.domain)
                c.delete(0)

    # -- the chain ---------------------------------------------------------------------------
    def _chain(self, repo: Repository, qcow2: list[DomainDisk],
               names: dict[str, str]) -> tuple[str | None, dict[str, BackupInfo], str | None]:
        """(checkpoint to read changes since, parent backup per target, None) or (None, {}, reason)."""
        libvirt = _libvirt()
        latest = {d.target: repo.latest(names[d.target]) for d in qcow2}
        for t, info in latest.items():
            if info is None:
                return None, {}, f"disk {names[t]} has no backup in this repository yet"
            if info.checkpoint is None:
                return None, {}, f"the latest backup {info.id} of disk {names[t]} opened no checkpoint"
        checkpoints = {info.checkpoint for info in latest.values()}
        if len(checkpoints) != 1:
            return None, {}, ("the disks' latest backups opened different checkpoints ("
                              + ", ".join(f"{names[t]}: {i.checkpoint}" for t, i in latest.items())
                              + "): they are not one set")
        [checkpoint] = checkpoints
        full_name = self._prefix + checkpoint
        try:
            ckpt = self.dom.checkpointLookupByName(full_name, 0)
        except libvirt.libvirtError as e:
            if _error_code(e) != libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                raise
            return None, {}, (f"libvirt no longer knows checkpoint {full_name} of the latest backups "
                              "(deleted by hand, or the domain was redefined)")
        covered = {d.get("name") for d in ET.fromstring(ckpt.getXMLDesc(0)).findall("./disks/disk")
                   if d.get("checkpoint") == "bitmap"}
        missing = [names[d.target] for d in qcow2 if d.target not in covered]
        if missing:
            return None, {}, f"checkpoint {full_name} does not cover disk {', '.join(missing)}"
        return checkpoint, latest, None

    # -- Source interface ----------------------------------------------------------------------
    def prepare(self, repo: Repository, kind: str, no_fallback: bool) -> list[DiskPlan]:
        self.conn = open_connection(self.connect_uri)
        self.dom = lookup_domain(self.conn, self.domain)
        self._prefix = checkpoint_prefix(repo.repo_id)
        self._repo_id = repo.repo_id
        xml = self.dom.XMLDesc(0)
        disks, skipped = backup_disks(xml, self.exclude)
        if skipped:
            log.warning("%s: not backed up: %s", self.domain, ", ".join(skipped))
        if not disks:
            raise UsageError(f"domain {self.domain} has no disk to back up (skipped: {', '.join(skipped)})")
        names = self._names(disks)
        if not self.dom.isActive():
            from .libvirt_offline import OfflineDomainSource

            self.delegate = OfflineDomainSource(self.dom, self.domain, disks, names, connections=self.connections)
            return self.delegate.prepare(repo, kind, no_fallback)
        return self._prepare_running(repo, kind, no_fallback, xml, disks, names)

    def _prepare_running(self, repo: Repository, kind: str, no_fallback: bool, xml: str,
                         disks: list[DomainDisk], names: dict[str, str]) -> list[DiskPlan]:
        self._lock_domain(repo)
        all_targets = [t.get("dev") for t in ET.fromstring(xml).findall("./devices/disk/target")]
        all_names = {disk_name(self.domain, t) for t in all_targets} | set(names.values())
        self._clean_leftovers(repo, sorted(all_names))
        socket = self._job_socket()
        if socket is not None:
            raise LockedError(f"domain {self.domain} already runs a backup job that is not this repository's "
                              f"(NBD server {socket or 'not on a unix socket'})",
                              hint="wait for it to end (virsh domjobinfo), or end it with virsh domjobabort")

        qcow2 = [d for d in disks if d.fmt == "qcow2"]
        for d in disks:
            if d.fmt != "qcow2":
                log.warning(RAW_REASON.format(target=f"{self.domain} disk {d.target}", fmt=d.fmt))
        since, parents, reason = None, {}, None
        if kind == "incremental" and qcow2:
            since, parents, reason = self._chain(repo, qcow2, names)
            if reason:
                raise_if_no_fallback(", ".join(names[d.target] for d in qcow2), reason, no_fallback)
                log.warning("%s: %s; taking a full backup instead", self.domain, reason)

        self._make_run_dir(xml)
        checkpoint = new_checkpoint() if qcow2 else None
        backup_xml = self._backup_xml(all_targets, disks, since)
        checkpoint_xml = self._checkpoint_xml(all_targets, qcow2, checkpoint, repo.repo_id) if checkpoint else None
        self._begin(backup_xml, checkpoint_xml, checkpoint)

        sock = os.path.join(self._run_dir, "nbd.sock")
        plans = []
        for d in disks:
            incr = since is not None and d.fmt == "qcow2"
            plans.append(DiskPlan(
                disk=names[d.target], uri=f"nbd+unix:///{d.target}?socket={sock}",
                kind="incremental" if incr else "full",
                bitmap_context=f"{DIRTY_PREFIX}backup-{d.target}" if incr else None,
                bitmap=self._prefix + since if incr else None,
                parent_id=parents[d.target].id if incr else None,
                checkpoint=checkpoint if d.fmt == "qcow2" else None,
                fallback_reason=reason if kind == "incremental" and d.fmt == "qcow2" else None,
                extra={"source": f"libvirt:{self.domain}/{d.target}", "target": d.target, "format": d.fmt},
            ))
        return plans

    def _make_run_dir(self, xml: str) -> None:
        d = tempfile.mkdtemp(prefix=os.path.basename(run_dir_prefix(self._repo_id)), dir=run_base())
        self._run_dir = d
        with open(os.path.join(d, "domain"), "w") as f:
            f.write(self.dom.UUIDString() + "\n")
        # qemu (libvirt-qemu on Debian) creates the socket and the scratch files in it
        uid, gid = _qemu_ids(xml)
        if uid is not None and os.geteuid() == 0:
            os.chown(d, uid, gid if gid is not None else -1)

    def _backup_xml(self, all_targets: list[str], disks: list[DomainDisk], since: str | None) -> str:
        root = ET.Element("domainbackup", mode="pull")
        if since is not None:
            ET.SubElement(root, "incremental").text = self._prefix + since
        ET.SubElement(root, "server", transport="unix", socket=os.path.join(self._run_dir, "nbd.sock"))
        el = ET.SubElement(root, "disks")
        chosen = {d.target: d for d in disks}
        scratch = os.path.abspath(self.scratch_dir) if self.scratch_dir else self._run_dir
        tag = os.path.basename(self._run_dir)
        for t in all_targets:
            d = chosen.get(t)
            if d is None:
                ET.SubElement(el, "disk", name=t, backup="no")
                continue
            attrs = {"name": t, "backup": "yes", "type": "file", "backupmode": "full"}
            if since is not None and d.fmt == "qcow2":
                attrs.update(backupmode="incremental", incremental=self._prefix + since)
            disk = ET.SubElement(el, "disk", attrs)
            ET.SubElement(disk, "scratch", file=os.path.join(scratch, f"{tag}-{t}.scratch"))
        return ET.tostring(root, encoding="unicode")

    def _checkpoint_xml(self, all_targets: list[str], qcow2: list[DomainDisk], checkpoint: str,
                        repo_id: str) -> str:
        root = ET.Element("domaincheckpoint")
        ET.SubElement(root, "name").text = self._prefix + checkpoint
        ET.SubElement(root, "description").text = f"nbdbackup repository {repo_id}"
        el = ET.SubElement(root, "disks")
        bitmap = {d.target for d in qcow2}
        for t in all_targets:
            ET.SubElement(el, "disk", name=t, checkpoint="bitmap" if t in bitmap else "no")
        return ET.tostring(root, encoding="unicode")

    def _begin(self, backup_xml: str, checkpoint_xml: str | None, checkpoint: str | None) -> None:
        libvirt = _libvirt()
        frozen_marker = os.path.join(self._run_dir, "frozen")
        if self.quiesce:
            open(frozen_marker, "w").close()    # a run killed while frozen: the next one thaws
            try:
                self.dom.fsFreeze(None, 0)
            except libvirt.libvirtError as e:
                os.unlink(frozen_marker)
                raise SourceUnreachable(f"--quiesce: cannot freeze the file systems of {self.domain}: "
                                        f"{e.get_error_message()}",
                                        hint="the guest needs qemu-guest-agent and a guest agent channel; "
                                             "or back up without --quiesce") from None
        try:
            # set before the call: a lost reply may still have made the job and checkpoint
            self._job = True
            self._new_checkpoint = self._prefix + checkpoint if checkpoint else None
            self.dom.backupBegin(backup_xml, checkpoint_xml, 0)
        except libvirt.libvirtError as e:
            raise SourceUnreachable(f"libvirt refused the backup job of {self.domain}: {e.get_error_message()}",
                                    hint="see libvirtd's log; with --scratch-dir, qemu's user must be able "
                                         "to write there") from None
        finally:
            if self.quiesce and self._thaw():
                os.unlink(frozen_marker)

    def _thaw(self) -> bool:
        try:
            self.dom.fsThaw(None, 0)
            return True
        except Exception as e:   # the marker stays: the next run tries again
            log.warning("could not thaw the file systems of %s: %s", self.domain, e)
            return False

    # -- outcome ------------------------------------------------------------------------------
    def committed(self, plans: list[DiskPlan], infos: list[BackupInfo]) -> None:
        if self.delegate is not None:
            return self.delegate.committed(plans, infos)
        self._outcome = "committed"
        if self._job:
            self._end_job()
        keep = self._new_checkpoint
        if keep is None:
            return                  # no qcow2 disk: no chain to advance
        for c in self._our_checkpoints():
            if c.getName() != keep:
                try:
                    c.delete(0)     # older bases of this repository are no longer needed
                except Exception as e:   # committed: a leftover checkpoint only costs guest I/O
                    log.warning("could not delete old checkpoint %s: %s", c.getName(), e)

    def failed(self, exc: BaseException | None) -> None:
        if self.delegate is not None:
            return self.delegate.failed(exc)
        if self._outcome or self.dom is None:
            return
        self._outcome = "failed"
        try:
            if self._job:
                self._end_job()
        except Exception as e:
            log.warning("%s", e)
        new, self._new_checkpoint = self._new_checkpoint, None
        if new is None:
            return
        libvirt = _libvirt()
        try:
            self.dom.checkpointLookupByName(new, 0).delete(0)
        except libvirt.libvirtError as e:
            if _error_code(e) != libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:   # the next run deletes it
                log.warning("could not delete checkpoint %s of the failed run: %s", new, e.get_error_message())

    def close(self) -> None:
        try:
            if self.delegate is not None:
                self.delegate.close()
            elif self.dom is not None and self._job and not self._outcome:
                self.failed(None)
        finally:
            if self._run_dir:
                shutil.rmtree(self._run_dir, ignore_errors=True)
                self._run_dir = None
            lock, self._lock = self._lock, None
            if lock is not None:
                lock.release()
            if self.conn is not None:
                try:
                    self.conn.close()
                except Exception:
                    pass
                self.conn = None

    def vm_definition(self):
        return None


def _qemu_ids(xml: str) -> tuple[int | None, int | None]:
    """The uid and gid qemu runs as, from the live XML's DAC seclabel ("+64055:+64055")."""
    for sec in ET.fromstring(xml).findall("seclabel"):
        label = sec.find("label")
        if sec.get("model") == "dac" and label is not None and label.text:
            uid, _, gid = label.text.partition(":")
            try:
                return int(uid.lstrip("+")), int(gid.lstrip("+")) if gid else None
            except ValueError:
                return None, None
    return None, None
