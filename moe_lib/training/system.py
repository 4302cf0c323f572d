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
import json
import platform
from pathlib import Path

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


# --------------------------------------------------------------------------- benchmark results
def benchmark_results_path() -> Path:
    from ..profiles import project_root

    return project_root() / "benchmarks" / "RESULTS.json"


def load_benchmark_results(path=None) -> dict:
    """The raw results of the last full ``benchmarks/bench_moe.py`` run (``RESULTS.json``)."""
    path = Path(path) if path else benchmark_results_path()
    if not path.is_file():
        raise FileNotFoundError(f"no benchmark results at {path}: run `python benchmarks/bench_moe.py` to create them")
    return json.loads(path.read_text())


def benchmark_layer_frame(results: dict):
    """The MoE-layer tables as one tidy DataFrame: ``shape, label, tokens, implementation, ms,
    gflops, pct_peak, vs_fast, peak_gflops`` (one row per shape, token count and implementation)."""
    import pandas as pd

    rows = []
    for entry in results.get("layer", []):
        for name, r in entry["rows"].items():
            rows.append({"shape": entry["shape"], "label": entry["label"], "tokens": entry["tokens"], "implementation": name,
                         "ms": r["ms"], "gflops": r["gflops"], "pct_peak": r["pct_peak"], "vs_fast": r["vs_fast"],
                         "peak_gflops": entry["peak_gflops"]})
    return pd.DataFrame(rows)


def benchmark_layer_summary(layer, tokens: int):
    """Per shape at ``tokens`` tokens: the fast path's ms, GFLOP/s and % of peak, and how many
    times slower each other implementation is (``x <name>`` = ``ms / fast ms``; > 1 means the fast path wins).

    The dense baseline is a different model, not a rival implementation, so its column says what it
    is: ``dense time / MoE fast-path time`` (below 1 when the dense layer is faster)."""
    import pandas as pd

    part = layer[layer.tokens == tokens]
    if part.empty:
        raise ValueError(f"no benchmark rows at {tokens} tokens; measured: {sorted(layer.tokens.unique())}")
    rows = []
    for shape, rows_ in part.groupby("shape", sort=False):
        by = rows_.set_index("implementation")
        fast = by.loc["moe_lib fast path"]
        row = {"shape": shape, "label": fast.label, "fast ms": fast.ms, "fast GFLOP/s": fast.gflops, "fast % of peak": fast.pct_peak}
        for name, r in by.iterrows():
            if name.startswith("dense"):
                row[f"{name}: dense time / MoE fast-path time"] = r.vs_fast
            elif name != "moe_lib fast path":
                row[f"x {name}"] = r.vs_fast
        rows.append(row)
    return pd.DataFrame(rows).set_index("shape")
