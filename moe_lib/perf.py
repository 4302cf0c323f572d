"""CPU speed settings that live outside the model code.

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
import platform

_M_TRIM_THRESHOLD = -1  # glibc mallopt parameter numbers (malloc.h)
_M_MMAP_THRESHOLD = -3
_GLIBC_DEFAULT = 128 * 1024
_KEEP = 2**31 - 1  # mallopt takes an int: about 2 GiB, far above any activation we allocate

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
    value = _KEEP if enable else _GLIBC_DEFAULT
    ok = bool(libc.mallopt(_M_MMAP_THRESHOLD, value)) and bool(libc.mallopt(_M_TRIM_THRESHOLD, value))
    _state["tuned"] = enable and ok
    if not enable:
        libc.malloc_trim(0)
    return ok


def cpu_allocator_tuned() -> bool:
    """Whether :func:`configure_cpu_allocator` is in effect in this process."""
    return _state["tuned"]
