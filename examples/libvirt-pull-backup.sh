#!/bin/sh
# Back up one disk of a RUNNING libvirt VM with virsh backup-begin in pull mode.
#
#   libvirt-pull-backup.sh DOMAIN [TARGET]        (TARGET: the disk's target dev, default vda)
#
# libvirt starts an NBD server on a private unix socket that exports the disk as
# it was when the job began (export name = the disk target, e.g. "vda"). For an
# incremental job (<incremental>CHECKPOINT</incremental>) it also exports the
# bitmap of changes since CHECKPOINT as qemu:dirty-bitmap:backup-<target>
# (libvirt's default `exportbitmap` name). Each job also creates a new checkpoint,
# so the next job can be incremental to this one.
#
# The state file remembers the checkpoint of the last backup that nbdbackup
# COMMITTED, with that backup's id: the next run asks for changes since that
# checkpoint and names that backup as the parent (--since), so a failed run never
# leaves a gap. Needs: virsh, nbdbackup, NBDBACKUP_REPO set (or edit REPO).
set -eu

DOMAIN=$1
TARGET=${2:-vda}
REPO=${NBDBACKUP_REPO:?set NBDBACKUP_REPO to the repository path}
STATE_DIR=${STATE_DIR:-/var/lib/nbdbackup/libvirt}
STATE=$STATE_DIR/$DOMAIN-$TARGET.last           # "CHECKPOINT BACKUP_ID"
DISK_NAME=$DOMAIN-$TARGET
RUN_DIR=$(mktemp -d /run/nbdbackup-XXXXXX)      # private: the socket lives here
SOCKET=$RUN_DIR/nbd.sock
NEW_CKPT=nbdbackup-$(date -u +%Y%m%dT%H%M%S%3NZ)-$$     # unique even for two runs in one second
mkdir -p "$STATE_DIR"
STARTED=0; COMMITTED=0
cleanup() {
    # End the pull job whatever happened: libvirt then drops the export and scratch file.
    virsh domjobabort "$DOMAIN" >/dev/null 2>&1 || true
    # A job whose backup did not commit must not leave its checkpoint behind: deleting it
    # merges its bitmap into the previous checkpoint's, so the next run still sees every
    # change since the last COMMITTED backup (and bitmaps do not pile up).
    if [ "$STARTED" = 1 ] && [ "$COMMITTED" = 0 ]; then
        virsh checkpoint-delete "$DOMAIN" "$NEW_CKPT" >/dev/null 2>&1 || true
    fi
    rm -rf "$RUN_DIR"
}
trap cleanup EXIT INT TERM

# qemu runs as its own user (libvirt-qemu on Debian) and must create the socket and
# the scratch file in RUN_DIR: hand the private directory to that user (root keeps access).
QEMU_PID=$(cat "/run/libvirt/qemu/$DOMAIN.pid" 2>/dev/null || true)
QEMU_USER=$(stat -c %U "/proc/${QEMU_PID:-self}" 2>/dev/null || echo root)
chown "$QEMU_USER" "$RUN_DIR"

LAST_CKPT= ; LAST_ID=
if [ -s "$STATE" ]; then
    read -r LAST_CKPT LAST_ID <"$STATE"
    # The checkpoint may be gone (deleted by hand): then take a full.
    virsh checkpoint-info "$DOMAIN" "$LAST_CKPT" >/dev/null 2>&1 || { LAST_CKPT= ; LAST_ID= ; }
fi

INCREMENTAL=
[ -n "$LAST_CKPT" ] && INCREMENTAL="<incremental>$LAST_CKPT</incremental>"
cat >"$RUN_DIR/backup.xml" <<XML
<domainbackup mode='pull'>
  $INCREMENTAL
  <server transport='unix' socket='$SOCKET'/>
  <disks>
    <disk name='$TARGET' backup='yes' type='file'>
      <scratch file='$RUN_DIR/$TARGET.scratch'/>
    </disk>
  </disks>
</domainbackup>
XML
cat >"$RUN_DIR/checkpoint.xml" <<XML
<domaincheckpoint>
  <name>$NEW_CKPT</name>
  <disks>
    <disk name='$TARGET' checkpoint='bitmap'/>
  </disks>
</domaincheckpoint>
XML
# Disks other than TARGET are left out of this job and of its checkpoint; list them
# with backup='no' / checkpoint='no' if your libvirt includes all disks by default.

virsh backup-begin "$DOMAIN" --backupxml "$RUN_DIR/backup.xml" --checkpointxml "$RUN_DIR/checkpoint.xml"
STARTED=1

URI="nbd+unix:///$TARGET?socket=$SOCKET"
if [ -n "$LAST_CKPT" ]; then
    # Falls back to a full (with a warning) if the export lacks the bitmap or the
    # parent backup is gone; add --no-fallback to get exit code 13 instead.
    OUT=$(nbdbackup --json --repo "$REPO" incremental --source "$URI" --disk "$DISK_NAME" \
          --bitmap "backup-$TARGET" --since "$LAST_ID")
else
    OUT=$(nbdbackup --json --repo "$REPO" full --source "$URI" --disk "$DISK_NAME")
fi
NEW_ID=$(printf '%s' "$OUT" | python3 -c 'import json,sys; print(json.load(sys.stdin)["id"])')

# Only now, with the backup committed, does the new checkpoint become the base.
echo "$NEW_CKPT $NEW_ID" >"$STATE.tmp" && mv "$STATE.tmp" "$STATE"
COMMITTED=1
# Older checkpoints are no longer needed as bases (their bitmaps cost guest I/O).
if [ -n "$LAST_CKPT" ]; then
    virsh checkpoint-delete "$DOMAIN" "$LAST_CKPT" >/dev/null 2>&1 || true
fi
echo "backed up $DOMAIN/$TARGET as $NEW_ID (checkpoint $NEW_CKPT)"
