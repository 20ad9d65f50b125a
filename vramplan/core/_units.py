"""Byte sizes: the only place that parses or formats memory amounts.

Bytes are ints everywhere else. "GB" is 10**9 bytes and "GiB" is 2**30: a card sold as
"48GB" (RTX A6000, L40S) really has about 48 GiB, which is why the GPU catalog stores the
size NVML reports and a bare "48GB" here means 48 * 10**9 bytes.
"""
from __future__ import annotations

import re

from vramplan.core._errors import UsageError

_DECIMAL = {"": 1, "b": 1, "k": 10**3, "kb": 10**3, "m": 10**6, "mb": 10**6,
            "g": 10**9, "gb": 10**9, "t": 10**12, "tb": 10**12}
_BINARY = {"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}
_UNITS = {**_DECIMAL, **_BINARY}
_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*$")

GiB = 2**30
MiB = 2**20


def parse_size(text: str, flag: str = "--gpu") -> int:
    """'48GB' -> 48_000_000_000, '24GiB' -> 25_769_803_776, '80G' -> 80 * 10**9 (SI, like GB).

    Raises UsageError for anything that is not a positive amount with a known unit; its hint
    shows `flag`, the option the size was given to.
    """
    match = _SIZE.match(str(text))
    if not match:
        raise UsageError(f"cannot read {text!r} as a memory size",
                         hint="write a number and a unit, e.g. 48GB, 24GiB or 80G")
    number, unit = match.groups()
    factor = _UNITS.get(unit.lower())
    if factor is None:
        raise UsageError(f"unknown unit {unit!r} in {text!r}",
                         hint="use B, KB/MB/GB/TB (powers of 1000) or KiB/MiB/GiB/TiB (powers of 1024)")
    value = round(float(number) * factor)
    if value <= 0:
        raise UsageError(f"memory size {text!r} must be positive", hint=f"e.g. {flag} 24GB")
    return value


def format_amount(n: int | None, unit: str = "GiB", digits: int = 3, signed: bool = False,
                  missing: str = "—") -> str:
    """Bytes as a bare number in `unit`, for a table column whose header names the unit (one unit
    per column); `missing` for None."""
    if n is None:
        return missing
    scale = _UNITS.get(unit.lower()) if isinstance(unit, str) else None
    if scale is None:
        raise UsageError(f"unknown unit {unit!r}", hint="B, KB, MB, GB, TB (powers of 1000) or KiB, MiB, GiB, TiB (of 1024)")
    if isinstance(n, bool) or not isinstance(n, (int, float)):
        raise UsageError(f"bytes must be a number, got {n!r}", hint="e.g. format_bytes(48 * 10**9, 'GB')")
    return f"{n / scale:{'+' if signed else ''},.{digits}f}"


def format_bytes(n: int, unit: str = "GiB", digits: int = 2) -> str:
    """Render bytes for people; the unit is always printed, so GiB never masquerades as GB."""
    return f"{format_amount(n, unit, digits)} {unit}"


def format_signed(n: int, unit: str = "GiB", digits: int = 2) -> str:
    sign = "+" if n >= 0 else "-"
    return sign + format_bytes(abs(n), unit, digits)


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple
