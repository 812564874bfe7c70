"""Turning a user's NODE (node name, drive id or device id) into a block node."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import NotFound

if TYPE_CHECKING:
    from .qmp_conn import Qmp


@dataclass
class Bitmap:
    name: str
    recording: bool
    persistent: bool
    inconsistent: bool
    busy: bool
    granularity: int
    count: int


@dataclass
class Node:
    name: str           # block node name
    driver: str
    size: int
    filename: str
    bitmaps: list[Bitmap] = field(default_factory=list)

    @property
    def can_persist(self) -> bool:
        """Only qcow2 stores dirty bitmaps in the image."""
        return self.driver == "qcow2"


def _bitmaps(raw: list) -> list[Bitmap]:
    out = []
    for b in raw or []:
        if "name" not in b:     # anonymous bitmaps belong to running jobs
            continue
        out.append(Bitmap(b["name"], bool(b.get("recording")), bool(b.get("persistent")),
                          bool(b.get("inconsistent")), bool(b.get("busy")),
                          int(b.get("granularity", 0)), int(b.get("count", 0))))
    return out


def named_nodes(qmp: Qmp) -> dict[str, Node]:
    nodes = {}
    for n in qmp.cmd("query-named-block-nodes", {"flat": True}):
        img = n.get("image") or {}
        nodes[n["node-name"]] = Node(n["node-name"], n.get("drv", ""), int(img.get("virtual-size", 0)),
                                     img.get("filename", ""), _bitmaps(n.get("dirty-bitmaps")))
    return nodes


def _device_ids(entry: dict) -> set[str]:
    """The names a query-block entry answers to: drive id, qdev id, qdev path."""
    ids = {entry.get("device") or ""}
    qdev = entry.get("qdev") or ""
    ids.add(qdev)
    parts = [p for p in qdev.split("/") if p]
    # /machine/peripheral/ID/virtio-backend (virtio-blk) or /machine/peripheral/ID
    if len(parts) >= 3 and parts[:2] == ["machine", "peripheral"]:
        ids.add(parts[2])
    ids.discard("")
    return ids


def resolve(qmp: Qmp, wanted: str, nodes: dict[str, Node] | None = None) -> Node:
    """The block node behind *wanted*: a node name first, else a drive or device id."""
    nodes = nodes if nodes is not None else named_nodes(qmp)
    if wanted in nodes:
        return nodes[wanted]
    for entry in qmp.cmd("query-block"):
        inserted = entry.get("inserted")
        if inserted and wanted in _device_ids(entry):
            name = inserted.get("node-name")
            if name in nodes:
                return nodes[name]
    known = sorted(nodes) + sorted(i for e in qmp.cmd("query-block") for i in _device_ids(e))
    raise NotFound(f"qemu has no block node, drive or device named {wanted!r}",
                   hint="known: " + (", ".join(k for k in known if not k.startswith("#")) or "none"))
