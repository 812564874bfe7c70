"""examples/libvirt-pull-backup.sh against a real libvirt: a running VM backed up in pull
mode (virsh backup-begin), full then incremental from its checkpoint, restored bit-exact.

The VM has no guest OS (it sits in the firmware); its "guest writes" go through HMP
qemu-io on the virtio disk, as the QMP tests do. qemu runs as libvirt's own user
(libvirt-qemu on Debian), as it does on a real host.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import support
from helpers.engine_util import MiB, init_repo, nbb, restore_equals
from helpers.libvirt import disk_xml, domain_dir, domain_xml, virsh

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "libvirt-pull-backup.sh"
DISK_QDEV = "/machine/peripheral/virtio-disk0/virtio-backend"


def _virsh(*args, check=True) -> subprocess.CompletedProcess:
    return virsh(*args, check=check)


@pytest.fixture
def vm(libvirtd):
    """A running transient domain with a 64 MiB qcow2 virtio disk (vda)."""
    # qemu runs as libvirt-qemu: the image's directory must be one it can enter
    d = domain_dir()
    img = d / "vm.qcow2"
    support.run([support.require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(img), "64M"])
    support.run([support.require_tool("qemu-io"), "-f", "qcow2", "-c", "write -q -P 0x11 0 2M", str(img)])
    name = f"nbdbackup-test-{os.getpid()}"
    xml = d / "dom.xml"
    xml.write_text(domain_xml(name, disk_xml("vda", img, "qcow2")))
    _virsh("create", str(xml))
    try:
        yield name, img
    finally:
        _virsh("destroy", name, check=False)
        shutil.rmtree(d, ignore_errors=True)


def _guest_write(name: str, pattern: int, offset: int, length: int) -> None:
    _virsh("qemu-monitor-command", name, "--hmp", f'qemu-io -d {DISK_QDEV} "write -P {pattern} {offset} {length}"')


def _run_script(name: str, repo: Path, state: Path, ok: bool = True):
    env = dict(os.environ, NBDBACKUP_REPO=str(repo), STATE_DIR=str(state),
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    p = subprocess.run(["sh", str(SCRIPT), name, "vda"], env=env, capture_output=True, text=True, timeout=300)
    if not ok:
        assert p.returncode != 0, p.stdout + p.stderr
        return p
    assert p.returncode == 0, p.stdout + p.stderr
    assert "backed up" in p.stdout, p.stdout
    [info] = [b for b in json.loads(nbb(repo, "--json", "list").stdout) if b["id"] in p.stdout]
    return info


def _disk_now(img: Path, out: Path) -> Path:
    # -U: the running VM holds the image's lock; nothing else writes while we copy
    support.run([support.require_tool("qemu-img"), "convert", "-U", "-f", "qcow2", "-O", "raw", str(img), str(out)])
    return out


def test_libvirt_pull_mode_full_then_incremental(vm, tmp_path):
    name, img = vm
    repo = init_repo(tmp_path / "repo", "256K")
    state = tmp_path / "state"

    full = _run_script(name, repo, state)
    assert full["kind"] == "full" and full["disk"] == f"{name}-vda"
    first = _disk_now(img, tmp_path / "first.raw")

    _guest_write(name, 0x33, 1 * MiB, 64 * 1024)
    # a run that fails (here: the repository is unusable) commits nothing, keeps the state,
    # and drops its own checkpoint: the next run still covers the write above
    before = _virsh("checkpoint-list", name, "--name").stdout.split()
    failed = _run_script(name, tmp_path / "not-a-repo", state, ok=False)
    assert "nbdbackup: error" in failed.stderr, failed.stderr
    assert _virsh("checkpoint-list", name, "--name").stdout.split() == before
    _guest_write(name, 0x44, 40 * MiB, 128 * 1024)
    inc = _run_script(name, repo, state)
    assert inc["kind"] == "incremental" and inc["parent"] == full["id"]
    assert inc["bitmap"] == "backup-vda"
    assert inc["read_bytes"] <= 1 * MiB, inc          # two dirty chunks, not the disk
    second = _disk_now(img, tmp_path / "second.raw")
    assert first.read_bytes() != second.read_bytes()

    assert restore_equals(repo, full["id"], first, tmp_path)
    assert restore_equals(repo, inc["id"], second, tmp_path)
    # the job is over, and only the newest checkpoint is kept as the next base
    checkpoints = _virsh("checkpoint-list", name, "--name").stdout.split()
    last_ckpt = (state / f"{name}-vda.last").read_text().split()
    assert checkpoints == [last_ckpt[0]] and last_ckpt[1] == inc["id"], (checkpoints, last_ckpt)
    assert "None" in _virsh("domjobinfo", name).stdout or "none" in _virsh("domjobinfo", name).stdout.lower()
    # its private run dirs (mktemp's nbdbackup-XXXXXX; /run/nbdbackup-live and others are not its)
    assert not [p for p in os.listdir("/run") if re.fullmatch(r"nbdbackup-[A-Za-z0-9]{6}", p)]
