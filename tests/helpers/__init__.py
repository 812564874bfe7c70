"""Helpers shared by the tests (pyproject's pytest `pythonpath` puts tests/ on sys.path).

support        real tools started for real (require_tool fails, never skips), the CLI, file systems that fail
repo           new_repo(), write_backup(), read_all(), pack_files(): repositories through the API
serve          a running `nbdbackup serve` and a raw NBD client that can misbehave
pki            openssl-made test certificates (conftest's session `pki` fixture)
engine_util    qcow2 images changed with qemu-io, raw snapshots, CLI backups
nbd_servers    nbdkit, qemu-storage-daemon and nbd-server for the client tests
fake_nbd_server  a scriptable NBD server
qmp_vm         a real qemu VM and qemu-storage-daemon for the QMP tests
crash_writer   a script writing backups until killed (test_maint_crash)
"""
