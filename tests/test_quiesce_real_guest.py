"""--quiesce (libvirt's fsFreeze/fsThaw) and --qga (our own agent client) against Debian's real
qemu-guest-agent in a real Linux guest (helpers.guest: Debian's kernel, a busybox initramfs,
an ext4 disk mounted with commit=600 and the kernel's periodic writeback off).

The proof that a freeze really happens: the guest writes a file through the agent (guest-exec
of `echo ... > /mnt/F`, no sync), so its data and even its directory entry are only in the
guest's page cache. A backup without a freeze does not have the file (the control: it shows
the test can fail); a backup with one does, because FIFREEZE syncs the file system and flushes
its journal before libvirt's (or our) point in time is taken. The file is read out of the
restored raw image with debugfs, which reads the blocks as they are on the disk.

One booted guest per module (a libvirt domain for the --libvirt tests, a plain qemu for
--qmp/--qga); every test leaves it thawed (and a fixture thaws it for the next test if not).
The failure modes a real agent cannot easily show (a thaw that fails, a stale reply) stay in
test_libvirt_quiesce_files.py and test_qmp_qga.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from helpers import guest, support
from helpers.engine_util import init_repo, nbb
from helpers.libvirt import make_domain, virsh


def _backups(repo: Path, *args, code: int = 0) -> list[dict] | subprocess.CompletedProcess:
    p = nbb(repo, "--json", *args, check=False)
    assert p.returncode == code, (p.returncode, p.stdout, p.stderr)
    if code:
        return p
    out = json.loads(p.stdout)
    return out if isinstance(out, list) else [out]


def _on_disk(repo: Path, backup_id: str, names: list[str], tmp: Path) -> dict[str, bytes | None]:
    """{NAME: /NAME as the backup's ext4 has it on the disk (None: not there)}."""
    raw = tmp / f"{backup_id}.raw"
    nbb(repo, "restore", backup_id, str(raw))
    try:
        return {name: guest.ext4_file(raw, name) for name in names}
    finally:
        raw.unlink()


def _write_unsynced(agent, name: str) -> bytes:
    """The guest writes /mnt/NAME (page cache only); its content."""
    text = f"{name} {uuid.uuid4().hex}"
    guest.guest_sh(agent, f"echo {text} > /mnt/{name}")
    return (text + "\n").encode()


# --- a libvirt domain -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def guests(libvirtd, tmp_path_factory):
    """(the libvirt domain, its agent, the plain qemu guest): both boot at once (the boot is
    most of this module's time), the plain one is waited for only by the test that uses it."""
    os_ = guest.guest_os()
    d = tmp_path_factory.mktemp("guests")
    plain = guest.PlainGuest(d, os_, guest.make_ext4_qcow2(d / "plain-vda.qcow2"), wait=False)
    dom = None
    try:
        start = time.monotonic()
        dom = make_domain((("image", guest.make_ext4_qcow2(d / "vda.qcow2")),), guest=os_, tag="agent")
        agent = guest.LibvirtAgent(dom.name)
        guest.wait_ready(agent, dom.console, dom.name)
        print(f"\nlibvirt guest {dom.name}: agent answered {time.monotonic() - start:.1f}s after start (TCG)")
        yield dom, agent, plain
    finally:
        if dom is not None:
            dom.remove()
        plain.stop()


@pytest.fixture
def domain(guests):
    return guests[0], guests[1]


@pytest.fixture
def libvirt_guest(domain):
    yield domain
    _dom, agent = domain
    guest.ensure_thawed(agent)      # a failed test must not leave the next one a frozen guest


def _checkpoints(dom, repo: Path) -> list[str]:
    """The domain's checkpoints of *repo* (the module's other tests' repositories have theirs)."""
    prefix = f"nbdbackup-{json.loads((repo / 'config.json').read_text())['repo_id']}-"
    return sorted(c for c in virsh("checkpoint-list", dom.name, "--name").stdout.split() if c.startswith(prefix))


def test_libvirt_quiesce_really_freezes_and_thaws(libvirt_guest, tmp_path):
    dom, agent = libvirt_guest
    repo = init_repo(tmp_path / "repo", "64K")
    control = _write_unsynced(agent, "control")
    [plain] = _backups(repo, "full", "--libvirt", dom.name)
    assert _on_disk(repo, plain["id"], ["control"], tmp_path)["control"] in (None, b""), \
        "the unsynced write is on the disk without a freeze: this test could not tell a freeze happened"

    fresh = _write_unsynced(agent, "quiesced")
    [frozen] = _backups(repo, "full", "--libvirt", dom.name, "--quiesce")
    assert _on_disk(repo, frozen["id"], ["quiesced", "control"], tmp_path) == {"quiesced": fresh, "control": control}

    assert guest.freeze_status(agent) == "thawed"
    assert guest.guest_sh(agent, "echo again > /mnt/after && cat /mnt/after") == "again\n"


def test_libvirt_failed_job_after_the_freeze_thaws(libvirt_guest, tmp_path):
    """libvirt refuses the job after the guest was frozen (qemu's user cannot write the scratch
    files): exit 4, and the guest is thawed, nothing is left."""
    dom, agent = libvirt_guest
    repo = init_repo(tmp_path / "repo", "64K")
    scratch = tmp_path / "root-only"
    scratch.mkdir(mode=0o700)
    p = _backups(repo, "full", "--libvirt", dom.name, "--quiesce", "--scratch-dir", str(scratch), code=4)
    assert "refused the backup job" in p.stderr and "Traceback" not in p.stderr, p.stderr
    assert guest.freeze_status(agent) == "thawed"
    assert not any(Path(d, "frozen").exists() for d in _run_dirs(dom))
    assert guest.guest_sh(agent, "echo ok > /mnt/after-refusal && cat /mnt/after-refusal") == "ok\n"


KILL_AFTER_BEGIN = """
import os, signal, sys
import libvirt
real = libvirt.virDomain.backupBegin
def begin_then_die(self, *args):
    real(self, *args)
    os.kill(os.getpid(), signal.SIGKILL)    # frozen, the job and checkpoint made, no thaw yet
libvirt.virDomain.backupBegin = begin_then_die
from nbdbackup.cli.main import run
sys.argv[0] = "nbdbackup"
sys.exit(run())
"""


def _run_dirs(dom) -> list[str]:
    uuid_ = virsh("domuuid", dom.name).stdout.strip()
    return [str(d) for d in Path("/run").glob("nbdbackup-libvirt-*")
            if (d / "domain").exists() and (d / "domain").read_text().strip() == uuid_]


def test_libvirt_sigkill_while_frozen_then_the_next_run_thaws(libvirt_guest, tmp_path):
    """SIGKILL lands between fsFreeze and fsThaw (injected right after libvirt's backupBegin,
    so it lands there every time): the guest stays frozen with the `frozen` marker in the run
    dir; the next run of the repository thaws it, ends the job, drops the checkpoint."""
    dom, agent = libvirt_guest
    repo = init_repo(tmp_path / "repo", "64K")
    [first] = _backups(repo, "full", "--libvirt", dom.name)
    p = subprocess.run([sys.executable, "-c", KILL_AFTER_BEGIN, "--repo", str(repo), "incremental", "--libvirt",
                        dom.name, "--quiesce"], capture_output=True, text=True, timeout=300)
    assert p.returncode == -signal.SIGKILL, (p.returncode, p.stderr)
    assert guest.freeze_status(agent) == "frozen", "the kill did not land while the guest was frozen"
    assert any(Path(d, "frozen").exists() for d in _run_dirs(dom))

    [second] = _backups(repo, "incremental", "--libvirt", dom.name)
    assert guest.freeze_status(agent) == "thawed"
    assert _run_dirs(dom) == []
    assert virsh("domjobinfo", dom.name).stdout.count("None") >= 1
    # only the checkpoint the committed backup opened is left
    assert len(_checkpoints(dom, repo)) == 1, _checkpoints(dom, repo)   # the killed run's is gone
    fresh = _write_unsynced(agent, "after-kill")
    assert guest.guest_sh(agent, "cat /mnt/after-kill").encode() == fresh
    assert first["id"] != second["id"]


# --- a plain qemu with the agent on a unix socket (--qmp ... --qga) ------------------------------

@pytest.fixture
def plain_guest(guests):
    vm = guests[2]
    vm.wait_booted()
    print(f"\nplain qemu guest: agent answered {vm.boot_seconds:.1f}s after start (TCG)")
    return vm


def test_qmp_qga_really_freezes_and_thaws(plain_guest, tmp_path):
    vm = plain_guest
    agent = vm.agent
    try:
        repo = init_repo(tmp_path / "repo", "64K")
        common = ("--qmp", vm.qmp_sock, "--node", vm.node, "--disk", "plain-vda")
        control = _write_unsynced(agent, "control")
        [plain] = _backups(repo, "full", *common)
        assert _on_disk(repo, plain["id"], ["control"], tmp_path)["control"] in (None, b""), \
            "the unsynced write is on the disk without a freeze: this test could not tell a freeze happened"

        fresh = _write_unsynced(agent, "quiesced")
        [frozen] = _backups(repo, "incremental", *common, "--qga", vm.agent_sock)
        assert frozen["kind"] == "incremental"
        assert _on_disk(repo, frozen["id"], ["quiesced", "control"], tmp_path) == \
            {"quiesced": fresh, "control": control}

        assert guest.freeze_status(agent) == "thawed"
        assert guest.guest_sh(agent, "echo again > /mnt/after && cat /mnt/after") == "again\n"
    finally:
        guest.ensure_thawed(agent)


def test_guest_helpers_are_honest(tmp_path):
    """The initramfs is cached by its inputs, and debugfs tells a missing file from an empty one."""
    assert guest.initramfs() == guest.initramfs()
    img = guest.make_ext4_qcow2(tmp_path / "x.qcow2", 8 * guest.MiB, {"a": b"A\n", "empty": b""})
    raw = tmp_path / "x.raw"
    support.run([support.require_tool("qemu-img"), "convert", "-O", "raw", str(img), str(raw)])
    assert guest.ext4_file(raw, "a") == b"A\n"
    assert guest.ext4_file(raw, "empty") == b""
    assert guest.ext4_file(raw, "missing") is None
    assert os.access(guest.initramfs(), os.R_OK)
