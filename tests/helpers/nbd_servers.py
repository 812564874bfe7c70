"""Real NBD servers for the client tests (nbdkit, qemu-storage-daemon, nbd-server, images)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from pathlib import Path

from helpers import support


def make_qcow2_with_bitmap(path: Path, size: str = "64M") -> Path:
    """A qcow2 with data, a persistent bitmap bm0, and tracked writes/zeroes/discards after it."""
    support.require_tool("qemu-img")
    support.require_tool("qemu-io")
    support.run(["qemu-img", "create", "-q", "-f", "qcow2", str(path), size])
    support.run(["qemu-io", "-c", "write -P 0xaa 0 4M", "-c", "write -P 0x11 10M 3M", str(path)])
    support.run(["qemu-img", "bitmap", "--add", str(path), "bm0"])
    support.run(["qemu-io", "-c", "write -P 0xcc 20M 64k", "-c", "write -z 0 4k", "-c", "discard 1M 1M",
                 "-c", "write -P 0x33 11M 8k", "-c", "write -P 0x44 40M 1M", str(path)])
    return path


def convert_raw(image: Path, out: Path, fmt: str = "qcow2") -> bytes:
    support.run(["qemu-img", "convert", "-f", fmt, "-O", "raw", str(image), str(out)])
    return out.read_bytes()


def nbdinfo_map(uri: str, context: str | None = None) -> list[tuple[int, int, int]]:
    """nbdinfo --map --json, with adjacent equal extents merged (as our map does)."""
    exe = support.require_tool("nbdinfo")
    arg = "--map" if context is None else f"--map={context}"
    out = json.loads(support.run([exe, "--json", arg, uri]).stdout)
    return merge([(e["offset"], e["length"], e["type"]) for e in out])


def qcow2_with_bitmap_and_raw(d: Path) -> tuple[Path, bytes]:
    """make_qcow2_with_bitmap() in *d*, and its content as raw bytes."""
    img = make_qcow2_with_bitmap(d / "d.qcow2")
    return img, convert_raw(img, d / "d.raw")


def merge(extents) -> list[tuple[int, int, int]]:
    res: list[list[int]] = []
    for off, n, t in extents:
        if res and res[-1][2] == t and res[-1][0] + res[-1][1] == off:
            res[-1][1] += n
        else:
            res.append([off, n, t])
    return [tuple(x) for x in res]


@contextlib.contextmanager
def nbdkit(sock: Path, plugin: str, *args: str, filters: tuple[str, ...] = (), options: tuple[str, ...] = ()):
    """nbdkit in the foreground on a unix socket; yields the URI."""
    exe = support.require_tool("nbdkit")
    pidfile = Path(f"{sock}.pid")    # nbdkit writes it once it accepts connections
    pidfile.unlink(missing_ok=True)
    cmd = [exe, "-f", "-U", str(sock), "-P", str(pidfile), *options, *[f"--filter={f}" for f in filters],
           plugin, *args]
    with support.running(cmd, lambda proc: support.wait_for_path(pidfile, proc=proc)):
        yield f"nbd+unix:///?socket={sock}"


@contextlib.contextmanager
def qsd_export(image: Path, sock: Path, *, name: str = "disk", bitmap: str | None = None, writable: bool = False):
    """qemu-storage-daemon exporting a qcow2 node over NBD, optionally with a bitmap."""
    exe = support.require_tool("qemu-storage-daemon")
    export = f"type=nbd,id=e0,node-name=d0,name={name},writable={'on' if writable else 'off'}"
    if bitmap:
        export += f",bitmaps.0={bitmap}"
    cmd = [exe, "--blockdev", f"driver=file,node-name=f0,filename={image}",
           "--blockdev", "driver=qcow2,node-name=d0,file=f0",
           "--nbd-server", f"addr.type=unix,addr.path={sock}", "--export", export]
    with support.running(cmd, lambda proc: support.wait_listening(sock, proc=proc)):
        yield f"nbd+unix:///{name}?socket={sock}"


@contextlib.contextmanager
def nbd_server(image: Path, tmp: Path, *, name: str = "disk", readonly: bool = False):
    """The reference nbd-server (in the foreground it serves a single client, then exits)."""
    exe = support.require_tool("nbd-server")
    sock = tmp / "ns.sock"
    sock.unlink(missing_ok=True)    # a previous run's socket would look like readiness
    conf = tmp / "nbd-server.conf"
    conf.write_text(
        "[generic]\n"
        "  allowlist = true\n"
        f"  unixsock = {sock}\n"
        f"  port = {support.free_port()}\n"
        "  listenaddr = 127.0.0.1\n"
        f"[{name}]\n"
        f"  exportname = {image}\n"
        f"  readonly = {'true' if readonly else 'false'}\n"
        "  flush = true\n  fua = true\n  trim = true\n")
    with support.running([exe, "-C", str(conf), "-d"], lambda proc: support.wait_listening(sock, proc=proc)):
        yield f"nbd+unix:///{name}?socket={sock}"


def slow_source(tmp_path: Path, name: str, plugin: str, size: str, rdelay: str) -> tuple[subprocess.Popen, str]:
    """An nbdkit export (*plugin*, e.g. pattern or random) that reads one request of at most 1 MiB at
    a time, *rdelay* each (the delay filter): a backup of it takes seconds. (process, URI)."""
    sock = str(tmp_path / f"{name}.sock")
    proc = subprocess.Popen(["nbdkit", "-f", "-U", sock, "--filter=noparallel", "--filter=blocksize",
                             "--filter=delay", plugin, f"size={size}", "maxdata=1M", f"rdelay={rdelay}"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 20
    while not os.path.exists(sock):
        assert proc.poll() is None and time.monotonic() < deadline, "nbdkit did not start"
        time.sleep(0.05)
    return proc, f"nbd+unix:///?socket={sock}"
