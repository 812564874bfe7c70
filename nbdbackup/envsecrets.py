"""Passphrases given in the environment, kept from the programs the CLI starts.

NBDBACKUP_PASSPHRASE and its kin are moved out of os.environ when the CLI starts
(hide_from_children), so qemu-nbd, qemu-img and a passphrase command do not inherit
them; env() still finds them for this process. Imports nothing of the package, so the
CLI can call it before anything heavy is imported.
"""

from __future__ import annotations

import os

# Passphrases given in the environment, taken out of os.environ by hide_from_children(): the
# programs the CLI starts (qemu-nbd, qemu-img, a passphrase command) need not inherit them.
SECRET_ENV = ("NBDBACKUP_PASSPHRASE", "NBDBACKUP_DEST_PASSPHRASE", "NBDBACKUP_NEW_PASSPHRASE")
_hidden: dict[str, str] = {}


def hide_from_children() -> None:
    """Move SECRET_ENV out of os.environ into this process's memory (the CLI does it at start;
    a second run in one process, as tests do, forgets what the first one was given)."""
    _hidden.clear()
    for name in SECRET_ENV:
        value = os.environ.pop(name, None)
        if value is not None:
            _hidden[name] = value


def env(name: str) -> str | None:
    """os.environ.get(*name*), or the value hide_from_children() took out of it."""
    return os.environ.get(name) or _hidden.get(name)
