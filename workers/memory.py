"""Peak anonymous memory (RssAnon: heap, not memory-mapped files) of this process during a task."""

from __future__ import annotations

import ctypes
import threading

STATUS = "/proc/self/status"


def rss_anon_bytes() -> int | None:
    """Current RssAnon of this process, or None where /proc is not available."""
    try:
        with open(STATUS) as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class PeakAnonMemory:
    """Samples RssAnon every ``interval`` seconds while open; ``start`` holds the value on entry
    (the process before the task's data), ``peak`` the largest value."""

    def __init__(self, interval: float = 0.02):
        self.interval = interval
        self.start = self.peak = rss_anon_bytes()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(self.interval):
            now = rss_anon_bytes()
            if now is not None and (self.peak is None or now > self.peak):
                self.peak = now

    def __enter__(self) -> "PeakAnonMemory":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        now = rss_anon_bytes()
        if now is not None and (self.peak is None or now > self.peak):
            self.peak = now


def release_free_memory() -> None:
    """Give the C heap's free pages back to the OS (glibc ``malloc_trim``), so that what one task
    freed does not count against the next task in the same worker process; a no-op elsewhere."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
