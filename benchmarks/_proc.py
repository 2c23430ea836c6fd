"""Memory figures of this process from /proc (Linux), shared by the benchmark scripts."""

from __future__ import annotations

import resource
import sys


def status_mib(field: str) -> float | None:
    """A ``/proc/self/status`` field such as ``VmRSS`` or ``VmHWM`` in MiB; None off Linux."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def peak_rss_mib() -> float:
    """This process's peak resident memory so far, in MiB."""
    hwm = status_mib("VmHWM")
    if hwm is not None:
        return hwm
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / (1 << 20) if sys.platform == "darwin" else peak / 1024


def reset_peak_rss() -> float:
    """Reset the peak-RSS mark if the OS allows it; return the baseline to subtract.

    On Linux, writing "5" to /proc/self/clear_refs resets VmHWM to the current RSS, so the
    baseline is the *current* RSS and transient peaks of the input set-up do not hide the
    measured code's own peak. Elsewhere fall back to ``ru_maxrss`` (high-water mark so far).
    """
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        rss = status_mib("VmRSS")
        if rss is not None:
            return rss
    except OSError:
        pass
    return peak_rss_mib()
