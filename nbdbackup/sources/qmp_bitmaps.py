"""The bitmap protocol of live backups: one chain of checkpoints per repository.

A checkpoint bitmap named after checkpoint C holds the changes since the
backup that recorded C was taken (its point in time is the transaction that
created the bitmap). Each run's transaction adds a new one and stops the old
ones, so old + new together always cover every write. Hence:

* the dirty set read is the union of *every* checkpoint bitmap of the
  repository on the node (leftovers of crashed or failed runs included): a
  superset of the changes since any of them, never less;
* the parent is the newest committed backup whose checkpoint has a bitmap;
* success removes the old bitmaps; failure merges them all into the new
  one and keeps only the parent's (disabled) bitmap, which names the parent.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .qmp_nodes import Bitmap, Node
from .qmp_state import Names

if TYPE_CHECKING:
    from ..repo.repository import Repository
    from .qmp_conn import Qmp


@dataclass
class Choice:
    kind: str                                   # "full" or "incremental"
    old: list[Bitmap] = field(default_factory=list)    # our checkpoint bitmaps before this run
    parent: object | None = None                # BackupInfo the dirty set is relative to
    parent_bitmap: str | None = None
    reason: str | None = None                   # why an incremental became a full


def choose(names: Names, node: Node, repo: Repository, disk: str, kind: str) -> Choice:
    old = [b for b in node.bitmaps if names.checkpoint_of(b.name)]
    if kind == "full":
        return Choice("full", old)

    def full(reason: str) -> Choice:
        return Choice("full", old, reason=reason)

    if not old:
        return full(f"node {node.name} has no dirty bitmap of this repository (first backup, or "
                    "the VM was restarted and its bitmaps were not persistent)")
    bad = [b.name for b in old if b.inconsistent]
    if bad:
        return full(f"bitmap {', '.join(bad)} on node {node.name} is inconsistent (qemu stopped "
                    "without saving it): it may miss changes")
    if not any(b.recording for b in old):
        return full(f"no bitmap of this repository on node {node.name} is recording changes "
                    "(someone disabled it)")
    busy = [b.name for b in old if b.busy]
    if busy:
        return full(f"bitmap {', '.join(busy)} on node {node.name} is in use by another job")
    opened = []
    for b in old:
        parent = repo.find_by_checkpoint(disk, names.checkpoint_of(b.name))
        if parent is not None and parent.disk == disk:
            opened.append((parent.created, parent.id, b, parent))
    if opened:      # the newest committed backup: the shortest chain
        _, _, b, parent = max(opened, key=lambda t: t[:2])
        return Choice("incremental", old, parent=parent, parent_bitmap=b.name)
    return full(f"no committed backup of disk {disk!r} opened any of the bitmaps "
                f"{', '.join(b.name for b in old)} (forgotten, pruned, or never committed)")


def transaction_actions(node: Node, choice: Choice, new_bitmap: str, read_bitmap: str,
                        granularity: int, fleece_node: str, job: str) -> list[dict]:
    """This disk's part of the one transaction that fixes the point in time."""
    acts = [_act("block-dirty-bitmap-add", node=node.name, name=new_bitmap,
                 persistent=node.can_persist, granularity=granularity)]
    if choice.kind == "incremental":
        acts += [_act("block-dirty-bitmap-disable", node=node.name, name=b.name)
                 for b in choice.old if b.recording]
        acts.append(_act("block-dirty-bitmap-add", node=node.name, name=read_bitmap,
                         persistent=False, disabled=True, granularity=granularity))
        acts.append(_act("block-dirty-bitmap-merge", node=node.name, target=read_bitmap,
                         bitmaps=[b.name for b in choice.old]))
    acts.append(_act("blockdev-backup", device=node.name, target=fleece_node, sync="none", **{"job-id": job}))
    return acts


def _act(kind: str, **data) -> dict:
    return {"type": kind, "data": data}


def after_success(qmp: Qmp, node: Node, choice: Choice) -> None:
    """The new bitmap now opens the chain: drop every older one."""
    for b in choice.old:
        qmp.cmd("block-dirty-bitmap-remove", {"node": node.name, "name": b.name})


def after_failure(qmp: Qmp, node: Node, choice: Choice, new_bitmap: str) -> None:
    """Keep every change: the new bitmap absorbs the old ones (incremental), or
    goes away (full: the old bitmaps were never stopped)."""
    if choice.kind == "full":
        qmp.cmd("block-dirty-bitmap-remove", {"node": node.name, "name": new_bitmap})
        return
    qmp.cmd("block-dirty-bitmap-merge", {"node": node.name, "target": new_bitmap,
                                          "bitmaps": [b.name for b in choice.old]})
    for b in choice.old:
        if b.name != choice.parent_bitmap:
            qmp.cmd("block-dirty-bitmap-remove", {"node": node.name, "name": b.name})
