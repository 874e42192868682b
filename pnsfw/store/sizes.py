"""Human sizes ("16G", "512M", "1.5k") and durations ("90s", "5m") parsed in one place."""

import re

_SIZE_UNITS = {"": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12,
               "ki": 2**10, "mi": 2**20, "gi": 2**30, "ti": 2**40}
_TIME_UNITS = {"": 1.0, "s": 1.0, "m": 60.0, "h": 3600.0}
_PATTERN = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*?)\s*[bB]?\s*$")


def _split(text: str) -> tuple[float, str]:
    match = _PATTERN.match(str(text))
    if not match:
        raise ValueError(f"not a size: {text!r}")
    return float(match.group(1)), match.group(2).lower()


def parse_size(text: "str | int") -> int:
    """Parse "16G", "512MiB", "100k" or a plain number into a count (bytes, rows)."""
    if isinstance(text, int):
        return text
    value, unit = _split(text)
    if unit not in _SIZE_UNITS:
        raise ValueError(f"unknown size unit in {text!r} (use k, M, G, T, Ki, Mi, Gi)")
    return int(value * _SIZE_UNITS[unit])


def parse_duration(text: "str | float") -> float:
    """Parse "90", "90s", "5m" or "1h" into seconds."""
    if isinstance(text, (int, float)):
        return float(text)
    match = re.match(r"^\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*$", str(text).lower())
    if not match:
        raise ValueError(f"not a duration: {text!r} (use e.g. 90s, 5m, 1h)")
    return float(match.group(1)) * _TIME_UNITS[match.group(2)]
