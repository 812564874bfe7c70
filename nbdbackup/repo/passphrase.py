"""Where a command gets an encrypted repository's passphrase (and key file): KeySource.

Nothing is asked until a key is needed: a plaintext repository never runs the
passphrase command nor prompts. The passphrase comes from, in this order:
--passphrase-file, $NBDBACKUP_PASSPHRASE, $NBDBACKUP_PASSPHRASE_COMMAND (run
without a shell; its stdout minus one trailing newline), else a prompt when
stdin is a terminal, else a UsageError naming the three ways (cron, systemd).
The destination of `copy` has the same under NBDBACKUP_DEST_* names.
A passphrase is never logged, printed, put into an exception or repr().
"""

from __future__ import annotations

import getpass
import logging
import os
import shlex
import subprocess
import sys
from dataclasses import dataclass, field

from ..envsecrets import env
from ..errors import UsageError

log = logging.getLogger("nbdbackup")
COMMAND_TIMEOUT_S = 300.0       # a command may wait for a token or an agent, but not forever
_MAX_PASSPHRASE = 4096


@dataclass(frozen=True)
class KeySource:
    """Where a command gets the key; nothing is asked until needed."""

    passphrase: str | None = field(default=None, repr=False)   # already known (env var, a file's contents)
    passphrase_file: str | None = None
    passphrase_command: str | None = field(default=None, repr=False)   # may name a secret's path
    key_file: str | None = None
    interactive: bool = True        # may prompt on a TTY
    label: str = "repository"       # "repository" / "destination" (prompts, messages)
    # what was asked once (the passphrase, unlocked keys by repo): a command that opens its
    # repository twice (rebuild-index) asks once
    cache: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_env(cls, *, dest: bool = False, key_file: str | None = None, passphrase_file: str | None = None,
                 interactive: bool = True) -> "KeySource":
        """The source the environment names (NBDBACKUP_[DEST_]PASSPHRASE, ..._PASSPHRASE_COMMAND,
        ..._KEY_FILE); *key_file* and *passphrase_file* (command-line options) take precedence."""
        pre = "NBDBACKUP_DEST_" if dest else "NBDBACKUP_"
        return cls(passphrase=env(pre + "PASSPHRASE") or None,
                   passphrase_file=passphrase_file or None,
                   passphrase_command=os.environ.get(pre + "PASSPHRASE_COMMAND") or None,
                   key_file=key_file or os.environ.get(pre + "KEY_FILE") or None,
                   interactive=interactive, label="destination" if dest else "repository")

    @property
    def env_prefix(self) -> str:
        return "NBDBACKUP_DEST_" if self.label == "destination" else "NBDBACKUP_"

    @property
    def option_prefix(self) -> str:
        return "--dest-" if self.label == "destination" else "--"

    def ways(self) -> str:
        """The three ways to give a passphrase, in words, for messages."""
        p, o = self.env_prefix, self.option_prefix
        return f"set {p}PASSPHRASE, pass {o}passphrase-file FILE, or set {p}PASSPHRASE_COMMAND"

    def get_passphrase(self, where: str) -> tuple[str, bool]:
        """(passphrase of *where*, whether it was typed at a prompt); asked once per KeySource."""
        if "passphrase" in self.cache:
            return self.cache["passphrase"], False
        given = self.given_passphrase()
        if given is not None:
            self.cache["passphrase"] = given
            return given, False
        typed = self.prompt(f"passphrase of {self.label} {where}: ", where)
        return typed, True

    def remember(self, passphrase: str) -> None:
        """Keep a typed passphrase that proved right, for the next open by this KeySource."""
        self.cache["passphrase"] = passphrase

    def given_passphrase(self) -> str | None:
        """The passphrase from a file, the environment or the command; None when none is given."""
        if self.passphrase_file:
            return _from_file(self.passphrase_file, f"{self.option_prefix}passphrase-file")
        if self.passphrase is not None:
            return self.passphrase
        if self.passphrase_command:
            return run_passphrase_command(self.passphrase_command, f"{self.env_prefix}PASSPHRASE_COMMAND")
        return None

    def can_prompt(self) -> bool:
        return self.interactive and _stdin_is_a_terminal()

    def prompt(self, text: str, where: str) -> str:
        if not self.can_prompt():
            raise UsageError(f"{self.label} {where} is encrypted and no passphrase was given (no terminal to ask)",
                             hint=self.ways())
        try:
            typed = getpass.getpass(text)
        except EOFError:
            raise UsageError(f"no passphrase entered for {self.label} {where}", hint=self.ways()) from None
        return _checked(typed, "the passphrase typed")

    def new_passphrase(self, where: str, *, new_file: str | None = None, env_name: str | None = None) -> str:
        """A new passphrase for *where*: from *new_file* or $*env_name* (key passphrase), else the
        given one (init), else typed twice at a prompt."""
        if new_file:
            return _from_file(new_file, f"{self.option_prefix}new-passphrase-file")
        if env_name is not None:
            if env(env_name):
                return _checked(env(env_name), f"${env_name}")
        else:
            given = self.given_passphrase()
            if given is not None:
                return given
        if not self.can_prompt():
            ways = (f"set {env_name} or pass {self.option_prefix}new-passphrase-file FILE" if env_name
                    else self.ways())
            raise UsageError(f"a new passphrase for {self.label} {where} is needed and there is no terminal "
                             "to ask", hint=ways)
        first = self.prompt(f"new passphrase of {self.label} {where}: ", where)
        if self.prompt("the same again: ", where) != first:
            raise UsageError("the two passphrases differ; nothing was changed", hint="run the command again")
        return first


def _stdin_is_a_terminal() -> bool:
    try:
        return sys.stdin is not None and sys.stdin.isatty()
    except (ValueError, OSError):     # closed stdin
        return False


def _checked(text: str, what: str) -> str:
    if not text:
        raise UsageError(f"{what} is empty", hint="an encrypted repository needs a non-empty passphrase")
    if len(text) > _MAX_PASSPHRASE:
        raise UsageError(f"{what} is longer than {_MAX_PASSPHRASE} characters")
    if "\0" in text:
        raise UsageError(f"{what} contains a NUL character")
    return text


def _strip_newline(text: str) -> str:
    """Without ONE trailing newline (echo and editors add it; other whitespace is the passphrase's)."""
    if text.endswith("\r\n"):
        return text[:-2]
    return text[:-1] if text.endswith("\n") else text


def _from_file(path: str, option: str) -> str:
    try:
        with open(path, "rb") as f:
            if os.fstat(f.fileno()).st_mode & 0o077:
                log.warning("the passphrase file %s (%s) may be read by other users: chmod 600 it", path, option)
            data = f.read(_MAX_PASSPHRASE * 4 + 3)
    except OSError as e:
        raise UsageError(f"cannot read the passphrase file {path} ({option}): {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"the passphrase file {path} ({option}) is not UTF-8 text") from None
    return _checked(_strip_newline(text), f"the passphrase file {path} ({option})")


def run_passphrase_command(command: str, name: str) -> str:
    """Run *command* (shlex-split, no shell): its stdout minus one trailing newline. A failure is
    a UsageError carrying its stderr, never its stdout (which may hold the passphrase)."""
    try:
        argv = shlex.split(command)
    except ValueError as e:
        raise UsageError(f"${name} is not a valid command line: {e}") from None
    if not argv:
        raise UsageError(f"${name} is empty")
    try:
        done = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=COMMAND_TIMEOUT_S)
    except FileNotFoundError:
        raise UsageError(f"the passphrase command of ${name} was not found: {argv[0]}") from None
    except PermissionError:
        raise UsageError(f"the passphrase command of ${name} may not be run: {argv[0]}") from None
    except subprocess.TimeoutExpired:
        raise UsageError(f"the passphrase command of ${name} ({argv[0]}) did not finish within "
                         f"{COMMAND_TIMEOUT_S:.0f} s") from None
    if done.returncode != 0:
        err = done.stderr.decode(errors="replace").strip()
        err = "\n    ".join(err.splitlines()[-10:])[-2000:] or "(nothing on stderr)"
        raise UsageError(f"the passphrase command of ${name} ({argv[0]}) failed with exit status "
                         f"{done.returncode}: {err}", hint="its standard output is not shown")
    try:
        text = done.stdout.decode("utf-8")
    except UnicodeDecodeError:
        raise UsageError(f"the passphrase command of ${name} ({argv[0]}) printed no UTF-8 text") from None
    return _checked(_strip_newline(text), f"the output of the passphrase command of ${name}")
