"""full/incremental/restore output: JSON fields, summary line, quiet, progress only on a TTY."""

import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import termios

import support
from engine_util import MiB, init_repo, make_image, nbb, qio


def test_json_fields_and_summary(tmp_path):
    img = make_image(tmp_path / "cli.qcow2", 8 * MiB)
    qio(img, "write -q -P 0x1 0 1M")
    repo = init_repo(tmp_path / "repo", "64K")
    p = nbb(repo, "--json", "full", "--image", str(img))
    info = json.loads(p.stdout)
    for k in ("id", "disk", "kind", "parent", "created", "size", "read_bytes", "stored_bytes", "duration_s"):
        assert k in info, k
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", info["created"])
    assert p.stderr == ""                         # no bars, no summary with --json
    p = nbb(repo, "incremental", "--image", str(img))
    assert p.stdout == ""
    assert re.search(r"incremental backup \S+ of cli .*read 0 B, stored .* new \(incl. map\); compression .*dedup", p.stderr)
    assert "\r" not in p.stderr                   # no progress bar without a TTY
    p = nbb(repo, "--quiet", "incremental", "--image", str(img))
    assert p.stdout == "" and p.stderr == ""
    p = nbb(repo, "restore", "cli", str(tmp_path / "out.raw"))
    assert re.search(r"restored \S+ \(cli, 8.0 MiB\) to .*out.raw", p.stderr)


def test_progress_bar_on_a_tty(tmp_path):
    img = make_image(tmp_path / "tty.qcow2", 64 * MiB)
    qio(img, "write -q -P 0x1 0 32M")
    repo = init_repo(tmp_path / "repo", "64K")
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))   # a real terminal's size
    try:
        env = dict(os.environ)
        env.pop("NBDBACKUP_REPO", None)
        p = subprocess.Popen([support.nbdbackup_exe(), "--repo", str(repo), "full", "--image", str(img)],
                             stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=slave, env=env)
        os.close(slave)
        slave = -1
        out = b""
        while True:
            try:
                data = os.read(master, 65536)
            except OSError:       # EIO: the child closed the pty
                break
            if not data:
                break
            out += data
        assert p.wait(60) == 0
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    text = out.decode(errors="replace")
    assert "full tty" in text and re.search(r"\d+%\|", text), text     # tqdm bar with its label
    assert "full backup" in text                                      # and the summary line
