"""--image probes the format with qemu-img: a headerless file is raw (with a warning), a damaged
qcow2 is refused (exit 4) before anything is read, written or committed."""

import json
import os

from helpers import support
from helpers.engine_util import MiB, bitmaps, init_repo, make_image, nbb, qio, random_file, restore_equals


def _listed(repo):
    return json.loads(nbb(repo, "--json", "list").stdout)


def test_random_bytes_are_backed_up_as_raw_with_a_warning(tmp_path):
    support.require_tool("qemu-img")
    img = random_file(tmp_path / "blob.img", 1 * MiB, seed=3)
    repo = init_repo(tmp_path / "repo", "64K")
    p = nbb(repo, "--json", "full", "--image", str(img))
    assert "has no image header qemu recognises: backing it up as raw" in p.stderr, p.stderr
    assert "--format raw" in p.stderr
    info = json.loads(p.stdout)
    assert info["read_bytes"] == 1 * MiB
    assert restore_equals(repo, info["id"], img, tmp_path)
    # said explicitly: no warning
    p = nbb(repo, "full", "--image", str(img), "--format", "raw")
    assert "no image header" not in p.stderr, p.stderr


def test_truncated_qcow2_is_refused(tmp_path):
    img = make_image(tmp_path / "vm.qcow2", 64 * MiB)
    qio(img, "write -q -P 0x11 0 8M")
    repo = init_repo(tmp_path / "repo", "64K")
    os.truncate(img, 200 * 1024)
    for kind in ("full", "incremental"):
        p = nbb(repo, kind, "--image", str(img), check=False)
        assert p.returncode == 4, (kind, p.returncode, p.stderr)
        assert f"image {img} is a damaged qcow2: qemu-img check found" in p.stderr, p.stderr
        assert "exceeding the end of the file" in p.stderr and "qemu-img check -r all" in p.stderr
        assert "Traceback" not in p.stderr
    assert _listed(repo) == []
    assert bitmaps(img) == []       # refused before a bitmap was added


def test_wrong_explicit_format_is_refused(tmp_path):
    support.require_tool("qemu-img")
    img = random_file(tmp_path / "blob.img", 1 * MiB, seed=4)
    repo = init_repo(tmp_path / "repo", "64K")
    p = nbb(repo, "full", "--image", str(img), "--format", "qcow2", check=False)
    assert p.returncode == 4 and "qemu-img info failed" in p.stderr, p.stderr
    assert "really a qcow2 image" in p.stderr and "Traceback" not in p.stderr
    assert _listed(repo) == []


def test_format_is_only_for_image(tmp_path):
    repo = init_repo(tmp_path / "repo", "64K")
    p = nbb(repo, "full", "--source", "nbd+unix:///?socket=/nonexistent", "--disk", "d", "--format", "raw",
            check=False)
    assert p.returncode == 2 and "--format is for --image" in p.stderr, p.stderr
