"""`nbdbackup restore --live BACKUP DEST.qcow2`: the VM runs at once on DEST, the data follows
(qemu's block-stream from the backup's NBD export). Called from restore.py on --live."""

from __future__ import annotations

from .. import numbers

DESCRIPTION = (
    "\n"
    "--live BACKUP DEST.qcow2 (instant recovery) creates DEST.qcow2 with the backup's NBD\n"
    "export as its backing file, so a VM can run on it at once. The export comes from a\n"
    "`nbdbackup serve` the command starts as its own process (on a unix socket in a private\n"
    "directory), or from --server URI. Its pid and socket are kept in DEST.qcow2.nbdbackup-live.json.\n"
    "Without --qmp/--domain the command prints how to start the VM and exits. With --qmp SOCKET\n"
    "it waits for a qemu with DEST open on that QMP socket and has it copy the backup into\n"
    "DEST (block-stream) while the guest runs; when done, DEST has no backing file and the\n"
    "server it started stops. --resume continues after a killed command or a failed copy.\n"
    "--domain DOMAIN does the same through libvirt; a DOMAIN that does not exist is defined from\n"
    "the definition a --libvirt backup stored (its disk on DEST, a new UUID and MACs for a new\n"
    "name, NVRAM beside DEST) and started."
)


def add_arguments(g) -> None:
    g.add_argument("--live", action="store_true",
                   help="instant recovery: DEST.qcow2 backed by the backup's export, copied in the background")
    g.add_argument("--server", metavar="URI",
                   help="use this running `nbdbackup serve` (nbd+unix:///?socket=PATH or nbd://HOST:PORT) "
                        "instead of starting one")
    g.add_argument("--qmp", metavar="SOCKET", help="QMP socket of the qemu running on DEST: drive the copy")
    g.add_argument("--domain", metavar="DOMAIN",
                   help="libvirt domain whose disk is DEST: drive the copy through libvirt's blockPull "
                        "(--start starts it when shut off; --connect URI); a DOMAIN that does not exist is "
                        "defined from a --libvirt backup's stored definition and started")
    g.add_argument("--wait", type=numbers.seconds(7 * numbers.DAY), default=600.0, metavar="SECS",
                   help="how long --qmp waits for qemu to answer (default 600)")
    g.add_argument("--speed", type=numbers.size(0, 1 << 50), default=None, metavar="BYTES_PER_S",
                   help="rate limit of the copy, bytes per second (default: none; with --resume of a running "
                        "copy: its limit is kept, 0 lifts it)")
    g.add_argument("--resume", action="store_true",
                   help="continue a live restore into DEST (restarts its server when it is not running)")
    g.add_argument("--socket-group", metavar="GROUP",
                   help="give the server's socket to GROUP (e.g. libvirt-qemu) for a qemu running as another user")


LIVE_ONLY = ("server", "qmp", "domain", "resume", "socket_group")


def _repo_argv(args) -> list[str]:
    """The options the serve we start needs to open the same repository. The index URL
    goes through the environment instead: it may hold a database password."""
    import os

    repo = args.repo
    if repo and "://" not in repo:
        repo = os.path.abspath(repo)
    argv = ["--repo", repo]
    if getattr(args, "s3_endpoint", None):
        argv += ["--s3-endpoint", args.s3_endpoint]
    if getattr(args, "key_file", None):
        argv += ["--key-file", os.path.abspath(args.key_file)]
    if getattr(args, "passphrase_file", None):
        argv += ["--passphrase-file", os.path.abspath(args.passphrase_file)]
    return argv


def _environment(args) -> dict[str, str]:
    """The server's environment: ours, the passphrases the CLI hid from children (as a user
    gives them, never on a command line), a passphrase typed here, the index URL."""
    import os

    from ...envsecrets import SECRET_ENV, env
    from ..repoargs import key_source

    # only the repository's passphrase: the server lives for hours, and serve needs no other
    e = {k: v for k, v in os.environ.items() if k not in SECRET_ENV}
    if (value := env("NBDBACKUP_PASSPHRASE")) is not None:
        e["NBDBACKUP_PASSPHRASE"] = value
    typed = key_source(args).cache.get("passphrase")
    if typed is not None and "NBDBACKUP_PASSPHRASE" not in e:
        e["NBDBACKUP_PASSPHRASE"] = typed
    if getattr(args, "index_url", None):
        e["NBDBACKUP_INDEX_URL"] = args.index_url
    return e


def run(args) -> int:
    import contextlib
    import shlex
    import sys

    from ...engine import live_restore as live
    from ...engine.live_libvirt import copy_domain, define_planned, plan_domain
    from ...engine.live_state import stop_command
    from ...errors import Interrupted, UsageError
    from .. import output
    from ..repoargs import open_repo

    if args.libvirt is not None:
        raise UsageError("--live and --libvirt do not go together")
    given = [f"--{o.replace('_', '-')}" for o in ("to_dir", "name", "define") if getattr(args, o)]
    if given or (args.start and not args.domain):
        raise UsageError(f"{', '.join(given) or '--start'} {'do' if len(given) > 1 else 'does'} not go with --live"
                         + ("" if given else " without --domain"))
    if args.format not in (None, "qcow2"):
        raise UsageError("--live makes a qcow2 DEST (its backing is the export); --format raw does not apply")
    ref, dest = args.backup, args.target
    if args.resume and dest is None:
        ref, dest = None, args.backup       # restore --live --resume DEST
    if dest is None:
        raise UsageError("restore --live needs BACKUP and DEST.qcow2 (or --resume DEST.qcow2)",
                         hint="restore --live BACKUP DEST.qcow2 [--qmp SOCKET]")
    if args.resume and args.force:
        raise UsageError("--resume continues DEST; --force would replace it: choose one")
    if args.qmp and args.domain:
        raise UsageError("--qmp or --domain: one drives the copy, not both")
    if args.domain and not args.socket_group and not args.resume:
        import grp

        with contextlib.suppress(KeyError):
            args.socket_group = grp.getgrnam("libvirt-qemu").gr_name    # qemu's user under libvirt
    if args.resume and args.server:
        raise UsageError("--resume takes the server from DEST's state file; drop --server")

    plan = None
    with open_repo(args) as repo:
        if args.domain and not args.resume:     # refusals before DEST or a server exist
            plan = plan_domain(repo, ref, dest, args.domain, args.connect, force=args.force)
            if plan is not None:
                ref = plan.backup       # a disk name resolved once: DEST serves what was planned
        prep = live.prepare(repo, ref, dest, server_uri=args.server, repo_argv=_repo_argv(args),
                            environment=_environment(args), socket_group=args.socket_group,
                            force=args.force, resume=args.resume)
    st = prep.state
    resume_cmd = shlex.join(["nbdbackup", "restore", "--live", "--resume", st.dest, "--qmp", "QMP_SOCKET"])
    if prep.server_started:
        output.summary(args, f"nbdbackup: serving {st.backup} on {st.socket} (pid {st.server_pid}); "
                             f"stop it with `{stop_command(st)}` (state: {st.path})"
                             + (f"; its socket is given to group {st.socket_group}: that group's processes "
                                f"(every qemu of libvirt) can read backup {st.backup}, and only it"
                                if st.socket_group else ""))
    bar = lambda total, desc: output.progress_bar(args, total, desc)  # noqa: E731
    if args.qmp is None and not args.domain:
        return _instructions(args, prep, resume_cmd)
    try:
        if args.domain:
            if plan is not None:
                define_planned(plan, args.connect)
                output.summary(args, f"nbdbackup: defined domain {plan.domain} on {args.connect} from the "
                                     f"stored definition of {plan.source_domain}, {plan.target} on {st.dest} "
                                     f"({plan.xml_path})")
            r = copy_domain(st, args.domain, args.connect, start=args.start or plan is not None, speed=args.speed,
                            progress=bar)
        else:
            if not args.quiet and not args.json:
                print(f"nbdbackup: waiting (up to {args.wait:.0f}s, --wait) for a qemu with {st.dest} open on "
                      f"{args.qmp}", file=sys.stderr, flush=True)
            r = live.copy(st, args.qmp, wait_s=args.wait, speed=args.speed, progress=bar)
    except (KeyboardInterrupt, Interrupted):
        # only this command stops: qemu's job and the server go on
        again = resume_cmd.replace("--qmp QMP_SOCKET", f"--domain {shlex.quote(args.domain)}" if args.domain
                                   else f"--qmp {shlex.quote(args.qmp)}")
        print(f"nbdbackup: the copy into {st.dest} goes on in qemu (if it started) and the server keeps "
              f"serving; follow it again with `{again}`", file=sys.stderr)
        raise
    if args.json:
        output.print_json({"dest": st.dest, "backup": st.backup, "disk": st.disk, "size": st.size,
                           "bytes": r.bytes, "seconds": round(r.duration_s, 3), "job": r.job,
                           "followed_running_job": r.followed, "already_complete": r.already_complete,
                           "server_stopped": r.server_stopped, "server_pid": st.server_pid,
                           "domain_defined": plan is not None, "domain_xml": plan.xml_path if plan else None,
                           "nvram": plan.nvram_path if plan else None})
    else:
        hb = output.human_bytes
        how = "already complete" if r.already_complete else \
            f"copied {hb(r.bytes)} in {r.duration_s:.1f}s" + (" (followed the running job)" if r.followed else "")
        srv = f"; server (pid {st.server_pid}) stopped" if r.server_stopped else \
            f"; the server ({st.server_uri}) may stop now" if not st.ours else ""
        output.summary(args, f"live restore of {st.backup} ({st.disk}) into {st.dest}: {how}; "
                             f"it has no backing file now{srv}")
    return 0


def _instructions(args, prep, resume_cmd: str) -> int:
    import sys

    from ...engine.live_server import forget_state, libvirt_snippet, qemu_command, stop_server
    from ...engine.live_state import read_backing, stop_command
    from .. import output

    st = prep.state
    if prep.resumed and not read_backing(st.dest):
        stopped = stop_server(st) if st.ours else False
        forget_state(st)
        output.summary(args, f"{st.dest} is complete already (no backing file)"
                             + ("; its server stopped" if stopped else ""))
        return 0
    qemu = qemu_command(st, "QMP_SOCKET")
    if args.json:
        output.print_json({"dest": st.dest, "backup": st.backup, "disk": st.disk, "size": st.size,
                           "backing": st.backing, "socket": st.socket, "server_pid": st.server_pid,
                           "server_log": st.server_log, "state_file": st.path, "qemu_command": qemu,
                           "libvirt_disk": libvirt_snippet(st), "resume_command": resume_cmd,
                           "stop_command": stop_command(st) if st.ours else None})
        return 0
    if not args.quiet:
        print(f"{st.dest} is ready: backed by backup {st.backup} ({st.disk}, {output.human_bytes(st.size)}).\n"
              f"Start the VM on it, with a QMP socket for the copy, e.g.:\n  {qemu}\n"
              f"or in a libvirt domain (qemu must reach {st.socket}: see --socket-group):\n"
              + "".join(f"  {line}\n" for line in libvirt_snippet(st).splitlines())
              + f"Then copy the backup into it while the guest runs:\n  {resume_cmd}\n"
              + (f"The server keeps running until the copy is done; stop it with `{stop_command(st)}` "
                 f"(state in {st.path})." if st.ours else
                 f"Keep --server {st.server_uri} running until the copy is done."), file=sys.stderr)
    return 0
