"""This process's resident memory as the kernel counts it (``/proc/self/status``), and resetting its peak.

Shared by the memory benches (the 405B simulation, the export and the shard-memory benches), so that
every figure reads the same fields the same way.
"""

from __future__ import annotations

import resource

#: the ``/proc/self/status`` fields :func:`proc_memory` reads
STATUS_KEYS = ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem")


def proc_memory() -> dict[str, int]:
    """This process's VmRSS, VmHWM, RssAnon, RssFile and RssShmem in bytes (Linux; those it has)."""
    out = {}
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            key, _, value = line.partition(":")
            if key in STATUS_KEYS:
                out[key] = int(value.split()[0]) * 1024  # kB
    return out


def reset_peak() -> bool:
    """Reset VmHWM to the current RSS; False where the kernel refuses (peaks then count from start)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_mb() -> float:
    """This process's peak RSS in MB: ``VmHWM`` of ``/proc/self/status``.

    Not ``getrusage(RUSAGE_SELF).ru_maxrss``: Linux carries that high-water mark across ``fork`` +
    ``execve``, so a process started by a parent that holds torch (~230 MB) reports at least the
    parent's peak. ``VmHWM`` belongs to the address space ``execve`` created. ``ru_maxrss`` is the
    fallback where ``/proc`` is missing.
    """
    try:
        peak = proc_memory().get("VmHWM")
    except OSError:
        peak = None
    if peak is not None:
        return peak / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
