"""Error types and the one exit-code table shared by every command.

Each condition a user can hit maps to one exception class and one exit code.
The CLI catches NbdBackupError, prints its message (what went wrong and what
to do), and exits with its code; nothing else reaches the user as a traceback.
"""

from __future__ import annotations

import errno
from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    FAILURE = 1              # generic failure
    USAGE = 2                # bad command line, malformed URI, bad option value
    LOCKED = 3               # repository or disk locked by another run
    SOURCE_UNREACHABLE = 4   # cannot connect to / open the backup source or NBD target
    VERIFY_FAILED = 5        # verify found damaged or missing data
    NOT_A_REPOSITORY = 6     # path is not an nbdbackup repository
    REPO_FORMAT = 7          # repository or index format is newer than this tool, or needs `nbdbackup migrate`
    NO_SPACE = 8             # disk full (ENOSPC) while writing
    REPO_DAMAGED = 9         # a pack or the index is damaged; committed data may be unreadable
    PROTOCOL = 10            # the NBD peer broke the protocol (lying or broken server)
    NOT_FOUND = 11           # no such backup, disk or export
    SOURCE_FAILED = 12       # source failed mid-backup after retries; nothing was committed
    CHAIN_BROKEN = 13        # incremental impossible (bitmap/parent missing or untrustworthy) with --no-fallback
    READ_ONLY = 14           # the repository's file system is mounted read-only (EROFS) and the command writes
    PERMISSION_DENIED = 15   # this user may not read or write a repository file (EACCES/EPERM)
    CREDENTIALS = 16         # object storage or index database refused the credentials
    STORAGE_UNREACHABLE = 17 # object storage or index database unreachable or failing, after retries
    NO_BUCKET = 18           # the S3 bucket does not exist
    KEY_REFUSED = 19         # wrong passphrase, or a key (file) that is not this repository's
    SOME_SOURCES_FAILED = 20 # `run`: some of the job's sources (or its prune) failed; the others are committed
    NO_FILESYSTEM = 21       # `files`: no filesystem found on the backup's disk
    PATH_NOT_FOUND = 22      # `files`: the path does not exist in the backup's filesystem
    APPLIANCE_FAILED = 23    # `files`: libguestfs's appliance cannot start
    LIVE_COPY_FAILED = 24    # restore --live: qemu's copy job failed, or the VM went away
    INTERRUPTED = 130        # SIGINT/SIGTERM


EXIT_CODE_HELP = {
    ExitCode.OK: "success",
    ExitCode.FAILURE: "generic failure",
    ExitCode.USAGE: "usage error (bad option, malformed URI or argument)",
    ExitCode.LOCKED: "repository or image locked: another run (or qemu) holds the lock",
    ExitCode.SOURCE_UNREACHABLE: "source unreachable: cannot connect to or open the source/target",
    ExitCode.VERIFY_FAILED: "verification failed: damaged or missing data found",
    ExitCode.NOT_A_REPOSITORY: "not a repository (run `nbdbackup init`)",
    ExitCode.REPO_FORMAT: "repository format too new for this tool, or index needs `nbdbackup migrate`",
    ExitCode.NO_SPACE: "no space left on the repository's or the restore target's disk; nothing committed was harmed",
    ExitCode.REPO_DAMAGED: "repository damaged (corrupt pack or index); see `verify`, `rebuild-index`",
    ExitCode.PROTOCOL: "NBD protocol error: the peer misbehaved",
    ExitCode.NOT_FOUND: "no such backup, disk or export",
    ExitCode.SOURCE_FAILED: "source failed during the backup (after retries); nothing was committed",
    ExitCode.CHAIN_BROKEN: "incremental refused (--no-fallback): bitmap or parent backup missing or untrustworthy",
    ExitCode.READ_ONLY: "read-only file system where the command must write "
                        "(reading commands work on a read-only repository)",
    ExitCode.PERMISSION_DENIED: "permission denied: this user may not read or write a file the command needs",
    ExitCode.CREDENTIALS: "wrong or missing credentials for the S3 storage or the index database",
    ExitCode.STORAGE_UNREACHABLE: "S3 storage or index database unreachable or failing after retries, "
                                  "or its TLS certificate not accepted; "
                                  "nothing half-done was committed",
    ExitCode.NO_BUCKET: "the S3 bucket does not exist (create it, or check the name and endpoint)",
    ExitCode.KEY_REFUSED: "key refused: wrong passphrase, or a key (file) that is not this repository's",
    ExitCode.SOME_SOURCES_FAILED: "run: some sources of the job (or its prune) failed; the others' backups "
                                  "are committed (see the summary)",
    ExitCode.NO_FILESYSTEM: "files: no filesystem found on the backup's disk",
    ExitCode.PATH_NOT_FOUND: "files: the path does not exist in the backup's filesystem",
    ExitCode.APPLIANCE_FAILED: "files: the libguestfs appliance cannot start (see `libguestfs-test-tool`; "
                               "without KVM set LIBGUESTFS_BACKEND_SETTINGS=force_tcg)",
    ExitCode.LIVE_COPY_FAILED: "restore --live: qemu's copy job failed or the VM went away; the VM's disk "
                               "keeps what was copied and written (see the hint, then --resume)",
    ExitCode.INTERRUPTED: "interrupted by SIGINT/SIGTERM; nothing half-done was committed",
}


def exit_code_table() -> str:
    """The exit-code table as text, for --help and the README."""
    return "\n".join(f"  {int(c):>3}  {EXIT_CODE_HELP[c]}" for c in ExitCode)


class NbdBackupError(Exception):
    """Base class: a condition the user should read about, not a bug."""

    exit_code: ExitCode = ExitCode.FAILURE

    def __init__(self, message: str, *, hint: str | None = None):
        super().__init__(message)
        self.hint = hint

    def user_message(self) -> str:
        msg = str(self)
        if self.hint:
            msg += f"\n  hint: {self.hint}"
        return msg


class UsageError(NbdBackupError):
    exit_code = ExitCode.USAGE


class LockedError(NbdBackupError):
    exit_code = ExitCode.LOCKED


class SourceUnreachable(NbdBackupError):
    exit_code = ExitCode.SOURCE_UNREACHABLE


class VerifyFailed(NbdBackupError):
    exit_code = ExitCode.VERIFY_FAILED


class NotARepository(NbdBackupError):
    exit_code = ExitCode.NOT_A_REPOSITORY


class RepoFormatError(NbdBackupError):
    exit_code = ExitCode.REPO_FORMAT


class NoSpaceError(NbdBackupError):
    exit_code = ExitCode.NO_SPACE


class ReadOnlyError(NbdBackupError):
    exit_code = ExitCode.READ_ONLY


class PermissionDenied(NbdBackupError):
    exit_code = ExitCode.PERMISSION_DENIED


class CredentialsError(NbdBackupError):
    """S3 or the index database refused who we are (wrong key, secret, password, or no access)."""
    exit_code = ExitCode.CREDENTIALS


class StorageUnreachable(NbdBackupError):
    """S3 endpoint or index database cannot be reached, or keeps failing after retries."""
    exit_code = ExitCode.STORAGE_UNREACHABLE


class NoSuchBucket(NbdBackupError):
    exit_code = ExitCode.NO_BUCKET


READING_COMMANDS = "list, restore, serve, verify, stats"
SPACE_HINT = "free space on it and run the command again; committed backups are intact"
NO_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def is_no_space(exc_or_errno: BaseException | int | None) -> bool:
    """True for a full disk or an exhausted quota: ENOSPC or EDQUOT, given as an errno or as an
    OSError carrying one. Any other exception is False, even with an errno attribute (an
    NbdCommandError's errno is the NBD protocol's number, not this host's)."""
    if isinstance(exc_or_errno, BaseException):
        return isinstance(exc_or_errno, OSError) and exc_or_errno.errno in NO_SPACE_ERRNOS
    return exc_or_errno in NO_SPACE_ERRNOS


def storage_error(err: int | None, where: str, what: str, *, repository: bool = True) -> NbdBackupError | None:
    """The one translation of a file-system condition (an errno: ENOSPC/EDQUOT, EROFS,
    EACCES/EPERM) met at *where* while *what* ("writing the index") into its error class
    and hint; None for any other errno (the caller reports it as it would have).
    repository=False: *where* may be any path (a restore target, a log file)."""
    if is_no_space(err):
        return NoSpaceError(f"no space left on the file system of {where} ({what})", hint=SPACE_HINT)
    if err == errno.EROFS:
        hint = (f"the repository is mounted read-only; remount it read-write, or use a reading command "
                f"({READING_COMMANDS})") if repository else "remount it read-write, or choose a path elsewhere"
        return ReadOnlyError(f"{where} is on a read-only file system ({what})", hint=hint)
    if err in (errno.EACCES, errno.EPERM):
        hint = ("run the command as the user that owns the repository, or give this user access to it"
                if repository else "run the command as a user who may access it, or change its permissions")
        return PermissionDenied(f"permission denied: {where} ({what})", hint=hint)
    return None


class NoFilesystem(NbdBackupError):
    exit_code = ExitCode.NO_FILESYSTEM


class PathNotFound(NbdBackupError):
    exit_code = ExitCode.PATH_NOT_FOUND


class ApplianceFailed(NbdBackupError):
    exit_code = ExitCode.APPLIANCE_FAILED


class KeyRefused(NbdBackupError):
    """An encrypted repository's key could not be unlocked: a wrong passphrase, or a key (file)
    of another repository. Nothing was read or changed."""
    exit_code = ExitCode.KEY_REFUSED


class RepoDamaged(NbdBackupError):
    exit_code = ExitCode.REPO_DAMAGED


class ChunkCorrupt(RepoDamaged):
    """A chunk of a backup is missing or fails its check; .offset/.length: the disk byte range."""

    def __init__(self, message: str, *, offset: int, length: int, hint: str | None = None):
        super().__init__(message, hint=hint)
        self.offset = offset
        self.length = length


class NotFound(NbdBackupError):
    exit_code = ExitCode.NOT_FOUND


class SourceFailed(NbdBackupError):
    exit_code = ExitCode.SOURCE_FAILED


class QmpCommandError(SourceFailed):
    """qemu answered a QMP command with an error: .command, .error_class (QMP's "class",
    e.g. "GenericError"), .desc (its "desc")."""

    def __init__(self, command: str, error_class: str, desc: str):
        super().__init__(f"QMP {command} failed: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class LiveCopyFailed(NbdBackupError):
    """restore --live: the block-stream job ended with an error, or the VM (its QMP session) went away."""

    exit_code = ExitCode.LIVE_COPY_FAILED


class ChainBroken(NbdBackupError):
    """An incremental cannot be trusted and --no-fallback forbids the full instead."""

    exit_code = ExitCode.CHAIN_BROKEN


class Interrupted(BaseException):
    """SIGTERM, raised from the CLI's signal handler so that finally-blocks run (like
    KeyboardInterrupt for SIGINT)."""


class CommittedThenFailed(NbdBackupError):
    """The run's backups were committed (complete and usable), then the source's bookkeeping
    failed. The failure is .cause (also __cause__): its message, hint and exit code are
    reported, naming .committed_backups (their ids)."""

    def __init__(self, committed_backups: list[str], cause: Exception):
        super().__init__(str(cause), hint=getattr(cause, "hint", None))
        self.committed_backups = committed_backups
        self.cause = cause


class CommittedThenInterrupted(KeyboardInterrupt):
    """SIGINT/SIGTERM after the run's backups were committed: still an interrupt (exit 130);
    .committed_backups: their ids, complete and usable."""

    def __init__(self, committed_backups: list[str]):
        super().__init__(committed_backups)
        self.committed_backups = committed_backups


# --- NBD protocol errors (client and server side) ---------------------------

class NbdError(NbdBackupError):
    """Base for NBD problems."""

    exit_code = ExitCode.PROTOCOL


class NbdProtocolError(NbdError):
    """The peer broke the protocol: bad magic, unknown chunk, wrong cookie..."""

    exit_code = ExitCode.PROTOCOL


class TruncatedReply(NbdProtocolError):
    """The server closed the connection in the middle of a message: .what (the message),
    .got and .expected (its bytes), when known."""

    def __init__(self, message: str, *, what: str | None = None, got: int | None = None,
                 expected: int | None = None):
        super().__init__(message)
        self.what = what
        self.got = got
        self.expected = expected

    @classmethod
    def during(cls, what: str, got: int, expected: int) -> "TruncatedReply":
        return cls(f"server closed the connection in the middle of {what} "
                   f"(got {got} of {expected} bytes): truncated reply", what=what, got=got, expected=expected)


class NbdConnectionError(NbdError):
    """Could not connect, the connection dropped, or a socket operation timed out."""

    exit_code = ExitCode.SOURCE_UNREACHABLE


class GreetingTimeout(NbdConnectionError):
    """The server accepted the connection but sent no greeting within .timeout seconds (it may
    be full)."""

    def __init__(self, message: str, *, timeout: float | None = None):
        super().__init__(message)
        self.timeout = timeout


class NbdOptionError(NbdError):
    """The server refused an option during the handshake, or we could not send it:
    .option (NBD_OPT_*, None when no option was involved), .reply_type (the server's
    NBD_REP_ERR_*, 0 when the refusal was ours)."""

    exit_code = ExitCode.SOURCE_UNREACHABLE

    def __init__(self, message: str, *, reply_type: int = 0, option: int | None = None,
                 hint: str | None = None):
        super().__init__(message, hint=hint)
        self.reply_type = reply_type
        self.option = option


class NbdExportNotFound(NbdOptionError):
    """The server has no export of that name (NBD_REP_ERR_UNKNOWN)."""

    exit_code = ExitCode.NOT_FOUND


class NbdCommandError(NbdError):
    """A transmission request failed with an errno: .errno (the NBD protocol's number, not the
    host's), .offset (where it failed, from NBD_REPLY_TYPE_ERROR_OFFSET, else None),
    .command (NBD_CMD_*), .request_offset and .request_length (the request's range); those
    three are None when the client refused the request itself (read-only export, no
    FAST_ZERO)."""

    exit_code = ExitCode.SOURCE_FAILED

    def __init__(self, message: str, *, errno: int, offset: int | None = None, command: int | None = None,
                 request_offset: int | None = None, request_length: int | None = None):
        super().__init__(message)
        self.errno = errno
        self.offset = offset
        self.command = command
        self.request_offset = request_offset
        self.request_length = request_length
