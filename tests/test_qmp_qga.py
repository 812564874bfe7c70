"""--qga: guest file systems frozen around the transaction, and always thawed.

There is no guest OS here, so no real qemu-guest-agent: FakeAgent is a small
unix-socket server speaking the agent's line-delimited JSON. It records each
call together with how many backup jobs qemu had at that moment (a job exists
exactly from the transaction on), and can be told to fail freeze or thaw.
The VM and the backup are real.
"""

from __future__ import annotations

import json
import os
import socket
import threading

import pytest

from helpers.qmp_vm import MiB, Vm
from helpers.repo import new_repo
from nbdbackup.engine.backup import BackupOptions, run_backup
from nbdbackup.errors import SourceFailed, SourceUnreachable
from nbdbackup.sources.qmp import QmpSource


class FakeAgent:
    def __init__(self, path: str, vm: Vm, *, fail_freeze=False, fail_thaw=0, stale=False):
        self.path, self.vm = path, vm
        self.fail_freeze, self.fail_thaw, self.stale = fail_freeze, fail_thaw, stale
        self.calls: list[tuple[str, int]] = []
        self.srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.srv.bind(path)
        self.srv.listen(4)
        self.srv.settimeout(0.2)
        self.stopping = False
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self):
        while not self.stopping:
            try:
                conn, _ = self.srv.accept()
            except OSError:
                continue
            with conn:
                conn.settimeout(10)
                if self.stale:      # an answer an earlier client never read
                    conn.sendall(b'{"return": 12345}\n')
                buf = b""
                while True:
                    try:
                        data = conn.recv(4096)
                    except OSError:
                        break
                    if not data:
                        break
                    buf += data
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        conn.sendall(json.dumps(self._answer(json.loads(line))).encode() + b"\n")

    def _answer(self, msg):
        cmd = msg["execute"]
        if cmd == "guest-sync":
            return {"return": msg["arguments"]["id"]}
        self.calls.append((cmd, len(self.vm.jobs())))
        if cmd == "guest-fsfreeze-freeze" and self.fail_freeze:
            return {"error": {"class": "GenericError", "desc": "failed to freeze /: Device busy"}}
        if cmd == "guest-fsfreeze-thaw" and self.fail_thaw:
            self.fail_thaw -= 1
            return {"error": {"class": "GenericError", "desc": "thaw hiccup"}}
        return {"return": 2}

    def close(self):
        self.stopping = True
        self.thread.join(5)
        self.srv.close()


@pytest.fixture
def setup(tmp_path, monkeypatch):
    monkeypatch.setenv("NBDBACKUP_STATE_DIR", str(tmp_path / "state"))
    repo = new_repo(tmp_path / "repo")
    vm = Vm(tmp_path, {"vda": 4 * MiB})
    agents = []

    def agent(**kw):
        a = FakeAgent(str(tmp_path / f"qga{len(agents)}.sock"), vm, **kw)
        agents.append(a)
        return a

    try:
        yield repo, vm, agent
    finally:
        for a in agents:
            a.close()
        vm.stop()
        repo.close()


def run(repo, vm, qga, kind="full"):
    return run_backup(repo, QmpSource(vm.qmp_sock, ["vda"], qga=qga), kind, BackupOptions())


def test_freeze_before_transaction_thaw_after(setup):
    repo, vm, agent = setup
    a = agent(stale=True)
    vm.write("vda", 0, 65536, 0x11)
    r = run(repo, vm, a.path)
    assert a.calls == [("guest-fsfreeze-freeze", 0), ("guest-fsfreeze-thaw", 1)]
    with repo.open_image(r[0].info) as img:
        assert img.read(0, 4 * MiB) == vm.snapshot()["vda"]
    vm.assert_clean()


def test_freeze_failure_still_thaws_and_leaves_nothing(setup):
    repo, vm, agent = setup
    a = agent(fail_freeze=True)
    with pytest.raises(SourceFailed, match="Device busy"):
        run(repo, vm, a.path)
    assert [c for c, _ in a.calls] == ["guest-fsfreeze-freeze", "guest-fsfreeze-thaw"]
    vm.assert_clean()
    assert vm.bitmaps("vda") == {}        # the transaction never ran
    assert repo.list_backups() == []


def test_thaw_is_retried_and_its_failure_reported(setup, tmp_path):
    repo, vm, agent = setup
    a = agent(fail_thaw=1)                # one hiccup, then the retry thaws
    run(repo, vm, a.path)
    assert [c for c, _ in a.calls] == ["guest-fsfreeze-freeze"] + ["guest-fsfreeze-thaw"] * 2
    b = agent(fail_thaw=99)
    with pytest.raises(SourceFailed, match="could not thaw") as ei:
        run(repo, vm, b.path, "incremental")
    assert "by hand" in ei.value.hint
    assert [c for c, _ in b.calls].count("guest-fsfreeze-thaw") == 3
    vm.assert_clean()
    assert len(repo.list_backups()) == 1   # the failed run committed nothing...
    bms = [bm for n, bm in vm.bitmaps("vda").items() if n.startswith("nbdbackup-")]
    assert len(bms) == 2                   # ...and kept its changes (merged into the new bitmap)
    assert sorted(bm["recording"] for bm in bms) == [False, True]
    # the guest may still be frozen: the state remembers to thaw it on the next run
    (state,) = [p for p in (tmp_path / "state").iterdir() if p.suffix == ".json"]
    assert json.loads(state.read_text())["frozen"] == b.path
    run(repo, vm, None, "incremental")
    assert [c for c, _ in b.calls][-1] == "guest-fsfreeze-thaw"
    assert not state.exists()


def test_missing_agent_socket_is_a_clear_error(setup, tmp_path):
    repo, vm, _ = setup
    with pytest.raises(SourceUnreachable, match="guest agent"):
        run(repo, vm, str(tmp_path / "nope.sock"))
    vm.assert_clean()
    assert not os.path.exists(tmp_path / "nope.sock")


def test_guest_left_frozen_by_a_killed_run_is_thawed_next_run(setup, tmp_path):
    """A run SIGKILLed between freeze and thaw leaves "frozen" in its state file;
    the next run (even without --qga) thaws through the recorded agent first."""
    from nbdbackup.sources.qmp_state import StateFile

    repo, vm, agent = setup
    a = agent()
    st = StateFile(str(tmp_path / "state"), repo.repo_id, vm.qmp_sock)
    st.lock()
    st.data["frozen"] = a.path
    st.save()
    st.unlock()
    run(repo, vm, None)
    assert [c for c, _ in a.calls] == ["guest-fsfreeze-thaw"]
    assert not os.path.exists(st.path)
    vm.assert_clean()
