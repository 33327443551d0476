"""What a run costs: training images per second and peak memory, recorded in ``metrics.json`` so
an ablation table can set speed and memory beside accuracy."""

from __future__ import annotations

import os
import resource
import sys
import time

import torch


class ThroughputMeter:
    """Training images per second over the training steps only (validation excluded), for all
    ranks together."""

    def __init__(self) -> None:
        self.images = 0
        self.seconds = 0.0
        self._start: float | None = None

    def start(self) -> None:
        """Start timing an epoch's training loop."""
        self._start = time.perf_counter()

    def stop(self, images: int, device: torch.device) -> None:
        """Stop timing; ``images`` were trained on (all ranks) since :meth:`start`."""
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.images += images
        self._start = None

    @property
    def images_per_second(self) -> float | None:
        """Training images per second, or None before any training step."""
        return self.images / self.seconds if self.seconds > 0 and self.images else None


def _current_rss_mib() -> float | None:
    """This process's resident memory now (Linux), in MiB."""
    try:
        with open("/proc/self/statm") as f:
            pages = int(f.read().split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return pages * os.sysconf("SC_PAGE_SIZE") / 2**20


class PeakMemory:
    """Peak memory of training on ``device``: the CUDA allocator's peak on a GPU
    (``cuda_max_allocated``), else the largest resident set size sampled at every step
    (``host_rss``; ``getrusage``'s lifetime peak where ``/proc`` is missing)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.kind = "cuda_max_allocated" if device.type == "cuda" else "host_rss"
        self._peak = 0.0
        self._floor = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)

    def sample(self) -> None:
        """Record the memory in use now (host only: CUDA keeps its own peak)."""
        if self.device.type != "cuda":
            rss = _current_rss_mib()
            if rss is None:
                self.kind = "host_max_rss"
                scale = 2**20 if sys.platform == "darwin" else 2**10  # bytes vs KiB
                rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale / 2**20
            self._peak = max(self._peak, rss)

    def floor(self, mib: float) -> None:
        """Count ``mib`` as already reached (the peak of a run's epochs before a resume)."""
        self._floor = max(self._floor, mib)

    @property
    def peak_mib(self) -> float:
        """The peak so far, in MiB."""
        floor = self._floor
        if self.device.type == "cuda":
            return max(floor, torch.cuda.max_memory_allocated(self.device) / 2**20)
        return max(floor, self._peak)
