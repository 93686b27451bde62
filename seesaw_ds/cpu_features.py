"""What this machine's CPU is: the one reader of ``/proc/cpuinfo``.

It owns the CPU's model name and its x86 feature flags, as the first processor's entry lists them. Callers
decide from the flags (which kernel build runs, whether bf16 is native, what a benchmark reports); where the
file or the field is missing (not Linux, or not x86: ARM lists ``Features``), nothing is claimed.
"""
from __future__ import annotations

from pathlib import Path

CPUINFO = Path("/proc/cpuinfo")


def first_processor(cpuinfo: Path = CPUINFO) -> dict[str, str]:
    """The first processor's ``key: value`` lines of ``cpuinfo`` (empty where it cannot be read)."""
    fields: dict[str, str] = {}
    try:
        text = cpuinfo.read_text()
    except OSError:
        return fields
    for line in text.splitlines():
        if not line.strip():
            if fields:
                break
            continue
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return fields


def cpu_flags(cpuinfo: Path = CPUINFO) -> set[str] | None:
    """The first CPU's x86 feature flags; None where ``cpuinfo`` is missing or has no ``flags`` line."""
    flags = first_processor(cpuinfo).get("flags")
    return None if flags is None else set(flags.split())


def cpu_model_name(cpuinfo: Path = CPUINFO) -> str | None:
    """The first CPU's ``model name`` (None where ``cpuinfo`` is missing or does not say)."""
    return first_processor(cpuinfo).get("model name")
