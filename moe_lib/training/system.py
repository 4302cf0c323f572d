"""The machine a run trains on: its device, the CPU allocator, and the run's peak memory.

:func:`resolve_device` picks the device; :class:`PeakMemory` measures a run's peak memory.

:func:`configure_cpu_allocator` is the single largest speed-up this project measured on CPU
(``benchmarks/RESULTS.md``): it stops the C library from handing every large freed tensor
back to the operating system.

Why it matters. glibc's ``malloc`` serves every request above its *mmap threshold* (128 KiB
at first, adapting up to at most 32 MiB) with a fresh ``mmap`` and returns it with
``munmap`` when freed. A training step allocates and frees the same large activations and
gradients every step, so every step touches brand-new pages: one page fault plus zeroing
per 4 KiB, on first touch. On the 2-core benchmark machine an elementwise op on a 50 MB
tensor took 11 ms that way and 2-3 ms once the memory was recycled; in a virtual machine
that reports freed pages to its host the fault is dearer still. Raising the mmap threshold
and the trim threshold makes ``malloc`` keep freed blocks in the process heap and reuse
them, which is what PyTorch's CUDA caching allocator does on the GPU.

Cost: the process keeps its peak heap size until it exits (memory is reused, not returned).
"""

from __future__ import annotations

import ctypes
import gc
import platform
import re
from dataclasses import dataclass
from pathlib import Path

import torch

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_GLIBC_DEFAULT = 128 * 1024
_KEEP = 2**31 - 1  # mallopt takes an int: about 2 GiB, far above any activation we allocate
_NEVER_TRIM = -1

_state = {"tuned": False}


def _libc():
    if platform.system() != "Linux":
        return None
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.gnu_get_libc_version  # glibc only (musl has no working mallopt)
        return libc
    except (OSError, AttributeError):
        return None


def configure_cpu_allocator(enable: bool = True) -> bool:
    """Recycle freed tensor memory inside the process (glibc only). Returns whether it applied.

    ``enable=False`` restores glibc's default thresholds (for before/after measurements).
    A no-op returning ``False`` on macOS, Windows or a non-glibc Linux.
    """
    libc = _libc()
    if libc is None:
        return False
    mmap_threshold = _KEEP if enable else _GLIBC_DEFAULT
    # -1 disables trimming completely (mallopt(3)); a finite threshold still hands back the top of
    # the heap whenever more than that is free there, which a large model's step exceeds
    trim_threshold = _NEVER_TRIM if enable else _GLIBC_DEFAULT
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, mmap_threshold)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, trim_threshold))
    _state["tuned"] = enable and ok
    if not enable:
        libc.malloc_trim(0)
    return ok


def release_free_heap() -> bool:
    """Hand the heap's free memory back to the operating system now (glibc ``malloc_trim(0)``).

    With :func:`configure_cpu_allocator` in effect freed memory otherwise stays resident until
    the process exits; a per-run memory peak starts from here. Returns whether it applied.
    """
    libc = _libc()
    return libc is not None and bool(libc.malloc_trim(0))


def cpu_allocator_tuned() -> bool:
    """Whether :func:`configure_cpu_allocator` is in effect in this process."""
    return _state["tuned"]


# --------------------------------------------------------------------------- device


def resolve_device(requested: str = "auto") -> torch.device:
    """``auto`` picks CUDA, then MPS, then CPU; an explicit choice must be available."""
    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' was requested but CUDA is not available; valid here: 'cpu' or 'auto'")
    if requested == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError("device='mps' was requested but MPS is not available; valid here: 'cpu' or 'auto'")
    return torch.device(requested)


# --------------------------------------------------------------------------- peak memory of one run

PEAK_CUDA = "cuda max_memory_allocated"
PEAK_RSS = "process peak RSS"
PEAK_NONE = "not measured"


@dataclass
class PeakMemory:
    """A run's peak memory, reset when the run starts (:meth:`start`) and read when it ends (:meth:`gb`).

    ``measure`` says what the number is:

    * CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, the peak of
      tensor memory (the original studies' ``peak_memory_gb``).
    * CPU on Linux: the process's peak resident set size ``VmHWM`` after resetting it to the
      current RSS (``5 > /proc/self/clear_refs``), once the heap has handed its free memory back
      (:func:`release_free_heap`; a previous run's freed tensors would stay resident
      otherwise). Everything resident counts, interpreter, libraries and data included: the
      memory this run needed the machine to have. (The lifetime ``ru_maxrss`` cannot be reset,
      so within a grid it would only ever rise.)
    * elsewhere (macOS, Windows, MPS): NaN; no per-run peak is available there.
    """

    device: torch.device
    measure: str

    @classmethod
    def start(cls, device: torch.device) -> PeakMemory:
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            return cls(device, PEAK_CUDA)
        if device.type == "cpu" and _reset_peak_rss():
            return cls(device, PEAK_RSS)
        return cls(device, PEAK_NONE)

    def gb(self) -> float:
        if self.measure == PEAK_CUDA:
            return torch.cuda.max_memory_allocated(self.device) / 1e9
        if self.measure == PEAK_RSS:
            return _peak_rss_kib() * 1024 / 1e9
        return float("nan")


def _reset_peak_rss() -> bool:
    """Reset Linux's ``VmHWM`` to the current RSS, after trimming the heap. Whether it worked."""
    gc.collect()  # a finished run's tensors in reference cycles
    release_free_heap()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return _peak_rss_kib() > 0
    except (OSError, ValueError):
        return False


def _peak_rss_kib() -> int:
    match = re.search(r"^VmHWM:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    if match is None:
        raise ValueError("/proc/self/status has no VmHWM line")
    return int(match.group(1))
