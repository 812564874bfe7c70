"""`nbdbackup info` and `nbdbackup map`, run as a user runs them, compared with nbdinfo."""

from __future__ import annotations

import json

import pytest

from helpers import support
from helpers.nbd_servers import make_qcow2_with_bitmap, merge, nbdinfo_map, nbdkit
from helpers.support import qemu_nbd
from nbdbackup.errors import ExitCode

pytestmark = pytest.mark.timeout(180)

BM = "qemu:dirty-bitmap:bm0"


@pytest.fixture(scope="module")
def image(tmp_path_factory):
    return make_qcow2_with_bitmap(tmp_path_factory.mktemp("cimg") / "d.qcow2")


def our_map(uri, *extra):
    out = json.loads(support.nbdbackup("map", "--json", *extra, uri).stdout)
    for e in out:
        assert set(e) == {"offset", "length", "flags", "description"}
        assert all(isinstance(e[k], int) for k in ("offset", "length", "flags"))
    return out


def test_map_agrees_with_nbdinfo(tmp_path, image):
    with qemu_nbd(image, tmp_path / "s", bitmaps=("bm0",), extra=("-A",)) as uri:
        for ctx in (None, BM, "qemu:allocation-depth"):
            extra = () if ctx is None else ("--context", ctx)
            got = our_map(uri, *extra)
            assert [(e["offset"], e["length"], e["flags"]) for e in got] == nbdinfo_map(uri, ctx)
            # merged: no two neighbours with equal flags
            assert all(a["flags"] != b["flags"] for a, b in zip(got, got[1:]))
        text = support.nbdbackup("map", uri).stdout.splitlines()
        assert len(text) == len(nbdinfo_map(uri))
        assert text[1].split()[-1] == "hole,zero"


def test_map_many_extents_agrees_with_nbdinfo(tmp_path):
    with nbdkit(tmp_path / "s", "sparse-random", "size=256M", "seed=9", "runlength=65536") as uri:
        got = our_map(uri)
        want = nbdinfo_map(uri)
        assert len(want) > 100
        assert [(e["offset"], e["length"], e["flags"]) for e in got] == want


def test_info_agrees_with_nbdinfo(tmp_path, image):
    exe = support.require_tool("nbdinfo")
    with qemu_nbd(image, tmp_path / "s", bitmaps=("bm0",)) as uri:
        ours = json.loads(support.nbdbackup("info", "--json", uri).stdout)
        theirs = json.loads(support.run([exe, "--json", uri]).stdout)["exports"][0]
        assert ours["size"] == theirs["export-size"]
        for k in ("read_only", "can_multi_conn", "can_flush", "can_fua", "can_trim", "can_zero",
                  "can_fast_zero", "can_cache", "can_df", "is_rotational"):
            nk = "is_read_only" if k == "read_only" else k
            assert ours[k] == theirs[nk], k
        assert ours["block_size"]["minimum"] == theirs["block_size_minimum"]
        assert ours["block_size"]["preferred"] == theirs["block_size_preferred"]
        assert ours["block_size"]["maximum"] == theirs["block_size_maximum"]
        assert sorted(ours["contexts"]) == sorted(theirs["contexts"])
        assert ours["structured_replies"] is True and "multi_conn" in ours["flags"]
        text = support.nbdbackup("info", uri).stdout
        assert "read-only: yes" in text and "multi-conn: yes" in text and BM in text
        exports = json.loads(support.nbdbackup("info", "--list", "--json", uri).stdout)
        assert [e["name"] for e in exports] == [""]


def test_info_without_multi_conn_and_simple_replies(tmp_path):
    with nbdkit(tmp_path / "s", "memory", "1M", options=("--no-sr",)) as uri:
        ours = json.loads(support.nbdbackup("info", "--json", uri).stdout)
        assert ours["structured_replies"] is False and ours["contexts"] == []
        r = support.nbdbackup("map", uri, check=False)
        assert r.returncode == ExitCode.NOT_FOUND
        assert "no structured replies" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize("args, code, text", [
    (("info", "http://x/"), ExitCode.USAGE, "malformed NBD URI"),
    (("map", "nbd+unix:///x"), ExitCode.USAGE, "missing \\?socket"),
    (("info", "--tls-ca", "/x.pem", "nbd+unix:///?socket=/nowhere"), ExitCode.USAGE, "need an nbds"),
    (("info", "--timeout", "0", "nbd+unix:///?socket=/nowhere"), ExitCode.USAGE,
     "--timeout: invalid number of seconds '0': must be positive"),
    (("info", "nbd+unix:///?socket=/nonexistent/sock"), ExitCode.SOURCE_UNREACHABLE, "cannot connect"),
    (("map", "nbds+unix:///?socket=/nowhere", "--tls-ca", "/nonexistent.pem"), ExitCode.USAGE,
     "cannot load TLS certificates"),
])
def test_errors_are_clear(args, code, text):
    import re

    r = support.nbdbackup(*args, check=False)
    assert r.returncode == code, r.stderr
    assert re.search(text, r.stderr) and "Traceback" not in r.stderr


def test_missing_context_and_unknown_export(tmp_path, image):
    with qemu_nbd(image, tmp_path / "s") as uri:
        r = support.nbdbackup("map", "--context", "qemu:dirty-bitmap:nope", uri, check=False)
        assert r.returncode == ExitCode.NOT_FOUND and "does not offer meta context" in r.stderr
        r = support.nbdbackup("info", uri.replace(":///", ":///nosuch"), check=False)
        assert r.returncode == ExitCode.NOT_FOUND and "no export named 'nosuch'" in r.stderr


def test_cli_over_tls(tmp_path, pki):
    certs = pki.server
    with nbdkit(tmp_path / "s", "memory", "2M", options=("--tls=require", f"--tls-certificates={certs}")) as uri:
        turi = uri.replace("nbd+unix", "nbds+unix")
        ours = json.loads(support.nbdbackup("info", "--json", "--tls-ca", certs / "ca-cert.pem", turi).stdout)
        assert ours["tls"] is True and ours["size"] == 2 << 20
        got = our_map(turi, "--tls-ca", certs / "ca-cert.pem", "--tls-cert", certs / "client-cert.pem",
                      "--tls-key", certs / "client-key.pem")
        assert [(e["offset"], e["length"], e["flags"]) for e in got] == [(0, 2 << 20, 3)]
        r = support.nbdbackup("info", uri, check=False)
        assert r.returncode == ExitCode.SOURCE_UNREACHABLE and "requires TLS" in r.stderr
        r = support.nbdbackup("info", f"{turi}&tls-certificates={tmp_path}", check=False)
        assert r.returncode == ExitCode.SOURCE_UNREACHABLE and "certificate" in r.stderr


def test_merge_helper():
    assert merge([(0, 1, 0), (1, 1, 0), (2, 1, 3)]) == [(0, 2, 0), (2, 1, 3)]


def test_info_and_map_over_tcp(tmp_path, image):
    import subprocess

    port = support.free_port()
    proc = subprocess.Popen([support.require_tool("qemu-nbd"), "-r", "-t", "-e", "4", "-b", "127.0.0.1",
                             "-p", str(port), "-f", "qcow2", "-B", "bm0", "-x", "vda", str(image)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        support.wait_for_port(port)
        uri = f"nbd://127.0.0.1:{port}/vda"
        ours = json.loads(support.nbdbackup("info", "--json", uri).stdout)
        assert ours["export"] == "vda" and BM in ours["contexts"]
        got = our_map(uri, "--context", BM)
        assert [(e["offset"], e["length"], e["flags"]) for e in got] == nbdinfo_map(uri, BM)
    finally:
        support.stop(proc)


def test_timeout_option_applies(tmp_path):
    """A server that accepts but never speaks: --timeout 1 gives up quickly with exit 4."""
    import time

    from helpers.fake_nbd_server import FakeServer

    with FakeServer(tmp_path / "s", lambda conn, srv: time.sleep(8)) as srv:
        t0 = time.monotonic()
        r = support.nbdbackup("info", "--timeout", "1", srv.uri, check=False)
        assert time.monotonic() - t0 < 6
    assert r.returncode == ExitCode.SOURCE_UNREACHABLE and "no greeting within 1s" in r.stderr
