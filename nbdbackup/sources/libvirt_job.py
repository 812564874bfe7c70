"""The pieces of a libvirt pull-mode backup job (sources/libvirt.py runs the flow): private
run directories, the backup and checkpoint XML, ending a job, thawing, the definition to store.

libvirt is imported inside the functions (an optional extra); docs/libvirt.md has the
call sequence these pieces make up.
"""

from __future__ import annotations

import logging
import os
import stat
import tempfile
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import TYPE_CHECKING

from ..errors import SourceUnreachable

if TYPE_CHECKING:
    from ..repo.vmdef import VmDefinition
    from .libvirt_domain import DomainDisk

log = logging.getLogger(__name__)

JOB_END_TIMEOUT = 60.0


def binding():
    import libvirt

    return libvirt


def error_code(e) -> int:
    return e.get_error_code() if hasattr(e, "get_error_code") else -1


# -- run directories ---------------------------------------------------------------------------

def run_base() -> str:
    """Where private run directories go: /run when we may write there (root), else $TMPDIR."""
    return "/run" if os.access("/run", os.W_OK) else tempfile.gettempdir()


def run_dir_prefix(repo_id: str) -> str:
    """Every run directory of this repository starts with this: a backup job whose NBD socket
    is under it was started by us (and is stale when we hold the domain's lock)."""
    return os.path.join(run_base(), f"nbdbackup-libvirt-{repo_id}-")


def make_run_dir(repo_id: str, uuid: str, live_xml: str) -> str:
    """A new 0700 run directory naming the domain (by UUID) it is for, owned by qemu's user,
    who creates the NBD socket and the scratch files in it."""
    d = tempfile.mkdtemp(prefix=os.path.basename(run_dir_prefix(repo_id)), dir=run_base())
    with open(os.path.join(d, "domain"), "w") as f:
        f.write(uuid + "\n")
    uid, gid = qemu_ids(live_xml)
    if uid is not None and os.geteuid() == 0:
        os.chown(d, uid, gid if gid is not None else -1)
    return d


def qemu_ids(xml: str) -> tuple[int | None, int | None]:
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


# -- the job -----------------------------------------------------------------------------------

def backup_xml(prefix: str, run_dir: str, scratch_dir: str | None, all_targets: Sequence[str],
               disks: Sequence[DomainDisk], since: str | None) -> str:
    """<domainbackup mode='pull'>: every disk of the domain listed (backup='no' for those not
    chosen), qcow2 disks incremental from checkpoint prefix+*since* when given, others full."""
    root = ET.Element("domainbackup", mode="pull")
    if since is not None:
        ET.SubElement(root, "incremental").text = prefix + since
    ET.SubElement(root, "server", transport="unix", socket=os.path.join(run_dir, "nbd.sock"))
    el = ET.SubElement(root, "disks")
    chosen = {d.target: d for d in disks}
    scratch = os.path.abspath(scratch_dir) if scratch_dir else run_dir
    tag = os.path.basename(run_dir)
    for t in all_targets:
        d = chosen.get(t)
        if d is None:
            ET.SubElement(el, "disk", name=t, backup="no")
            continue
        attrs = {"name": t, "backup": "yes", "type": "file", "backupmode": "full"}
        if since is not None and d.fmt == "qcow2":
            attrs.update(backupmode="incremental", incremental=prefix + since)
        disk = ET.SubElement(el, "disk", attrs)
        ET.SubElement(disk, "scratch", file=os.path.join(scratch, f"{tag}-{t}.scratch"))
    return ET.tostring(root, encoding="unicode")


def job_socket(dom, domain: str) -> str | None:
    """The NBD socket of the domain's backup job; None when it runs none ('' when the job
    has no unix socket: a push job or a TCP server)."""
    libvirt = binding()
    try:
        # ask for the job first: a failed backupGetXMLDesc is an error line in libvirtd's log
        if not dom.isActive() or dom.jobInfo()[0] == libvirt.VIR_DOMAIN_JOB_NONE:
            return None
        xml = dom.backupGetXMLDesc(0)
    except libvirt.libvirtError as e:
        if error_code(e) == libvirt.VIR_ERR_NO_DOMAIN_BACKUP:
            return None
        raise SourceUnreachable(f"cannot ask libvirt about {domain}'s backup job: {e.get_error_message()}") from None
    server = ET.fromstring(xml).find("server")
    return (server.get("socket") or "") if server is not None else ""


def end_job(dom, domain: str) -> None:
    """End the domain's pull job (libvirt then removes its NBD export and scratch files) and
    wait until it is gone."""
    libvirt = binding()
    try:
        dom.abortJob()
    except libvirt.libvirtError as e:
        if job_socket(dom, domain) is not None:      # still there: say so; the next run ends it
            raise SourceUnreachable(f"could not end the backup job of {domain}: {e.get_error_message()}") from None
    # abortJob can return while libvirt still winds the job down (qemu's block jobs
    # conclude asynchronously): wait, so that no job outlives the run
    deadline = time.monotonic() + JOB_END_TIMEOUT
    while job_socket(dom, domain) is not None:
        if time.monotonic() > deadline:
            raise SourceUnreachable(f"the backup job of {domain} did not end within {JOB_END_TIMEOUT:.0f}s "
                                    "of abortJob", hint="see virsh domjobinfo")
        time.sleep(0.05)


def delete_checkpoint(checkpoint, *, with_bitmaps: bool = True) -> bool:
    """Delete a checkpoint of ours, with its bitmaps when *with_bitmaps* (a running domain: libvirt
    removes them from qemu), else or where the bitmaps are gone already (a shut-off backup removed
    them from the images; libvirt refuses then) its metadata only. Warns instead of failing: a
    checkpoint left over is never a base (no backup records it) or costs only guest I/O (an
    older one), and the next run tries again. True when it is gone."""
    libvirt = binding()
    name = checkpoint.getName()
    first = ""
    if with_bitmaps:
        try:
            checkpoint.delete(0)
            log.debug("deleted checkpoint %s", name)
            return True
        except libvirt.libvirtError as e:     # "bitmap ... not found in backing chain"
            first = e.get_error_message() + "; "
    try:
        checkpoint.delete(libvirt.VIR_DOMAIN_CHECKPOINT_DELETE_METADATA_ONLY)
        log.debug("dropped the metadata of checkpoint %s", name)
        return True
    except libvirt.libvirtError as e:
        log.warning("could not delete checkpoint %s: %s%s", name, first, e.get_error_message())
        return False


THAW_ATTEMPTS = 3


def thaw(dom, domain: str, attempts: int = 1) -> bool:
    """fsThaw, *attempts* times a second apart (a guest agent that timed out once often answers
    the next call); False when every attempt failed (the caller keeps its marker)."""
    for attempt in range(attempts):
        try:
            dom.fsThaw(None, 0)
            return True
        except Exception as e:   # the caller keeps its marker: the next run tries again
            log.warning("could not thaw the file systems of %s: %s", domain, e)
            if attempt + 1 < attempts:
                time.sleep(1.0)
    return False


def mark_frozen(path: str) -> None:
    """Create the `frozen` marker as root in a directory qemu's user owns: never through a
    name planted there (O_EXCL | O_NOFOLLOW), so nothing else is created or truncated."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    os.close(fd)


def read_run_dir_domain(run_dir: str) -> str | None:
    """The UUID a run directory names, or None. Its `domain` file is read only when it is a
    regular file that root (this user) owns: qemu's user owns the directory and could plant a
    FIFO (every later run would hang on it) or a link there."""
    try:
        fd = os.open(os.path.join(run_dir, "domain"), os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid():
            return None
        return os.read(fd, 200).decode(errors="replace").strip()
    finally:
        os.close(fd)


# -- the definition stored with the set --------------------------------------------------------

def read_definition(dom, domain: str) -> VmDefinition:
    """The domain XML to keep (the persistent definition, or a transient domain's live one;
    never VIR_DOMAIN_XML_SECURE, so no VNC/SPICE passwords reach the repository) and its
    UEFI variable store."""
    from ..repo.vmdef import VmDefinition

    libvirt = binding()
    persistent = bool(dom.isPersistent())
    xml = dom.XMLDesc(libvirt.VIR_DOMAIN_XML_INACTIVE if persistent else 0)
    path = nvram_path(xml)
    nvram = None
    if path:
        try:
            with open(path, "rb") as f:
                nvram = f.read()
        except FileNotFoundError:   # libvirt makes it from the template at the first start
            log.warning("%s names NVRAM file %s, which does not exist (yet): not stored", domain, path)
        except OSError as e:
            raise SourceUnreachable(f"cannot read the NVRAM (UEFI variables) of {domain} at {path}: "
                                    f"{e.strerror or e}",
                                    hint="run as a user who may read it (root, as libvirtd)") from None
    return VmDefinition(domain=domain, xml=xml, nvram=nvram, nvram_path=path)


def nvram_path(xml: str) -> str | None:
    """<os><nvram>PATH</nvram>, or the newer <nvram type='file'><source file='PATH'/>."""
    el = ET.fromstring(xml).find("./os/nvram")
    if el is None:
        return None
    source = el.find("source")
    path = source.get("file") if source is not None else (el.text or "").strip()
    return path or None
