"""`nbdbackup map URI`: the extents of one meta context, like `nbdinfo --map`."""

from __future__ import annotations

NAME = "map"
HELP = "print an NBD export's extents for one meta context (base:allocation by default)"
DESCRIPTION = (
    "Ask the server for block status over the whole export (window by window,\n"
    "in constant memory) and print one line per extent: offset, length, flags\n"
    "and their meaning. Adjacent extents with equal flags are merged.\n"
    "--json prints a JSON array of {offset, length, flags, description}.\n"
    "Contexts: base:allocation (1 hole, 2 zero), qemu:dirty-bitmap:NAME (1 dirty),\n"
    "qemu:allocation-depth (0 unallocated, 1 local, N backing depth N)."
)


def add_arguments(p) -> None:
    from ..nbdargs import add_client_arguments

    p.add_argument("uri", metavar="URI", help="NBD URI of the export")
    p.add_argument("--context", default="base:allocation", metavar="NAME",
                   help="meta context to map (default base:allocation)")
    add_client_arguments(p)


def describe(context: str, flags: int) -> str:
    from ...nbd import proto

    if context == proto.CONTEXT_BASE_ALLOCATION:
        names = [n for bit, n in ((proto.STATE_HOLE, "hole"), (proto.STATE_ZERO, "zero")) if flags & bit]
        rest = flags & ~(proto.STATE_HOLE | proto.STATE_ZERO)
        return ",".join(names + ([f"{rest:#x}"] if rest else [])) or "data"
    if context.startswith(proto.CONTEXT_DIRTY_BITMAP_PREFIX):
        return "dirty" if flags & proto.STATE_DIRTY else "clean"
    if context == proto.CONTEXT_ALLOCATION_DEPTH:
        return {0: "unallocated", 1: "local"}.get(flags, f"backing depth {flags}")
    return f"type {flags}"


def run(args) -> int:
    import json
    import sys

    from ...errors import NotFound
    from ...nbd.client import Client
    from ...nbd.extents import walk_context
    from ...nbd.uri import parse_uri
    from ..nbdargs import client_options

    uri = parse_uri(args.uri)
    tls, timeout = client_options(args, uri)
    with Client.connect(uri, meta_contexts=[args.context], tls=tls, timeout=timeout) as c:
        if args.context not in c.contexts:
            why = "" if c.structured else " (the server has no structured replies, so no meta contexts)"
            raise NotFound(f"the server does not offer meta context {args.context!r}{why}",
                           hint="see the offered contexts with `nbdbackup info URI`")
        out = sys.stdout
        # Streamed, not collected: a huge export's map must not need huge memory.
        if args.json:
            out.write("[")
            first = True
            for off, n, f in walk_context(c, args.context):
                out.write(("\n" if first else ",\n") + json.dumps(
                    {"offset": off, "length": n, "flags": f, "description": describe(args.context, f)}))
                first = False
            out.write("\n]\n")
        else:
            for off, n, f in walk_context(c, args.context):
                out.write(f"{off:>14} {n:>14} {f:>4}  {describe(args.context, f)}\n")
        out.flush()
    return 0
