"""Memory figures of this process from /proc (Linux), shared by the benchmark scripts."""

from __future__ import annotations


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
