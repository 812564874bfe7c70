"""`restore --live`: a TCG qemu (no guest OS) runs on DEST.qcow2 while qemu's block-stream copies
a 256 MiB backup into it; guest writes (HMP qemu-io through the device's block backend) go to
blocks already copied and not yet copied; the command is SIGKILLed and resumed, the server
killed and restarted. Every end state is compared with the backup plus exactly those writes."""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest

from helpers import support
from helpers.repo import new_repo, write_backup
from helpers.serve import wait_until

MiB = 1024 * 1024
SIZE = 256 * MiB
SPEED = 24 * MiB            # bytes/s: the copy takes ~10 s, time enough to act mid-copy
DEV = "vdisk"


def _disk_bytes() -> bytes:
    """Real data: 40 MiB random, 16 MiB of a repeating text, patterned blocks, zero holes."""
    rnd = random.Random(15)
    d = bytearray(SIZE)
    d[0:24 * MiB] = rnd.randbytes(24 * MiB)
    d[64 * MiB:80 * MiB] = (b"nbdbackup live restore " * (16 * MiB // 23 + 1))[:16 * MiB]
    for i in range(96, 256, 8):                 # a MiB of its own byte every 8 MiB, up to the end
        d[i * MiB:(i + 1) * MiB] = bytes([i]) * MiB
    d[200 * MiB:216 * MiB] = rnd.randbytes(16 * MiB)
    return bytes(d)


@pytest.fixture(scope="module")
def backup(tmp_path_factory):
    """(repo path, backup id, disk bytes): one 256 MiB backup shared by the module's tests."""
    tmp = tmp_path_factory.mktemp("live-repo")
    data = _disk_bytes()
    r = new_repo(tmp / "repo")
    try:
        info = write_backup(r, "live", data, zero_holes=True)
    finally:
        r.close()
    return str(tmp / "repo"), info.id, data


class GuestVm:
    """qemu on DEST: one QMP socket for the tool, one for the test (query-block-jobs, HMP writes);
    a byte model of the disk the guest should see (the backup + its writes)."""

    def __init__(self, tmp: Path, dest: Path, data: bytes):
        self.tmp, self.dest = tmp, dest
        self.qmp_sock = str(tmp / "qmp.sock")
        self.watch_sock = str(tmp / "watch.sock")
        self.model = bytearray(data)
        self.proc = None
        self.mon = None

    def start(self) -> None:
        for s in (self.qmp_sock, self.watch_sock):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(s)
        cmd = [support.require_tool("qemu-system-x86_64"), "-machine", "pc,accel=tcg", "-m", "64", "-S",
               "-nodefaults", "-display", "none",
               "-qmp", f"unix:{self.qmp_sock},server=on,wait=off",
               "-qmp", f"unix:{self.watch_sock},server=on,wait=off",
               "-blockdev", f"driver=file,node-name=dest-file,filename={self.dest}",
               "-blockdev", "driver=qcow2,node-name=dest,file=dest-file",
               "-device", f"virtio-blk-pci,drive=dest,id={DEV}"]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE, text=True)
        self.mon = support.qmp_connect(self.watch_sock, self.proc)

    def cmd(self, name: str, **args):
        r = self.mon.cmd_raw(name, args or None)
        assert "error" not in r, f"QMP {name}: {r['error']}"
        return r["return"]

    def hmp_io(self, line: str) -> str:
        return self.cmd("human-monitor-command",
                        **{"command-line": f'qemu-io -d /machine/peripheral/{DEV}/virtio-backend "{line}"'})

    def write(self, offset: int, length: int, pattern: int) -> None:
        out = self.hmp_io(f"write -P {pattern:#x} {offset} {length}")
        assert "error" not in out.lower() and "fail" not in out.lower(), out
        self.model[offset:offset + length] = bytes([pattern]) * length

    def read_ok(self, offset: int, length: int) -> None:
        """The guest reads what the model says (a single-byte range: qemu-io read -P)."""
        want = self.model[offset]
        assert self.model[offset:offset + length] == bytes([want]) * length
        out = self.hmp_io(f"read -P {want:#x} {offset} {length}")
        assert "error" not in out.lower() and "fail" not in out.lower() and "mismatch" not in out.lower(), out

    def job(self) -> dict | None:
        jobs = self.cmd("query-block-jobs")
        return jobs[0] if jobs else None

    def wait_offset(self, at_least: int, timeout: float = 60.0) -> int:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            j = self.job()
            if j and j["offset"] >= at_least:
                return j["offset"]
            time.sleep(0.1)
        raise AssertionError(f"the copy did not reach {at_least} within {timeout}s: {self.job()}")

    def stop(self) -> None:
        if self.proc is None:
            return
        try:
            self.mon.cmd_raw("quit")
            self.proc.wait(15)
        except Exception:
            support.kill_if_running(self.proc)
        finally:
            with contextlib.suppress(Exception):
                self.mon.close()
            self.proc = None


def _state(dest: Path) -> dict:
    return json.loads(Path(f"{dest}.nbdbackup-live.json").read_text())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"
    return True


@pytest.fixture
def live(tmp_path, backup):
    """A GuestVm factory; every server the tool started (its pids from the state file, read
    while the test runs) and every VM are stopped at the end."""
    vms, pids = [], set()

    def make(dest: Path) -> GuestVm:
        vm = GuestVm(tmp_path, dest, backup[2])
        vms.append(vm)
        return vm

    make.pids = pids
    yield make
    for vm in vms:
        vm.stop()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    for state in tmp_path.glob("*.nbdbackup-live.json"):     # servers killed above leave their dirs
        st = json.loads(state.read_text())
        if st.get("server_pid") and st["server_pid"] not in pids:    # restarted by a --resume
            with contextlib.suppress(ProcessLookupError):
                os.kill(st["server_pid"], signal.SIGKILL)
        run_dir = st.get("run_dir")
        if run_dir and os.path.basename(run_dir).startswith("live-"):
            shutil.rmtree(run_dir, ignore_errors=True)


def _cli(repo: str, *args, **kw):
    return subprocess.Popen([support.nbdbackup_exe(), "--repo", repo, *map(str, args)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def _finish(proc: subprocess.Popen, timeout: float = 120) -> tuple[int, str, str]:
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"restore --live did not finish in {timeout}s: {err}") from None
    return proc.returncode, out, err


def _check_result(vm: GuestVm, dest: Path, tmp: Path) -> None:
    """No backing file any more, and DEST equals the backup with exactly the guest's writes."""
    vm.stop()       # qemu's caches flushed; DEST's header final
    info = json.loads(support.run([support.require_tool("qemu-img"), "info", "--output=json", str(dest)]).stdout)
    assert "backing-filename" not in info, info
    expected = tmp / "expected.raw"
    expected.write_bytes(vm.model)
    p = support.run([support.require_tool("qemu-img"), "compare", "-f", "qcow2", "-F", "raw", str(dest),
                     str(expected)], check=False)
    assert p.returncode == 0, p.stdout + p.stderr
    assert not Path(f"{dest}.nbdbackup-live.json").exists()


def _writes_around(vm: GuestVm, offset: int) -> None:
    """Guest writes to blocks the copy has done and to blocks it has not reached: whole and
    partial clusters, one across a cluster boundary."""
    done = (offset // 2) & ~0xFFFF
    assert done >= 2 * MiB
    vm.write(done, 64 * 1024, 0x5A)
    vm.write(done // 2 + 512, 4096, 0x5B)                 # partial cluster in copied ground
    ahead = offset + 64 * MiB
    assert ahead + 2 * MiB < SIZE
    vm.write(ahead + 4096, 8192, 0xA5)                    # partial cluster not yet copied
    vm.write(ahead + MiB - 4096, 8192, 0xA6)              # across a cluster boundary
    vm.write(SIZE - 64 * 1024, 64 * 1024, 0xA7)           # the last cluster


def test_live_restore_with_guest_writes(tmp_path, backup, live):
    repo, bid, _ = backup
    dest = tmp_path / "dest.qcow2"
    proc = _cli(repo, "restore", "--live", "live", dest, "--qmp", tmp_path / "qmp.sock", "--speed", SPEED,
                "--json")
    try:
        support.wait_for_path(f"{dest}.nbdbackup-live.json", timeout=60, proc=proc)
        support.wait_for_path(dest, timeout=60, proc=proc)
        st = _state(dest)
        live.pids.add(st["server_pid"])
        assert st["backup"] == bid and f'"export":"{bid}"' in st["backing"]     # the id, never the alias
        vm = live(dest)
        vm.start()
        offset = vm.wait_offset(16 * MiB)
        _writes_around(vm, offset)
        rc, out, err = _finish(proc)
    finally:
        support.kill_if_running(proc)
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["backup"] == bid and doc["bytes"] == SIZE and doc["server_stopped"] and not doc["followed_running_job"]
    assert wait_until(lambda: not _alive(st["server_pid"]), timeout=15)
    vm.read_ok(SIZE - 64 * 1024, 64 * 1024)
    _check_result(vm, dest, tmp_path)


def _start_dest(repo: str, dest: Path, live) -> dict:
    p = support.nbdbackup("--repo", repo, "restore", "--live", "live", dest, "--json")
    doc = json.loads(p.stdout)
    live.pids.add(doc["server_pid"])
    assert doc["state_file"] == f"{dest}.nbdbackup-live.json" and _alive(doc["server_pid"])
    assert "--resume" in doc["resume_command"]
    assert doc["stop_command"] == f"kill {doc['server_pid']} && rm -r {os.path.dirname(doc['socket'])}"
    return doc


def test_killed_command_then_resume(tmp_path, backup, live):
    repo, bid, _ = backup
    dest = tmp_path / "dest.qcow2"
    doc = _start_dest(repo, dest, live)
    vm = live(dest)
    vm.start()
    proc = _cli(repo, "restore", "--live", "--resume", dest, "--qmp", vm.qmp_sock, "--speed", SPEED, "--json")
    try:
        offset = vm.wait_offset(16 * MiB)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        support.kill_if_running(proc)
        proc.stdout.close()
        proc.stderr.close()
    # the server is its own process: the guest still reads ranges not yet copied
    assert _alive(doc["server_pid"])
    j = vm.job()
    assert j is not None and j["offset"] < SIZE - 64 * MiB, j
    vm.read_ok(248 * MiB, MiB)                      # a patterned MiB far ahead of the copy
    _writes_around(vm, vm.job()["offset"])
    rc, out, err = _finish(_cli(repo, "restore", "--live", "--resume", dest, "--qmp", vm.qmp_sock, "--speed", 0,
                                "--json"))                  # 0: lift the running job's limit
    assert rc == 0, err
    res = json.loads(out)
    assert res["followed_running_job"] and res["server_stopped"], res
    assert wait_until(lambda: not _alive(doc["server_pid"]), timeout=15)
    assert offset > 0
    _check_result(vm, dest, tmp_path)


def test_server_killed_mid_copy_then_resume(tmp_path, backup, live):
    """The server dies mid-copy: exit 24 with the exact command to start it again; run that
    command (as a user would), then --resume: it finds the new server and completes."""
    import re

    repo, bid, _ = backup
    dest = tmp_path / "dest.qcow2"
    doc = _start_dest(repo, dest, live)
    vm = live(dest)
    vm.start()
    proc = _cli(repo, "restore", "--live", "--resume", dest, "--qmp", vm.qmp_sock, "--speed", SPEED)
    try:
        offset = vm.wait_offset(16 * MiB)
        vm.write(offset // 2 & ~0xFFFF, 64 * 1024, 0x3C)      # copied ground: still writable
        os.kill(doc["server_pid"], signal.SIGKILL)
        rc, out, err = _finish(proc, timeout=90)
    finally:
        support.kill_if_running(proc)
    assert rc == 24, err
    assert "copy into" in err and "failed" in err and "Traceback" not in err, err
    assert vm.job() is None                     # on-error=report: the job ended, qemu kept running
    vm.read_ok(offset // 2 & ~0xFFFF, 64 * 1024)  # the guest's write is intact
    m = re.search(r"not running: start it again with `([^`]+)`", err)
    assert m and "--resume" in err, err
    subprocess.run(["bash", "-c", m.group(1)], check=True, timeout=30)
    assert wait_until(lambda: os.path.exists(doc["socket"]), timeout=30)
    rc, out, err = _finish(_cli(repo, "restore", "--live", "--resume", dest, "--qmp", vm.qmp_sock, "--json"))
    assert rc == 0, err
    assert "starting it again" not in err, err  # the server started by hand was found
    res = json.loads(out)
    live.pids.add(res["server_pid"])
    assert res["server_stopped"] and not res["followed_running_job"] and res["server_pid"] != doc["server_pid"]
    assert wait_until(lambda: not _alive(res["server_pid"]), timeout=15)
    assert not os.path.exists(os.path.dirname(doc["socket"]))
    _check_result(vm, dest, tmp_path)


def test_vm_gone_mid_copy(tmp_path, backup, live):
    repo, _, _ = backup
    dest = tmp_path / "dest.qcow2"
    doc = _start_dest(repo, dest, live)
    vm = live(dest)
    vm.start()
    proc = _cli(repo, "restore", "--live", "--resume", dest, "--qmp", vm.qmp_sock, "--speed", SPEED)
    try:
        vm.wait_offset(8 * MiB)
        support.kill_if_running(vm.proc)
        rc, out, err = _finish(proc, timeout=60)
    finally:
        support.kill_if_running(proc)
    assert rc == 24, err
    assert "the VM went away" in err and "Traceback" not in err, err
    assert _alive(doc["server_pid"])            # kept for the VM's next start
    assert Path(doc["state_file"]).exists()


def test_refusals(tmp_path, backup, live):
    repo, _, _ = backup
    dest = tmp_path / "dest.qcow2"
    dest.write_bytes(b"precious")
    p = support.nbdbackup("--repo", repo, "restore", "--live", "live", dest, check=False)
    assert p.returncode == 2 and "exists" in p.stderr and "--force" in p.stderr, p.stderr
    assert dest.read_bytes() == b"precious"
    assert not Path(f"{dest}.nbdbackup-live.json").exists()
    assert [n for n in os.listdir(tmp_path) if n.startswith(".nbdbackup-live-")] == []

    # --resume of a qcow2 whose backing is not ours (a state file that names another backing)
    doc = _start_dest(repo, tmp_path / "ours.qcow2", live)
    other = tmp_path / "other.qcow2"
    support.run([support.require_tool("qemu-img"), "create", "-q", "-f", "qcow2", "-F", "raw", "-u",
                 "-b", "/elsewhere/disk.raw", str(other), str(SIZE)])
    st = json.loads(Path(doc["state_file"]).read_text())
    st["dest"] = str(other)
    Path(f"{other}.nbdbackup-live.json").write_text(json.dumps(st))
    p = support.nbdbackup("--repo", repo, "restore", "--live", "--resume", other, check=False)
    assert p.returncode == 2 and "backing file is not the export" in p.stderr, p.stderr
    # a qemu that does not have DEST open: refused, nothing started in it
    plain = tmp_path / "plain.qcow2"
    support.run([support.require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(plain), "1M"])
    vm = live(plain)
    vm.start()
    p = support.nbdbackup("--repo", repo, "restore", "--live", "--resume", tmp_path / "ours.qcow2", "--qmp",
                          vm.qmp_sock, check=False)
    assert p.returncode == 11 and "has no qcow2 node on" in p.stderr, p.stderr
    assert vm.job() is None and _alive(doc["server_pid"])
    # no state file at all
    p = support.nbdbackup("--repo", repo, "restore", "--live", "--resume", dest, check=False)
    assert p.returncode == 2 and "was not made by `restore --live`" in p.stderr, p.stderr


def test_user_server(tmp_path, backup, live):
    """--server URI: the user's serve; the command checks it serves the id, never stops it."""
    from helpers.serve import serve

    repo, bid, _ = backup
    dest = tmp_path / "dest.qcow2"
    with serve(Path(repo), tmp_path) as s:
        p = support.nbdbackup("--repo", repo, "restore", "--live", "live", dest, "--server",
                              f"nbd+unix:///?socket={s.sock}", "--json")
        doc = json.loads(p.stdout)
        assert doc["server_pid"] is None and doc["stop_command"] is None and doc["socket"] == s.sock
        vm = live(dest)
        vm.start()
        vm.write(3 * MiB, 64 * 1024, 0x42)
        tty = support.nbdbackup_on_a_tty("--repo", repo, "restore", "--live", "--resume", dest, "--qmp",
                                         vm.qmp_sock, "--speed", 64 * MiB)
        assert f"live restore {bid}:" in tty and "%|" in tty, tty        # a progress bar on a terminal
        assert "it has no backing file now" in tty and "stopped" not in tty, tty
        assert s.alive()
        _check_result(vm, dest, tmp_path)


def test_encrypted_repository_and_force(tmp_path, live):
    """The server we start opens an encrypted repository with the passphrase from our
    environment; it is in neither the state file nor the server's command line. --force
    replaces a live restore and stops its server."""
    from nbdbackup.repo.keys import KdfParams, KeySource

    secret = "live and let live " + os.urandom(4).hex()
    data = random.Random(3).randbytes(4 * MiB) + bytes(4 * MiB)
    r = new_repo(tmp_path / "repo", encryption=True, kdf=KdfParams.for_memory(8),
                 key_source=KeySource(passphrase=secret, interactive=False))
    try:
        write_backup(r, "sealed", data, zero_holes=True)
    finally:
        r.close()
    dest = tmp_path / "dest.qcow2"
    other = "not for the server " + os.urandom(4).hex()
    env = {"NBDBACKUP_PASSPHRASE": secret, "NBDBACKUP_DEST_PASSPHRASE": other, "NBDBACKUP_NEW_PASSPHRASE": other}
    first = json.loads(support.nbdbackup("--repo", tmp_path / "repo", "restore", "--live", "sealed", dest,
                                         "--json", env=env).stdout)
    live.pids.add(first["server_pid"])
    assert secret not in Path(first["state_file"]).read_text()
    # a process living for hours keeps only the secret it needs
    assert other.encode() not in Path(f"/proc/{first['server_pid']}/environ").read_bytes()
    assert secret.encode() not in Path(f"/proc/{first['server_pid']}/cmdline").read_bytes()
    raw = tmp_path / "data.raw"
    raw.write_bytes(data)
    c = support.run([support.require_tool("qemu-img"), "compare", "-U", "-f", "qcow2", "-F", "raw", str(dest),
                     str(raw)], check=False)           # DEST read through its backing: the server decrypts
    assert c.returncode == 0, c.stdout + c.stderr
    second = json.loads(support.nbdbackup("--repo", tmp_path / "repo", "restore", "--live", "sealed", dest,
                                          "--force", "--json", env=env).stdout)
    live.pids.add(second["server_pid"])
    assert second["server_pid"] != first["server_pid"] and _alive(second["server_pid"])
    assert wait_until(lambda: not _alive(first["server_pid"]), timeout=15)
    assert not os.path.exists(os.path.dirname(first["socket"]))


@pytest.mark.parametrize("place", ["s3+pg"], indirect=True)     # its index is on PostgreSQL too; local: all others
def test_server_opens_every_place(place, tmp_path, live):
    """The serve the command starts opens the repository wherever it lives (PostgreSQL index,
    S3 objects: through the environment it inherits); DEST reads the backup through it."""
    support.nbdbackup("--repo", place, "init", "--chunk-size", "64K")
    raw = tmp_path / "disk.raw"
    raw.write_bytes(random.Random(5).randbytes(2 * MiB) + bytes(2 * MiB))
    support.nbdbackup("--repo", place, "full", "--image", raw, "--format", "raw", "--disk", "placed")
    dest = tmp_path / "dest.qcow2"
    doc = json.loads(support.nbdbackup("--repo", place, "restore", "--live", "placed", dest, "--json").stdout)
    live.pids.add(doc["server_pid"])
    c = support.run([support.require_tool("qemu-img"), "compare", "-U", "-f", "qcow2", "-F", "raw", str(dest),
                     str(raw)], check=False)
    assert c.returncode == 0, c.stdout + c.stderr


# --- the security review's findings (state file trust, cwd, export scope, read-only, pids) ---

def _valid_state(dest: Path):
    """A state file as a fresh run writes it, its run dir made by make_run_dir."""
    from nbdbackup.engine.live_state import LiveState, backing_string, make_run_dir

    run_dir = make_run_dir(None)
    sock = os.path.join(run_dir, "serve.sock")
    st = LiveState(str(dest), "b" * 16, "live", SIZE, sock, backing_string(sock, None, None, "b" * 16),
                   server_pid=None, server_log=os.path.join(run_dir, "serve.log"), run_dir=run_dir)
    st.save()
    return st


def test_state_file_is_trusted_only_when_ours(tmp_path):
    from nbdbackup.engine.live_state import LiveState
    from nbdbackup.errors import UsageError

    dest = tmp_path / "d.qcow2"
    st = _valid_state(dest)
    path = Path(st.path)
    try:
        assert LiveState.load(str(dest)).run_dir == st.run_dir          # ours: accepted
        good = path.read_text()

        def refused(text: str | None = None, *, mode: int = 0o600, uid: int | None = None, match: str = ""):
            if path.is_symlink() or path.exists():
                path.unlink()
            path.write_text(good if text is None else text)
            os.chmod(path, mode)
            if uid is not None:
                os.chown(path, uid, -1)
            with pytest.raises(UsageError, match=match):
                LiveState.load(str(dest))

        doc = json.loads(good)
        refused(mode=0o620, match="writable by group or others")
        refused(mode=0o602, match="writable by group or others")
        if os.geteuid() == 0:
            refused(uid=65534, match="belongs to uid 65534")
        refused(json.dumps(dict(doc, run_dir="/etc")), match="run_dir")
        refused(json.dumps(dict(doc, run_dir=os.path.dirname(st.run_dir) + "/live-../../etc")), match="run_dir")
        refused(json.dumps(dict(doc, socket="/tmp/x.sock")), match="socket or server_log")
        refused(json.dumps(dict(doc, server_log="/etc/passwd")), match="socket or server_log")
        refused(json.dumps(dict(doc, socket=5)), match="socket is int")          # LOW-5: no internal error
        refused(json.dumps(dict(doc, size="x")), match="size is str")
        refused(json.dumps(dict(doc, server_argv="sh")), match="server_argv")
        refused(json.dumps(dict(doc, server_uri="nbd://h", server_pid=1234)), match="names a server of ours")
        path.unlink()
        target = tmp_path / "elsewhere.json"
        target.write_text(good)
        path.symlink_to(target)
        with pytest.raises(UsageError, match="symlink"):
            LiveState.load(str(dest))
        path.unlink()
        path.write_text(good)
        os.chmod(path, 0o600)
        # stop_server's clean-up unlinks only the two names it made, never anything else there
        from nbdbackup.engine.live_state import remove_run_dir

        keep = Path(st.run_dir) / "precious"
        keep.write_text("x")
        Path(st.socket).write_text("")
        remove_run_dir(st.run_dir)
        assert os.listdir(st.run_dir) == ["precious"]
    finally:
        shutil.rmtree(st.run_dir, ignore_errors=True)


def test_planted_state_file_unlinks_nothing(tmp_path, backup):
    """The PoC: DEST without backing and a state file naming a victim directory as run_dir;
    --resume (the command the tool prints) must refuse it, not empty the directory."""
    repo, bid, _ = backup
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "file").write_text("keep")
    dest = tmp_path / "d.qcow2"
    support.run([support.require_tool("qemu-img"), "create", "-q", "-f", "qcow2", str(dest), "1M"])
    planted = {"dest": str(dest), "backup": bid, "disk": "live", "size": SIZE, "socket": str(victim / "s"),
               "backing": "x", "server_pid": 1234, "server_argv": ["/bin/sh", "-c", f"touch {tmp_path}/ran"],
               "server_log": str(victim / "l"), "server_uri": None, "run_dir": str(victim), "created": "",
               "format": 1}
    Path(f"{dest}.nbdbackup-live.json").write_text(json.dumps(planted))
    os.chmod(f"{dest}.nbdbackup-live.json", 0o600)
    for extra in ([], ["--qmp", tmp_path / "none.sock"]):
        p = support.nbdbackup("--repo", repo, "restore", "--live", "--resume", dest, *extra, check=False)
        assert p.returncode == 2 and "not a valid state file" in p.stderr and "internal" not in p.stderr, p.stderr
    assert (victim / "file").read_text() == "keep" and not (tmp_path / "ran").exists()


def test_children_ignore_a_planted_package_in_cwd(tmp_path):
    from nbdbackup.engine.live_server import server_argv
    from nbdbackup.jobs.children import base_argv

    planted = tmp_path / "nbdbackup"
    planted.mkdir()
    (planted / "__init__.py").write_text("")
    (planted / "__main__.py").write_text(f"open({str(tmp_path / 'ran')!r}, 'w').write('planted')\n")
    for argv in (base_argv(), "serve"):
        if argv == "serve":
            argv = server_argv(["--repo", str(tmp_path / "nope")], "/x.sock", None, "b" * 16)
            argv = argv[:argv.index("--repo")]
        p = subprocess.run([*argv, "--version"], cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert p.returncode == 0 and not (tmp_path / "ran").exists(), (argv, p.stdout, p.stderr)


def test_pid_identity_is_exact(tmp_path):
    from nbdbackup.engine.live_server import find_server_pid, pid_is_our_server, stop_pid

    sock = f"/run/nbdbackup/live-{os.getpid():08x}/serve.sock"      # unique to this run
    script = "import time; time.sleep(60)"
    exact = subprocess.Popen(["python3", "-c", script, "serve", "--listen", f"unix:{sock}", "--export", "x"])
    suffix = subprocess.Popen(["python3", "-c", script, "serve", "--listen", f"unix:/other{sock}"])
    try:
        wait_until(lambda: pid_is_our_server(exact.pid, sock), timeout=15)
        assert pid_is_our_server(exact.pid, sock)
        assert not pid_is_our_server(suffix.pid, sock) and not pid_is_our_server(exact.pid, "serve.sock")
        # the /proc scan sees every process of a busy machine: give it the same bounded wait
        wait_until(lambda: find_server_pid(sock) == exact.pid, timeout=15)
        assert find_server_pid(sock) == exact.pid
        stop_pid(suffix.pid, timeout=5, socket_path=sock)       # not the server: not signalled
        assert suffix.poll() is None
        stop_pid(exact.pid, timeout=5, socket_path=sock)      # reaps it: our child here
        assert not _alive(exact.pid) and suffix.poll() is None
    finally:
        for p in (exact, suffix):
            p.kill()
            p.wait()


def test_serve_export_allow_list(tmp_path):
    """serve --export ID: that backup only; other ids and the disk aliases are not there."""
    from helpers.serve import serve
    from nbdbackup.errors import NbdBackupError
    from nbdbackup.nbd.client import Client

    r = new_repo(tmp_path / "repo")
    try:
        one = write_backup(r, "one", b"\1" * MiB).id
        two = write_backup(r, "two", b"\2" * MiB).id
    finally:
        r.close()
    with serve(tmp_path / "repo", tmp_path, "--export", one) as s:
        assert Client.query_info(s.uri(one)).size == MiB
        for name in (two, "one", "two"):
            with pytest.raises(NbdBackupError):
                Client.query_info(s.uri(name))
        assert one in s.log() and two not in s.log()        # the banner lists only the allowed one
    p = support.nbdbackup("--repo", tmp_path / "repo", "serve", "--listen", f"unix:{tmp_path}/x.sock",
                          "--export", "one", check=False)
    assert p.returncode == 2 and "full id" in p.stderr, p.stderr


def test_resume_after_reboot_restarts_a_scoped_server(tmp_path, backup, live):
    """The started serve exports only the backup, runs with -P; after a reboot (the tmpfs run
    dir gone, the server dead) --resume makes the dir again and restarts the server."""
    repo, bid, _ = backup
    dest = tmp_path / "dest.qcow2"
    doc = _start_dest(repo, dest, live)
    with open(f"/proc/{doc['server_pid']}/cmdline", "rb") as f:
        argv = [a.decode() for a in f.read().rstrip(b"\0").split(b"\0")]
    assert argv[1:4] == ["-P", "-m", "nbdbackup"], argv
    assert argv[argv.index("--export") + 1] == bid, argv
    from nbdbackup.errors import NbdBackupError
    from nbdbackup.nbd.client import Client

    with pytest.raises(NbdBackupError):                 # the disk alias is not served
        Client.query_info(f"nbd+unix:///live?socket={doc['socket']}")
    os.kill(doc["server_pid"], signal.SIGKILL)
    assert wait_until(lambda: not _alive(doc["server_pid"]), timeout=15)
    shutil.rmtree(os.path.dirname(doc["socket"]))
    p = support.nbdbackup("--repo", repo, "restore", "--live", "--resume", dest, "--json", check=False)
    assert p.returncode == 0, p.stderr
    again = json.loads(p.stdout)
    live.pids.add(again["server_pid"])
    assert again["server_pid"] != doc["server_pid"] and _alive(again["server_pid"])
    assert again["socket"] == doc["socket"] and stat_mode(os.path.dirname(doc["socket"])) == 0o700
    assert Client.query_info(f"nbd+unix:///{bid}?socket={doc['socket']}").size == SIZE
    # DEST deleted, its server running: a fresh run does not orphan that server
    dest.unlink()
    p = support.nbdbackup("--repo", repo, "restore", "--live", "live", dest, check=False)
    assert p.returncode == 2 and "server still runs" in p.stderr, p.stderr
    assert _alive(again["server_pid"]) and _state(dest)["server_pid"] == again["server_pid"]


def stat_mode(path: str) -> int:
    return os.stat(path).st_mode & 0o7777


def test_writable_server_refused(tmp_path, backup):
    from helpers.serve import serve

    repo, _, _ = backup
    dest = tmp_path / "dest.qcow2"
    with serve(Path(repo), tmp_path, "--writable") as s:
        p = support.nbdbackup("--repo", repo, "restore", "--live", "live", dest, "--server",
                              f"nbd+unix:///?socket={s.sock}", check=False)
    assert p.returncode != 0 and "writable" in p.stderr and "internal" not in p.stderr, p.stderr
    assert not dest.exists() and not Path(f"{dest}.nbdbackup-live.json").exists()


def test_temp_name_swapped_for_a_symlink(tmp_path, monkeypatch):
    """Someone swaps the freshly made temp image for a symlink to a root file: that file is
    neither chmodded nor linked as DEST, and nothing is left behind."""
    from nbdbackup.engine import live_restore as lr
    from nbdbackup.engine.live_state import LiveState, backing_string
    from nbdbackup.errors import SourceUnreachable

    victim = tmp_path / "victim"
    victim.write_text("a root file")
    os.chmod(victim, 0o644)
    real_run = subprocess.run

    def run_then_swap(cmd, *a, **kw):
        if "create" not in cmd:
            return real_run(cmd, *a, **kw)
        # the image made (no server behind the backing here: -u), then swapped by "someone"
        real_run([*cmd[:-2], "-u", *cmd[-2:]], check=True)
        os.unlink(cmd[-2])
        os.symlink(victim, cmd[-2])
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(lr.subprocess, "run", run_then_swap)
    dest = tmp_path / "dest.qcow2"
    st = LiveState(str(dest), "b" * 16, "live", MiB, "/nowhere.sock",
                   backing_string("/nowhere.sock", None, None, "b" * 16))
    for force in (False, True):
        with pytest.raises(SourceUnreachable, match="replaced"):
            lr._create_dest(st, force)
        assert stat_mode(str(victim)) == 0o644 and victim.read_text() == "a root file"
        assert not os.path.lexists(dest) and sorted(os.listdir(tmp_path)) == ["victim"]


def test_qmp_event_taken_at_a_timeout_is_not_lost():
    """An event the listener takes just after get() timed out is returned by the next get()
    (it was dropped with the cancelled future: a finished copy then looked like exit 24)."""
    import asyncio
    import threading

    from nbdbackup.sources.qmp_conn import EventQueue

    class OneEventListener:          # qemu.qmp's EventListener: get() takes the next queued event
        def __init__(self):
            self.events = [{"event": "BLOCK_JOB_COMPLETED", "data": {"device": "j"}}]

        async def get(self):
            # the dequeue runs to its end even when the caller gives up at that moment
            return await asyncio.shield(self._take())

        async def _take(self):
            await asyncio.sleep(0.3)
            return self.events.pop() if self.events else await asyncio.sleep(3600)

    loop = asyncio.new_event_loop()
    t = threading.Thread(target=loop.run_forever, daemon=True)
    t.start()
    try:
        q = EventQueue(loop, OneEventListener())
        assert q.get(0.1) is None
        time.sleep(0.4)                  # the event is taken meanwhile
        assert q.get(2.0) == {"event": "BLOCK_JOB_COMPLETED", "data": {"device": "j"}}
    finally:
        loop.call_soon_threadsafe(loop.stop)
        t.join(5)
