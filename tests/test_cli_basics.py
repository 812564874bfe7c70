"""The CLI shell: help, exit-code table, common options, packaging."""

import re
import subprocess
import sys
import zipfile
from pathlib import Path

from helpers.support import nbdbackup, run
from nbdbackup.errors import EXIT_CODE_HELP, ExitCode

ROOT = Path(__file__).resolve().parent.parent


def test_help_lists_commands_and_exit_codes():
    out = nbdbackup("--help").stdout
    for cmd in ("full", "incremental", "restore", "list", "serve", "init", "verify", "prune", "gc", "demo"):
        assert re.search(rf"^\s+{cmd}\s", out, re.M), f"{cmd} missing from --help"
    for code in ExitCode:
        assert re.search(rf"^\s+{int(code)}\s+{re.escape(EXIT_CODE_HELP[code])}$", out, re.M)


def test_readme_exit_code_table_matches_code():
    readme = (ROOT / "README.md").read_text()
    rows = dict(re.findall(r"^\| (\d+) \| (.+?) \|$", readme, re.M))
    assert {int(k) for k in rows} == {int(c) for c in ExitCode}
    for code in ExitCode:
        assert rows[str(int(code))].replace("`", "") == EXIT_CODE_HELP[code].replace("`", "")


def test_only_the_command_run_gets_its_parser_built():
    from nbdbackup.cli.main import build_parser, command_named

    assert command_named(["--repo", "restore", "-q", "rebuild-index", "--keep-damaged", "2"]) == "rebuild_index"
    assert command_named(["--lock-wait", "5", "restore", "--help"]) == "restore"
    for unsure in ([], ["--help", "restore"], ["-q", "-h"], ["--version"], ["--lock-wait", "x", "list"],
                   ["--repo"], ["--he", "restore"], ["-qh", "restore"], ["--repo", "R", "--hel", "key", "export", "F"],
                   ["--vers", "list"], ["rebuild_index"], ["--", "restore", "B", "T"]):
        assert command_named(unsure) is None, unsure
    assert command_named(["--re", "r", "list"]) == "list"       # abbreviated, as the whole parser takes it
    one = build_parser("rebuild_index")
    args = one.parse_args(["--repo", "r", "rebuild-index", "--keep-damaged", "2", "--json"])
    assert (args.command, args.repo, args.keep_damaged, args.json) == ("rebuild-index", "r", 2, True)
    # a word naming no command: every command's parser, so the error lists the choices
    p = nbdbackup("--repo", "r", "lis", check=False)
    assert p.returncode == ExitCode.USAGE and "invalid choice: 'lis'" in p.stderr and "'restore'" in p.stderr
    p = nbdbackup("--repo", "r", "rebuild_index", check=False)       # a module's name, not a command's
    assert p.returncode == ExitCode.USAGE and "'restore'" in p.stderr and "'rebuild-index'" in p.stderr
    p = nbdbackup("--he", "restore")                                   # abbreviated help: every command listed
    assert "rebuild-index" in p.stdout and "serve" in p.stdout


def test_no_command_is_usage_error():
    p = nbdbackup(check=False)
    assert p.returncode == ExitCode.USAGE


def test_unknown_option_is_usage_error():
    p = nbdbackup("list", "--no-such-option", check=False)
    assert p.returncode == ExitCode.USAGE
    assert "Traceback" not in p.stderr


def test_common_options_after_subcommand(tmp_path):
    # --repo after the command works the same as before it
    repo = tmp_path / "r"
    nbdbackup("init", "--repo", repo)
    a = nbdbackup("list", "--repo", repo, "--json").stdout
    b = nbdbackup("--repo", repo, "--json", "list").stdout
    assert a == b


def test_missing_repository_option(tmp_path):
    p = nbdbackup("list", check=False, cwd=tmp_path)
    assert p.returncode == ExitCode.USAGE
    assert "NBDBACKUP_REPO" in p.stderr


def test_not_a_repository(tmp_path):
    p = nbdbackup("list", "--repo", tmp_path, check=False)
    assert p.returncode == ExitCode.NOT_A_REPOSITORY
    assert "Traceback" not in p.stderr


def test_plain_wheel_ships_migrations_and_works(tmp_path):
    """A non-editable install must carry the Alembic scripts and run `init`."""
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
         "-w", str(tmp_path / "wheels"), str(ROOT)], timeout=300)
    wheel = next((tmp_path / "wheels").glob("nbdbackup-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert "nbdbackup/_migrations/env.py" in names
    assert any(n.startswith("nbdbackup/_migrations/versions/") and n.endswith(".py") for n in names)
    target = tmp_path / "site"
    run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--target", str(target), str(wheel)],
        timeout=300)
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(target)}
    # run from an unrelated directory so the source tree cannot be imported
    p = subprocess.run([sys.executable, "-c", "from nbdbackup.cli.main import run; run()",
                        "init", "--repo", str(tmp_path / "repo")],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    probe = subprocess.run([sys.executable, "-c", "import nbdbackup; print(nbdbackup.__file__)"],
                           cwd=tmp_path, env=env, capture_output=True, text=True)
    assert probe.stdout.startswith(str(target)), probe.stdout


def test_interrupt_wrapped_by_python_is_still_an_interrupt(monkeypatch, capsys):
    """A SIGTERM that lands inside an import reaches main as a RuntimeError
    (Python wraps exceptions raised from __set_name__); it is still exit 130."""
    from nbdbackup.cli import main as cli_main
    from nbdbackup.cli.commands import list as list_cmd

    def interrupted_inside_class_body(args):
        class Field:
            def __set_name__(self, owner, name):
                raise cli_main.Interrupted()

        class Export:  # noqa: F841  (the class body is what raises)
            contexts = Field()

    monkeypatch.setattr(list_cmd, "run", interrupted_inside_class_body)
    assert cli_main.main(["list", "--repo", "/nonexistent"]) == ExitCode.INTERRUPTED
    err = capsys.readouterr().err
    assert "interrupted" in err and "internal error" not in err

    def plain_bug(args):
        raise RuntimeError("a real bug")

    monkeypatch.setattr(list_cmd, "run", plain_bug)
    assert cli_main.main(["list", "--repo", "/nonexistent"]) == ExitCode.FAILURE
    assert "internal error" in capsys.readouterr().err


def _readme_setup_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Set up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```sh\n(.+?)\n```", section, re.S)


def test_readme_has_two_setup_commands_that_need_no_sudo():
    install, tests = _readme_setup_commands()
    assert not install.lstrip().startswith("sudo"), "a root-only Debian 12 has no sudo"
    assert "$S apt-get install" in install and install.startswith("S=$(command -v sudo);")
    assert tests == ".venv/bin/pytest -q tests"
    # what .ci/run installs, the README's command installs too
    ci = (ROOT / ".ci" / "run").read_text()
    ci_block = re.search(r"apt-get install -y --no-install-recommends \\\n(.+?)\n\n", ci, re.S).group(1)
    continued = ci_block.splitlines()[:-1]
    assert all(line.endswith(" \\") for line in continued), f".ci/run: a package line lost its backslash: {ci_block}"
    ci_pkgs = set(ci_block.replace("\\", " ").split())
    readme_pkgs = set(install.split("apt-get install -y", 1)[1].split("&&", 1)[0].split())
    assert ci_pkgs <= readme_pkgs, f"README's install misses {sorted(ci_pkgs - readme_pkgs)}"
    assert ".venv/bin/pytest -q tests" in ci
    # the optional clients the README and CI install are extras the package really has
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    for name in ("s3", "postgresql", "libvirt"):
        assert name in extras, f"no extra {name!r} in pyproject.toml"
    assert "'.[test,s3,postgresql,libvirt]'" in install and "'.[test,s3,postgresql,libvirt]'" in ci
    # libvirt-python builds from source against Debian's libvirt
    assert {"libvirt-dev", "pkg-config", "gcc"} <= readme_pkgs


def test_readme_install_prefix_runs_without_sudo(tmp_path):
    # the prefix as a root-only machine runs it: no sudo anywhere on PATH
    install = _readme_setup_commands()[0]
    prefix = install.split(";", 1)[0]
    p = run(["/bin/bash", "-c", f'{prefix}; printf "[%s]" "$S"'], env={"PATH": str(tmp_path)})
    assert p.stdout == "[]"


def test_cycle_collection_is_off_during_start_up_only():
    # run() turns the collector off for START_UP_S (imports); a long command must get it back
    code = ("import gc, sys, time\n"
            "import nbdbackup.cli.main as m\n"
            "m.START_UP_S = 0.3\n"
            "m._exit = lambda rc: None\n"
            "sys.argv = ['nbdbackup']\n"
            "m.run()\n"
            "during = gc.isenabled()\n"
            "time.sleep(1.0)\n"
            "print(during, gc.isenabled())\n")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["False", "True"]
