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
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import LockedError, SourceFailed, SourceUnreachable, UsageError
from ..repo.ids import check_disk_name
from .base import DiskPlan, Source, raise_if_no_fallback
from .image import DIRTY_PREFIX, new_checkpoint
from .libvirt_checkpoints import reconcile_checkpoints
from .libvirt_domain import (
    DEFAULT_URI,
    DomainDisk,
    backup_disks,
    checkpoint_prefix,
    checkpoint_xml,
    disk_name,
    lookup_domain,
    open_connection,
)
from .libvirt_job import (
    THAW_ATTEMPTS,
    backup_xml,
    binding,
    delete_checkpoint,
    end_job,
    error_code,
    job_socket,
    make_run_dir,
    mark_frozen,
    read_definition,
    read_run_dir_domain,
    run_dir_prefix,
    thaw,
)

if TYPE_CHECKING:
    from ..repo.info import BackupInfo
    from ..repo.repository import Repository
    from ..repo.vmdef import VmDefinition

log = logging.getLogger(__name__)

RAW_REASON = ("{target} is {fmt}, not qcow2: libvirt keeps checkpoints (dirty bitmaps) only in qcow2 "
              "images, so it is backed up in full every time")


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
        self._vm: VmDefinition | None = None
        self._reconciled = False                 # reconcile_checkpoints ran in this run
        self._keep_run_dir = False               # it holds `frozen`: a guest this run could not thaw

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
        # by UUID alone: qemu:///system and qemu+unix:///system name the same domain
        key = hashlib.sha256(self.dom.UUIDString().encode()).hexdigest()[:16]
        try:
            self._lock = repo.host_locks.lock(f"libvirt-{key}", exclusive=True, wait=repo.lock_wait,
                                              purpose=f"the lock of libvirt domain {self.domain}")
        except LockedError:
            raise LockedError(f"another nbdbackup run of this repository is backing up domain {self.domain}",
                              hint="wait for it to finish, or pass --lock-wait SECONDS") from None

    def _job_socket(self) -> str | None:
        return job_socket(self.dom, self.domain)

    def _end_job(self) -> None:
        self._job = False
        end_job(self.dom, self.domain)

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
            if read_run_dir_domain(d) != uuid:
                continue            # another domain's run (its own next run cleans it), or not ours
            if os.path.exists(os.path.join(d, "frozen")):
                log.warning("thawing the guest file systems of %s, frozen by an interrupted run", self.domain)
                if not thaw(self.dom, self.domain):
                    continue        # the marker stays: every run tries again (and says so)
            shutil.rmtree(d, ignore_errors=True)
        for c in self._our_checkpoints():
            name = c.getName()
            if not self._recorded(repo, name[len(self._prefix):], all_names):
                # libvirt drops its bitmap; the parent checkpoint's bitmap still tracks every
                # change since the parent's backup, so nothing is lost
                log.warning("deleting checkpoint %s of domain %s: no committed backup of this repository "
                            "records it (left by an interrupted or failed run)", name, self.domain)
                delete_checkpoint(c)

    # -- the chain ---------------------------------------------------------------------------
    def _chain(self, repo: Repository, qcow2: list[DomainDisk],
               names: dict[str, str]) -> tuple[str | None, dict[str, BackupInfo], str | None]:
        """(checkpoint to read changes since, parent backup per target, None) or (None, {}, reason)."""
        libvirt = binding()
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
        known = not self._not_covered(full_name, qcow2, libvirt)
        # Always, even when libvirt knows it: libvirt's metadata says nothing about qemu's
        # bitmaps (one removed while shut off makes backupBegin fail). REDEFINE_VALIDATE checks
        # them against the running qemu, and redefines a checkpoint a shut-off backup made.
        self._reconciled = True
        why = reconcile_checkpoints(self.dom, self._repo_id, qcow2, checkpoint)
        if why is None:
            missing = self._not_covered(full_name, qcow2, libvirt)
            why = f"it does not cover disk {', '.join(names[t] for t in missing)}" if missing else None
        if why:
            if not known:
                return None, {}, (f"libvirt no longer knows checkpoint {full_name} of the latest backups "
                                  f"(deleted by hand, or the domain was redefined), and it cannot be "
                                  f"taken back from the images: {why}")
            return None, {}, f"checkpoint {full_name} of the latest backups cannot be used: {why}"
        return checkpoint, latest, None

    def _not_covered(self, full_name: str, qcow2: list[DomainDisk], libvirt) -> list[str]:
        """The targets of *qcow2* that libvirt's checkpoint *full_name* has no bitmap for (all
        of them when libvirt does not know it)."""
        try:
            ckpt = self.dom.checkpointLookupByName(full_name, 0)
        except libvirt.libvirtError as e:
            if error_code(e) != libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:
                raise
            return [d.target for d in qcow2]
        covered = {d.get("name") for d in ET.fromstring(ckpt.getXMLDesc(0)).findall("./disks/disk")
                   if d.get("checkpoint") == "bitmap"}
        return [d.target for d in qcow2 if d.target not in covered]

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
        self._vm = read_definition(self.dom, self.domain)
        if not self.dom.isActive():
            from .libvirt_offline import OfflineDomainSource

            if self.quiesce:
                log.warning("--quiesce: domain %s is shut off, there is nothing to freeze", self.domain)

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
        if qcow2 and not self._reconciled:
            # a full: only tidy up (metadata of our checkpoints whose bitmaps are gone, our bitmaps
            # libvirt has no checkpoint for); its answer about "no checkpoint" does not matter
            reconcile_checkpoints(self.dom, self._repo_id, qcow2, None)

        self._run_dir = make_run_dir(repo.repo_id, self.dom.UUIDString(), xml)
        checkpoint = new_checkpoint() if qcow2 else None
        job_xml = backup_xml(self._prefix, self._run_dir, self.scratch_dir, all_targets, disks, since)
        ckpt_xml = checkpoint_xml(self._prefix + checkpoint, all_targets, [d.target for d in qcow2],
                                  description=f"nbdbackup repository {repo.repo_id}") if checkpoint else None
        self._begin(job_xml, ckpt_xml, checkpoint)

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

    def _begin(self, job_xml: str, ckpt_xml: str | None, checkpoint: str | None) -> None:
        libvirt = binding()
        frozen_marker = os.path.join(self._run_dir, "frozen")
        if self.quiesce:
            mark_frozen(frozen_marker)      # a run killed while frozen: the next one thaws
            try:
                self.dom.fsFreeze(None, 0)
            except libvirt.libvirtError as e:
                os.unlink(frozen_marker)
                raise SourceUnreachable(f"--quiesce: cannot freeze the file systems of {self.domain}: "
                                        f"{e.get_error_message()}",
                                        hint="the guest needs qemu-guest-agent and a guest agent channel; "
                                             "or back up without --quiesce") from None
        refused = None
        thawed = True
        try:
            try:
                # set before the call: a lost reply may still have made the job and checkpoint
                self._job = True
                self._new_checkpoint = self._prefix + checkpoint if checkpoint else None
                self.dom.backupBegin(job_xml, ckpt_xml, 0)
            except libvirt.libvirtError as e:
                refused = SourceUnreachable(f"libvirt refused the backup job of {self.domain}: "
                                            f"{e.get_error_message()}",
                                            hint="see libvirtd's log; with --scratch-dir, qemu's user must be "
                                                 "able to write there")
        finally:        # whatever happened (an interrupt too): thaw now
            if self.quiesce:
                thawed = thaw(self.dom, self.domain, attempts=THAW_ATTEMPTS)
                if thawed:
                    os.unlink(frozen_marker)
                else:   # the marker and its run dir stay: every later run tries again
                    self._keep_run_dir = True
        if not thawed:  # fail the run: nobody may read "success" while the guest's I/O hangs
            raise SourceFailed(f"--quiesce: the file systems of {self.domain} are still FROZEN: "
                               f"libvirt could not thaw them ({THAW_ATTEMPTS} attempts)",
                               hint=f"thaw them now: virsh domfsthaw {self.domain}; the next backup of "
                                    "this domain tries again too")
        if refused is not None:
            raise refused

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
                delete_checkpoint(c)    # older bases of this repository are no longer needed

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
        libvirt = binding()
        try:
            checkpoint = self.dom.checkpointLookupByName(new, 0)
        except libvirt.libvirtError as e:
            if error_code(e) != libvirt.VIR_ERR_NO_DOMAIN_CHECKPOINT:   # the next run deletes it
                log.warning("could not find checkpoint %s of the failed run: %s", new, e.get_error_message())
            return
        delete_checkpoint(checkpoint)

    def close(self) -> None:
        try:
            if self.delegate is not None:
                self.delegate.close()
            elif self.dom is not None and self._job and not self._outcome:
                self.failed(None)
        finally:
            if self._run_dir and not self._keep_run_dir:
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

    def vm_definition(self) -> VmDefinition | None:
        """The domain's definition as prepare() read it (the moment the set was taken)."""
        return self._vm
