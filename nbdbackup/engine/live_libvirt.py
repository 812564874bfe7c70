"""restore --live --domain: the copy through libvirt (virDomainBlockPull = qemu's block-stream,
followed by virDomainGetBlockJobInfo). Sequence in docs/live-restore.md."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
import time
from collections.abc import Callable
from dataclasses import dataclass

from ..errors import LiveCopyFailed, NotFound, SourceUnreachable, UsageError
from ..progress import NoBar
from .live_server import check_header_no_backing, copy_failed, finish, serves
from .live_state import POLL_S, RECONNECT_GRACE, LiveCopyResult, LiveState

log = logging.getLogger("nbdbackup.engine.live_restore")


def _disk_of(dom, dest: str) -> tuple[str, bool] | None:
    """(target, has a backing) of the domain's disk whose source file is DEST; None: none is."""
    import xml.etree.ElementTree as ET

    real = os.path.realpath(dest)
    for disk in ET.fromstring(dom.XMLDesc(0)).findall("./devices/disk"):
        src, tgt = disk.find("source"), disk.find("target")
        if src is None or tgt is None or not src.get("file"):
            continue
        if os.path.realpath(src.get("file")) == real:
            backing = disk.find("backingStore")
            return tgt.get("dev"), backing is not None and backing.find("source") is not None
    return None


def copy_domain(state: LiveState, domain: str, connect_uri: str, *, start: bool = False, speed: int | None = None,
                progress: Callable | None = None) -> LiveCopyResult:
    """The copy through libvirt: virDomainBlockPull (block-stream; libvirt leaves qemu's
    on-error at its default, report) on the domain's disk whose source is DEST, followed by
    virDomainGetBlockJobInfo; done when the job is gone and the disk has no backing store."""
    from ..sources.libvirt_domain import lookup_domain, open_connection

    conn = open_connection(connect_uri)     # UsageError without the binding
    import libvirt
    t0 = time.monotonic()
    try:
        dom = lookup_domain(conn, domain)
        if not dom.isActive():
            if not start:
                raise UsageError(f"domain {domain} is not running", hint="start it, or pass --start")
            try:
                dom.create()
            except libvirt.libvirtError as e:
                raise SourceUnreachable(f"cannot start domain {domain}: {e.get_error_message()}",
                                        hint=f"qemu runs as libvirt's user: it must reach {state.dest} and "
                                             f"{state.socket} (--socket-group libvirt-qemu)") from None
        found = _disk_of(dom, state.dest)
        if found is None:
            raise NotFound(f"domain {domain} has no disk whose source is {state.dest}",
                           hint=f"give the domain a <disk> with <source file='{state.dest}'/>")
        target, has_backing = found
        job = f"{domain}:{target}"
        if not has_backing:
            check_header_no_backing(state)
            return finish(state, 0, time.monotonic() - t0, job, followed=False, stop=True, already=True)
        first = time.monotonic()
        try:
            followed = bool(dom.blockJobInfo(target, 0))
        except libvirt.libvirtError as e:
            raise _domain_failed(state, domain, f"blockJobInfo failed: {e.get_error_message()}") from None
        if followed:
            log.info("a block job on %s of %s is still running: following it", target, domain)
        pulling = followed
        while True:
            try:
                if not pulling:
                    dom.blockPull(target, speed or 0, libvirt.VIR_DOMAIN_BLOCK_PULL_BANDWIDTH_BYTES)
                elif speed is not None:         # 0: no limit
                    dom.blockJobSetSpeed(target, speed, libvirt.VIR_DOMAIN_BLOCK_JOB_SPEED_BANDWIDTH_BYTES)
            except libvirt.libvirtError as e:
                raise _domain_failed(state, domain, f"blockPull refused: {e.get_error_message()}") from None
            _follow_domain(dom, libvirt, state, domain, target, progress)
            found = _disk_of(dom, state.dest)
            if found is not None and not found[1]:
                break
            # as in copy(): qemu may not have reconnected to a restarted server yet
            if time.monotonic() - first < RECONNECT_GRACE and serves(state, timeout=5.0):
                log.info("the block job ended with the backing in place while the server answers: "
                         "qemu has not reconnected yet; trying again")
                pulling = False
                time.sleep(2.0)
                continue
            raise _domain_failed(state, domain, "the block job ended but the disk still has its backing store "
                                                f"(qemu's error is in /var/log/libvirt/qemu/{domain}.log)")
        check_header_no_backing(state)
        return finish(state, state.size, time.monotonic() - t0, job, followed=followed, stop=True)
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def _follow_domain(dom, libvirt, state: LiveState, domain: str, target: str, progress) -> None:
    bar = progress(state.size, f"live restore {state.backup}") if progress else NoBar()
    shown = 0
    try:
        while True:
            try:
                info = dom.blockJobInfo(target, 0)
            except libvirt.libvirtError as e:
                with contextlib.suppress(libvirt.libvirtError):
                    if dom.isActive():
                        raise _domain_failed(state, domain, e.get_error_message()) from None
                raise _domain_gone(state, domain) from None
            if not info:
                if not dom.isActive():
                    raise _domain_gone(state, domain)
                bar.update(max(0, state.size - shown))
                return
            cur = int(info.get("cur", 0))
            if cur > shown:
                bar.update(cur - shown)
                shown = cur
            time.sleep(POLL_S)
    finally:
        bar.close()


def _resume_domain_cmd(state: LiveState, domain: str) -> str:
    return f"nbdbackup restore --live --resume {shlex.quote(state.dest)} --domain {shlex.quote(domain)}"


def _domain_gone(state: LiveState, domain: str) -> LiveCopyFailed:
    return LiveCopyFailed(f"the VM went away during the live restore of {state.dest} (domain {domain} "
                          "is not running)",
                          hint=f"{state.dest} keeps what was copied and what the guest wrote; "
                               f"`{_resume_domain_cmd(state, domain)} --start`")


def _domain_failed(state: LiveState, domain: str, message: str) -> LiveCopyFailed:
    e = copy_failed(state, "SOCKET", message)
    return LiveCopyFailed(str(e), hint=e.hint.replace(
        f"nbdbackup restore --live --resume {shlex.quote(state.dest)} --qmp SOCKET", _resume_domain_cmd(state, domain)))


@dataclass
class DomainPlan:
    """A domain restore --live defines from the backup's stored definition (DOMAIN missing)."""
    domain: str
    backup: str                     # the backup id it was planned for (DEST's backing must name it)
    source_domain: str              # its name when it was backed up
    target: str                     # the backup's disk in it ("vda"), now DEST
    xml: str                        # the rewritten definition
    xml_path: str                   # written beside DEST
    nvram: bytes | None
    nvram_path: str | None
    uuid: str | None


def plan_domain(repo, ref: str, dest: str, domain: str, connect_uri: str, *, force: bool = False) -> DomainPlan | None:
    """Before anything is made: None when DOMAIN exists with DEST as a disk (the copy runs in it);
    else the definition to make from the backup's --libvirt set. Refusals: an existing DOMAIN
    without DEST (never replaced), a backup without a stored definition (NotFound), a set with
    other disks or a kept writable disk (the new domain would write the original's images)."""
    import uuid as uuidlib

    from ..sources.libvirt_domain import open_connection
    from .live_server import disk_snippet
    from .restore_vm import (
        DOMAIN_NAME_RE,
        check_free,
        disk_target,
        lookup_or_none,
        refuse_existing,
        rewrite,
        stored_uuid,
    )
    from .vm_xml import RestoredDisk

    dest = os.path.abspath(dest)
    conn = open_connection(connect_uri)
    try:
        dom = lookup_or_none(conn.lookupByName, domain)
        if dom is not None:
            if _disk_of(dom, dest) is None:
                raise UsageError(f"domain {domain} exists on {connect_uri} and has no disk whose source is {dest}: "
                                 "restore --live never redefines an existing domain",
                                 hint="give a new name with --domain NEW (defined from the backup's stored "
                                      f"definition), or give {domain} a <disk> with <source file='{dest}'/>")
            return None
        info = repo.resolve(ref)
        vm = repo.vm_definition(info)
        if vm is None:
            raise NotFound(f"no libvirt domain {domain!r} on {connect_uri}, and backup {info.id} ({info.disk}) has "
                           "no stored definition to define it from (not taken with --libvirt)",
                           hint="define a domain whose disk is DEST, e.g. with\n" + disk_snippet(dest)
                                + f"\nthen `nbdbackup restore --live {info.id} {dest} --domain NAME --start`")
        others = [b for b in repo.set_members(info) if b.id != info.id]
        if others:
            raise UsageError(f"backup {info.id} is one of {len(others) + 1} disks of a set of domain {vm.domain} "
                             f"(also {', '.join(b.disk for b in others)}): a domain defined from it would run "
                             f"those disks on {vm.domain}'s images",
                             hint="restore the whole set with `nbdbackup restore --libvirt SET --to-dir DIR "
                                  "--name NEW --start`, or define a domain whose disk is DEST yourself and "
                                  "pass it with --domain")
        if not DOMAIN_NAME_RE.match(domain):
            raise UsageError(f"invalid --domain {domain!r} for a new domain",
                             hint="use 1-64 characters from A-Z a-z 0-9 . _ + -, starting with a letter or digit")
        target = disk_target(info, vm.domain)
        new_name = domain if domain != vm.domain else None
        uuid = str(uuidlib.uuid4()) if new_name is not None else None
        try:
            check_free(conn, domain, connect_uri, force=False, want_uuid=uuid or stored_uuid(vm))
        except UsageError as e:     # its hint speaks restore --libvirt's --name
            raise UsageError(str(e), hint=(e.hint or "").replace("--name NEW", "--domain NEW")) from None
        d = os.path.dirname(dest)
        nvram_path = os.path.join(d, f"{domain}_VARS.fd") if vm.nvram is not None else None
        xml_path = os.path.join(d, f"{domain}.xml")
        rewritten = rewrite(vm, {target: RestoredDisk(dest, "qcow2")}, new_name=new_name, uuid=uuid,
                            nvram_path=nvram_path)
        if rewritten.shared_writable:
            raise UsageError(f"disk {', '.join(rewritten.shared_writable)} of {vm.domain} was not in the backup and "
                             f"keeps its source: the new domain {domain} would write the same image as {vm.domain}",
                             hint="define a domain whose disk is DEST yourself and pass it with --domain")
        refuse_existing([p for p in (nvram_path, xml_path) if p], force=force)
        return DomainPlan(domain, info.id, vm.domain, target, rewritten.xml, xml_path, vm.nvram, nvram_path,
                          rewritten.uuid)
    finally:
        with contextlib.suppress(Exception):
            conn.close()


def define_planned(plan: DomainPlan, connect_uri: str) -> None:
    """After DEST exists: the NVRAM (0600) and XML beside it, then the definition (the name and
    UUID checked again: another may have taken them meanwhile)."""
    from ..fsutil import write_atomically
    from ..sources.libvirt_domain import open_connection
    from .restore_vm import check_free, define_domain

    if plan.nvram_path is not None:
        write_atomically(plan.nvram_path, plan.nvram, 0o600)
    write_atomically(plan.xml_path, plan.xml.encode(), 0o644)
    conn = open_connection(connect_uri)
    try:
        check_free(conn, plan.domain, connect_uri, force=False, want_uuid=plan.uuid)
        define_domain(conn, plan.xml, plan.xml_path, connect_uri)
        log.info("defined domain %s on %s from the stored definition of %s (its %s on DEST; XML in %s)",
                 plan.domain, connect_uri, plan.source_domain, plan.target, plan.xml_path)
    finally:
        with contextlib.suppress(Exception):
            conn.close()
