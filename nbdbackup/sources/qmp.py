"""Live backups of a running qemu's disks, driven through QMP (fleecing).

prepare() cleans up whatever a killed run of this repository left, then, for
all disks at once, takes one point in time with one QMP `transaction` (new
checkpoint bitmap, old ones stopped, `blockdev-backup sync=none` into a
scratch overlay) and exports each overlay through qemu's NBD server with the
union of the old bitmaps. The exact sequence is written down in docs/qmp.md;
the bitmap rules are in qmp_bitmaps.
"""

from __future__ import annotations

import logging
import os
import tempfile
from typing import TYPE_CHECKING

from ..errors import UsageError
from ..fsutil import default_state_dir
from . import qmp_bitmaps, qmp_fleece
from .base import DiskPlan, Source, raise_if_no_fallback
from .image import new_checkpoint
from .qmp_conn import Qmp
from .qmp_nodes import named_nodes, resolve
from .qmp_qga import frozen, thaw_leftover
from .qmp_state import DIRTY_PREFIX, Names, StateFile

if TYPE_CHECKING:
    from ..repo.info import BackupInfo
    from ..repo.repository import Repository
    from .qmp_nodes import Node

log = logging.getLogger(__name__)

DEFAULT_GRANULARITY = 64 * 1024


class QmpSource(Source):
    def __init__(self, qmp_path: str, nodes: list[str], disks: list[str] | None = None, *,
                 scratch_dir: str | None = None, nbd_server: str | None = None,
                 granularity: int = DEFAULT_GRANULARITY, qga: str | None = None,
                 state_dir: str | None = None):
        if not nodes:
            raise UsageError("--qmp needs at least one --node NODE")
        disks = list(disks or nodes)
        if len(disks) != len(nodes):
            raise UsageError(f"{len(nodes)} --node but {len(disks)} --disk: give one --disk per --node, or none")
        if len(set(disks)) != len(disks):
            raise UsageError("disk names must be different")
        if granularity < 512 or granularity & (granularity - 1) or granularity > 2**31:
            raise UsageError(f"bitmap granularity {granularity} is not a power of two in 512..2 GiB")
        self.qmp_path = qmp_path
        self.wanted = list(nodes)
        self.disks = disks
        self.scratch_dir = scratch_dir
        self.server_uri = None
        if nbd_server:
            from ..nbd.uri import parse_uri

            self.server_uri = parse_uri(nbd_server)
        self.granularity = granularity
        self.qga = qga
        self.state_dir = state_dir or default_state_dir()
        self.qmp: Qmp | None = None
        self.state: StateFile | None = None
        self.names: Names | None = None
        self._disks: list[tuple] = []     # (node, choice, new bitmap) per disk, after the transaction
        self._transaction_sent = False
        self._outcome: str | None = None

    # -- prepare ----------------------------------------------------------------
    def prepare(self, repo: Repository, kind: str, no_fallback: bool) -> list[DiskPlan]:
        try:
            return self._prepare(repo, kind, no_fallback)
        except BaseException:
            self.close()    # merges bitmaps back if the point in time was taken
            raise

    def _prepare(self, repo: Repository, kind: str, no_fallback: bool) -> list[DiskPlan]:
        self.names = Names(repo.repo_id)
        self.qmp = Qmp(self.qmp_path)
        state = StateFile(self.state_dir, repo.repo_id, self.qmp_path)
        state.lock()        # only a locked state may be cleaned up
        self.state = state
        self._clean_leftovers()

        nodes = named_nodes(self.qmp)
        resolved = [resolve(self.qmp, w, nodes) for w in self.wanted]
        if len({n.name for n in resolved}) != len(resolved):
            raise UsageError("two --node options name the same block node")
        choices = []
        for disk, node in zip(self.disks, resolved):
            choice = qmp_bitmaps.choose(self.names, node, repo, disk, kind)
            if choice.reason:
                raise_if_no_fallback(disk, choice.reason, no_fallback)
                log.warning("%s: %s; taking a full backup instead", disk, choice.reason)
            if not node.can_persist:
                log.warning("node %s is %s, which cannot store dirty bitmaps: the next incremental "
                            "needs the VM to keep running until then", node.name, node.driver)
            choices.append(choice)

        base_uri = self._server()
        self._add_overlays(resolved)
        checkpoint = new_checkpoint()
        new_bitmap = self.names.checkpoint_bitmap(checkpoint)
        actions = []
        for i, (node, choice) in enumerate(zip(resolved, choices)):
            actions += qmp_bitmaps.transaction_actions(node, choice, new_bitmap, self.names.read_bitmap(i),
                                                       self.granularity, self.names.node(i), self.names.job(i))
        if self.qga:    # a run killed while the guest is frozen: the next run thaws it
            self.state.data["frozen"] = self.qga
            self.state.save()
        # From here on a failure may follow a transaction that took effect
        # (e.g. thaw failed, or the reply was lost): failed() checks qemu.
        self._disks = [(node, choice, new_bitmap) for node, choice in zip(resolved, choices)]
        self._transaction_sent = True
        freeze = None
        try:
            with frozen(self.qga) as freeze:
                self.qmp.cmd("transaction", {"actions": actions})
        finally:
            if freeze is not None and freeze.thawed and self.state.data.pop("frozen", None):
                self.state.save()

        plans = []
        for i, (disk, node, choice) in enumerate(zip(self.disks, resolved, choices)):
            incr = choice.kind == "incremental"
            read = self.names.read_bitmap(i) if incr else None
            export = qmp_fleece.add_export(self.qmp, self.names, i, read, node.name)
            plans.append(DiskPlan(
                disk=disk, uri=str(base_uri.with_export(export)), kind=choice.kind,
                bitmap_context=DIRTY_PREFIX + read if incr else None,
                bitmap=choice.parent_bitmap, parent_id=choice.parent.id if incr else None,
                checkpoint=checkpoint, fallback_reason=choice.reason,
                extra={"qmp": self.qmp_path, "node": node.name, "source": f"qmp:{self.qmp_path} node {node.name}"},
            ))
        return plans

    def _clean_leftovers(self) -> None:
        had = bool(self.state.data)
        if self.state.data.get("frozen"):
            thaw_leftover(self.state.data["frozen"])
            self.state.data.pop("frozen")
            self.state.save()
        qmp_fleece.teardown(self.qmp, self.names, self.state)
        qmp_fleece.stop_private_server(self.qmp, self.names, self.state)
        if had:
            log.warning("cleaned up what an interrupted run of this repository left in qemu")

    def _server(self):
        from ..nbd.uri import parse_uri

        if self.server_uri is not None:
            return self.server_uri
        sock = qmp_fleece.start_private_server(self.qmp, self.state)
        return parse_uri(f"nbd+unix:///?socket={sock}")

    def _add_overlays(self, nodes: list[Node]) -> None:
        d = self.scratch_dir
        if d is None:
            d = tempfile.mkdtemp(prefix="nbdbackup-scratch-")
            self.state.add("dirs", d)
        elif not os.path.isdir(d):
            raise UsageError(f"--scratch-dir {d} is not a directory")
        for i, node in enumerate(nodes):
            path = os.path.join(os.path.abspath(d), f"{self.names.node(i)}.qcow2")
            self.state.add("files", path)      # before creating it: a kill leaves no orphan
            qmp_fleece.create_overlay_file(path, node.size)
            qmp_fleece.add_overlay_node(self.qmp, self.names, i, path, node.name)

    # -- outcome --------------------------------------------------------------------
    def committed(self, plans: list[DiskPlan], infos: list[BackupInfo]) -> None:
        self._outcome = "committed"
        try:
            self._teardown()
        except Exception as e:   # committed already: close() and the next run retry the cleanup
            log.warning("cleanup after the backup failed: %s", e)
        for node, choice, _new in self._disks:
            try:
                qmp_bitmaps.after_success(self.qmp, node, choice)
            except Exception as e:   # committed; an old bitmap left only widens the next dirty set
                log.warning("could not remove an old bitmap on %s: %s", node.name, e)

    def failed(self, exc: BaseException | None) -> None:
        if self._outcome:
            return
        self._outcome = "failed"
        if self.qmp is None or self.state is None:
            return
        try:
            self._teardown()
        except Exception as e:
            log.warning("cleanup after the failed backup failed: %s", e)
        if not self._transaction_sent:
            return
        try:
            now = named_nodes(self.qmp)
        except Exception as e:   # the bitmaps stay as they are: the next run unions them all
            log.warning("could not merge the bitmaps back: %s", e)
            return
        for node, choice, new in self._disks:
            current = now.get(node.name)
            if current is None or not any(b.name == new for b in current.bitmaps):
                continue        # the transaction did not take effect: nothing changed
            try:
                qmp_bitmaps.after_failure(self.qmp, node, choice, new)
            except Exception as e:   # the bitmaps stay as they are: the next run unions them all
                log.warning("could not merge the bitmaps of %s back: %s", node.name, e)

    def close(self) -> None:
        try:
            if self.qmp is not None and self.state is not None:
                if self._transaction_sent and not self._outcome:
                    self.failed(None)
                try:
                    self._teardown()
                    qmp_fleece.stop_private_server(self.qmp, self.names, self.state)
                except Exception as e:  # don't mask the run's own outcome; the next run retries
                    log.warning("could not remove everything from qemu (the next run will): %s", e)
        finally:
            if self.state is not None:
                self.state.unlock()
                self.state = None
            if self.qmp is not None:
                self.qmp.close()
                self.qmp = None

    def _teardown(self) -> None:
        qmp_fleece.teardown(self.qmp, self.names, self.state)
