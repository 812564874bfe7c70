"""argparse `type=` validators for every numeric option.

Each numeric option of every command parses through one of these, so a bad
value (inf, nan, 1e400, a negative count, garbage, an absurd size) is a usage
error, exit 2, that names the option (argparse prefixes "argument --x:") and
the accepted range, never a traceback. tests/test_cli_numbers.py finds every
numeric option in the parser and checks that it uses one of these.

    p.add_argument("--workers", type=numbers.integer(1, 256), ...)

A validator's bounds may be a zero-argument callable, resolved on first use, so
that a command module can name a limit of the heavy repo package without
importing it at start-up.
"""

from __future__ import annotations

import argparse
import math
import re

_INTEGER = re.compile(r"[+-]?\d{1,30}")
_REAL = re.compile(r"[+-]?(\d{1,30}(\.\d{0,30})?|\.\d{1,30})")   # no exponent: 1e400 is no one's timeout
_OCTAL = re.compile(r"(0o?)?[0-7]{1,6}", re.IGNORECASE)


class NumberType:
    """A numeric option's parser: text -> number within [lo, hi] (lo excluded when lo_open)."""

    def __init__(self, kind: str, lo, hi, *, lo_open: bool = False, unit: str = "", noun: str | None = None,
                 power_of_two: bool = False, suffix: str = "", hint: str | None = None):
        self.kind = kind                # "integer", "real", "size" or "octal"
        self._lo, self._hi = lo, hi
        self.lo_open = lo_open
        self.unit = unit
        self.noun = noun or {"integer": "whole number", "real": "number", "size": "size",
                             "octal": "octal number"}[kind]
        self.power_of_two = power_of_two
        self.suffix = suffix            # accepted after the number (verify's "10%")
        self.hint = hint                # printed under the error, as the CLI prints other hints
        self.__name__ = self.noun       # argparse names the type by it in some messages

    @property
    def lo(self):
        return self._lo() if callable(self._lo) else self._lo

    @property
    def hi(self):
        return self._hi() if callable(self._hi) else self._hi

    def accepted(self) -> str:
        """The accepted range in words (the second half of every error message)."""
        hi = f"{self._show(self.hi)}{' ' + self.unit if self.unit else ''}"
        if self.power_of_two:
            return f"must be a power of two from {self._show(self.lo)} to {hi}"
        if self.lo_open and self.lo == 0 or self.kind == "size" and self.lo == 1:
            text = f"must be positive and at most {hi}"
        elif self.lo == 0:
            text = f"must be 0 or more and at most {hi}"
        elif self.kind == "size":
            text = f"must be at least {self._show(self.lo)} and at most {hi}"
        else:
            text = f"must be between {self._show(self.lo)} and {hi}"
        return text

    def _show(self, n) -> str:
        if self.kind == "octal":
            return f"{n:o}"
        if self.kind == "size":
            for shift, unit in ((40, "T"), (30, "G"), (20, "M"), (10, "K")):
                if n >= 1 << shift and n % (1 << shift) == 0:
                    return f"{n >> shift}{unit}"
        return f"{n:g}" if isinstance(n, float) else str(n)

    def __call__(self, text: str):
        value = self._parse(str(text).strip().removesuffix(self.suffix).strip())
        if value is None:
            raise self._invalid(text)
        lo, hi = self.lo, self.hi
        below = value <= lo if self.lo_open else value < lo
        if below or value > hi or self.power_of_two and value & (value - 1):
            raise self._invalid(text)
        return value

    def _invalid(self, text: str) -> argparse.ArgumentTypeError:
        hint = f"\n  hint: {self.hint}" if self.hint else ""
        return argparse.ArgumentTypeError(f"invalid {self.noun} {text!r}: {self.accepted()}{hint}")

    def _parse(self, text: str):
        if self.kind == "size":
            from ..errors import UsageError
            from ..repo.config import parse_size  # here: the repo package is heavy for --help

            try:
                return parse_size(text, allow_zero=True)
            except UsageError:
                return None
        if self.kind == "octal":
            return int(text.lower().removeprefix("0o") or "0", 8) if _OCTAL.fullmatch(text) else None
        pattern = _INTEGER if self.kind == "integer" else _REAL
        if not pattern.fullmatch(text):
            return None
        value = int(text) if self.kind == "integer" else float(text)
        return value if math.isfinite(value) else None


def integer(lo, hi, *, unit: str = "", noun: str | None = None) -> NumberType:
    return NumberType("integer", lo, hi, unit=unit, noun=noun)


def real(lo, hi, *, lo_open: bool = False, unit: str = "", noun: str | None = None,
         suffix: str = "") -> NumberType:
    return NumberType("real", lo, hi, lo_open=lo_open, unit=unit, noun=noun, suffix=suffix)


def seconds(hi: float, *, positive: bool = False) -> NumberType:
    """A duration: 0 (or, with positive, more than 0) to *hi* seconds."""
    return NumberType("real", 0, hi, lo_open=positive, unit="seconds", noun="number of seconds")


def octal(lo: int = 0, hi: int = 0o777, *, noun: str | None = None, hint: str | None = None) -> NumberType:
    """A file mode such as 0660 or 660 (octal digits only)."""
    return NumberType("octal", lo, hi, noun=noun, hint=hint)


def size(lo, hi, *, power_of_two: bool = False, noun: str | None = None) -> NumberType:
    """A byte count in the size syntax of repo.config.parse_size (1M, 256K, 1.5G, 1048576)."""
    return NumberType("size", lo, hi, power_of_two=power_of_two, noun=noun)


DAY = 86400.0
