"""`nbdbackup --repo R info BACKUP` (info.py hands a non-URI here; "_": not a command): one backup."""

from __future__ import annotations


def backup_json(repo, info) -> dict:
    """The backup's fields, its set's members and its VM definition (read and checked)."""
    vm = repo.vm_definition(info)       # RepoDamaged (exit 9) when damaged or not authentic
    j = info.to_json()
    j["set_members"] = [{"id": m.id, "disk": m.disk} for m in repo.set_members(info)]
    j["vm_definition"] = None if vm is None else {
        "domain": vm.domain, "xml_bytes": len(vm.xml.encode()),
        "nvram_bytes": None if vm.nvram is None else len(vm.nvram), "nvram_path": vm.nvram_path}
    return j


def run_backup_info(args, ref: str) -> int:
    from ...repo.ids import iso_ms
    from .. import output
    from ..repoargs import open_repo

    with open_repo(args) as repo:
        info = repo.resolve(ref)
        j = backup_json(repo, info)
    if args.json:
        output.print_json(j)
        return 0
    vm = j["vm_definition"]
    if vm is None:
        stored = "none"
    else:
        stored = f"stored (XML {vm['xml_bytes']} bytes" + (
            f", NVRAM {vm['nvram_bytes']} bytes from {vm['nvram_path']})" if vm["nvram_bytes"] is not None else ")")
    others = [f"{m['disk']} ({m['id']})" for m in j["set_members"] if m["id"] != info.id]
    lines = [
        f"backup: {info.id}",
        f"disk: {info.disk}",
        f"kind: {info.kind}" + (f" (parent {info.parent})" if info.parent else ""),
        f"created: {iso_ms(info.created)}",
        f"size: {info.size} ({output.human_bytes(info.size)})",
        f"stored: {info.stored_bytes} ({output.human_bytes(info.stored_bytes)})",
        f"source: {info.source or '-'}",
        f"set: {info.set_id or '-'}" + (f" with {', '.join(others)}" if others else ""),
        f"domain: {info.domain or '-'}",
        f"VM definition: {stored}",
    ]
    print("\n".join(lines))
    return 0
