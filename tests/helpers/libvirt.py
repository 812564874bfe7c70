"""libvirt for the tests: the shared libvirtd, throw-away domains, guest writes.

    def test_x(libvirt_domain, tmp_path):           # fixtures: libvirtd, libvirt_domain
        dom = libvirt_domain(disks=[("qcow2", 64 * MiB), ("raw", 16 * MiB)], cdrom=True)
        guest_write(dom, "vda", 0x33, 1 * MiB, 64 * 1024)
        disk_now(dom.disks["vda"], tmp_path / "vda.raw")

libvirtd (and virtlogd) are shared with every engineer's tests running at the same time:
the running daemon is used, one is started only when none answers, and a shared one is
never stopped. Domains are named nbdbackup-test-<pid>-<n>, have no guest OS (TCG, 64 MiB,
sitting in the firmware) and are always destroyed and undefined at the end. qemu runs as
libvirt's own user, so images live in a 0755 directory under /var/tmp.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from . import support

URI = "qemu:///system"
MiB = 1024 * 1024
_counter = itertools.count(1)


def virsh(*args, check=True, timeout=120) -> subprocess.CompletedProcess:
    """virsh -c qemu:///system ARGS (AssertionError with its output when check and it fails)."""
    return support.run([support.require_tool("virsh"), "-c", URI, *args], check=check, timeout=timeout)


@pytest.fixture(scope="session")
def libvirtd(tmp_path_factory):
    """The connection URI of a libvirtd that answers: the running one, else one started here
    (and only that one stopped at the end of the session).

    A daemon started here logs into files, never into a pipe: libvirtd logs every failed call
    (the tests make hundreds) to stderr, and once an unread pipe's 64 KiB fill up, its logging
    thread blocks with the log lock held and every later call, `virsh destroy` too, hangs."""
    support.require_tool("virsh")
    _kvm_device_as_udev_sets_it()
    started: list[tuple[subprocess.Popen, Path]] = []
    if virsh("list", "--name", check=False).returncode != 0:
        logs = tmp_path_factory.mktemp("libvirtd-logs")
        for daemon in ("virtlogd", "libvirtd"):
            exe = support.require_tool(daemon)
            log = logs / f"{daemon}.log"
            with log.open("wb") as out:
                started.append((subprocess.Popen([exe], stdin=subprocess.DEVNULL, stdout=out, stderr=out,
                                                 start_new_session=True), log))
        deadline = time.monotonic() + 30
        while virsh("list", "--name", check=False).returncode != 0:
            proc, log = started[-1]
            assert time.monotonic() < deadline and proc.poll() is None, \
                f"libvirtd did not come up; the end of {log}:\n" + log.read_text(errors="replace")[-4000:]
            time.sleep(0.2)
    yield URI
    for proc, _log in reversed(started):
        support.stop(proc)


def _kvm_device_as_udev_sets_it() -> None:
    """A container without udev leaves /dev/kvm root:root 0600. libvirt then finds its cached
    qemu capabilities (which say "kvm") outdated for libvirt-qemu on EVERY define and start and
    probes qemu again: 10-90 s each on 2 cores. Debian's udev rule makes it root:kvm 0660; as root,
    do what udev would. Domains still run under TCG (type='qemu')."""
    import grp

    kvm = Path("/dev/kvm")
    if os.geteuid() != 0 or not kvm.exists():
        return
    try:
        gid = grp.getgrnam("kvm").gr_gid
    except KeyError:
        return
    st = kvm.stat()
    if st.st_gid != gid or (st.st_mode & 0o060) != 0o060:
        os.chown(kvm, 0, gid)
        kvm.chmod(0o660)


@dataclass
class TestDomain:
    name: str
    dir: Path                               # 0755 directory with its images and XML
    disks: dict[str, Path]                  # target -> image, in XML order ("vda", "vdb", ...)
    formats: dict[str, str]                 # target -> "qcow2" | "raw"
    persistent: bool
    xml: str                                # the XML it was created/defined from
    cdrom: str | None = None                # the CD-ROM's target ("hdc") when it has one
    nvram: Path | None = None
    console: Path | None = None             # the serial console's log (a domain with a guest OS)
    removed: bool = field(default=False, repr=False)

    __test__ = False        # not a pytest test class

    def is_active(self) -> bool:
        return virsh("domstate", self.name).stdout.strip() in ("running", "paused", "in shutdown")

    def start(self) -> None:
        virsh("start", self.name)

    def stop(self) -> None:
        """virsh destroy: qemu gets SIGTERM and saves the persistent bitmaps into the images."""
        virsh("destroy", self.name)

    def checkpoints(self) -> list[str]:
        """libvirt's checkpoint names of this domain, sorted."""
        return sorted(virsh("checkpoint-list", self.name, "--name").stdout.split())

    def job_running(self) -> bool:
        out = virsh("domjobinfo", self.name).stdout
        return not any(line.split(":", 1)[-1].strip().lower() == "none"
                       for line in out.splitlines() if line.startswith("Job type"))

    def remove(self) -> None:
        if self.removed:
            return
        self.removed = True
        virsh("destroy", self.name, check=False)
        if self.persistent:
            virsh("undefine", self.name, "--checkpoints-metadata", "--nvram", check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def _qemu_img(*args) -> None:
    support.run([support.require_tool("qemu-img"), *args])


def domain_dir(prefix: str = "nbdbackup-libvirt-") -> Path:
    """A new 0755 directory under /var/tmp for a domain's images: qemu runs as libvirt-qemu,
    which must be able to enter it."""
    d = Path(tempfile.mkdtemp(prefix=prefix, dir="/var/tmp"))
    d.chmod(0o755)
    return d


def domain_xml(name: str, devices: str, *, memory: int = 64, os_boot: str = "<boot dev='hd'/>",
               features: str = "") -> str:
    """The XML of a TCG domain *name* (*memory* MiB, one vCPU) with *devices* (disk_xml...)."""
    return f"""<domain type='qemu'>
  <name>{name}</name>
  <memory unit='MiB'>{memory}</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='pc'>hvm</type>{os_boot}</os>
  {features}
  <devices>
    <emulator>{support.require_tool("qemu-system-x86_64")}</emulator>
{devices}  </devices>
</domain>
"""


def disk_xml(target: str, path: Path, fmt: str) -> str:
    return f"""    <disk type='file' device='disk'>
      <driver name='qemu' type='{fmt}'/>
      <source file='{path}'/>
      <target dev='{target}' bus='virtio'/>
    </disk>
"""


def make_domain(disks=(("qcow2", 64 * MiB),), *, cdrom: bool = False, persistent: bool = False,
                running: bool = True, fill: int | None = 0x11, nvram: bool = False,
                tag: str = "", busy: int = 0, guest=None) -> TestDomain:
    """A new domain with one virtio disk per (format, size) in *disks* (targets vda, vdb, ...),
    each with its first MiB written with byte *fill* (None: left empty); *cdrom*: an IDE CD-ROM
    hdc with a small file in it; *nvram*: a pflash NVRAM file (SeaBIOS as the loader); *busy*:
    this many bytes of random (incompressible) data in vda from 1 MiB on, so that reading it
    takes a while (for faults in the middle of a read).
    *guest*: a helpers.guest.GuestOs to boot (kernel, initrd, cmdline; 256 MiB, the guest agent's
    channel, the serial console to dom.console), with vda a copy of the image *disks*[0] names as
    ("image", PATH) instead of a (format, size).
    Transient domains are always running. The caller removes it (the fixture does)."""
    if not persistent and not running:
        raise ValueError("a transient domain only exists while it runs")
    name = f"nbdbackup-test-{os.getpid()}-{next(_counter)}{'-' + tag if tag else ''}"
    d = domain_dir()
    images: dict[str, Path] = {}
    formats: dict[str, str] = {}
    devices = ""
    for i, (fmt, size) in enumerate(disks):
        target = "vd" + chr(ord("a") + i)
        if fmt == "image":          # (image, PATH): a copy of a prepared qcow2 image
            fmt, source = "qcow2", Path(size)
            img = d / f"{target}.{fmt}"
            shutil.copyfile(source, img)
            images[target], formats[target] = img, fmt
            devices += disk_xml(target, img, fmt)
            continue
        img = d / f"{target}.{fmt}"
        _qemu_img("create", "-q", "-f", fmt, str(img), str(size))
        if fill is not None:
            support.run([support.require_tool("qemu-io"), "-f", fmt, "-c", f"write -q -P {fill} 0 1M", str(img)])
        if busy and i == 0:
            noise = d / "noise.bin"
            noise.write_bytes(os.urandom(busy))
            support.run([support.require_tool("qemu-io"), "-f", fmt, "-c", f"write -q -s {noise} 1M {busy}",
                         str(img)])
            noise.unlink()
        images[target], formats[target] = img, fmt
        devices += disk_xml(target, img, fmt)
    if cdrom:
        iso = d / "cd.iso"
        iso.write_bytes(b"\x42" * (2 * MiB))
        devices += f"""    <disk type='file' device='cdrom'>
      <driver name='qemu' type='raw'/>
      <source file='{iso}'/>
      <target dev='hdc' bus='ide'/>
      <readonly/>
    </disk>
"""
    loader = ""
    nvram_path = None
    if nvram:
        nvram_path = d / "VARS.fd"
        nvram_path.write_bytes(bytes(range(256)) * 512)     # 128 KiB, recognisable
        bios = "/usr/share/seabios/bios-256k.bin"
        loader = (f"<loader readonly='yes' type='pflash'>{bios}</loader>"
                  f"<nvram>{nvram_path}</nvram>")
    memory, boot, console = 64, "<boot dev='hd'/>", None
    if guest is not None:
        # copies in the domain's directory: libvirt chowns a domain's kernel and initrd to qemu's user
        kernel, initrd = shutil.copyfile(guest.kernel, d / "vmlinuz"), shutil.copyfile(guest.initrd, d / "initrd")
        memory, console = 256, d / "console.log"
        boot = f"<kernel>{kernel}</kernel><initrd>{initrd}</initrd><cmdline>{guest.cmdline}</cmdline>"
        devices += f"""    <serial type='file'><source path='{console}'/><target port='0'/></serial>
    <console type='file'><source path='{console}'/><target type='serial' port='0'/></console>
    <channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>
"""
    xml = domain_xml(name, devices, memory=memory, os_boot=loader + boot,
                     features="<features><acpi/></features>" if nvram else "")
    xml_file = d / "dom.xml"
    xml_file.write_text(xml)
    dom = TestDomain(name=name, dir=d, disks=images, formats=formats, persistent=persistent, xml=xml,
                     cdrom="hdc" if cdrom else None, nvram=nvram_path, console=console)
    try:
        if persistent:
            virsh("define", str(xml_file))
            if running:
                dom.start()
        else:
            virsh("create", str(xml_file))
    except BaseException:
        dom.remove()
        raise
    return dom


@pytest.fixture
def libvirt_domain(libvirtd):
    """make_domain as a factory; every domain it made is removed after the test."""
    made: list[TestDomain] = []

    def factory(*args, **kw) -> TestDomain:
        dom = make_domain(*args, **kw)
        made.append(dom)
        return dom

    yield factory
    for dom in reversed(made):
        dom.remove()


def _qdev(dom: TestDomain, target: str) -> str:
    """The qdev path of *target*'s virtio device, from the live XML's alias (vdb -> virtio-disk1)."""
    import xml.etree.ElementTree as ET

    root = ET.fromstring(virsh("dumpxml", dom.name).stdout)
    for disk in root.findall("./devices/disk"):
        if disk.find("target").get("dev") == target:
            alias = disk.find("alias").get("name")
            return f"/machine/peripheral/{alias}/virtio-backend"
    raise AssertionError(f"{dom.name} has no disk {target}")


def guest_write(dom: TestDomain | str, target: str, pattern: int, offset: int, length: int) -> None:
    """What the guest would write: HMP qemu-io on *target*'s device of the running domain, then
    a flush (as a guest's fsync would)."""
    if isinstance(dom, str):
        dom = TestDomain(name=dom, dir=Path("/nonexistent"), disks={}, formats={}, persistent=False, xml="")
    qdev = _qdev(dom, target)
    # the flush writes qemu's cached qcow2 metadata to the image, so disk_now() sees the write
    for cmd in (f"write -P {pattern} {offset} {length}", "flush"):
        out = virsh("qemu-monitor-command", dom.name, "--hmp", f'qemu-io -d {qdev} "{cmd}"').stdout
        assert "error" not in out.lower() and "fail" not in out.lower(), out


def disk_now(path: Path | str, out: Path | str) -> Path:
    """The disk's current contents as a raw file *out* (-U: a running qemu holds the image's
    lock; the caller makes sure nothing writes meanwhile)."""
    info = json.loads(support.run([support.require_tool("qemu-img"), "info", "-U", "--output=json",
                                   str(path)]).stdout)
    _qemu_img("convert", "-U", "-f", info["format"], "-O", "raw", str(path), str(out))
    return Path(out)
