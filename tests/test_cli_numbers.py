"""Every numeric option of every command rejects inf, nan, 1e400, out-of-range values and
garbage with a usage error (exit 2) naming the option and the accepted range, never a
traceback (issue 10, item 10: `serve --cache-size inf` ended in an OverflowError).

The options are found in the real argparse parser, so a numeric option added later is
checked too: it must parse through nbdbackup.cli.numbers, or the discovery test fails.
"""

import argparse

import pytest

from helpers.support import nbdbackup
from nbdbackup.cli.main import build_parser, main
from nbdbackup.cli.numbers import NumberType
from nbdbackup.errors import ExitCode

# metavars that announce a number: an option showing one must have a numbers.* type
NUMERIC_METAVARS = {"N", "SIZE", "SECONDS", "PERCENT", "FRACTION", "BYTES", "COUNT", "MODE", "OCTAL"}


def _parsers():
    """(argv prefix, parser) for the top-level parser and every command's."""
    top = build_parser()
    yield [], top
    for action in top._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in sorted(action.choices.items()):
                yield [name], sub


def _numeric_options():
    """(command, option string, action) of every option that takes a number."""
    out = []
    for prefix, parser in _parsers():
        for a in parser._actions:
            if not a.option_strings or a.nargs == 0:
                continue
            numeric = (isinstance(a.type, NumberType) or a.type in (int, float)
                       or str(a.metavar).upper() in NUMERIC_METAVARS)
            if numeric:
                out.append((prefix, a.option_strings[-1], a))
    return out


OPTIONS = _numeric_options()


def test_every_numeric_option_uses_a_validator():
    loose = [f"{' '.join(p) or 'nbdbackup'} {opt} (type={a.type!r})" for p, opt, a in OPTIONS
             if not isinstance(a.type, NumberType)]
    assert not loose, f"numeric options that do not parse through nbdbackup.cli.numbers: {loose}"
    found = {(tuple(p), o) for p, o, _ in OPTIONS}
    for must in [((), "--lock-wait"), (("serve",), "--cache-size"), (("serve",), "--workers"),
                 (("serve",), "--max-connections"), (("full",), "--connections"), (("restore",), "--connections"),
                 (("init",), "--chunk-size"), (("init",), "--compression-level"), (("verify",), "--sample"),
                 (("prune",), "--keep-daily"), (("gc",), "--repack-threshold"), (("info",), "--timeout"),
                 (("full",), "--bitmap-granularity"), (("demo",), "--size")]:
        assert must in found, f"{must} not discovered as a numeric option"


def _bad_values(v: NumberType) -> list[str]:
    bad = ["inf", "-inf", "nan", "1e400", "garbage", "", "0x10", "1" * 5000]
    lo, hi = v.lo, v.hi
    if lo > -1:
        bad.append("-1")
    if v.kind == "octal":
        bad += [f"{v.hi + 1:o}", "8", "0o9"]
    elif v.kind == "integer":
        bad += [str(lo - 1), str(hi + 1), "1.5"]
    elif v.kind == "real":
        bad += [str(lo) if v.lo_open else str(lo - 0.5), str(hi * 2 + 1)]
    else:
        bad += [str(hi * 2), "99999999T"]
        if lo > 0:
            bad.append(str(lo - 1))
        if v.power_of_two:
            bad.append(str(lo + lo // 2))
    return bad


CASES = [pytest.param(prefix, opt, a, value, id=f"{'-'.join(prefix) or 'top'}{opt}={value[:12]}")
         for prefix, opt, a in OPTIONS if isinstance(a.type, NumberType) for value in _bad_values(a.type)]


@pytest.mark.parametrize("prefix,opt,action,value", CASES)
def test_bad_numeric_value_is_a_usage_error(prefix, opt, action, value, capsys):
    argv = [*prefix, f"{opt}={value}"] if prefix else [f"{opt}={value}", "list"]
    with pytest.raises(SystemExit) as ei:
        main(argv)
    err = capsys.readouterr().err
    assert ei.value.code == ExitCode.USAGE, err
    assert f"argument {opt}: invalid" in err, err
    assert action.type.accepted() in err, err
    assert "Traceback" not in err


@pytest.mark.parametrize("prefix,opt,action", [pytest.param(p, o, a, id=f"{'-'.join(p) or 'top'}{o}")
                                               for p, o, a in OPTIONS if isinstance(a.type, NumberType)])
def test_numeric_option_accepts_its_range(prefix, opt, action):
    v = action.type
    assert v(v._show(v.hi) if v.kind == "octal" else str(v.hi)) == v.hi
    if v.lo_open:
        assert v(str(v.hi / 2)) == v.hi / 2
    else:
        assert v(str(v.lo)) == v.lo


def test_sizes_suffixes_and_modes():
    from nbdbackup.cli.numbers import octal, real, size

    assert size(0, 1 << 40)("1.5G") == 3 << 29
    assert size(0, 1 << 40)("256KiB") == 256 << 10
    assert real(0, 100, lo_open=True, suffix="%")("10%") == 10.0
    with pytest.raises(argparse.ArgumentTypeError):
        size(0, 1 << 40)("0.5")       # not a whole number of bytes
    assert octal()("0660") == octal()("660") == octal()("0o660") == 0o660
    for bad in ("0800", "1000", "-1", "rw"):
        with pytest.raises(argparse.ArgumentTypeError, match="must be 0 or more and at most 777"):
            octal()(bad)


@pytest.mark.parametrize("args", [("serve", "--cache-size", "inf"), ("serve", "--workers", "1e400"),
                                  ("--lock-wait", "inf", "list")])
def test_cli_reports_bad_numbers_without_traceback(tmp_path, args):
    # the reported case, end to end through the installed console script
    p = nbdbackup("--repo", tmp_path, *args, check=False, timeout=60)
    assert p.returncode == ExitCode.USAGE, p.stderr
    opt = next(a for a in args if a.startswith("--"))
    assert f"argument {opt}: invalid" in p.stderr and "Traceback" not in p.stderr, p.stderr
