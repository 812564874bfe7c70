"""The example crontab, systemd units and scripts use options the CLI really has."""

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from nbdbackup.cli.main import build_parser

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _commands():
    for name in ("crontab", "nbdbackup-incremental.service", "nbdbackup-full.service"):
        for line in (EXAMPLES / name).read_text().splitlines():
            line = re.sub(r"^(ExecStart(Post)?=|[\d*,/-]+\s+[\d*,/-]+\s+[\d*,/-]+\s+[\d*,/-]+\s+[\d*,/-]+\s+)", "",
                          line.strip())
            if line.startswith("#") or "nbdbackup " not in line or "=" in line.split()[0]:
                continue
            for part in line.split("&&"):
                words = shlex.split(part)
                i = next(i for i, w in enumerate(words) if w.endswith("nbdbackup"))
                yield name, words[i + 1:]


def test_example_commands_parse():
    cmds = list(_commands())
    assert len(cmds) >= 5
    parser = build_parser()
    for name, argv in cmds:
        try:
            args = parser.parse_args(argv)
        except SystemExit:
            pytest.fail(f"{name}: `nbdbackup {' '.join(argv)}` does not parse")
        assert args.command in ("full", "incremental", "prune", "gc"), (name, argv)


def test_libvirt_script_is_valid_shell():
    subprocess.run(["sh", "-n", str(EXAMPLES / "libvirt-pull-backup.sh")], check=True)
    text = (EXAMPLES / "libvirt-pull-backup.sh").read_text()
    assert "<domainbackup mode='pull'>" in text and "transport='unix'" in text
    assert "--bitmap \"backup-$TARGET\"" in text and "domjobabort" in text
