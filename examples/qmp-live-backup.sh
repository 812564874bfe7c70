#!/bin/sh
# Back up all disks of a RUNNING plain-qemu VM (not managed by libvirt) through QMP.
#
#   qmp-live-backup.sh QMP_SOCKET NODE[=DISKNAME] [NODE[=DISKNAME] ...]
#
# Start qemu with a QMP socket for the tool (and, optionally, the guest agent):
#   qemu-system-x86_64 ... -qmp unix:/run/vm1/qmp-backup.sock,server=on,wait=off \
#     -blockdev driver=file,node-name=f0,filename=/vm/vm1-os.qcow2 \
#     -blockdev driver=qcow2,node-name=os,file=f0 -device virtio-blk-pci,drive=os,id=vda \
#     -chardev socket,path=/run/vm1/qga.sock,server=on,wait=off,id=qga0 \
#     -device virtio-serial -device virtserialport,chardev=qga0,name=org.qemu.guest_agent.0
# Run this script as the user qemu runs as (qemu opens the scratch overlays and the
# NBD socket the tool creates). Every run is an incremental: the tool takes a full
# by itself when there is no usable bitmap (first run, VM restarted with a
# non-persistent bitmap, a bitmap qemu could not save, a pruned parent).
# All NODEs are one point in time and one set in `nbdbackup list`.
# Set QGA=/run/vm1/qga.sock to freeze the guest's file systems around the snapshot,
# and SCRATCH_DIR to a directory with room for what the guest rewrites meanwhile.
set -eu

QMP=$1; shift
REPO=${NBDBACKUP_REPO:?set NBDBACKUP_REPO to the repository path}

ARGS=
for spec in "$@"; do
    node=${spec%%=*}
    disk=${spec#*=}
    ARGS="$ARGS --node $node --disk $disk"
done
[ -n "${QGA:-}" ] && ARGS="$ARGS --qga $QGA"
[ -n "${SCRATCH_DIR:-}" ] && ARGS="$ARGS --scratch-dir $SCRATCH_DIR"

# If something else already started qemu's NBD server, the tool cannot find out
# where it listens: pass it with NBD_SERVER=nbd+unix:///?socket=PATH (or nbd://HOST:PORT).
[ -n "${NBD_SERVER:-}" ] && ARGS="$ARGS --nbd-server $NBD_SERVER"

# shellcheck disable=SC2086  # ARGS is a list of words on purpose
exec nbdbackup --repo "$REPO" incremental --qmp "$QMP" $ARGS
