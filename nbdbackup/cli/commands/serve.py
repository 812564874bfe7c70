"""`nbdbackup serve`: export backups over NBD (read-only, or with throw-away overlays)."""

from __future__ import annotations

from .. import numbers

NAME = "serve"
HELP = "serve backups over NBD (each backup by id, each disk's latest by disk name)"
DESCRIPTION = """\
Serve the repository's backups over NBD. Every backup is an export named by
its id; each disk name is an alias of that disk's latest backup, bound when a
client connects; --export ID (repeatable) serves only those backups, by id
(no aliases). Read-only unless --writable, which gives each backup a
copy-on-write overlay (shared by all its clients, discarded when the server
stops); the repository is never modified. Stop with SIGTERM or Ctrl-C."""


def add_arguments(p) -> None:
    p.add_argument("--listen", metavar="unix:PATH|HOST:PORT",
                   help="where to listen (default: unix socket serve.sock, mode 0600, in a private "
                        "runtime directory: /run/nbdbackup for root, else $XDG_RUNTIME_DIR/nbdbackup); "
                        "TCP needs TLS or --insecure-tcp")
    p.add_argument("--socket-mode", type=numbers.octal(
                       0, 0o777, noun="octal mode",
                       hint="0600: only the server's user; 0660: also --socket-group; 0666: every local user"),
                   metavar="MODE",
                   help="unix socket mode, octal (default 0600: only this user; 0660 with --socket-group)")
    p.add_argument("--socket-group", metavar="GROUP",
                   help="give the unix socket (and search access to its private directory) to GROUP, "
                        "e.g. libvirt-qemu, so qemu running as another user can connect")
    p.add_argument("--export", action="append", metavar="BACKUP_ID", dest="exports",
                   help="serve only this backup (by its full id; repeatable); other ids and the disk-name "
                        "aliases are refused and not listed. Use it whenever the socket is given to others")
    p.add_argument("--insecure-tcp", action="store_true",
                   help="allow TCP without TLS: anyone who can reach the port reads every backup (warns)")
    p.add_argument("--writable", action="store_true",
                   help="accept writes into a per-backup copy-on-write overlay (discarded on exit)")
    p.add_argument("--overlay-dir", metavar="DIR", help="where overlay files go (default: a temp dir)")
    p.add_argument("--cache-size", type=numbers.size(0, 1 << 40), default=256 << 20, metavar="SIZE",
                   help="decompressed chunk cache shared by all clients (default 256M)")
    p.add_argument("--workers", type=numbers.integer(1, 256), default=4, metavar="N",
                   help="threads reading and decompressing chunks (default 4)")
    p.add_argument("--max-connections", type=numbers.integer(1, 65536), default=1000, metavar="N",
                   help="clients served at once; more are turned away (default 1000)")
    p.add_argument("--max-handshakes", type=numbers.integer(1, 65536), metavar="N",
                   help="clients still negotiating at once (each has 60 s in all); more are turned away "
                        "(default 64, or half of --max-connections when that is less)")
    g = p.add_argument_group("TLS (X.509)")
    g.add_argument("--tls-cert", metavar="PEM", help="server certificate; turns TLS on and requires it")
    g.add_argument("--tls-key", metavar="PEM", help="its private key (default: inside --tls-cert)")
    g.add_argument("--tls-ca", metavar="PEM", help="CA that client certificates must chain to (asks for them)")


def _banner(addr, exports, writable: bool, access) -> str:
    if addr.unix:
        uri = f"nbd+unix:///{{EXPORT}}?socket={addr.unix}"
    else:
        host = f"[{addr.host}]" if ":" in addr.host else addr.host
        uri = f"nbd://{host}:{addr.port}/{{EXPORT}}"
    lines = [f"nbdbackup serve: listening on {addr} ({'writable overlays' if writable else 'read-only'})"]
    if addr.unix:
        lines.append(f"socket {addr.unix}: {access.describe()}")
    if exports:
        lines.append(f"exports ({len(exports)}):")
        lines += [f"  {name:<28} {desc}" for name, desc in exports[:50]]
        if len(exports) > 50:
            lines.append(f"  ... and {len(exports) - 50} more (nbdinfo --list)")
        example = uri.replace("{EXPORT}", exports[0][0])
        ro = "" if writable else ",readonly=on"
        lines.append(f"example: qemu-system-x86_64 -m 1G -drive file={example},format=raw{ro}")
    else:
        lines.append("no backups yet; new ones appear without a restart")
    return "\n".join(lines)


def run(args) -> int:
    import asyncio
    import errno
    import logging
    import os
    import shutil
    import signal
    import sys
    import tempfile

    from ...engine.exports import ChunkCache, RepoCatalog
    from ...errors import UsageError, is_no_space
    from ...nbd.server import ListenAddress, NbdServer, tls_server_context
    from ...nbd.server_socket import (
        DEFAULT_SOCKET_NAME,
        blocking_directory,
        check_private_dir,
        runtime_dir,
        socket_access,
    )
    from ..output import print_json, summary
    from ..repoargs import open_repo

    if not args.repo:
        raise UsageError("no repository given", hint="use --repo PATH or set NBDBACKUP_REPO")
    private_dir = None
    if args.listen:
        addr = ListenAddress.parse(args.listen)
    else:
        private_dir = runtime_dir()
        addr = ListenAddress(unix=os.path.join(private_dir, DEFAULT_SOCKET_NAME))
    if (args.tls_key or args.tls_ca) and not args.tls_cert:
        raise UsageError("--tls-key/--tls-ca need --tls-cert")
    if not addr.unix and (args.socket_mode is not None or args.socket_group):
        raise UsageError("--socket-mode/--socket-group apply to unix sockets only",
                         hint="drop them, or listen on a unix socket (the default, or --listen unix:PATH)")
    if not addr.unix and not args.tls_cert and not args.insecure_tcp:
        raise UsageError(f"refusing to serve {addr} over TCP without TLS: anyone who can reach it could "
                         "read every backup" + (" and change what a VM booted from one sees" if args.writable else ""),
                         hint="give --tls-cert/--tls-key (and --tls-ca to require client certificates), "
                              "use a unix socket (the default, or --listen unix:PATH), "
                              "or pass --insecure-tcp to accept the risk")
    access = socket_access(args.socket_mode, args.socket_group)
    tls = tls_server_context(args.tls_cert, args.tls_key, args.tls_ca) if args.tls_cert else None
    server_log = logging.getLogger("nbdbackup.server")
    server_log.setLevel(logging.INFO if args.verbose else logging.WARNING)
    if not addr.unix and tls is None:
        server_log.warning("--insecure-tcp: serving %s over TCP without TLS or authentication: anyone who "
                           "can reach it can read every backup%s", addr,
                           " and write to its overlay" if args.writable else "")
    elif not addr.unix and not args.tls_ca:
        server_log.warning("TLS without --tls-ca: any client that can reach %s can read every backup; "
                           "give --tls-ca to require client certificates", addr)
    if private_dir:
        check_private_dir(private_dir)

    repo = open_repo(args)
    overlay_dir = None
    try:
        if args.writable:
            base = args.overlay_dir
            try:
                if base:
                    os.makedirs(base, exist_ok=True)
                # A private directory per server: its overlays are ours alone to delete.
                overlay_dir = tempfile.mkdtemp(prefix="nbdbackup-overlay-", dir=base)
            except OSError as e:
                if is_no_space(e):
                    raise
                why = "it is a file, not a directory" if e.errno == errno.EEXIST else e.strerror
                raise UsageError(f"cannot make an overlay directory in {base or tempfile.gettempdir()}: {why}",
                                 hint="give --overlay-dir a writable directory") from None
        cache = ChunkCache(args.cache_size)
        only = None
        if args.exports:
            for ref in args.exports:
                if repo.resolve(ref).id != ref:
                    raise UsageError(f"--export {ref}: give a backup's full id, not a disk name or a prefix "
                                     f"(it is {repo.resolve(ref).id})")
            only = frozenset(args.exports)
        catalog = RepoCatalog(repo, cache, only)
        server = NbdServer(catalog, writable=args.writable, overlay_dir=overlay_dir, tls=tls,
                           workers=args.workers, max_clients=args.max_connections,
                           max_handshakes=args.max_handshakes)

        async def main() -> None:
            stop = asyncio.Event()
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.add_signal_handler(sig, stop.set)
            try:
                await server.start(addr, access, private_dir)
                if addr.unix and (blocked := blocking_directory(addr.unix, access)):
                    server_log.warning("the users --socket-mode/--socket-group let in cannot reach %s: %s is "
                                       "not searchable by them (give them x on it, or choose another "
                                       "--listen unix:PATH)", addr.unix, blocked)
                shown = addr
                if addr.port == 0 and not addr.unix:
                    shown = ListenAddress(host=addr.host, port=server.bound_ports()[0])
                exports = await server.list_exports()
                if args.json:
                    print_json({"listen": str(shown), "socket": addr.unix,
                                "socket_mode": f"{access.mode:04o}" if addr.unix else None,
                                "socket_group": access.group_name if addr.unix else None,
                                "writable": args.writable, "tls": tls is not None,
                                "client_certificates": bool(args.tls_ca),
                                "exports": [{"name": n, "description": d} for n, d in exports]})
                if not args.quiet:
                    print(_banner(shown, exports, args.writable, access), file=sys.stderr, flush=True)
                await stop.wait()
                if not args.quiet:
                    print("nbdbackup serve: stopping", file=sys.stderr, flush=True)
            finally:
                await server.shutdown()

        asyncio.run(main())
        looked_up = cache.hits + cache.misses
        summary(args, f"nbdbackup serve: stopped; chunk cache: {cache.hits} of {looked_up} lookups hit, "
                      f"{cache.used / 2**20:.1f} of {cache.max_bytes / 2**20:.0f} MiB used (--cache-size)")
    finally:
        if overlay_dir:
            shutil.rmtree(overlay_dir, ignore_errors=True)
        close = getattr(repo, "close", None)
        if close:
            close()
    return 0
