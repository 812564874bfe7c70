"""`nbdbackup info URI`: what an NBD export offers, without reading it; `nbdbackup --repo R info
BACKUP`: one backup (its set, its libvirt domain, whether a VM definition is stored)."""

from __future__ import annotations

NAME = "info"
HELP = "show an NBD export's size, flags, block sizes and meta contexts, or one backup"
DESCRIPTION = (
    "Connect to an NBD server and describe the export named by URI\n"
    "(nbd://HOST[:PORT]/EXPORT, nbd+unix:///EXPORT?socket=PATH, nbds:// for TLS):\n"
    "size, read-only, multi-conn and the other transmission flags, the block\n"
    "sizes, and the meta contexts (base:allocation, qemu:dirty-bitmap:NAME, ...)\n"
    "the server offers. Nothing is read and the export is left untouched.\n"
    "With --list, list the server's exports instead.\n\n"
    "With --repo and a BACKUP (an id, or a disk name for its latest backup) instead of a\n"
    "URI: the backup, the other members of its set, its libvirt domain and whether a\n"
    "VM definition is stored with it (read and checked: a damaged one is exit 9)."
)


def add_arguments(p) -> None:
    from ..nbdargs import add_client_arguments

    p.add_argument("uri", metavar="URI|BACKUP", help="NBD URI of the export, or (with --repo) a backup")
    p.add_argument("--list", action="store_true", help="list the server's exports (NBD_OPT_LIST)")
    add_client_arguments(p)


def info_json(uri, info) -> dict:
    from ...nbd import proto

    f = info.flags
    return {
        "uri": str(uri),
        "export": info.name,
        "description": info.description,
        "size": info.size,
        "read_only": info.read_only,
        "can_multi_conn": info.can_multi_conn,
        "can_flush": bool(f & proto.FLAG_SEND_FLUSH),
        "can_fua": bool(f & proto.FLAG_SEND_FUA),
        "can_trim": bool(f & proto.FLAG_SEND_TRIM),
        "can_zero": bool(f & proto.FLAG_SEND_WRITE_ZEROES),
        "can_fast_zero": bool(f & proto.FLAG_SEND_FAST_ZERO),
        "can_cache": bool(f & proto.FLAG_SEND_CACHE),
        "can_df": bool(f & proto.FLAG_SEND_DF),
        "is_rotational": bool(f & proto.FLAG_ROTATIONAL),
        "flags": info.flag_names,
        "flags_value": f,
        "block_size": {"minimum": info.min_block, "preferred": info.preferred_block,
                       "maximum": info.max_block, "negotiated": info.block_size_negotiated},
        "structured_replies": info.structured,
        "tls": uri.tls,
        "contexts": info.contexts,
    }


def run(args) -> int:
    from ...nbd.client import Client
    from ...nbd.uri import parse_uri
    from .. import output
    from ..nbdargs import client_options

    if "://" not in args.uri and getattr(args, "repo", None):
        from ._backupinfo import run_backup_info
        return run_backup_info(args, args.uri)
    uri = parse_uri(args.uri)
    tls, timeout = client_options(args, uri)
    if args.list:
        exports = Client.list_exports(uri, tls=tls, timeout=timeout)
        if args.json:
            output.print_json([{"name": n, "description": d, "uri": str(uri.with_export(n))} for n, d in exports])
        else:
            for n, d in exports:
                print(f"{n!r}" + (f"  {d}" if d else ""))
        return 0
    info = Client.query_info(uri, tls=tls, timeout=timeout)
    j = info_json(uri, info)
    if args.json:
        output.print_json(j)
        return 0
    yes = lambda b: "yes" if b else "no"  # noqa: E731
    bs = j["block_size"]
    lines = [
        f"export: {info.name!r}" + (f" ({info.description})" if info.description else ""),
        f"uri: {uri}",
        f"size: {info.size} ({output.human_bytes(info.size)})",
        f"read-only: {yes(info.read_only)}",
        f"multi-conn: {yes(info.can_multi_conn)}",
        f"flags: {' '.join(info.flag_names) or '-'}",
        f"block sizes: minimum {bs['minimum']}, preferred {bs['preferred']}, maximum {bs['maximum']}"
        + ("" if bs["negotiated"] else " (defaults: not advertised)"),
        f"structured replies: {yes(info.structured)}",
        f"TLS: {yes(uri.tls)}",
        "meta contexts:" + ("" if info.contexts else " none"),
        *[f"  {c}" for c in info.contexts],
    ]
    print("\n".join(lines))
    return 0
