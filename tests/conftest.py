"""Fixtures every test can use, the environment every test runs in, and markers.

Helpers live in tests/helpers/ (pyproject's pythonpath puts tests/ on sys.path).
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

from helpers.pki import Pki, make_test_pki
from helpers.places import REPO_MODES, RepoPlace, make_place
from helpers.repo import REPO_BACKENDS, backend_options, new_repo

pytest_plugins = ["helpers.ceph", "helpers.pg", "helpers.libvirt"]

# --- the environment ------------------------------------------------------------------

@pytest.fixture(scope="session", autouse=True)
def _clean_session_environment(tmp_path_factory):
    """No NBDBACKUP_* variable of the caller's shell reaches a test or the CLI runs it starts
    (an NBDBACKUP_REPO would pick a repository), and qmp state never lands in the caller's
    ~/.local/state. Session-wide, so module-scoped fixtures see it too."""
    saved = dict(os.environ)
    for name in [n for n in os.environ if n.startswith("NBDBACKUP_")]:
        del os.environ[name]
    os.environ["XDG_STATE_HOME"] = str(tmp_path_factory.mktemp("xdg-state"))
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def isolated_environment(_clean_session_environment):
    """Whatever a test sets in os.environ is undone after it."""
    saved = dict(os.environ)
    yield
    if dict(os.environ) != saved:
        os.environ.clear()
        os.environ.update(saved)


_HOST_DIRS = ("/", "/tmp", "/var/tmp", "/run", "/etc")


def _owner_and_mode(path: str) -> tuple[int, int, int]:
    st = os.lstat(path)
    return st.st_mode, st.st_uid, st.st_gid


@pytest.fixture(autouse=True, scope="module")
def host_directories_untouched():
    """The suite runs as root: a test (or the code under test, e.g. an extraction following a
    planted link) that changes the owner or mode of /, /tmp, /var/tmp, /run or /etc would break
    every later test in odd ways (PostgreSQL's fixture failed once when /tmp lost its x bits).
    Each module is checked; a change is put back and named, so the run stays sane and red."""
    before = {d: _owner_and_mode(d) for d in _HOST_DIRS}
    yield
    changed = {d: (b, _owner_and_mode(d)) for d, b in before.items() if _owner_and_mode(d) != b}
    for d, ((mode, uid, gid), _now) in changed.items():
        os.chown(d, uid, gid, follow_symlinks=False)
        os.chmod(d, mode & 0o7777)
    assert not changed, "this module changed host directories (put back): " + ", ".join(
        f"{d}: {oct(b[0])} {b[1]}:{b[2]} -> {oct(a[0])} {a[1]}:{a[2]}" for d, (b, a) in changed.items())


# --- shared fixtures ------------------------------------------------------------------

@pytest.fixture(params=REPO_BACKENDS)
def repo(request, tmp_path):
    """A new repository at tmp_path/"repo" (helpers.repo.new_repo), once per storage backend."""
    with new_repo(tmp_path / "repo", **backend_options(request.param, tmp_path)) as r:
        yield r


@pytest.fixture(params=REPO_MODES)
def place(request, tmp_path) -> RepoPlace:
    """Where this test's repository lives, once per mode (helpers.places): local, local+pg, s3+pg."""
    return make_place(request, request.param, tmp_path)


@pytest.fixture(scope="session")
def pki(tmp_path_factory) -> Pki:
    """Test certificates (helpers.pki.Pki), made once per session."""
    return make_test_pki(tmp_path_factory.mktemp("pki"))


# --- markers --------------------------------------------------------------------------
# A module is marked with the tools its source names (directly or through the helpers
# that start them), so that `pytest -m 'not slow and not libvirt'` is a fast local loop.
# Markers only select: a test that runs and misses a tool still fails.

TOOL_MARKERS = {
    "qemu": re.compile(r"qemu-(img|io|nbd|storage-daemon|system)|\b(qemu_nbd|qsd_export|make_image|qio|Vm|Qsd|"
                       r"snapshot_raw|convert_raw|make_qcow2_with_bitmap)\b"),
    "nbdkit": re.compile(r"\bnbdkit\b"),
    "libvirt": re.compile(r"\b(virsh|libvirtd|virtlogd)\b"),
}

# Modules whose slow tests add up to 25 s or more (pytest --durations, full suite on two
# shared cores): SIGKILL and fallback loops, tamper and rebuild rounds, fuzzing, libvirt.
SLOW_MODULES = {      # one per line, sorted: branches add to it without conflicts
    "test_copy",
    "test_encryption_cli",
    "test_engine_chain_check",
    "test_engine_fallbacks",
    "test_engine_image_race",
    "test_engine_libvirt",
    "test_engine_points_in_time",
    "test_files",
    "test_libvirt_offline",
    "test_libvirt_source",
    "test_live_restore",
    "test_live_restore_libvirt",
    "test_maint_crash",
    "test_maint_rebuild",
    "test_qmp_cli",
    "test_quiesce_real_guest",
    "test_repo_tamper",
    "test_restore_libvirt",
    "test_run_job",
    "test_run_libvirt",
    "test_salvage_heal",
    "test_serve_fuzz",
    "test_vmdef",
}

_module_markers: dict[Path, list[str]] = {}


def _markers_of(path: Path) -> list[str]:
    if path not in _module_markers:
        text = path.read_text()
        names = [m for m, pattern in TOOL_MARKERS.items() if pattern.search(text)]
        _module_markers[path] = names + (["slow"] if path.stem in SLOW_MODULES else [])
    return _module_markers[path]


def pytest_collection_modifyitems(config, items):
    for item in items:
        for name in _markers_of(item.path):
            item.add_marker(name)
