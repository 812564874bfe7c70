"""Make libvirt's checkpoint metadata match the repository's chain.

A libvirt checkpoint of a qcow2 disk is a persistent bitmap of the same name in the image;
our checkpoints are named `bitmap_prefix(repo_id) + <checkpoint>`, the very name ImageSource
gives its own bitmaps. A shut-off domain is backed up from its images (libvirt_offline.py),
which adds and removes bitmaps behind libvirt's back; libvirt 9.0 can neither create a
checkpoint nor run a backup job on an inactive domain. So after such a backup, and before
each backup of the running domain, libvirt is told again which checkpoint is ours:
REDEFINE (metadata only; allowed on an inactive domain) of the repository's checkpoint, and
removal of every other checkpoint of this repository. Checkpoints of other repositories or
other tools (any other name) are never looked at.
"""

from __future__ import annotations

import calendar
import logging
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import TYPE_CHECKING

from .image import bitmap_prefix
from .libvirt_domain import checkpoint_xml
from .libvirt_job import delete_checkpoint
from .qemu_tools import image_info

if TYPE_CHECKING:
    from .libvirt_domain import DomainDisk

log = logging.getLogger(__name__)


def reconcile_checkpoints(dom, repo_id: str, disks: Sequence[DomainDisk], want: str | None) -> str | None:
    """Make libvirt know checkpoint *want* of this repository (a BackupInfo.checkpoint, without
    prefix) on every qcow2 disk of *disks*, and no checkpoint of this repository whose bitmaps
    are gone.

    Returns None when that holds and every such disk really has the bitmap (present, persistent,
    recording, not left in use by a qemu that died: libvirt's REDEFINE_VALIDATE on a running
    domain, qemu-img info on a shut-off one); otherwise the reason the checkpoint cannot be an
    incremental's base (the caller takes a full, or exits 13 with --no-fallback), and that
    checkpoint is removed (with its bitmaps where libvirt can). Other checkpoints of this
    repository are kept while their bitmaps are there (the running source's committed()
    deletes them); those whose bitmaps are gone lose their metadata."""
    import libvirt

    prefix = bitmap_prefix(repo_id)
    ours = {c.getName(): c for c in dom.listAllCheckpoints() if c.getName().startswith(prefix)}
    qcow2 = [d for d in disks if d.fmt == "qcow2"]
    name = prefix + want if want else None
    if name is None:
        reason = "the repository's latest backup of this domain recorded no checkpoint"
    elif not qcow2:
        reason = "the domain has no qcow2 disk to hold a checkpoint's bitmap"
    else:
        reason = _redefine(dom, name, qcow2, ours.get(name), libvirt)
    for other, checkpoint in ours.items():
        if other == name and not reason:
            continue
        if other != name and _bitmaps_there(dom, checkpoint, disks, libvirt):
            continue        # a real older checkpoint: LibvirtSource.committed() deletes it with its bitmaps
        delete_checkpoint(checkpoint, with_bitmaps=bool(dom.isActive()))
    if dom.isActive():
        known = {c.getName() for c in dom.listAllCheckpoints() if c.getName().startswith(prefix)}
        _drop_unknown_bitmaps(dom, prefix, qcow2, known, libvirt)
    return reason


def domain_disk_targets(dom) -> list[str]:
    """Every <disk> target of the domain as libvirt has it now (live XML when it runs)."""
    root = ET.fromstring(dom.XMLDesc(0))
    return [t.get("dev") for t in root.findall("./devices/disk/target") if t.get("dev")]


def checkpoint_time(checkpoint: str) -> int:
    """The creation time (epoch seconds) a new_checkpoint() name carries; now when it has none."""
    try:
        return calendar.timegm(time.strptime(checkpoint.split("-")[-2][-16:], "%Y%m%dT%H%M%SZ"))
    except (ValueError, IndexError):
        return int(time.time())


def _redefine(dom, name: str, qcow2: Sequence[DomainDisk], known, libvirt) -> str | None:
    active = bool(dom.isActive())
    if not active:
        # REDEFINE_VALIDATE needs a running domain: look at the images ourselves
        reason = _images_lack(name, qcow2)
        if reason:
            return reason
    created = checkpoint_time(name)
    if known is not None:       # keep the time libvirt (or we) recorded at first
        try:
            got = ET.fromstring(known.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)).findtext("creationTime")
            created = int(got) if got else created
        except (libvirt.libvirtError, ValueError, ET.ParseError):
            pass
    xml = checkpoint_xml(name, domain_disk_targets(dom), [d.target for d in qcow2], created=created)
    flags = libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
    if active:
        flags |= libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE
    try:
        dom.checkpointCreateXML(xml, flags)
    except libvirt.libvirtError as e:
        return f"libvirt cannot use checkpoint {name}: {e.get_error_message()}"
    log.debug("libvirt knows checkpoint %s on %s", name, ", ".join(d.target for d in qcow2))
    return None


def _bitmaps_there(dom, checkpoint, disks: Sequence[DomainDisk], libvirt) -> bool:
    """Whether the bitmaps of *checkpoint* are still in the disks it names."""
    try:
        xml = checkpoint.getXMLDesc(libvirt.VIR_DOMAIN_CHECKPOINT_XML_NO_DOMAIN)
    except libvirt.libvirtError:
        return False
    if dom.isActive():
        # libvirt checks the running qemu's bitmaps; redefining a checkpoint as it is changes nothing
        try:
            dom.checkpointCreateXML(xml, libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE
                                    | libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE_VALIDATE)
            return True
        except libvirt.libvirtError:
            return False
    by_target = {d.target: d for d in disks}
    named = [by_target[d.get("name")] for d in ET.fromstring(xml).findall("./disks/disk")
             if d.get("checkpoint") == "bitmap" and d.get("name") in by_target]
    return _images_lack(checkpoint.getName(), named) is None if named else True


def _images_lack(name: str, qcow2: Sequence[DomainDisk]) -> str | None:
    for disk in qcow2:
        try:
            bitmaps = {b.name: b for b in image_info(disk.path, disk.fmt).bitmaps}
        except Exception as e:
            return f"cannot read the bitmaps of {disk.path} ({disk.target}): {e}"
        bitmap = bitmaps.get(name)
        if bitmap is None:
            return f"{disk.path} ({disk.target}) has no bitmap {name}"
        if bitmap.in_use:
            return f"bitmap {name} on {disk.path} is marked in-use: a qemu died without saving it"
        if not bitmap.enabled:
            return f"bitmap {name} on {disk.path} is disabled: it did not track every change"
    return None


def _drop_unknown_bitmaps(dom, prefix: str, qcow2: Sequence[DomainDisk], known: set, libvirt) -> None:
    """Bitmaps of this repository in a running domain's images that libvirt has no checkpoint
    for: left by a killed shut-off backup (its next shut-off backup would remove them) before the
    domain was started. They only cost guest I/O; libvirt is the only one who may remove them
    from the running qemu, so each is redefined as a checkpoint and deleted with its bitmaps."""
    found: dict[str, list[str]] = {}
    for disk in qcow2:
        try:
            names = [b.name for b in image_info(disk.path, disk.fmt, force_share=True).bitmaps]
        except Exception as e:
            log.debug("cannot list the bitmaps of %s: %s", disk.path, e)
            continue
        for bitmap in names:
            if bitmap.startswith(prefix) and bitmap not in known:
                found.setdefault(bitmap, []).append(disk.target)
    if not found:
        return
    targets = domain_disk_targets(dom)
    for bitmap, on in found.items():
        try:
            checkpoint = dom.checkpointCreateXML(checkpoint_xml(bitmap, targets, on, created=checkpoint_time(bitmap)),
                                                 libvirt.VIR_DOMAIN_CHECKPOINT_CREATE_REDEFINE)
        except libvirt.libvirtError as e:
            log.warning("could not remove leftover bitmap %s: %s", bitmap, e.get_error_message())
            continue
        log.info("removing bitmap %s, left by a backup that did not commit", bitmap)
        delete_checkpoint(checkpoint, with_bitmaps=bool(dom.isActive()))
