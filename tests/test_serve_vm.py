"""A VM boots from a writable `nbdbackup serve` export and reads a sector 8 MiB in,
from a plaintext and from an encrypted repository."""

from __future__ import annotations

import os
import subprocess

import pytest

from helpers import support
from helpers.repo import new_repo, write_backup
from helpers.serve import serve, wait_until
from nbdbackup.repo.keys import KdfParams, KeySource

PASSPHRASE = "boot from me"

DEEP_LBA = 16384                      # 8 MiB / 512
MARKER = b"NBDBACKUP-DEEP-SECTOR-" + os.urandom(6).hex().encode() + b"-OK"


def boot_sector() -> bytes:
    """16-bit real-mode code: int 13h AH=42h reads LBA 16384 to 0:8000, prints
    it (up to a NUL) to COM1, then forces a triple fault so that qemu, run
    with -no-reboot, exits by itself."""
    DAP, ERR, IDT0 = 0x3F, 0x32, 0x2C          # offsets of the data below
    code = bytes([
        0xFA,                    # 00 cli
        0xFC,                    # 01 cld
        0x31, 0xC0,              # 02 xor ax, ax
        0x8E, 0xD8,              # 04 mov ds, ax
        0x8E, 0xD0,              # 06 mov ss, ax
        0xBC, 0x00, 0x7C,        # 08 mov sp, 0x7c00
        0xFB,                    # 0b sti
        0xBE, DAP, 0x7C,         # 0c mov si, 0x7c00+DAP   (dl = boot drive, from the BIOS)
        0xB4, 0x42,              # 0f mov ah, 0x42         (extended read)
        0xCD, 0x13,              # 11 int 0x13
        0xBE, 0x00, 0x80,        # 13 mov si, 0x8000       (the sector just read)
        0x73, 0x03,              # 16 jnc 0x1b
        0xBE, ERR, 0x7C,         # 18 mov si, 0x7c00+ERR
        0xAC,                    # 1b lodsb
        0x84, 0xC0,              # 1c test al, al
        0x74, 0x06,              # 1e jz 0x26
        0xBA, 0xF8, 0x03,        # 20 mov dx, 0x3f8        (COM1)
        0xEE,                    # 23 out dx, al
        0xEB, 0xF5,              # 24 jmp 0x1b
        0x0F, 0x01, 0x1E, IDT0, 0x7C,  # 26 lidt [0x7c00+IDT0] (limit 0)
        0xCC,                    # 2b int3 -> #GP -> double -> triple fault
    ])
    assert len(code) == IDT0
    data = bytes(6)                                   # 2c: empty IDT descriptor
    data += b"int13 failed\0"                         # 32
    assert len(code) + len(data) == DAP
    data += bytes([0x10, 0, 1, 0, 0x00, 0x80, 0, 0]) + DEEP_LBA.to_bytes(8, "little")   # 3f: DAP
    sector = bytearray(512)
    sector[:len(code) + len(data)] = code + data
    sector[510:512] = b"\x55\xAA"
    return bytes(sector)


@pytest.mark.parametrize("encrypted", [False, True], ids=["plaintext", "encrypted"])
def test_vm_boots_from_writable_export(tmp_path, encrypted):
    qemu = support.require_tool("qemu-system-x86_64")
    disk = bytearray(9 * 1024 * 1024)
    disk[:512] = boot_sector()
    disk[DEEP_LBA * 512:DEEP_LBA * 512 + len(MARKER) + 1] = MARKER + b"\0"
    keys = dict(encryption=True, key_source=KeySource(passphrase=PASSPHRASE, interactive=False),
                kdf=KdfParams.for_memory(8)) if encrypted else {}
    r = new_repo(tmp_path / "repo", **keys)
    try:
        write_backup(r, "bootdisk", bytes(disk), zero_holes=True)
    finally:
        r.close()
    serial = tmp_path / "serial.txt"
    env = {"NBDBACKUP_PASSPHRASE": PASSPHRASE} if encrypted else None
    with serve(tmp_path / "repo", tmp_path, "--writable", env=env) as s:
        vm = subprocess.Popen([qemu, "-machine", "accel=tcg", "-display", "none", "-m", "32", "-no-reboot",
                               "-serial", f"file:{serial}", "-monitor", "none", "-nodefaults",
                               "-drive", f"file={s.uri('bootdisk')},format=raw,if=ide"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        try:
            seen = wait_until(lambda: serial.exists() and MARKER in serial.read_bytes(), timeout=90)
            if not seen:
                vm.kill()
                out, err = vm.communicate(timeout=10)
                raise AssertionError(f"marker not on the serial port: {serial.read_bytes()[:200]!r} "
                                     f"qemu: {err.decode(errors='replace')[:1000]} server: {s.log()[-2000:]}")
            assert b"int13 failed" not in serial.read_bytes()
            try:
                vm.wait(30)          # the triple fault ends the VM (-no-reboot)
            except subprocess.TimeoutExpired:
                pass
        finally:
            if vm.poll() is None:
                vm.kill()
            vm.wait()
            vm.stdout.close()
            vm.stderr.close()
        assert s.alive()
