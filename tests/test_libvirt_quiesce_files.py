"""What a root-run backup does with the files in its libvirt run directory, which qemu's user
owns, and with a guest it cannot thaw.

The thaw failure needs a guest agent that froze and then stopped answering; the test domains
have no guest OS (so no agent), which is why these drive LibvirtSource._begin with a stand-in
for the one libvirt object involved. The rest (markers, run-directory files) is real.
"""

from __future__ import annotations

import os
import stat

import libvirt
import pytest

from nbdbackup.errors import SourceFailed
from nbdbackup.sources import libvirt_job
from nbdbackup.sources.libvirt import LibvirtSource


class AgentThatStopsAnswering:
    """virDomain's freeze/backup/thaw calls: the freeze works, the first *thaw_failures* thaws fail."""

    def __init__(self, thaw_failures: int):
        self.thaw_failures, self.calls = thaw_failures, []

    def fsFreeze(self, mountpoints, flags):
        self.calls.append("freeze")
        return 1

    def backupBegin(self, backup_xml, checkpoint_xml, flags):
        self.calls.append("backupBegin")

    def fsThaw(self, mountpoints, flags):
        self.calls.append("thaw")
        if self.thaw_failures:
            self.thaw_failures -= 1
            raise libvirt.libvirtError("Guest agent is not responding: QEMU guest agent is not connected")
        return 1


def _source(tmp_path, dom) -> LibvirtSource:
    src = LibvirtSource("web1", quiesce=True)
    src.dom, src._run_dir, src._prefix = dom, str(tmp_path), "nbdbackup-x-"
    return src


def test_a_guest_that_cannot_be_thawed_fails_the_run_and_keeps_the_marker(tmp_path, monkeypatch):
    monkeypatch.setattr(libvirt_job.time, "sleep", lambda s: None)
    dom = AgentThatStopsAnswering(thaw_failures=libvirt_job.THAW_ATTEMPTS)
    src = _source(tmp_path, dom)
    with pytest.raises(SourceFailed, match="still FROZEN") as e:
        src._begin("<domainbackup/>", None, "c1")
    assert "virsh domfsthaw web1" in e.value.hint
    assert dom.calls == ["freeze", "backupBegin"] + ["thaw"] * libvirt_job.THAW_ATTEMPTS
    assert (tmp_path / "frozen").exists()
    src.dom = None          # close() without a libvirt connection: only the run dir matters here
    src.close()
    assert (tmp_path / "frozen").exists(), "the next run must find the marker and thaw"


def test_a_thaw_that_fails_once_is_retried(tmp_path, monkeypatch):
    monkeypatch.setattr(libvirt_job.time, "sleep", lambda s: None)
    dom = AgentThatStopsAnswering(thaw_failures=1)
    src = _source(tmp_path, dom)
    src._begin("<domainbackup/>", None, "c1")
    assert dom.calls == ["freeze", "backupBegin", "thaw", "thaw"]
    assert not (tmp_path / "frozen").exists()


def test_the_frozen_marker_is_never_made_through_a_planted_name(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("keep me")
    (tmp_path / "frozen").symlink_to(victim)
    with pytest.raises(FileExistsError):
        libvirt_job.mark_frozen(str(tmp_path / "frozen"))
    assert victim.read_text() == "keep me"


def test_a_run_dirs_domain_file_is_read_only_when_it_is_a_regular_file_we_own(tmp_path):
    d = tmp_path / "run"
    d.mkdir()
    assert libvirt_job.read_run_dir_domain(str(d)) is None
    (d / "domain").write_text("1234-uuid\n")
    assert libvirt_job.read_run_dir_domain(str(d)) == "1234-uuid"
    (d / "domain").unlink()
    os.mkfifo(d / "domain")             # would block a plain open() forever
    assert stat.S_ISFIFO((d / "domain").stat().st_mode)
    assert libvirt_job.read_run_dir_domain(str(d)) is None
    (d / "domain").unlink()
    (tmp_path / "elsewhere").write_text("1234-uuid\n")
    (d / "domain").symlink_to(tmp_path / "elsewhere")
    assert libvirt_job.read_run_dir_domain(str(d)) is None
    if os.geteuid() == 0:               # a file qemu's user planted: not root's
        (d / "domain").unlink()
        (d / "domain").write_text("1234-uuid\n")
        os.chown(d / "domain", 64055, 64055)
        assert libvirt_job.read_run_dir_domain(str(d)) is None
