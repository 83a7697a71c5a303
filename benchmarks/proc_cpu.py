"""CPU time another process has used, to the nanosecond.

``/proc/<pid>/stat`` counts in clock ticks (10 ms): a level of 300 requests that costs SMG
0.5 ms each is 15 ticks, so its CPU per request moves by ±7 % on rounding alone. The process's
CPU-time clock (``clock_getcpuclockid``, all its threads, those that exited included) has no
such step; ``/proc`` stays the fallback where the clock cannot be read.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

TICK = os.sysconf("SC_CLK_TCK")


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far."""
    clock = ctypes.c_int()
    spec = _Timespec()
    if (_libc.clock_getcpuclockid(pid, ctypes.byref(clock)) == 0
            and _libc.clock_gettime(clock, ctypes.byref(spec)) == 0):
        return spec.tv_sec + spec.tv_nsec / 1e9
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime + stime, in ticks
