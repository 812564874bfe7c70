"""full/incremental/restore output: JSON fields, summary line, quiet, progress only on a TTY."""

import json
import re

from helpers import support
from helpers.engine_util import MiB, init_repo, make_image, nbb, qio


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
    assert re.search(r"incremental backup \S+ of cli .*read 0 B, stored .* new \(incl. map\); compression .*dedup",
                     p.stderr)
    assert "\r" not in p.stderr                   # no progress bar without a TTY
    p = nbb(repo, "--quiet", "incremental", "--image", str(img))
    assert p.stdout == "" and p.stderr == ""
    p = nbb(repo, "restore", "cli", str(tmp_path / "out.raw"))
    assert re.search(r"restored \S+ \(cli, 8.0 MiB\) to .*out.raw", p.stderr)


def test_progress_bar_on_a_tty(tmp_path):
    img = make_image(tmp_path / "tty.qcow2", 64 * MiB)
    qio(img, "write -q -P 0x1 0 32M")
    repo = init_repo(tmp_path / "repo", "64K")
    text = support.nbdbackup_on_a_tty("--repo", repo, "full", "--image", img, timeout=60)
    assert "full tty" in text and re.search(r"\d+%\|", text), text     # tqdm bar with its label
    assert "full backup" in text                                      # and the summary line
