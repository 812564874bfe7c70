"""Two runs want the same --image: the loser names the other nbdbackup run, not "shut the VM down"."""

import glob
import json
import os
import signal
import subprocess
import tempfile
import time

from helpers import support
from helpers.engine_util import MiB, init_repo, make_image, nbb, qio, random_file


def _image(tmp_path):
    img = make_image(tmp_path / "vm.qcow2", 128 * MiB)
    qio(img, f"write -q -s {random_file(tmp_path / 'r.bin', 64 * MiB, seed=9)} 0 64M")
    return img


def _wait_for(pred, proc, what, timeout=30.0):
    deadline = time.monotonic() + timeout
    while not pred():
        assert proc.poll() is None, f"the first run ended before {what}: {proc.communicate()}"
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)


def _start(repo, img):
    return subprocess.Popen([support.nbdbackup_exe(), "--repo", str(repo), "--json", "full", "--image", str(img)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _finish(first):
    os.kill(first.pid, signal.SIGCONT)
    out, err = first.communicate(timeout=120)
    assert first.returncode == 0, err
    return json.loads(out)


def _serving(run):
    """Whether *run* has its qemu-nbd up (a private dir it owns, with the socket in it)."""
    for d in glob.glob(os.path.join(tempfile.gettempdir(), "nbdbackup-nbd-*")):
        try:
            with open(os.path.join(d, "owner")) as f:
                if int(f.read()) == run.pid and os.path.exists(os.path.join(d, "nbd.sock")):
                    return True
        except (OSError, ValueError):
            pass
    return False


def test_same_repository_the_loser_names_the_run_holding_the_image(tmp_path):
    img = _image(tmp_path)
    repo = init_repo(tmp_path / "repo", "64K")
    first = _start(repo, img)
    try:
        _wait_for(lambda: _serving(first), first, "its qemu-nbd")
        os.kill(first.pid, signal.SIGSTOP)          # holds the image as long as the test wants
        for kind in ("full", "incremental"):
            p = nbb(repo, kind, "--image", str(img), check=False)
            assert p.returncode == 3, (kind, p.stderr)
            assert f"another nbdbackup run is backing up image {img}: pid {first.pid}" in p.stderr, p.stderr
            assert f"full --image {img}" in p.stderr and "since" in p.stderr
            assert "shut the VM down" not in p.stderr and "Traceback" not in p.stderr
        info = _finish(first)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
        support.stop(first)
    inc = json.loads(nbb(repo, "--json", "incremental", "--image", str(img)).stdout)
    assert inc["kind"] == "incremental" and inc["parent"] == info["id"]


def test_other_repository_the_loser_names_the_run_serving_the_image(tmp_path):
    """Another repository has no shared lock file: qemu's image lock trips, and the loser finds the
    other run from the private dir of the qemu-nbd it started."""
    img = _image(tmp_path)
    repo1 = init_repo(tmp_path / "repo1", "64K")
    repo2 = init_repo(tmp_path / "repo2", "64K")
    first = _start(repo1, img)
    try:
        _wait_for(lambda: _serving(first), first, "its qemu-nbd")
        os.kill(first.pid, signal.SIGSTOP)
        p = nbb(repo2, "full", "--image", str(img), check=False)
        assert p.returncode == 3, p.stderr
        assert f"image {img} is in use by another nbdbackup run: pid {first.pid}" in p.stderr, p.stderr
        assert f"--repo {repo1}" in p.stderr and "shut the VM down" not in p.stderr
        assert "could not remove bitmap" not in p.stderr     # it never added one
        assert json.loads(nbb(repo2, "--json", "list").stdout) == []
        _finish(first)
    finally:
        if first.poll() is None:
            os.kill(first.pid, signal.SIGCONT)
        support.stop(first)
    assert json.loads(nbb(repo2, "--json", "full", "--image", str(img)).stdout)["kind"] == "full"
